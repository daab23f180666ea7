"""The group-commit figure: concurrent changes on one key, and how many of them one fdatasync covers."""

from __future__ import annotations

from typing import Any

import ray

from broker.devtools.bench.common import BenchContext, extra_broker, run_workers
from broker.devtools.bench.stats import Result

__all__ = ["group_commit"]


def _commit_counts(actor: Any) -> tuple[int, int]:
    """(fdatasyncs begun, records they made durable) of the actor's committer."""
    return ray.get(actor.__ray_call__.remote(lambda self: (self._committer.syncs, self._committer.records)))


def group_commit(ctx: BenchContext, clients: int | None = None) -> Result:
    """Changes/s on one key from 1 and from ``clients`` processes (waiting reserve + release, direct), and
    records per fdatasync: with one client each change has a sync of its own; with many, a sync covers
    every change that arrived while the one before was in flight. ``clients``: 8 (--quick: 3)."""
    from broker.actors.deploy import broker_down

    result = Result("group-commit")
    clients = clients or ctx.samples(8, 3)
    rounds = ctx.samples(100, 20)
    namespace, (key,), _handle = extra_broker(ctx, 1)
    actor = ray.get_actor(f"resource:{key}", namespace=namespace)
    try:
        for count in (1, clients):
            spec = {"mode": "handoff", "target": "direct", "key": key, "rounds": rounds, "max_s": 120.0}
            before = _commit_counts(actor)
            answers = run_workers(ctx, [spec] * count, namespace=namespace)
            syncs, records = (after - then for after, then in zip(_commit_counts(actor), before))
            grants = [grant for answer in answers for grant in answer.get("grants", [])]
            # From the first grant to the last release of any client: a late starter widens the window.
            window_s = (
                max(released for _, released in grants) - min(granted for granted, _ in grants) if grants else 0.0
            )
            result.figures[f"{count} client(s): changes/s"] = 2 * len(grants) / window_s if window_s else float("nan")
            result.figures[f"{count} client(s): records per fdatasync"] = records / syncs if syncs else float("nan")
    finally:
        broker_down(namespace)
    result.notes.append(
        f"{rounds} reserve(wait=True)+release cycles per client, straight to resource:<key>; records per"
        " fdatasync is counted by the actor (every change of the run), not timed"
    )
    return result
