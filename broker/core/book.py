"""The lease book of one resource key: the lease rules, pure.

No Ray, no files, no clock: every command takes ``now`` (wall-clock seconds,
because deadlines are written to disk and must survive a restart) and returns
an :class:`Outcome` listing the leases it changed. The resource actor writes
those to disk before it answers; if the write fails it calls
:meth:`LeaseBook.rollback` and the book is as it was before the command.

Rules (DESIGN.md "Leases"):

* at most one granted lease; waiters are served by priority, then arrival;
* ``wait=False`` on a held, queued-for or in-maintenance key fails at once;
* a granted lease ends at ``expires_at`` unless renewed; then the next
  waiter is granted in the same command;
* fencing tokens strictly increase per key and are never reused;
* the same ``(holder, request_id)`` always answers with the same lease;
* maintenance stops new grants; the current holder keeps its lease.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from broker.errors import InvalidRequest, LeaseNotFound, LeaseNotHeld, ResourceBusy, StaleFencingToken
from broker.models import (
    Lease,
    LeaseState,
    LeaseTransition,
    ReserveRequest,
    check_transition,
    lease_ref,
)

__all__ = ["Change", "Outcome", "Maintenance", "LeaseBook", "WAIT_TIMED_OUT", "release_ended"]

WAIT_TIMED_OUT = "wait timed out"

_EVENT_OF_STATE = {
    LeaseState.QUEUED: "lease.queued",
    LeaseState.GRANTED: "lease.granted",
    LeaseState.RELEASED: "lease.released",
    LeaseState.EXPIRED: "lease.expired",
    LeaseState.REVOKED: "lease.revoked",
    LeaseState.CANCELLED: "lease.cancelled",
}


@dataclass(frozen=True)
class Change:
    """One state change, in the order it happened: what to log and journal."""

    event: str
    lease: Lease | None = None
    by: str = ""  # who asked, for changes without a lease (maintenance off)


@dataclass
class Outcome:
    """What a command did: its answer and every change, for the ledger and the log."""

    result: Lease | None = None
    changes: list[Change] = field(default_factory=list)
    maintenance_changed: bool = False

    @property
    def changed_leases(self) -> list[Lease]:
        """The latest version of every lease this command touched (what to write)."""
        latest: dict[str, Lease] = {}
        for change in self.changes:
            if change.lease is not None:
                latest[change.lease.lease_id] = change.lease
        return list(latest.values())

    @property
    def wrote_anything(self) -> bool:
        return bool(self.changes) or self.maintenance_changed


@dataclass(frozen=True)
class Maintenance:
    reason: str
    since: float
    by: str = ""


@dataclass
class _Undo:
    counter: int
    seq: int
    maintenance: Maintenance | None
    granted_id: str | None
    queue: list[tuple[int, int, str]]
    unclaimed: set[str]
    leases: list[tuple[str, Lease | None]] = field(default_factory=list)
    requests: list[tuple[tuple[str, str], str | None]] = field(default_factory=list)
    revokes: list[tuple[str, str | None]] = field(default_factory=list)
    ended_len: int = 0


def release_ended(lease: Lease) -> Lease:
    """``release`` of a lease that already ended: idempotent if it ended by choice."""
    if lease.state in (LeaseState.RELEASED, LeaseState.CANCELLED):
        return lease
    detail = lease.end_reason or ""
    raise LeaseNotHeld(lease.lease_id, lease.state.value, detail)


class LeaseBook:
    """The leases of one key, their queue, its fencing counter and maintenance flag.

    Args:
        resource: the key.
        max_hold_s: hard cap on how long one grant may last, renewals included.
        warn_before_s: with a cap, the lease's ``warn_at`` is this long before it.
        claim_s: a request that was queued before a restart has nobody awaiting it
            until its holder retries; if it is granted first, its lease lasts at
            most this long unless renewed, so an absent holder does not block the key.
        retention_s: how long ended leases stay in memory (for ``request_id`` retries
            and ``lease()`` lookups); older ones live only on disk.
    """

    def __init__(
        self,
        resource: str,
        *,
        max_hold_s: float | None = None,
        warn_before_s: float = 300.0,
        claim_s: float = 60.0,
        retention_s: float = 24 * 3600.0,
    ):
        self.resource = resource
        self.max_hold_s = max_hold_s
        self.warn_before_s = warn_before_s
        self.claim_s = claim_s
        self.retention_s = retention_s
        self._counter = 0
        self._seq = 0
        self._maintenance: Maintenance | None = None
        self._leases: dict[str, Lease] = {}
        self._by_request: dict[tuple[str, str], str] = {}
        self._revokes: dict[str, str] = {}
        self._granted_id: str | None = None
        self._queue: list[tuple[int, int, str]] = []  # (-priority, seq, lease_id), sorted
        self._unclaimed: set[str] = set()
        self._ended: deque[str] = deque()  # ended lease ids, oldest first, for eviction
        self._undo: _Undo | None = None

    # ------------------------------------------------------------------ restore

    @classmethod
    def restore(
        cls,
        resource: str,
        leases: Iterable[Lease],
        *,
        fencing_floor: int = 0,
        maintenance: Maintenance | None = None,
        now: float,
        **options: float | None,
    ) -> tuple[LeaseBook, Outcome]:
        """Rebuild a book from its records; returns it and the fixes to write.

        Queued requests keep their order and become unclaimed; the fencing
        counter starts above every token ever seen; a second granted lease
        (which the ledger never writes, but a hand-edited one might hold) is
        expired; leases whose time ran out while nobody watched are expired.
        """
        book = cls(resource, **options)  # type: ignore[arg-type]
        book._counter = fencing_floor
        book._maintenance = maintenance
        granted: list[Lease] = []
        ended: list[Lease] = []
        for lease in leases:
            if lease.resource != resource:
                continue
            book._seq = max(book._seq, lease.seq)
            if lease.fencing_token is not None:
                book._counter = max(book._counter, lease.fencing_token)
            if lease.state is LeaseState.GRANTED:
                granted.append(lease)
            elif lease.state is LeaseState.QUEUED:
                book._enqueue(lease)
                book._unclaimed.add(lease.lease_id)
            else:
                if lease.ended_at is not None and lease.ended_at < now - book.retention_s:
                    continue
                ended.append(lease)
            book._index(lease)
        for lease in sorted(ended, key=lambda item: item.ended_at or 0.0):
            book._ended.append(lease.lease_id)
        granted.sort(key=lambda item: item.fencing_token or 0)
        if granted:
            book._granted_id = granted[-1].lease_id
        with book._transaction(now) as outcome:
            for extra in granted[:-1]:
                book._end(extra, LeaseState.EXPIRED, now, "superseded by a later grant on recovery", outcome)
            book._advance(now, outcome)
        return book, outcome  # rollback() undoes the fixes if they cannot be written

    # ------------------------------------------------------------------ queries

    @property
    def fencing_counter(self) -> int:
        return self._counter

    @property
    def maintenance(self) -> Maintenance | None:
        return self._maintenance

    @property
    def granted(self) -> Lease | None:
        return self._leases[self._granted_id] if self._granted_id is not None else None

    @property
    def queue(self) -> list[Lease]:
        return [self._leases[lease_id] for _, _, lease_id in self._queue]

    def get(self, lease_id: str) -> Lease:
        try:
            return self._leases[lease_id]
        except KeyError:
            raise LeaseNotFound(lease_id) from None

    def find_request(self, holder: str, request_id: str) -> Lease | None:
        lease_id = self._by_request.get((holder, request_id))
        return self._leases[lease_id] if lease_id is not None else None

    def position(self, lease_id: str) -> int | None:
        """1-based place in the queue, or None if the lease is not queued."""
        for index, (_, _, queued_id) in enumerate(self._queue):
            if queued_id == lease_id:
                return index + 1
        return None

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` has something to do."""
        deadlines = [lease.wait_deadline for lease in self.queue if lease.wait_deadline is not None]
        granted = self.granted
        if granted is not None and granted.expires_at is not None:
            deadlines.append(granted.expires_at)
        return min(deadlines) if deadlines else None

    def check_fence(self, lease_id: str, token: int, now: float) -> Lease:
        """The granted lease if ``(lease_id, token)`` still holds the key at ``now``."""
        granted = self.granted
        live = granted is not None and (granted.expires_at is None or granted.expires_at > now)
        if live and granted.lease_id == lease_id and granted.fencing_token == token:  # type: ignore[union-attr]
            return granted  # type: ignore[return-value]
        raise StaleFencingToken(self.resource, token, granted.fencing_token if live else None)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ commands

    def reserve(self, request: ReserveRequest, lease_id: str, now: float) -> Outcome:
        """Grant, queue, or refuse ``request``; the same request_id answers the same lease."""
        if request.resource != self.resource:
            raise InvalidRequest(f"request for {request.resource!r} sent to {self.resource!r}", "resource")
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            existing = self._leases.get(self._by_request.get((request.holder, request.request_id), ""))
            if existing is not None:
                self._unclaimed.discard(existing.lease_id)
                outcome.result = existing
                return outcome
            if lease_id in self._leases:
                raise InvalidRequest(f"lease id collision on {lease_id!r}", "lease_id")
            busy = self._maintenance is not None or self._granted_id is not None or bool(self._queue)
            if busy and not request.wait:
                granted = self.granted
                raise ResourceBusy(
                    self.resource,
                    granted.holder if granted else None,
                    granted.expires_at if granted else None,
                    len(self._queue),
                    self._maintenance.reason if self._maintenance else None,
                )
            self._seq += 1
            deadline = None if request.timeout_s is None else now + request.timeout_s
            lease = Lease(
                lease_id=lease_id,
                resource=self.resource,
                holder=request.holder,
                state=LeaseState.QUEUED,
                priority=request.priority,
                seq=self._seq,
                ttl_s=request.ttl_s,
                queued_at=now,
                wait_deadline=deadline,
                note=request.note,
                request_id=request.request_id,
                history=(LeaseTransition(state=LeaseState.QUEUED, at=now),),
            )
            self._put(lease)
            self._enqueue(lease)
            queued = Change("lease.queued", lease)
            outcome.changes.append(queued)
            self._advance(now, outcome)
            outcome.result = self._leases[lease_id]
            if outcome.result.state is LeaseState.GRANTED:
                outcome.changes.remove(queued)  # granted at once: one event, not two
            return outcome

    def release(self, lease_id: str, now: float) -> Outcome:
        """End a granted lease (or withdraw a queued one); idempotent once released."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            lease = self.get(lease_id)
            if lease.state is LeaseState.GRANTED:
                self._end(lease, LeaseState.RELEASED, now, "released", outcome)
            elif lease.state is LeaseState.QUEUED:
                self._end(lease, LeaseState.CANCELLED, now, "released while queued", outcome)
            else:
                outcome.result = release_ended(lease)
                return outcome
            self._advance(now, outcome)
            outcome.result = self._leases[lease_id]
            return outcome

    def renew(self, lease_id: str, ttl_s: float | None, now: float) -> Outcome:
        """Push a granted lease's expiry to ``now + ttl_s`` (default: its own TTL), within its hold cap."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            lease = self.get(lease_id)
            if lease.state is not LeaseState.GRANTED:
                detail = "not granted yet" if lease.state is LeaseState.QUEUED else lease.end_reason
                raise LeaseNotHeld(lease_id, lease.state.value, detail)
            ttl = lease.ttl_s if ttl_s is None else ttl_s
            renewed = lease.model_copy(
                update={
                    "ttl_s": ttl,
                    "expires_at": self._expiry(lease, now, ttl),
                    "renewals": lease.renewals + 1,
                }
            )
            self._unclaimed.discard(lease_id)
            self._put(renewed)
            outcome.changes.append(Change("lease.renewed", renewed))
            outcome.result = renewed
            return outcome

    def revoke(
        self,
        reason: str,
        now: float,
        *,
        expected_holder: str | None = None,
        by: str = "",
        request_id: str | None = None,
    ) -> Outcome:
        """Take the key from its holder, recorded with ``reason`` and ``by``; grants the next waiter."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            if request_id is not None and request_id in self._revokes:
                outcome.result = self._leases[self._revokes[request_id]]
                return outcome
            granted = self.granted
            if granted is None:
                raise InvalidRequest(f"nothing to revoke: {self.resource!r} is not leased", "resource")
            if expected_holder is not None and granted.holder != expected_holder:
                raise LeaseNotHeld(
                    lease_ref(granted.lease_id),
                    granted.state.value,
                    f"{self.resource!r} is held by {granted.holder!r}, not {expected_holder!r}: nothing was revoked",
                    holder=granted.holder,
                )
            self._end(granted, LeaseState.REVOKED, now, reason, outcome, by=by, request_id=request_id)
            self._advance(now, outcome)
            outcome.result = self._leases[granted.lease_id]
            return outcome

    def cancel(self, lease_id: str, now: float, reason: str = "cancelled", *, by: str = "") -> Outcome:
        """Withdraw a queued request; idempotent once cancelled."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            lease = self.get(lease_id)
            if lease.state is LeaseState.CANCELLED:
                outcome.result = lease
                return outcome
            if lease.state is not LeaseState.QUEUED:
                detail = "granted: release it instead" if lease.state is LeaseState.GRANTED else lease.end_reason
                raise LeaseNotHeld(lease_id, lease.state.value, detail)
            self._end(lease, LeaseState.CANCELLED, now, reason, outcome, by=by)
            outcome.result = self._leases[lease_id]
            return outcome

    def set_maintenance(self, on: bool, reason: str, now: float, by: str = "") -> Outcome:
        """Stop (on) or resume (off) grants; the current holder keeps its lease either way."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            current = self._maintenance
            if on:
                since = current.since if current is not None else now
                updated = Maintenance(reason=reason, since=since, by=by)
                if updated != current:
                    self._maintenance = updated
                    outcome.maintenance_changed = True
            elif current is not None:
                self._maintenance = None
                outcome.maintenance_changed = True
            if outcome.maintenance_changed:
                outcome.changes.append(Change("resource.maintenance", by=by))
            self._advance(now, outcome)
            return outcome

    def tick(self, now: float) -> Outcome:
        """Expire what is due at ``now``: leases past ``expires_at``, waiters past their deadline."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            return outcome

    def rollback(self) -> None:
        """Undo the most recent command (its changes could not be written)."""
        undo, self._undo = self._undo, None
        if undo is None:
            return
        for lease_id, previous in reversed(undo.leases):
            if previous is None:
                self._leases.pop(lease_id, None)
            else:
                self._leases[lease_id] = previous
        for request_key, previous_id in reversed(undo.requests):
            if previous_id is None:
                self._by_request.pop(request_key, None)
            else:
                self._by_request[request_key] = previous_id
        for request_id, previous_id in reversed(undo.revokes):
            if previous_id is None:
                self._revokes.pop(request_id, None)
            else:
                self._revokes[request_id] = previous_id
        while len(self._ended) > undo.ended_len:
            self._ended.pop()
        self._counter = undo.counter
        self._seq = undo.seq
        self._maintenance = undo.maintenance
        self._granted_id = undo.granted_id
        self._queue = undo.queue
        self._unclaimed = undo.unclaimed

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _transaction(self, now: float) -> Iterator[Outcome]:
        self._evict(now)
        self._undo = _Undo(
            counter=self._counter,
            seq=self._seq,
            maintenance=self._maintenance,
            granted_id=self._granted_id,
            queue=list(self._queue),
            unclaimed=set(self._unclaimed),
            ended_len=len(self._ended),
        )
        outcome = Outcome()
        try:
            yield outcome
        except BaseException:
            self.rollback()
            raise

    def _advance(self, now: float, outcome: Outcome) -> None:
        """Apply everything due at ``now``, in time order, then grant if the key is free."""
        granted = self.granted
        freed_at = None
        if granted is not None and granted.expires_at is not None and granted.expires_at <= now:
            self._end(granted, LeaseState.EXPIRED, granted.expires_at, "ttl elapsed", outcome)
            freed_at = granted.expires_at
        # A waiter whose deadline passed before the key came free timed out; one
        # still waiting when it came free is served even if the timer fired late.
        for lease in self.queue:
            deadline = lease.wait_deadline
            if deadline is not None and deadline <= now and (freed_at is None or deadline < freed_at):
                self._end(lease, LeaseState.CANCELLED, deadline, WAIT_TIMED_OUT, outcome)
        self._grant_next(now, outcome)
        for lease in self.queue:
            if lease.wait_deadline is not None and lease.wait_deadline <= now:
                self._end(lease, LeaseState.CANCELLED, lease.wait_deadline, WAIT_TIMED_OUT, outcome)

    def _grant_next(self, now: float, outcome: Outcome) -> None:
        if self._granted_id is not None or self._maintenance is not None or not self._queue:
            return
        _, _, lease_id = self._queue.pop(0)
        lease = self._leases[lease_id]
        check_transition(lease_id, lease.state, LeaseState.GRANTED)
        self._counter += 1
        granted = lease.model_copy(
            update={
                "state": LeaseState.GRANTED,
                "fencing_token": self._counter,
                "granted_at": now,
                "wait_deadline": None,
                "history": lease.history + (LeaseTransition(state=LeaseState.GRANTED, at=now),),
            }
        )
        cap = None if self.max_hold_s is None else now + self.max_hold_s
        granted = granted.model_copy(
            update={
                "expires_at": self._expiry(granted, now, granted.ttl_s),
                "must_end_by": cap,
                "warn_at": None if cap is None else max(now, cap - self.warn_before_s),
            }
        )
        if lease_id in self._unclaimed:
            granted = granted.model_copy(update={"expires_at": min(granted.expires_at, now + self.claim_s)})
        self._granted_id = lease_id
        self._put(granted)
        outcome.changes.append(Change("lease.granted", granted))

    def _expiry(self, lease: Lease, now: float, ttl_s: float) -> float:
        expires_at = now + ttl_s
        if self.max_hold_s is not None and lease.granted_at is not None:
            expires_at = min(expires_at, lease.granted_at + self.max_hold_s)
        return expires_at

    def _end(
        self,
        lease: Lease,
        state: LeaseState,
        at: float,
        reason: str,
        outcome: Outcome,
        *,
        by: str = "",
        request_id: str | None = None,
    ) -> None:
        check_transition(lease.lease_id, lease.state, state)
        ended = lease.model_copy(
            update={
                "state": state,
                "ended_at": at,
                "end_reason": reason,
                "ended_by": by,
                "end_request_id": request_id,
                "wait_deadline": None,
                "history": lease.history + (LeaseTransition(state=state, at=at, reason=reason, by=by),),
            }
        )
        if lease.state is LeaseState.QUEUED:
            self._queue = [entry for entry in self._queue if entry[2] != lease.lease_id]
        if self._granted_id == lease.lease_id:
            self._granted_id = None
        self._unclaimed.discard(lease.lease_id)
        if request_id is not None:
            self._undo_log().revokes.append((request_id, self._revokes.get(request_id)))
            self._revokes[request_id] = lease.lease_id
        self._put(ended)
        self._ended.append(lease.lease_id)
        outcome.changes.append(Change(_EVENT_OF_STATE[state], ended))

    def _enqueue(self, lease: Lease) -> None:
        bisect.insort(self._queue, (-lease.priority, lease.seq, lease.lease_id))

    def _index(self, lease: Lease) -> None:
        self._leases[lease.lease_id] = lease
        self._by_request[(lease.holder, lease.request_id)] = lease.lease_id
        if lease.end_request_id is not None:
            self._revokes[lease.end_request_id] = lease.lease_id

    def _put(self, lease: Lease) -> None:
        undo = self._undo_log()
        undo.leases.append((lease.lease_id, self._leases.get(lease.lease_id)))
        request_key = (lease.holder, lease.request_id)
        if request_key not in self._by_request:
            undo.requests.append((request_key, None))
            self._by_request[request_key] = lease.lease_id
        self._leases[lease.lease_id] = lease

    def _evict(self, now: float) -> None:
        """Forget ended leases older than the retention window; they stay on disk.

        Runs before a command starts, on committed state only, so it is never undone.
        """
        horizon = now - self.retention_s
        while self._ended:
            lease = self._leases.get(self._ended[0])
            if lease is not None and (lease.ended_at or 0.0) >= horizon:
                break
            lease_id = self._ended.popleft()
            if lease is None or lease.active:
                continue
            del self._leases[lease_id]
            request_key = (lease.holder, lease.request_id)
            if self._by_request.get(request_key) == lease_id:
                del self._by_request[request_key]
            if lease.end_request_id is not None and self._revokes.get(lease.end_request_id) == lease_id:
                del self._revokes[lease.end_request_id]

    def _undo_log(self) -> _Undo:
        if self._undo is None:  # only restore() mutates outside a command
            raise RuntimeError("book mutated outside a transaction")
        return self._undo
