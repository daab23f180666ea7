"""The benchmark scenarios. Each returns a :class:`Result` with its figures and its baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from broker.bench.baselines import BareActor, LockActor
from broker.bench.stats import Result, Target, summarize
from broker.store import StateDir

__all__ = ["BenchContext", "cycle", "handoff", "metrics"]


@dataclass
class BenchContext:
    state: StateDir
    namespace: str
    keys: list[str]
    quick: bool

    def samples(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def broker(self) -> Any:
        return ray.get_actor("broker", namespace=self.namespace)

    def resource(self, key: str) -> Any:
        return ray.get_actor(f"resource:{key}", namespace=self.namespace)


def _timed(fn: Callable[[], Any], count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def _interleaved(fns: dict[str, Callable[[], Any]], count: int, rounds: int = 5) -> dict[str, list[float]]:
    """Alternate the contenders in rounds so machine noise hits each alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        _timed(fn, 0, max(10, count // 20))
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += _timed(fn, max(1, count // rounds), 0)
    return samples


def cycle(ctx: BenchContext) -> Result:
    """Uncontended reserve+release: via `broker`, directly on `resource:<key>`, beside Ray floors."""
    key = ctx.keys[0]
    broker, resource = ctx.broker(), ctx.resource(key)
    bare = BareActor.options(namespace=ctx.namespace).remote()
    lock = LockActor.options(namespace=ctx.namespace).remote()
    ray.get([bare.ping.remote(), lock.ping.remote()])

    def via_broker() -> None:
        lease = ray.get(broker.reserve.remote(key, "bench", request_id=uuid.uuid4().hex))
        ray.get(broker.release.remote(lease.lease_id))

    def direct() -> None:
        lease = ray.get(resource.reserve.remote("bench", request_id=uuid.uuid4().hex))
        ray.get(resource.release.remote(lease.lease_id))

    def lock_cycle() -> None:
        ray.get(lock.acquire.remote())
        ray.get(lock.release.remote())

    samples = _interleaved(
        {
            "bare actor round trip": lambda: ray.get(bare.ping.remote()),
            "minimal lock cycle": lock_cycle,
            "direct cycle": direct,
            "broker cycle": via_broker,
        },
        ctx.samples(1000, 150),
    )
    result = Result("cycle")
    for name, values in samples.items():
        result.figures[name] = summarize(values)
    direct_ratio = result.ratio("direct / lock", "direct cycle", "minimal lock cycle")
    broker_ratio = result.ratio("broker / lock", "broker cycle", "minimal lock cycle")
    result.targets += [
        Target("direct cycle <= 1.5x minimal lock cycle", direct_ratio, 1.5),
        Target("broker cycle <= 2.5x minimal lock cycle", broker_ratio, 2.5),
    ]
    ray.kill(bare)
    ray.kill(lock)
    return result


def _run_workers(ctx: BenchContext, spec: dict[str, Any], count: int) -> list[tuple[float, float]]:
    start_at = time.time() + 4.0 + 0.5 * count  # time for every worker to import Ray and connect
    spec = {**spec, "start_at": start_at, "state_dir": str(ctx.state.root), "namespace": ctx.namespace}
    env = {**os.environ}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "broker.bench.worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for _ in range(count)
    ]
    grants: list[tuple[float, float]] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if lines:
            grants += [tuple(pair) for pair in json.loads(lines[-1])["grants"]]
    return sorted(grants)


def _handoffs(grants: list[tuple[float, float]]) -> list[float]:
    """Release of one holder to the grant seen by the next: the gap between consecutive grants."""
    return [max(0.0, nxt[0] - prev[1]) for prev, nxt in zip(grants, grants[1:])]


def handoff(ctx: BenchContext, waiters: int = 8) -> Result:
    """Release to the next waiter's grant, ``waiters`` client processes contending for one key."""
    rounds = ctx.samples(60, 12)
    lock = LockActor.options(name="bench-lock", namespace=ctx.namespace).remote()
    ray.get(lock.ping.remote())
    result = Result("handoff")
    for name, target in (("minimal lock handoff", "lock"), ("direct handoff", "direct"), ("broker handoff", "broker")):
        grants = _run_workers(
            ctx, {"target": target, "key": ctx.keys[0], "actor": "bench-lock", "rounds": rounds}, waiters
        )
        result.figures[name] = summarize(_handoffs(grants))
    ray.kill(lock)
    direct_ratio = result.ratio("direct / lock", "direct handoff", "minimal lock handoff")
    result.ratio("broker / lock", "broker handoff", "minimal lock handoff")
    direct = result.figures["direct handoff"]
    result.targets += [
        Target("handoff p50 <= 1.5x minimal lock handoff", direct_ratio, 1.5),
        Target("handoff p50 <= 2.5 ms", direct.median, 2.5),  # type: ignore[union-attr]
    ]
    result.notes.append(f"{waiters} waiter processes, {rounds} grants each")
    return result


def _extra_broker(ctx: BenchContext, keys: int) -> tuple[str, list[str], Any]:
    """A second broker with ``keys`` keys in a namespace of its own; returns (namespace, keys, handle)."""
    from broker.deploy import broker_up

    namespace = f"{ctx.namespace}-{keys}k"
    names = [f"bench_{keys}k_{index:02d}" for index in range(keys)]
    state = StateDir(ctx.state.root.parent / namespace).ensure()
    broker_up(state, namespace, {"resources": {key: {} for key in names}}, metrics_port=0)
    return namespace, names, ray.get_actor("broker", namespace=namespace)


def metrics(ctx: BenchContext) -> Result:
    """Scrape time at a few and at many keys; what the snapshot push costs a reserve/release cycle."""
    import urllib.request

    from broker.deploy import broker_down

    result = Result("metrics")
    for size in (3, ctx.samples(50, 10)):
        namespace, keys, handle = _extra_broker(ctx, size)
        url = ray.get(handle.status.remote()).metrics_url

        def scrape() -> None:
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()

        result.figures[f"scrape, {size} keys"] = summarize(_timed(scrape, ctx.samples(300, 40), 10))
        broker_down(namespace)

    key = ctx.keys[0]
    resource = ctx.resource(key)

    def direct() -> None:
        lease = ray.get(resource.reserve.remote("bench", request_id=uuid.uuid4().hex))
        ray.get(resource.release.remote(lease.lease_id))

    def set_pushing(on: bool) -> None:
        # A pending flag that never clears suppresses pushes: the cycle without them.
        ray.get(resource.__ray_call__.remote(lambda actor, on=on: setattr(actor, "_push_pending", not on)))

    def push_cost(actor: Any) -> float:
        started = time.perf_counter()
        for _ in range(200):
            actor._push()
        return (time.perf_counter() - started) / 200

    count = ctx.samples(600, 100)
    with_push, without_push = [], []
    for _ in range(3):
        set_pushing(True)
        with_push += _timed(direct, count // 3, 10)
        set_pushing(False)
        without_push += _timed(direct, count // 3, 10)
    set_pushing(True)
    result.figures["cycle with pushes"] = summarize(with_push)
    result.figures["cycle without pushes"] = summarize(without_push)
    result.ratio("with / without", "cycle with pushes", "cycle without pushes")
    result.figures["one push, in the actor (us)"] = ray.get(resource.__ray_call__.remote(push_cost)) * 1e6
    result.notes.append("a push is sent after the call has answered; it costs CPU, not the caller's latency")
    return result
