"""Usage counters of one key and the snapshot a resource actor pushes to the coordinator. Pure.

Counters are derived from the lease records, never kept on their own: an
actor that restarts rebuilds them from the same ledger it rebuilds its book
from, so Prometheus never sees a counter go back (no false ``rate()`` reset).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.models import END_EVENTS, EndReason, Lease, LeaseEvent, LeaseState, ResourceState

__all__ = ["Histogram", "UsageCounters", "ResourceSnapshot", "WAIT_BUCKETS_S", "HOLD_BUCKETS_S"]

WAIT_BUCKETS_S = (0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
HOLD_BUCKETS_S = (1.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 2 * 3600.0, 4 * 3600.0, 8 * 3600.0, 24 * 3600.0, 72 * 3600.0)


@dataclass
class Histogram:
    """Cumulative-bucket histogram in Prometheus' shape (the last bucket is +Inf)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; len(bounds) + 1
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total, self.count)


@dataclass
class UsageCounters:
    """Totals since the key's first lease, from its records and then from each change."""

    grants: int = 0
    releases: int = 0
    expirations: int = 0
    revocations: int = 0
    cancellations: int = 0
    wait_timeouts: int = 0
    leased_seconds: float = 0.0  # of holds that ended; the live one is added at scrape
    wait: Histogram = field(default_factory=lambda: Histogram(WAIT_BUCKETS_S))
    hold: Histogram = field(default_factory=lambda: Histogram(HOLD_BUCKETS_S))
    holder_gone: int = 0  # requests and leases ended because their caller's session ended

    @classmethod
    def from_leases(cls, leases: Iterable[Lease]) -> UsageCounters:
        counters = cls()
        for lease in leases:
            if lease.granted_at is not None:
                counters._granted(lease)
            if lease.state not in (LeaseState.QUEUED, LeaseState.GRANTED):
                counters._ended(lease)
        return counters

    def observe(self, event: LeaseEvent, lease: Lease | None) -> None:
        """Fold one change (as the book reports it) into the totals."""
        if lease is None:
            return
        event = LeaseEvent(event)  # a name that is no event fails here rather than never counting
        if event is LeaseEvent.GRANTED:
            self._granted(lease)
        elif event in END_EVENTS:
            self._ended(lease)

    def _granted(self, lease: Lease) -> None:
        self.grants += 1
        self.wait.observe(max(0.0, (lease.granted_at or 0.0) - lease.queued_at))

    def _ended(self, lease: Lease) -> None:
        state = lease.state
        if state is LeaseState.RELEASED:
            self.releases += 1
        elif state is LeaseState.EXPIRED:
            self.expirations += 1
        elif state is LeaseState.REVOKED:
            self.revocations += 1
        elif state is LeaseState.CANCELLED:
            self.cancellations += 1
            if EndReason.of(lease.end_reason) is EndReason.WAIT_TIMED_OUT:
                self.wait_timeouts += 1
        if EndReason.of(lease.end_reason) is EndReason.HOLDER_GONE:
            self.holder_gone += 1
        if lease.granted_at is not None and lease.ended_at is not None:
            held = max(0.0, lease.ended_at - lease.granted_at)
            self.leased_seconds += held
            self.hold.observe(held)

    def copy(self) -> UsageCounters:
        return UsageCounters(
            self.grants,
            self.releases,
            self.expirations,
            self.revocations,
            self.cancellations,
            self.wait_timeouts,
            self.leased_seconds,
            self.wait.copy(),
            self.hold.copy(),
            self.holder_gone,
        )


@dataclass(frozen=True)
class ResourceSnapshot:
    """What the coordinator serves about one key; pushed on every change, pulled as a fallback."""

    key: str
    pid: int
    seq: int  # per actor life; with pid, orders pushes
    state: ResourceState
    queue_depth: int
    granted_at: float | None
    expires_at: float | None
    oldest_queued_at: float | None
    maintenance_since: float | None
    counters: UsageCounters
    # (session, earliest arrival) of every caller session something active is tied to: the
    # coordinator watches them end (broker.core.book.LeaseBook.sessions)
    sessions: tuple[tuple[str, float], ...] = ()
    # The refs of the group requests whose entries wait in this key's queue (counted in queue_depth):
    # a pool's queue depth counts a group queued on several of its members once.
    queued_groups: tuple[str, ...] = ()

    def leased_seconds_total(self, now: float) -> float:
        """Ended holds plus the live one, capped at its expiry so the total never steps back."""
        live = 0.0
        if self.granted_at is not None:
            end = now if self.expires_at is None else min(now, self.expires_at)
            live = max(0.0, end - self.granted_at)
        return self.counters.leased_seconds + live
