"""Latency: the uncontended reserve+release cycle, and the handoff to the next waiter.

Three ways in: the shim (``BrokerClient``: its fast path goes straight to
``resource:<key>``), a plain Ray call on ``resource:<key>``, and a plain Ray
call on ``broker`` (the notebook contract: one forwarded hop).
"""

from __future__ import annotations

import uuid

import ray

from broker.client import BrokerClient
from broker.devtools.bench.baselines import BareActor, LockActor, ProxyActor
from broker.devtools.bench.common import BenchContext, interleaved, run_workers
from broker.devtools.bench.stats import Result, Target, summarize

__all__ = ["cycle", "handoff"]


def cycle(ctx: BenchContext) -> Result:
    """Uncontended reserve+release: via `broker`, directly on `resource:<key>`, beside Ray floors."""
    key = ctx.keys[0]
    broker, resource = ctx.broker(), ctx.resource(key)
    bare = BareActor.options(namespace=ctx.namespace).remote()
    lock = LockActor.options(namespace=ctx.namespace).remote()
    proxy = ProxyActor.options(namespace=ctx.namespace).remote(bare)
    ray.get([bare.ping.remote(), lock.ping.remote(), proxy.ping.remote()])

    def via_broker() -> None:
        lease = ray.get(broker.reserve.remote(key, "bench", request_id=uuid.uuid4().hex))
        ray.get(broker.release.remote(lease.lease_id))

    def direct() -> None:
        lease = ray.get(resource.reserve.remote("bench", request_id=uuid.uuid4().hex))
        ray.get(resource.release.remote(lease.lease_id))

    client = BrokerClient(ctx.namespace)

    def shim() -> None:
        client.release(client.reserve(key, "bench").lease_id)

    def lock_cycle() -> None:
        ray.get(lock.acquire.remote())
        ray.get(lock.release.remote())

    samples = interleaved(
        {
            "bare actor round trip": lambda: ray.get(bare.ping.remote()),
            "forwarded round trip (async proxy actor)": lambda: ray.get(proxy.ping.remote()),
            "minimal lock cycle": lock_cycle,
            "shim cycle": shim,
            "direct cycle": direct,
            "broker cycle": via_broker,
        },
        ctx.samples(1000, 60),
    )
    result = Result("cycle")
    for name, values in samples.items():
        result.figures[name] = summarize(values)
    shim_ratio = result.ratio("shim / lock", "shim cycle", "minimal lock cycle")
    direct_ratio = result.ratio("direct / lock", "direct cycle", "minimal lock cycle")
    broker_ratio = result.ratio("broker / lock", "broker cycle", "minimal lock cycle")
    result.ratio("forwarded / bare", "forwarded round trip (async proxy actor)", "bare actor round trip")
    result.targets += [
        Target("shim cycle <= 1.5x minimal lock cycle", shim_ratio, 1.5),
        Target("direct cycle <= 1.5x minimal lock cycle", direct_ratio, 1.5),
        Target('plain ray.get_actor("broker") cycle <= 2.5x minimal lock cycle', broker_ratio, 2.5),
    ]
    result.notes.append("`broker` forwards each call to resource:<key>: two forwarded round trips per cycle")
    result.notes.append("the shim sends single-key calls straight to resource:<key> (cached handle, same retries)")
    ray.kill(bare)
    ray.kill(lock)
    ray.kill(proxy)
    return result


def _handoffs(grants: list[tuple[float, float]]) -> list[float]:
    """Release of one holder to the grant seen by the next: the gap between consecutive grants."""
    return [max(0.0, nxt[0] - prev[1]) for prev, nxt in zip(grants, grants[1:])]


def handoff(ctx: BenchContext, waiters: int | None = None) -> Result:
    """Release to the next waiter's grant, ``waiters`` client processes contending for one key (8; --quick 3)."""
    waiters = waiters or ctx.samples(8, 3)
    rounds = ctx.samples(60, 12)
    lock = LockActor.options(name="bench-lock", namespace=ctx.namespace).remote()
    ray.get(lock.ping.remote())
    result = Result("handoff")
    contenders = (
        ("minimal lock handoff", "lock"),
        ("shim handoff", "shim"),
        ("direct handoff", "direct"),
        ("broker handoff", "broker"),
    )
    for name, target in contenders:
        spec = {"mode": "handoff", "target": target, "key": ctx.keys[0], "actor": "bench-lock", "rounds": rounds}
        answers = run_workers(ctx, [spec] * waiters)
        grants = sorted(tuple(pair) for answer in answers for pair in answer.get("grants", []))
        result.figures[name] = summarize(_handoffs(grants))
    ray.kill(lock)
    shim_ratio = result.ratio("shim / lock", "shim handoff", "minimal lock handoff")
    result.ratio("direct / lock", "direct handoff", "minimal lock handoff")
    result.ratio("broker / lock", "broker handoff", "minimal lock handoff")
    result.targets.append(Target("shim handoff p50 <= 1.5x minimal lock handoff", shim_ratio, 1.5))
    result.notes.append(f"{waiters} waiter processes, {rounds} grants each")
    return result
