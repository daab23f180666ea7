"""Recovery: a resource actor's kill -9 to serving again with its leases intact; a holder's death to
the next grant. Beside Ray's own restart of a bare actor, measured in the same run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from functools import partial
from typing import Any

import ray

from broker.devtools.bench.common import BenchContext
from broker.devtools.bench.stats import Result, Target, summarize
from broker.errors import BrokerUnavailable

__all__ = ["recovery", "holder_death"]


@ray.remote(num_cpus=0, max_restarts=-1)
class RestartingActor:
    """Ray's floor: an actor with nothing to reload."""

    def ping(self) -> int:
        return os.getpid()


def _until_true(fn: Any, what: str, timeout_s: float = 60.0) -> None:
    """Poll ``fn`` until it returns true; raises TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not fn():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not so after {timeout_s:g}s")
        time.sleep(0.01)


def _queue_length(ctx: BenchContext, key: str) -> int:
    return len(ray.get(ctx.resource(key).status.remote(), timeout=10).queue)


def _renewed_with_waiter(ctx: BenchContext, lease_id: str) -> bool:
    lease = ray.get(ctx.broker().lease.remote(lease_id), timeout=10)
    return bool(lease.renewals >= 1 and _queue_length(ctx, ctx.keys[0]) == 1)


def _until(fn: Any, timeout_s: float = 60.0) -> float:
    """Call ``fn`` until it stops raising; returns when it first answered (perf_counter)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            fn()
            return time.perf_counter()
        except Exception:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.005)


def recovery(ctx: BenchContext) -> Result:
    key = ctx.keys[0]
    broker = ctx.broker()
    lease = ray.get(broker.reserve.remote(key, "bench-holder", ttl_s=600, request_id=uuid.uuid4().hex))
    waiter_id = uuid.uuid4().hex
    waiter = broker.reserve.remote(key, "bench-waiter", wait=True, timeout_s=600, request_id=waiter_id)
    _until_true(lambda: _queue_length(ctx, key) == 1, "the waiter is queued")
    ours, theirs = [], []
    bare = RestartingActor.options(namespace=ctx.namespace).remote()
    for _ in range(ctx.samples(8, 2)):
        resource = ctx.resource(key)
        pid = ray.get(resource.ping.remote())["pid"]

        def intact() -> None:
            got = ray.get(resource.lease.remote(lease.lease_id), timeout=5)
            queued = ray.get(resource.status.remote(), timeout=5).queue
            if got.fencing_token != lease.fencing_token or got.state != lease.state or len(queued) != 1:
                raise AssertionError("state not back")

        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        ours.append(_until(intact) - started)
        pid = ray.get(bare.ping.remote())
        started = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        theirs.append(_until(lambda: ray.get(bare.ping.remote(), timeout=5)) - started)
    ray.get(broker.release.remote(lease.lease_id))
    try:
        granted = ray.get(waiter, timeout=60)
    except BrokerUnavailable:
        # Its retry window (from its first failure) closed over many kills on a slow machine:
        # retry as any client does, with the same request id (the same queued request).
        granted = ray.get(
            broker.reserve.remote(key, "bench-waiter", wait=True, timeout_s=600, request_id=waiter_id), timeout=60
        )
    ray.get(broker.release.remote(granted.lease_id))
    ray.kill(bare, no_restart=True)
    result = Result("recovery")
    result.figures["resource actor kill -9 -> serving with its leases"] = summarize(ours)
    result.figures["Ray restarts a bare actor"] = summarize(theirs)
    ratio = result.ratio(
        "ours / Ray's", "resource actor kill -9 -> serving with its leases", "Ray restarts a bare actor"
    )
    result.targets.append(Target("recovery <= 2x Ray's own actor restart", ratio, 2.0))
    result.notes.append("ours = until lease(id) answers with the same token and the waiter is still queued")
    return result


HOLDER = """
import sys, time, broker
client = broker.connect()
ttl, bound = float(sys.argv[2]), sys.argv[3] == "session"
with client.lease(sys.argv[1], "bench-doomed", ttl_s=ttl, heartbeat_s=ttl / 4, bind_session=bound) as held:
    print("held", held.lease_id, flush=True)
    time.sleep(600)
"""

# The two kinds of lease a dead holder leaves behind: bound to its session (the shim's default:
# ends when Ray reports the driver gone) and bound only by its TTL (bind_session=False, the CLI's).
HOLDER_KINDS = {"session": "session-bound", "ttl": "TTL-bound"}


def holder_figure(kind: str) -> str:
    return f"SIGKILL of a {HOLDER_KINDS[kind]} holder -> next grant"


def holder_death(ctx: BenchContext) -> Result:
    """A process holding a lease (heartbeats) is SIGKILLed: how long until the next waiter has it."""
    key = ctx.keys[0]
    broker = ctx.broker()
    ttl = 2.0
    env = {**os.environ, "MERLIN_STATE_DIR": str(ctx.state.root), "MERLIN_RAY_NAMESPACE": ctx.namespace}
    result = Result("holder death")
    for kind in HOLDER_KINDS:
        samples = []
        for _ in range(ctx.samples(5, 1)):
            proc = subprocess.Popen(
                [sys.executable, "-c", HOLDER, key, str(ttl), kind], env=env, stdout=subprocess.PIPE, text=True
            )
            held = proc.stdout.readline().split() if proc.stdout is not None else []
            if held[:1] != ["held"]:
                raise RuntimeError("the holder process did not get its lease")
            waiter = broker.reserve.remote(key, "bench-next", wait=True, timeout_s=60, request_id=uuid.uuid4().hex)
            # Killed once it is a heartbeating holder with a waiter behind it: renewed, and the waiter queued.
            _until_true(partial(_renewed_with_waiter, ctx, held[1]), "the holder's lease renewed, the waiter queued")
            killed = time.time()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            lease = ray.get(waiter, timeout=60)
            samples.append(lease.granted_at - killed)
            ray.get(broker.release.remote(lease.lease_id))
        result.figures[holder_figure(kind)] = summarize(samples, scale=1.0, unit="s")
    result.figures["lease TTL (s)"] = ttl
    result.notes.append(
        f"heartbeat every {ttl / 4:g}s; a TTL-bound lease's gap is the TTL left since its last heartbeat, "
        "a session-bound one's is Ray reporting the driver gone (GCS job channel) plus one call"
    )
    return result
