"""What one MCP session holds, pure: its leases, when each is renewed, what it gives back at the end.

An agent's session (one ``merlin mcp`` process, started by its client) takes
leases and must not lose them while it lives, nor leave them behind when it
dies. The rules, with time passed in (monotonic seconds):

* Every lease the session takes is renewed every ``renew_every(ttl_s)``
  (a third of its TTL), for as long as the session lives, ``keep`` or not.
* A renewal that finds the lease gone (expired, revoked, released elsewhere)
  stops renewing it and remembers why: "do I still hold it?" says so.
* At the end the session withdraws every request still waiting, and releases
  every lease it holds unless it was taken with ``keep`` (then it runs to its
  TTL, or is renewed by whoever keeps its id).
* Once closing, a lease that arrives late (a wait granted during the
  shutdown) is not tracked: the caller releases it at once.

No I/O, no SDK: the server calls these under its event loop and its shutdown.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from broker.cli.filters import ResourceFilter, parse_labels
from broker.errors import BrokerError, InvalidRequest, LeaseNotFound, LeaseNotHeld, Surface, error_json
from broker.models import GroupLease, Lease, LeaseState, ResourceState

__all__ = [
    "MIN_RENEW_S",
    "Pending",
    "Tracked",
    "SessionLeases",
    "renew_every",
    "lease_view",
    "error_view",
    "resource_filter",
    "is_gone",
]

MIN_RENEW_S = 0.5  # a 1 s lease (the shortest TTL) is still renewed twice per TTL


def renew_every(ttl_s: float) -> float:
    """How often a lease of ``ttl_s`` is renewed: three chances before it would expire."""
    return max(MIN_RENEW_S, ttl_s / 3.0)


@dataclass(frozen=True)
class Pending:
    """A reserve that is waiting in a queue: what the session withdraws if it ends first."""

    holder: str
    request_id: str
    resource: str | None  # None: a group request (withdrawn by holder and request id)


@dataclass
class Tracked:
    """A lease this session took."""

    lease_id: str
    keep: bool
    ttl_s: float
    next_renew_at: float
    renewals: int = 0
    lost: dict[str, Any] | None = None  # the error a renewal got once the lease was gone

    @property
    def renewing(self) -> bool:
        return self.lost is None


@dataclass
class SessionLeases:
    """The leases and waiting requests of one MCP session; safe to call from several threads."""

    closing: bool = False
    _held: dict[str, Tracked] = field(default_factory=dict)
    _pending: dict[str, Pending] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ waiting requests

    def waiting(self, pending: Pending) -> None:
        with self._lock:
            self._pending[pending.request_id] = pending

    def answered(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def waiting_requests(self) -> list[Pending]:
        with self._lock:
            return list(self._pending.values())

    # ------------------------------------------------------------------ leases

    def track(self, lease_id: str, *, ttl_s: float, keep: bool, now: float) -> bool:
        """Start renewing ``lease_id``; False when the session is closing (release it instead).

        Tracking a lease again (a retried reserve with the same request id)
        keeps its renewal schedule; ``keep`` is the latest word of the agent.
        """
        with self._lock:
            if self.closing:
                return False
            known = self._held.get(lease_id)
            if known is not None and known.renewing:
                known.keep = keep
                return True
            self._held[lease_id] = Tracked(lease_id, keep, ttl_s, now + renew_every(ttl_s))
            return True

    def forget(self, lease_id: str) -> None:
        """Released by the agent: no more renewals, nothing to give back."""
        with self._lock:
            self._held.pop(lease_id, None)

    def get(self, lease_id: str) -> Tracked | None:
        with self._lock:
            return self._held.get(lease_id)

    def lease_ids(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def due(self, now: float) -> list[str]:
        """The leases whose renewal is due at ``now``, earliest first."""
        with self._lock:
            ready = [t for t in self._held.values() if t.renewing and t.next_renew_at <= now]
            return [t.lease_id for t in sorted(ready, key=lambda t: t.next_renew_at)]

    def next_due_in(self, now: float) -> float | None:
        """Seconds until the next renewal is due (0 if one is late), None if nothing is renewed."""
        with self._lock:
            times = [t.next_renew_at for t in self._held.values() if t.renewing]
        return max(0.0, min(times) - now) if times else None

    def renewed(self, lease_id: str, ttl_s: float, now: float) -> None:
        """A renewal (the session's or the agent's) succeeded: the next one is a third of the TTL away."""
        with self._lock:
            tracked = self._held.get(lease_id)
            if tracked is not None and tracked.renewing:
                tracked.ttl_s = ttl_s
                tracked.renewals += 1
                tracked.next_renew_at = now + renew_every(ttl_s)

    def lost(self, lease_id: str, error: dict[str, Any]) -> None:
        """The broker says the lease is gone: stop renewing it, remember why."""
        with self._lock:
            tracked = self._held.get(lease_id)
            if tracked is not None:
                tracked.lost = error

    def close(self) -> tuple[list[Pending], list[str], list[str]]:
        """Begin the end: ``(requests to withdraw, leases to release, leases kept)``. Idempotent."""
        with self._lock:
            self.closing = True
            pending = list(self._pending.values())
            release = [t.lease_id for t in self._held.values() if t.renewing and not t.keep]
            kept = [t.lease_id for t in self._held.values() if t.renewing and t.keep]
            self._pending.clear()
            self._held.clear()
            return pending, release, kept


def lease_view(lease: Lease | GroupLease, tracked: Tracked | None, now: float) -> dict[str, Any]:
    """A lease as the agent reads it: the holder's view, plus ``held`` and what this session does with it.

    ``now`` is wall time (``expires_in_s``). ``session`` is null for a lease
    this session did not take (it neither renews nor releases it).
    """
    data = lease.for_holder()
    held = lease.state is LeaseState.GRANTED
    data["held"] = held
    data["expires_in_s"] = round(max(0.0, lease.expires_at - now), 1) if held and lease.expires_at else None
    data["session"] = (
        None
        if tracked is None
        else {
            "renewing": tracked.renewing and held,
            "released_when_session_ends": not tracked.keep and tracked.renewing and held,
            "renewals": tracked.renewals,
        }
    )
    return data


def error_view(err: BaseException) -> dict[str, Any]:
    """``{"error": {"type", "message", ...fields}}``: the broker's error JSON, hints spelled for JSON arguments.

    Tool arguments are named like the HTTP API's (``wait``, ``timeout_s``), so the HTTP spelling fits.
    """
    return error_json(err, Surface.HTTP)


def resource_filter(
    states: list[str] | None, labels: str | None, holder: str | None, mine: bool, me: str
) -> ResourceFilter:
    """The listing filter of ``list_resources``; a bad state or label is ``InvalidRequest``."""
    known = {state.value: state for state in ResourceState}
    wrong = [state for state in states or () if state not in known]
    if wrong:
        raise InvalidRequest(f"invalid state {wrong[0]!r}: expected one of {', '.join(known)}", "state")
    holders = {holder} if holder else set()
    if mine:
        holders.add(me)
    return ResourceFilter(
        states=frozenset(known[state] for state in states or ()),
        labels=parse_labels([labels] if labels else None),
        holders=frozenset(holders),
    )


def is_gone(err: BrokerError) -> bool:
    """A renewal error that means the lease is over for good (not a broker that is away for a moment)."""
    return isinstance(err, (LeaseNotHeld, LeaseNotFound))
