"""A benchmark client process: ``python -m broker.bench.worker '<json spec>'``.

Separate processes, because waiting clients in a lab are separate processes
(notebooks, CI jobs), and one Python process cannot drive 8 Ray clients at
once. Prints one JSON line: ``{"grants": [[t_grant, t_release], ...]}``.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any


def _acquire_release(spec: dict[str, Any]) -> tuple[Any, Any]:
    import ray

    target = spec["target"]
    namespace = spec["namespace"]
    holder = f"bench-{uuid.uuid4().hex[:6]}"
    if target == "lock":
        lock = ray.get_actor(spec["actor"], namespace=namespace)
        return (lambda: ray.get(lock.acquire.remote())), (lambda _: ray.get(lock.release.remote()))
    if target == "direct":
        actor = ray.get_actor(f"resource:{spec['key']}", namespace=namespace)
        reserve = lambda: ray.get(actor.reserve.remote(holder, wait=True, request_id=uuid.uuid4().hex))  # noqa: E731
        return reserve, (lambda lease: ray.get(actor.release.remote(lease.lease_id)))
    broker = ray.get_actor("broker", namespace=namespace)
    reserve = lambda: ray.get(broker.reserve.remote(spec["key"], holder, wait=True, request_id=uuid.uuid4().hex))  # noqa: E731
    return reserve, (lambda lease: ray.get(broker.release.remote(lease.lease_id)))


def main(raw: str) -> None:
    from broker.cluster import connect_ray
    from broker.store import StateDir

    spec = json.loads(raw)
    connect_ray(StateDir.from_env(spec["state_dir"]), namespace=spec["namespace"])
    acquire, release = _acquire_release(spec)
    grants: list[tuple[float, float]] = []
    time.sleep(max(0.0, spec["start_at"] - time.time()))  # all workers start together
    deadline = time.time() + spec.get("max_s", 120.0)
    while len(grants) < spec["rounds"] and time.time() < deadline:
        token = acquire()
        granted = time.time()
        hold = spec.get("hold_s", 0.0)
        if hold:
            time.sleep(hold)
        released = time.time()
        release(token)
        grants.append((granted, released))
    print(json.dumps({"grants": grants}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
