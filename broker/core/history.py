"""Per-board history from the audit journal: how often, by whom, for how long. Pure.

Reads journal records (dicts as :func:`broker.disk.journal.read_journal` yields
them) and pairs each ``lease.granted`` with the event that ended the lease
(matched by the public lease ``ref``). Holds are clipped to the window, so
utilization is the share of the window the board was held. A group's take that
was given back (its group could not take every key) is no grant: nobody held it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from broker.models import EndReason, LeaseEvent

__all__ = ["HolderUsage", "UsageHistory", "summarize_usage", "select_events", "given_back"]

# The events that end a hold, and the UsageHistory count each one adds to.
_ENDS = {LeaseEvent.RELEASED: "released", LeaseEvent.EXPIRED: "expired", LeaseEvent.REVOKED: "revoked"}


@dataclass
class HolderUsage:
    holder: str
    leases: int = 0
    held_s: float = 0.0
    waited_s: float = 0.0
    expired: int = 0
    revoked: int = 0
    last_granted_at: float | None = None

    @property
    def mean_hold_s(self) -> float:
        return self.held_s / self.leases if self.leases else 0.0

    @property
    def mean_wait_s(self) -> float:
        return self.waited_s / self.leases if self.leases else 0.0


@dataclass
class UsageHistory:
    resource: str
    since: float
    until: float
    grants: int = 0
    released: int = 0
    expired: int = 0
    revoked: int = 0
    wait_timeouts: int = 0
    maintenance_periods: int = 0
    held_s: float = 0.0
    holders: dict[str, HolderUsage] = field(default_factory=dict)
    current_holder: str | None = None

    @property
    def utilization(self) -> float:
        window = self.until - self.since
        return min(1.0, self.held_s / window) if window > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "resource": self.resource,
            "since": self.since,
            "until": self.until,
            "grants": self.grants,
            "released": self.released,
            "expired": self.expired,
            "revoked": self.revoked,
            "wait_timeouts": self.wait_timeouts,
            "maintenance_periods": self.maintenance_periods,
            "held_s": round(self.held_s, 3),
            "utilization": round(self.utilization, 4),
            "current_holder": self.current_holder,
            "holders": [
                {
                    "holder": usage.holder,
                    "leases": usage.leases,
                    "held_s": round(usage.held_s, 3),
                    "mean_hold_s": round(usage.mean_hold_s, 3),
                    "mean_wait_s": round(usage.mean_wait_s, 3),
                    "expired": usage.expired,
                    "revoked": usage.revoked,
                    "last_granted_at": usage.last_granted_at,
                }
                for usage in sorted(self.holders.values(), key=lambda u: -u.held_s)
            ],
        }


def select_events(
    events: Iterable[dict[str, Any]],
    *,
    resource: str | None = None,
    since: float | None = None,
    prefix: str | None = None,
) -> Iterable[dict[str, Any]]:
    """The journal records that match every filter given."""
    for event in events:
        if resource is not None and event.get("resource") != resource:
            continue
        if since is not None and float(event.get("ts", 0.0)) < since:
            continue
        if prefix is not None and not str(event.get("event", "")).startswith(prefix):
            continue
        yield event


def summarize_usage(events: Iterable[dict[str, Any]], resource: str, since: float, until: float) -> UsageHistory:
    """Usage of ``resource`` in ``[since, until]`` from its journal records (in journal order).

    A grant counts once its end is seen (or the journal ends with it open): a group's take
    given back (``its group's grant could not take every key``, the key requeued for the
    group) was held by nobody and counts as nothing — no grant, no hold, no release.
    """
    history = UsageHistory(resource=resource, since=since, until=until)
    open_grants: dict[str, tuple[str, float, float]] = {}  # lease ref -> (holder, granted at, waited)
    for event in events:
        if event.get("resource") != resource:
            continue
        name = LeaseEvent.of(event.get("event"))  # None: not a lease event (run.*, ledger.*, ...)
        end = _ENDS.get(name) if name is not None else None
        ts = float(event.get("ts", 0.0))
        ref = event.get("lease")
        if name is LeaseEvent.GRANTED and ref:
            open_grants[ref] = (event.get("holder", "?"), ts, float(event.get("wait_s") or 0.0))
        elif end is not None and ref in open_grants:
            holder, granted_at, waited = open_grants.pop(ref)
            if given_back(event):
                continue
            _add_grant(history, holder, granted_at, waited)
            _add_hold(history, holder, granted_at, ts)
            if ts >= since:
                setattr(history, end, getattr(history, end) + 1)
                usage = history.holders.setdefault(holder, HolderUsage(holder))
                if name is LeaseEvent.EXPIRED:
                    usage.expired += 1
                elif name is LeaseEvent.REVOKED:
                    usage.revoked += 1
        elif name is LeaseEvent.CANCELLED and ts >= since:
            if EndReason.of(event.get("reason")) is EndReason.WAIT_TIMED_OUT:
                history.wait_timeouts += 1
        elif name is LeaseEvent.MAINTENANCE and event.get("on") and ts >= since:
            history.maintenance_periods += 1
    for holder, granted_at, waited in open_grants.values():  # still held
        _add_grant(history, holder, granted_at, waited)
        _add_hold(history, holder, granted_at, until)
        history.current_holder = holder
    return history


def given_back(end_event: dict[str, Any]) -> bool:
    """Is this the end of a group's take that was given back (a grant to nobody, its key requeued)?"""
    return EndReason.of(end_event.get("reason")) is EndReason.GROUP_GRANT_ABORTED


def _add_grant(history: UsageHistory, holder: str, granted_at: float, waited: float) -> None:
    if granted_at < history.since:
        return
    history.grants += 1
    usage = history.holders.setdefault(holder, HolderUsage(holder))
    usage.leases += 1
    usage.waited_s += waited
    usage.last_granted_at = max(usage.last_granted_at or granted_at, granted_at)


def _add_hold(history: UsageHistory, holder: str, start: float, end: float) -> None:
    clipped = max(0.0, min(end, history.until) - max(start, history.since))
    if clipped <= 0:
        return
    history.held_s += clipped
    history.holders.setdefault(holder, HolderUsage(holder)).held_s += clipped
