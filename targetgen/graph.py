"""The step graph's rules: unique ids, needs that exist, no cycles — refusals name the steps."""

from __future__ import annotations

from collections.abc import Sequence

from broker.errors import InvalidRequest
from targetgen.bundle import BundleStep

__all__ = ["check_steps", "find_cycle"]


def find_cycle(needs: dict[str, tuple[str, ...]]) -> list[str] | None:
    """One cycle in a needs graph as ``[a, b, ..., a]``, or ``None`` when there is none.

    Needs that name no node are ignored here (``check_steps`` reports them first).
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no cycle through it)
    for start in needs:
        if state.get(start):
            continue
        path: list[str] = []
        # An explicit stack instead of recursion: a long generated ladder must not hit the recursion limit.
        stack: list[tuple[str, int]] = [(start, 0)]
        while stack:
            node, index = stack.pop()
            if index == 0:
                state[node] = 1
                path.append(node)
            edges = [n for n in needs.get(node, ()) if n in needs]
            if index < len(edges):
                stack.append((node, index + 1))
                nxt = edges[index]
                if state.get(nxt) == 1:
                    return path[path.index(nxt) :] + [nxt]
                if not state.get(nxt):
                    stack.append((nxt, 0))
            else:
                state[node] = 2
                path.pop()
    return None


def check_steps(steps: Sequence[BundleStep], source: str) -> None:
    """Refuse a step list with a duplicate id, a need naming no step, or a cycle.

    Args:
        steps: the steps, with ``rung`` set (it makes the messages findable in the spec).
        source: the spec file, for messages.

    Raises:
        InvalidRequest: naming the steps at fault.
    """
    seen: dict[str, str] = {}
    for step in steps:
        if step.id in seen:
            rungs = f"rung {step.rung}" if seen[step.id] == step.rung else f"rungs {seen[step.id]} and {step.rung}"
            raise InvalidRequest(f"{source}: duplicate step id {step.id!r} in {rungs}: give each step its own id", "id")
        seen[step.id] = step.rung
    for step in steps:
        unknown = [need for need in step.needs if need not in seen]
        if unknown:
            raise InvalidRequest(
                f"{source}: step {step.id!r} (rung {step.rung}) needs unknown steps {', '.join(map(repr, unknown))} "
                f"(steps: {', '.join(seen)})",
                "needs",
            )
    cycle = find_cycle({step.id: step.needs for step in steps})
    if cycle is not None:
        raise InvalidRequest(f"{source}: the needs of steps form a cycle: {' -> '.join(cycle)}", "needs")
