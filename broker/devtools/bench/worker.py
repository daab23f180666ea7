"""A benchmark client process: ``python -m broker.devtools.bench.worker '{"state_dir": ..., "namespace": ...}'``.

Separate processes, because the clients of a lab broker are separate
processes (notebooks, CI jobs), and one Python process cannot drive many Ray
clients at once. It connects to Ray once, then serves runs
(:mod:`broker.devtools.bench.together`): for each spec on stdin it sets up
and warms up, says it is ready, starts at the common ``start_at`` it is sent
(with ``until``, for a spec with ``duration_s``), and answers. Modes:

``target`` says how a worker reaches the lock: ``shim`` (``BrokerClient``),
``direct`` (a plain Ray call on ``resource:<key>``), ``broker`` (a plain Ray
call on the coordinator), ``group`` (``reserve_group`` on the coordinator with
the spec's ``labels`` or ``keys``), or ``lock`` (the minimal lock actor
baseline), each in the spec's ``namespace``.

* ``handoff``: acquire (waiting) and release ``rounds`` times; answers
  ``{"grants": [[t_grant, t_release], ...], "keys": [[key, ...], ...]}``
  (the keys each grant got).
* ``cycles``: reserve (no wait) + release on its own key until ``until``;
  answers ``{"cycles": n}``.
* ``gated``: run zero-CPU tasks that each need one unit of a custom
  resource, one after another, until ``until`` (Ray's own gating);
  answers ``{"cycles": n}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from broker.devtools.bench.together import serve


def _acquire_release(spec: dict[str, Any]) -> tuple[Any, Any]:
    import ray

    target = spec["target"]
    namespace = spec["namespace"]
    holder = f"bench-{uuid.uuid4().hex[:6]}"
    wait = spec.get("mode", "handoff") == "handoff"
    if target == "lock":
        lock = ray.get_actor(spec["actor"], namespace=namespace)
        return (lambda: ray.get(lock.acquire.remote())), (lambda _: ray.get(lock.release.remote()))
    if target == "shim":
        from broker.client import BrokerClient

        client = BrokerClient(namespace)
        return (
            lambda: client.reserve(spec["key"], holder, wait=wait),
            lambda lease: client.release(lease.lease_id),
        )
    if target == "direct":
        actor = ray.get_actor(f"resource:{spec['key']}", namespace=namespace)
        reserve: Callable[[], Any] = lambda: ray.get(  # noqa: E731
            actor.reserve.remote(holder, wait=wait, request_id=uuid.uuid4().hex)
        )
        return reserve, (lambda lease: ray.get(actor.release.remote(lease.lease_id)))
    broker = ray.get_actor("broker", namespace=namespace)
    if target == "group":
        ask = {"keys": spec["keys"]} if spec.get("keys") else {"labels": spec["labels"]}
        reserve = lambda: ray.get(  # noqa: E731
            broker.reserve_group.remote(holder, wait=wait, request_id=uuid.uuid4().hex, **ask)
        )
        return reserve, (lambda lease: ray.get(broker.release.remote(lease.lease_id)))
    reserve = lambda: ray.get(broker.reserve.remote(spec["key"], holder, wait=wait, request_id=uuid.uuid4().hex))  # noqa: E731
    return reserve, (lambda lease: ray.get(broker.release.remote(lease.lease_id)))


def _gated(spec: dict[str, Any], start: Callable[[], None]) -> int:
    import ray

    @ray.remote(num_cpus=0, resources={spec["gate"]: 1})
    def use_the_board() -> None:
        return None

    ray.get(use_the_board.remote())  # warm: a worker process exists
    start()
    count = 0
    while time.time() < spec["until"]:
        ray.get(use_the_board.remote())
        count += 1
    return count


def run(spec: dict[str, Any], start: Callable[[], None]) -> dict[str, Any]:
    """One run of ``spec``: set up and warm up, ``start()`` with the others, measure; returns the answer."""
    mode = spec.get("mode", "handoff")
    if mode == "gated":
        return {"cycles": _gated(spec, start)}
    acquire, release = _acquire_release(spec)
    if mode == "cycles":
        release(acquire())  # warm
        start()
        count = 0
        while time.time() < spec["until"]:
            release(acquire())
            count += 1
        return {"cycles": count}
    grants: list[tuple[float, float]] = []
    keys: list[list[str]] = []
    start()
    deadline = time.time() + spec.get("max_s", 120.0)
    while len(grants) < spec["rounds"] and time.time() < deadline:
        token = acquire()
        granted = time.time()
        released = time.time()
        release(token)
        grants.append((granted, released))
        keys.append(_keys_of(token, spec))
    return {"grants": grants, "keys": keys}


def main(raw: str) -> None:
    """Connect once (``raw``: the state dir and namespace), then serve runs from stdin until it ends."""
    from broker.disk.store import StateDir
    from broker.seam.cluster import connect_ray

    where = json.loads(raw)
    connect_ray(StateDir.from_env(where["state_dir"]), namespace=where["namespace"])
    serve(run)


def _keys_of(token: Any, spec: dict[str, Any]) -> list[str]:
    """The keys a grant got: a group lease's members, a lease's key, or the spec's key (the lock)."""
    if hasattr(token, "members"):
        return [member.key for member in token.members]
    return [getattr(token, "resource", None) or spec.get("key") or "lock"]


if __name__ == "__main__":
    main(sys.argv[1])
    # Its answers are out: skip Ray's shutdown at exit (about a second of CPU each, taken from the
    # workers still measuring and from the next run); the cluster sees the driver gone either way.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
