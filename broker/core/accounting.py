"""Usage totals per holder or per resource from the audit journal, sacct-style. Pure.

Each ``lease.granted`` is paired with the event that ended it (released,
expired, revoked), matched by the public lease ``ref``. A hold is clipped to
the window ``[since, until]``; one still open at ``until`` counts up to it.
A lease counts (and its wait with it) in the window where it was granted. A
group's take given back (:func:`broker.core.history.given_back`) counts as nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.core.compat import StrEnum
from broker.core.history import given_back

__all__ = ["UsageBy", "UsageRow", "account"]

_ENDS = {"lease.released": "released", "lease.expired": "expired", "lease.revoked": "revoked"}


class UsageBy(StrEnum):
    HOLDER = "holder"
    RESOURCE = "resource"


@dataclass
class UsageRow:
    """One holder's (or one resource's) totals over the window."""

    name: str
    leases: int = 0
    held_s: float = 0.0
    waited_s: float = 0.0
    released: int = 0
    expired: int = 0
    revoked: int = 0

    @property
    def held_hours(self) -> float:
        return self.held_s / 3600.0

    @property
    def mean_wait_s(self) -> float:
        return self.waited_s / self.leases if self.leases else 0.0

    def as_dict(self, by: UsageBy) -> dict[str, Any]:
        return {
            by.value: self.name,
            "leases": self.leases,
            "held_s": round(self.held_s, 3),
            "held_hours": round(self.held_hours, 4),
            "mean_wait_s": round(self.mean_wait_s, 3),
            "released": self.released,
            "expired": self.expired,
            "revoked": self.revoked,
        }


def account(
    events: Iterable[dict[str, Any]],
    *,
    since: float,
    until: float,
    by: UsageBy = UsageBy.HOLDER,
    resource: str | None = None,
) -> list[UsageRow]:
    """Totals per ``by`` over ``[since, until]``, most hours held first (then by name)."""
    rows: dict[str, UsageRow] = {}
    open_grants: dict[str, tuple[str, float, float]] = {}  # lease ref -> (group name, granted at, waited)

    def row(name: str) -> UsageRow:
        return rows.setdefault(name, UsageRow(name))

    def grant(name: str, granted_at: float, waited: float) -> None:
        if granted_at >= since:  # counted once its end is known: a take given back is no lease
            granted = row(name)
            granted.leases += 1
            granted.waited_s += waited

    def hold(name: str, start: float, end: float) -> None:
        clipped = min(end, until) - max(start, since)
        if clipped > 0:
            row(name).held_s += clipped

    for event in events:
        key = event.get("resource")
        if not isinstance(key, str) or (resource is not None and key != resource):
            continue
        name = event.get("event")
        ref = event.get("lease")
        ts = float(event.get("ts", 0.0))
        if not ref or ts > until:
            continue
        group = key if by is UsageBy.RESOURCE else str(event.get("holder", "?"))
        if name == "lease.granted":
            open_grants[ref] = (group, ts, float(event.get("wait_s") or 0.0))
        elif name in _ENDS and ref in open_grants:
            group, granted_at, waited = open_grants.pop(ref)
            if given_back(event):
                continue
            grant(group, granted_at, waited)
            hold(group, granted_at, ts)
            if ts >= since:
                ended = row(group)
                kind = _ENDS[name]
                setattr(ended, kind, getattr(ended, kind) + 1)
    for group, granted_at, waited in open_grants.values():  # still held at the end of the window
        grant(group, granted_at, waited)
        hold(group, granted_at, until)
    return sorted(rows.values(), key=lambda r: (-r.held_s, r.name))
