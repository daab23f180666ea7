"""Pools: release of a key to the grant of a waiting group request, beside the single-key handoff.

Three contenders in one run, on one broker of their own, each with
``waiters`` client processes that wait, take and release at once:

* ``single-key handoff``: every waiter asks for one key by name (``reserve``);
* ``any-of handoff``: every waiter asks for any one member of a 2-key pool
  (``reserve_group(labels=...)``): a release makes the key *ready* for the
  group at the head of its queue, and the coordinator's pass takes it;
* ``2-key group handoff``: every waiter asks for both keys together
  (``reserve_group(keys=[a, b])``): the next group is granted once both are back.

All three go through the coordinator (``ray.get_actor("broker")``), both ways
(group lease ids have no key to route by), so the ratios compare like with like.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from broker.devtools.bench.stats import Result, summarize

__all__ = ["pools", "per_key_handoffs", "CONTENDERS"]

POOL_KEYS = ("bench_pool_00", "bench_pool_01")
SINGLE_KEY = "bench_single"
SELECTOR = "kind=bench_pool"
# (figure, worker spec): the single-key one first, the baseline of the ratios.
CONTENDERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("single-key handoff", {"target": "broker", "key": SINGLE_KEY}),
    ("any-of handoff", {"target": "group", "labels": SELECTOR}),
    ("2-key group handoff", {"target": "group", "keys": list(POOL_KEYS)}),
)


def per_key_handoffs(grants: Sequence[tuple[float, float, Sequence[str]]]) -> list[float]:
    """Release of a key to its next grant, per key: ``grants`` are (granted, released, keys) of every waiter.

    A group holding several keys is one handoff (the gap to its grant from the latest release of the keys it got).
    """
    last_release: dict[str, float] = {}
    gaps = []
    for granted, released, keys in sorted(grants, key=lambda grant: grant[0]):
        before = [last_release[key] for key in keys if key in last_release]
        if before:
            gaps.append(max(0.0, granted - max(before)))
        for key in keys:
            last_release[key] = released
    return gaps


def pools(ctx: Any, waiters: int | None = None) -> Result:
    """The handoff to a waiting any-of request and to a 2-key group, beside the single-key one.

    ``waiters`` client processes per contender: 8 (--quick: 3)."""
    from broker.actors.deploy import broker_down, broker_up
    from broker.devtools.bench.common import run_workers
    from broker.disk.store import StateDir

    waiters = waiters or ctx.samples(8, 3)
    rounds = ctx.samples(60, 12)
    namespace = f"{ctx.namespace}-pools-{uuid.uuid4().hex[:4]}"
    catalog = {
        "pools": {"bench_pool": SELECTOR},
        "resources": {
            **{key: {"labels": {"kind": "bench_pool"}} for key in POOL_KEYS},
            SINGLE_KEY: {"labels": {"kind": "bench_single"}},
        },
    }
    broker_up(StateDir(ctx.state.root.parent / namespace).ensure(), namespace, catalog, metrics_port=0)
    result = Result("pools")
    try:
        for name, contender in CONTENDERS:
            spec = {"mode": "handoff", "rounds": rounds, **contender}
            answers = run_workers(ctx, [spec] * waiters, namespace=namespace)
            grants: dict[str, list[tuple[float, float, Sequence[str]]]] = defaultdict(list)
            for answer in answers:
                for (granted, released), keys in zip(answer.get("grants", []), answer.get("keys", [])):
                    grants[name].append((granted, released, keys))
            result.figures[name] = summarize(per_key_handoffs(grants[name]))
    finally:
        broker_down(namespace)
    result.ratio("any-of / single-key", "any-of handoff", "single-key handoff")
    result.ratio("2-key group / single-key", "2-key group handoff", "single-key handoff")
    result.notes.append(
        f"{waiters} waiter processes, {rounds} grants each; all calls via `broker`; any-of over a 2-key pool, "
        "so a handoff is per key (release of a key to its next grant)"
    )
    return result
