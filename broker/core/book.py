"""The lease book of one resource key: the lease rules, pure.

No Ray, no files, no clock: every command takes ``now`` (wall-clock seconds,
because deadlines are written to disk and must survive a restart; the actor
derives it from the monotonic clock, see :mod:`broker.core.clock`) and returns
an :class:`Outcome` listing the leases it changed. The resource actor writes
those to disk before it answers; if the write fails it calls
:meth:`LeaseBook.rollback` and the book is as it was before the command.

Rules (README "Leases"):

* at most one granted lease; waiters are served by priority, then arrival;
* ``wait=False`` on a held, queued-for or in-maintenance key fails at once;
* a granted lease ends at ``expires_at`` unless renewed; then the next
  waiter is granted in the same command;
* fencing tokens strictly increase per key and are never reused;
* the same ``(holder, request_id)`` always answers with the same lease;
* a request queued before a restart and granted before its holder came back
  lasts at most the claim window; the holder's return lifts that cap;
* maintenance stops new grants; the current holder keeps its lease; it records
  who set it (``by``), and a caller may change only its own (``only_own``);
* a request tied to its caller's session leaves the queue when the session ends, and
  a grant tied to it ends then too (``holder gone``); a grant its holder has not yet
  acknowledged is tied even when only the wait was (see :class:`SessionTie`);
* so does a host that is down (the key's Ray node is not in the cluster): a flag
  the coordinator sets and lifts from what the cluster reports, apart from an
  admin's maintenance, and never written to disk (the cluster is its authority);
* a queued entry of a group request (``Lease.group``) is never granted by the
  book and holds back everything queued behind it: a free key headed by one
  is *ready* for that group, and the coordinator takes it for the group
  (:meth:`LeaseBook.take_for_group`) together with the group's other keys
  (:mod:`broker.core.groups`).

Transactions: everything the book knows is one :class:`_State`. A command
works on a fork of it (copy-on-write, so a fork costs what the previous
command changed, not the size of the book) and the fork becomes the state;
the version before stays until the next command, and :meth:`LeaseBook.rollback`
swaps it back. There is no undo log to keep in step with the fields.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from broker.errors import InvalidRequest, LeaseNotFound, LeaseNotHeld, ResourceBusy, StaleFencingToken
from broker.models import (
    EVENT_OF_STATE,
    EndReason,
    Lease,
    LeaseEvent,
    LeaseState,
    LeaseTransition,
    ReserveRequest,
    SessionTie,
    check_transition,
    lease_ref,
)

__all__ = [
    "Change",
    "Outcome",
    "Maintenance",
    "HostDown",
    "LeaseBook",
    "WAIT_TIMED_OUT",
    "release_ended",
    "SWEEPS_PER_RETENTION",
]

WAIT_TIMED_OUT = EndReason.WAIT_TIMED_OUT  # the name older callers import

# Ended leases (and ended groups) are swept about this often, in units of the retention window.
SWEEPS_PER_RETENTION = 16


@dataclass(frozen=True)
class Change:
    """One state change, in the order it happened: what to log and journal."""

    event: LeaseEvent
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


@dataclass(frozen=True)
class HostDown:
    """The key's host has no alive Ray node: no grants until it is back."""

    reason: str
    since: float


K = TypeVar("K")
V = TypeVar("V")
_ABSENT: Any = object()
_GONE: Any = object()  # a deletion in an overlay


class _Table(Generic[K, V]):
    """A dict that one version of the state changes without touching the version before it.

    Reads look in this version's overlay, then in the base it shares with the
    version it was forked from. :meth:`fork` folds the overlay into the base:
    the book calls it only when the version before is being dropped.
    """

    __slots__ = ("_base", "_overlay")

    def __init__(self, base: dict[K, V] | None = None) -> None:
        self._base: dict[K, V] = {} if base is None else base
        self._overlay: dict[K, Any] = {}

    def get(self, key: K, default: Any = None) -> Any:
        overlay = self._overlay
        if key in overlay:
            value = overlay[key]
            return default if value is _GONE else value
        return self._base.get(key, default)

    def __getitem__(self, key: K) -> V:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT  # type: ignore[arg-type]

    def __setitem__(self, key: K, value: V) -> None:
        self._overlay[key] = value

    def __delitem__(self, key: K) -> None:
        if key not in self:
            raise KeyError(key)
        self._overlay[key] = _GONE

    def items(self) -> Iterator[tuple[K, V]]:
        for key, value in self._base.items():
            if key not in self._overlay:
                yield key, value
        for key, value in self._overlay.items():
            if value is not _GONE:
                yield key, value

    def fork(self) -> _Table[K, V]:
        for key, value in self._overlay.items():
            if value is _GONE:
                self._base.pop(key, None)
            else:
                self._base[key] = value
        self._overlay.clear()
        return _Table(self._base)


# What a field of _State may hold besides a _Table: values nobody can change in place.
_IMMUTABLE = (int, float, str, tuple, frozenset, Maintenance, HostDown, type(None))


@dataclass
class _State:
    """Everything one key's book knows.

    Every field is an immutable value or a :class:`_Table`; :meth:`fork` checks
    that, so a field added later is versioned (and rolled back) like the others.
    """

    counter: int = 0  # the fencing counter: the last token handed out
    seq: int = 0  # arrival counter: FIFO among equal priorities
    maintenance: Maintenance | None = None
    host_down: HostDown | None = None
    granted_id: str | None = None
    queue: tuple[tuple[int, int, str], ...] = ()  # (-priority, seq, lease_id), sorted
    unclaimed: frozenset[str] = frozenset()  # queued before a restart; nobody awaits them yet
    swept_at: float = -math.inf  # when ended leases past the retention window were last forgotten
    freed_at: float | None = None  # when the last grant ended (None: never granted since the records began)
    leases: _Table[str, Lease] = field(default_factory=_Table)
    by_request: _Table[tuple[str, str], str] = field(default_factory=_Table)
    revokes: _Table[str, str] = field(default_factory=_Table)  # a revoke's request_id -> the lease it ended

    def fork(self) -> _State:
        fork = object.__new__(_State)  # every field, by its instance dict: one added later is not missed
        values = fork.__dict__
        for name, value in self.__dict__.items():
            if type(value) is _Table:
                value = value.fork()
            elif not isinstance(value, _IMMUTABLE):
                raise TypeError(f"book state {name!r} holds a mutable {type(value).__name__}")
            values[name] = value
        return fork

    def plain(self) -> dict[str, Any]:
        """Every field as plain values (tables as dicts): for comparing two versions."""
        return {name: dict(value.items()) if type(value) is _Table else value for name, value in self.__dict__.items()}


def release_ended(lease: Lease) -> Lease:
    """``release`` of a lease that already ended: idempotent if it ended by choice."""
    if lease.state in (LeaseState.RELEASED, LeaseState.CANCELLED):
        return lease
    detail = lease.end_reason or ""
    raise LeaseNotHeld(lease.lease_id, lease.state.value, detail)


def _tie_of(request: ReserveRequest, *, granted_now: bool) -> SessionTie:
    """What of ``request`` its session's end takes with it (a grant in the answer itself is received)."""
    if request.session is None:
        return SessionTie.NONE
    if request.bind_session:
        return SessionTie.LEASE
    return SessionTie.NONE if granted_now else SessionTie.UNTIL_ACKNOWLEDGED


class LeaseBook:
    """The leases of one key, their queue, its fencing counter and maintenance flag.

    Args:
        resource: the key.
        max_hold_s: hard cap on how long one grant may last, renewals included.
        warn_before_s: with a cap, the lease's ``warn_at`` is this long before it.
        claim_s: a request that was queued before a restart has nobody awaiting it
            until its holder retries; if it is granted first, its lease lasts at
            most this long unless renewed or claimed (the holder's retry with its
            request_id), so an absent holder does not block the key.
        retention_s: how long ended leases stay in memory (for ``request_id`` retries
            and ``lease()`` lookups; swept every 1/16 of it); older ones live only on disk.
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
        self._state = _State()
        self._before: _State | None = None  # the state before the last command, for rollback()

    # ------------------------------------------------------------------ restore

    @classmethod
    def restore(
        cls,
        resource: str,
        leases: Iterable[Lease],
        *,
        fencing_floor: int = 0,
        maintenance: Maintenance | None = None,
        host_down: HostDown | None = None,
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
        state = book._state
        state.counter = fencing_floor
        state.maintenance = maintenance
        state.host_down = host_down  # known before anything is granted on restore
        granted: list[Lease] = []
        unclaimed: set[str] = set()
        for lease in leases:
            if lease.resource != resource:
                continue
            state.seq = max(state.seq, lease.seq)
            if lease.fencing_token is not None:
                state.counter = max(state.counter, lease.fencing_token)
            if lease.state is LeaseState.GRANTED:
                granted.append(lease)
            elif lease.state is LeaseState.QUEUED:
                book._enqueue(lease)
                unclaimed.add(lease.lease_id)
            elif lease.granted_at is not None and lease.ended_at is not None:
                state.freed_at = max(state.freed_at or lease.ended_at, lease.ended_at)
            if not lease.active and lease.ended_at is not None and lease.ended_at < now - book.retention_s:
                continue
            book._index(lease)
        state.unclaimed = frozenset(unclaimed)
        granted.sort(key=lambda item: item.fencing_token or 0)
        if granted:
            state.granted_id = granted[-1].lease_id
        with book._transaction(now) as outcome:
            for extra in granted[:-1]:
                book._end(extra, LeaseState.EXPIRED, now, EndReason.SUPERSEDED, outcome)
            book._advance(now, outcome)
        return book, outcome  # rollback() undoes the fixes if they cannot be written

    # ------------------------------------------------------------------ queries

    @property
    def fencing_counter(self) -> int:
        return self._state.counter

    @property
    def maintenance(self) -> Maintenance | None:
        return self._state.maintenance

    @property
    def host_down(self) -> HostDown | None:
        return self._state.host_down

    @property
    def granted(self) -> Lease | None:
        granted_id = self._state.granted_id
        return self._state.leases[granted_id] if granted_id is not None else None

    @property
    def freed_at(self) -> float | None:
        """When the last grant ended, for any-of placement (None: not since the records began)."""
        return self._state.freed_at

    @property
    def ready_for_group(self) -> str | None:
        """The group whose entry heads the queue of this free key (it waits for that group), else None."""
        state = self._state
        if state.granted_id is not None or state.maintenance is not None or state.host_down is not None:
            return None
        if not state.queue:
            return None
        return state.leases[state.queue[0][2]].group

    @property
    def queue(self) -> list[Lease]:
        leases = self._state.leases
        return [leases[lease_id] for _, _, lease_id in self._state.queue]

    def leases(self) -> list[Lease]:
        """Every lease in memory: active ones and those ended within the retention window."""
        return [lease for _, lease in self._state.leases.items()]

    def contents(self) -> dict[str, Any]:
        """The whole state as plain values; two books with equal contents behave the same."""
        return self._state.plain()

    def get(self, lease_id: str) -> Lease:
        try:
            return self._state.leases[lease_id]
        except KeyError:
            raise LeaseNotFound(lease_id) from None

    def find_request(self, holder: str, request_id: str) -> Lease | None:
        lease_id = self._state.by_request.get((holder, request_id))
        return self._state.leases[lease_id] if lease_id is not None else None

    def position(self, lease_id: str) -> int | None:
        """1-based place in the queue, or None if the lease is not queued."""
        for index, (_, _, queued_id) in enumerate(self._state.queue):
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
            state = self._state
            self._advance(now, outcome)
            existing = self.find_request(request.holder, request.request_id)
            if existing is not None:
                outcome.result = self._acknowledge(self._claim(existing, now, outcome), request, outcome)
                return outcome
            if lease_id in state.leases:
                raise InvalidRequest(f"lease id collision on {lease_id!r}", "lease_id")
            busy = state.maintenance is not None or state.granted_id is not None or bool(state.queue)
            if (busy or state.host_down is not None) and not request.wait:
                raise self._busy()
            state.seq += 1
            deadline = None if request.timeout_s is None else now + request.timeout_s
            tie = _tie_of(request, granted_now=not busy and state.host_down is None)
            lease = Lease(
                lease_id=lease_id,
                resource=self.resource,
                holder=request.holder,
                state=LeaseState.QUEUED,
                priority=request.priority,
                seq=state.seq,
                ttl_s=request.ttl_s,
                queued_at=now,
                wait_deadline=deadline,
                note=request.note,
                request_id=request.request_id,
                history=(LeaseTransition(state=LeaseState.QUEUED, at=now),),
                group=request.group,
                session=request.session if tie is not SessionTie.NONE else None,
                session_tie=tie,
            )
            self._put(lease)
            self._enqueue(lease)
            queued = Change(LeaseEvent.QUEUED, lease)
            outcome.changes.append(queued)
            self._advance(now, outcome)
            outcome.result = state.leases[lease_id]
            if outcome.result.state is LeaseState.GRANTED:
                outcome.changes.remove(queued)  # granted at once: one event, not two
            return outcome

    def release(self, lease_id: str, now: float) -> Outcome:
        """End a granted lease (or withdraw a queued one); idempotent once released."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            lease = self.get(lease_id)
            if lease.state is LeaseState.GRANTED:
                self._end(lease, LeaseState.RELEASED, now, EndReason.RELEASED, outcome)
            elif lease.state is LeaseState.QUEUED:
                self._end(lease, LeaseState.CANCELLED, now, EndReason.RELEASED_WHILE_QUEUED, outcome)
            else:
                outcome.result = release_ended(lease)
                return outcome
            self._advance(now, outcome)
            outcome.result = self.get(lease_id)
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
                    "expires_at": self._expiry(lease.granted_at, now, ttl),
                    "renewals": lease.renewals + 1,
                    "unclaimed": False,  # renewing is its holder's claim
                }
            )
            self._put(renewed)
            outcome.changes.append(Change(LeaseEvent.RENEWED, renewed))
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
            revoked_id = self._state.revokes.get(request_id) if request_id is not None else None
            if revoked_id is not None:
                outcome.result = self.get(revoked_id)
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
            outcome.result = self.get(granted.lease_id)
            return outcome

    def cancel(
        self, lease_id: str, now: float, reason: EndReason | str = EndReason.CANCELLED, *, by: str = ""
    ) -> Outcome:
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
            self._advance(now, outcome)  # a group's entry heading a free key held back those behind it
            outcome.result = self.get(lease_id)
            return outcome

    def set_maintenance(self, on: bool, reason: str, now: float, by: str = "", *, only_own: bool = False) -> Outcome:
        """Stop (on) or resume (off) grants; the current holder keeps its lease either way.

        ``only_own`` makes it a compare-and-set for an automatic owner (the health prober): it
        changes nothing while the key is in maintenance set by anyone but ``by`` — its "on"
        applies only to a key in no maintenance (or in its own), its "off" only lifts its own.
        Without it, the last word wins (an admin's on takes over whoever's maintenance it was).
        """
        with self._transaction(now) as outcome:
            state = self._state
            self._advance(now, outcome)
            current = state.maintenance
            if only_own and current is not None and current.by != by:
                return outcome  # someone else's maintenance: theirs to change
            if on:
                since = current.since if current is not None else now
                updated = Maintenance(reason=reason, since=since, by=by)
                if updated != current:
                    state.maintenance = updated
                    outcome.maintenance_changed = True
            elif current is not None:
                state.maintenance = None
                outcome.maintenance_changed = True
            if outcome.maintenance_changed:
                outcome.changes.append(Change(LeaseEvent.MAINTENANCE, by=by))
            self._advance(now, outcome)
            return outcome

    def set_host_down(self, reason: str | None, now: float) -> Outcome:
        """Mark the key's host absent (``reason``) or back (None); back grants the next waiter.

        Idempotent: the coordinator repeats what the cluster shows every health pass.
        """
        with self._transaction(now) as outcome:
            state = self._state
            self._advance(now, outcome)
            current = state.host_down
            if reason is not None and (current is None or current.reason != reason):
                state.host_down = HostDown(reason=reason, since=current.since if current else now)
                outcome.changes.append(Change(LeaseEvent.DOWN))
            elif reason is None and current is not None:
                state.host_down = None
                outcome.changes.append(Change(LeaseEvent.UP))
            self._advance(now, outcome)
            return outcome

    def take_for_group(self, lease_id: str, now: float, *, awaited: bool = True) -> Outcome:
        """Grant a group's queued entry: only if the key is free and the entry heads its queue.

        ``awaited=False`` (the group's caller has not come back since a restart) caps the
        grant at the claim window, like any request granted while its holder is away.

        Raises:
            ResourceBusy: the key is held, in maintenance or down, or another request heads its queue.
            LeaseNotHeld: the entry is not a queued group entry (granted already, or ended).
        """
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            lease = self.get(lease_id)
            if lease.state is LeaseState.GRANTED and lease.group is not None:
                outcome.result = lease  # a retried take: it is the group's already
                return outcome
            if lease.state is not LeaseState.QUEUED or lease.group is None:
                raise LeaseNotHeld(lease_id, lease.state.value, "not a queued group entry")
            if self.ready_for_group != lease.group or self._state.queue[0][2] != lease_id:
                raise self._busy()
            unclaimed = self._state.unclaimed - {lease_id}
            self._state.unclaimed = unclaimed if awaited else unclaimed | {lease_id}
            self._grant(lease_id, now, outcome)
            outcome.result = self.get(lease_id)
            return outcome

    def requeue_group_member(self, lease_id: str, new_lease_id: str, now: float) -> Outcome:
        """Undo a take whose group could not get its other keys: the grant ends (nobody was told of it;
        its token is never reused) and a new entry takes the old one's place in the queue."""
        with self._transaction(now) as outcome:
            lease = self.get(lease_id)
            if lease.state is not LeaseState.GRANTED or lease.group is None:
                raise LeaseNotHeld(lease_id, lease.state.value, "not a granted group entry")
            if new_lease_id in self._state.leases:
                raise InvalidRequest(f"lease id collision on {new_lease_id!r}", "lease_id")
            self._end(lease, LeaseState.RELEASED, now, EndReason.GROUP_GRANT_ABORTED, outcome)
            entry = Lease(
                lease_id=new_lease_id,
                resource=self.resource,
                holder=lease.holder,
                state=LeaseState.QUEUED,
                priority=lease.priority,
                seq=lease.seq,
                ttl_s=lease.ttl_s,
                queued_at=lease.queued_at,
                note=lease.note,
                request_id=lease.request_id,
                history=(LeaseTransition(state=LeaseState.QUEUED, at=now),),
                group=lease.group,
            )
            self._put(entry)
            self._state.by_request[(entry.holder, entry.request_id)] = new_lease_id
            self._enqueue(entry)
            outcome.changes.append(Change(LeaseEvent.QUEUED, entry))
            self._advance(now, outcome)
            outcome.result = self.get(new_lease_id)
            return outcome

    def end_session(self, session: str, now: float) -> Outcome:
        """The caller's session ``session`` ended: its queued requests leave, its tied grant ends.

        Both end with reason ``holder gone``; the next live waiter is granted in the
        same command. Idempotent: nothing of a gone session is left to end.
        """
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            for lease in self.queue:
                if lease.session == session and lease.session_tie is not SessionTie.NONE:
                    self._end(lease, LeaseState.CANCELLED, now, EndReason.HOLDER_GONE, outcome)
            granted = self.granted
            if granted is not None and granted.session == session and granted.session_tie is not SessionTie.NONE:
                self._end(granted, LeaseState.EXPIRED, now, EndReason.HOLDER_GONE, outcome)
            self._advance(now, outcome)
            return outcome

    def sessions(self) -> dict[str, float]:
        """Every session something active is tied to, with the earliest arrival among its requests.

        The arrival time lets the cluster tell a live session from a later one that reused its
        id (Ray's job ids restart at 1 with a new cluster): the job must have started before it.
        """
        seen: dict[str, float] = {}
        granted = self.granted
        for lease in [*self.queue, *([granted] if granted is not None else [])]:
            if lease.session is not None and lease.session_tie is not SessionTie.NONE:
                seen[lease.session] = min(seen.get(lease.session, lease.queued_at), lease.queued_at)
        return seen

    def tick(self, now: float) -> Outcome:
        """Expire what is due at ``now``: leases past ``expires_at``, waiters past their deadline."""
        with self._transaction(now) as outcome:
            self._advance(now, outcome)
            return outcome

    def rollback(self) -> None:
        """Undo the most recent command (its changes could not be written)."""
        if self._before is not None:
            self._state, self._before = self._before, None

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _transaction(self, now: float) -> Iterator[Outcome]:
        # The fork becomes the state at once (the command reads and writes it);
        # the version before it is kept until the next command, for rollback().
        before = self._state
        self._state = before.fork()
        self._before = before
        self._sweep(now)
        outcome = Outcome()
        try:
            yield outcome
        except BaseException:
            self.rollback()
            raise

    def _busy(self) -> ResourceBusy:
        """Why the key cannot be had now: its holder, its queue, its maintenance or its absent host."""
        state = self._state
        granted = self.granted
        return ResourceBusy(
            self.resource,
            granted.holder if granted else None,
            granted.expires_at if granted else None,
            len(state.queue),
            state.maintenance.reason if state.maintenance else None,
            down_reason=state.host_down.reason if state.host_down else None,
        )

    def _advance(self, now: float, outcome: Outcome) -> None:
        """Apply everything due at ``now``, in time order, then grant if the key is free."""
        granted = self.granted
        freed_at = None
        if granted is not None and granted.expires_at is not None and granted.expires_at <= now:
            self._end(granted, LeaseState.EXPIRED, granted.expires_at, EndReason.TTL_ELAPSED, outcome)
            freed_at = granted.expires_at
        # A waiter whose deadline passed before the key came free timed out; one
        # still waiting when it came free is served even if the timer fired late.
        for lease in self.queue:
            deadline = lease.wait_deadline
            if deadline is not None and deadline <= now and (freed_at is None or deadline < freed_at):
                self._end(lease, LeaseState.CANCELLED, deadline, EndReason.WAIT_TIMED_OUT, outcome)
        self._grant_next(now, outcome)
        for lease in self.queue:
            if lease.wait_deadline is not None and lease.wait_deadline <= now:
                self._end(lease, LeaseState.CANCELLED, lease.wait_deadline, EndReason.WAIT_TIMED_OUT, outcome)

    def _grant_next(self, now: float, outcome: Outcome) -> None:
        state = self._state
        if state.granted_id is not None or state.maintenance is not None or not state.queue:
            return
        if state.host_down is not None:
            return
        if state.leases[state.queue[0][2]].group is not None:
            return  # ready for its group: the coordinator takes it with the group's other keys
        self._grant(state.queue[0][2], now, outcome)

    def _grant(self, lease_id: str, now: float, outcome: Outcome) -> None:
        """Grant the queued lease at the head of the queue (the caller checked the key is free)."""
        state = self._state
        state.queue = state.queue[1:]
        lease = state.leases[lease_id]
        check_transition(lease_id, lease.state, LeaseState.GRANTED)
        state.counter += 1
        expires_at = self._expiry(now, now, lease.ttl_s)
        unclaimed = lease_id in state.unclaimed
        if unclaimed:  # nobody awaits it (queued before a restart): hold the key only briefly
            expires_at = min(expires_at, now + self.claim_s)
            state.unclaimed = state.unclaimed - {lease_id}
        cap = None if self.max_hold_s is None else now + self.max_hold_s
        granted = lease.model_copy(
            update={
                "state": LeaseState.GRANTED,
                "fencing_token": state.counter,
                "granted_at": now,
                "wait_deadline": None,
                "expires_at": expires_at,
                "must_end_by": cap,
                "warn_at": None if cap is None else max(now, cap - self.warn_before_s),
                "unclaimed": unclaimed,
                "history": lease.history + (LeaseTransition(state=LeaseState.GRANTED, at=now),),
            }
        )
        state.granted_id = lease_id
        self._put(granted)
        outcome.changes.append(Change(LeaseEvent.GRANTED, granted))

    def _claim(self, lease: Lease, now: float, outcome: Outcome) -> Lease:
        """The holder came back with its request_id: nobody need guess whether it is there."""
        state = self._state
        if lease.lease_id in state.unclaimed:
            state.unclaimed = state.unclaimed - {lease.lease_id}
        if lease.state is not LeaseState.GRANTED or not lease.unclaimed:
            return lease
        claimed = lease.model_copy(
            update={"unclaimed": False, "expires_at": self._expiry(lease.granted_at, now, lease.ttl_s)}
        )
        self._put(claimed)
        outcome.changes.append(Change(LeaseEvent.CLAIMED, claimed))
        return claimed

    def _acknowledge(self, lease: Lease, request: ReserveRequest, outcome: Outcome) -> Lease:
        """The holder asked again with its request_id: it has the answer, and it is the caller now.

        A grant tied only until acknowledged is untied (it outlives the session from now on);
        a tied request asked for from another session (a retry from a new process) follows it.
        """
        if not lease.active or lease.session_tie is SessionTie.NONE:
            return lease
        update: dict[str, Any] = {}
        if request.session is not None and request.session != lease.session:
            update["session"] = request.session
        if lease.state is LeaseState.GRANTED and lease.session_tie is SessionTie.UNTIL_ACKNOWLEDGED:
            update["session_tie"] = SessionTie.NONE
        if not update:
            return lease
        acknowledged = lease.model_copy(update=update)
        self._put(acknowledged)
        outcome.changes.append(Change(LeaseEvent.CLAIMED, acknowledged))
        return acknowledged

    def _expiry(self, granted_at: float | None, now: float, ttl_s: float) -> float:
        expires_at = now + ttl_s
        if self.max_hold_s is not None and granted_at is not None:
            expires_at = min(expires_at, granted_at + self.max_hold_s)
        return expires_at

    def _end(
        self,
        lease: Lease,
        state: LeaseState,
        at: float,
        reason: EndReason | str,
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
        book = self._state
        if lease.state is LeaseState.QUEUED:
            book.queue = tuple(entry for entry in book.queue if entry[2] != lease.lease_id)
        if book.granted_id == lease.lease_id:
            book.granted_id = None
            book.freed_at = at
        if lease.lease_id in book.unclaimed:
            book.unclaimed = book.unclaimed - {lease.lease_id}
        self._put(ended)
        outcome.changes.append(Change(EVENT_OF_STATE[state], ended))

    def _enqueue(self, lease: Lease) -> None:
        queue = list(self._state.queue)
        bisect.insort(queue, (-lease.priority, lease.seq, lease.lease_id))
        self._state.queue = tuple(queue)

    def _index(self, lease: Lease) -> None:
        """Put a lease read from disk (restore): newer versions of a request win."""
        state = self._state
        state.leases[lease.lease_id] = lease
        request_key = (lease.holder, lease.request_id)
        current = state.leases.get(state.by_request.get(request_key, ""))
        # A group entry given back (requeue_group_member) shares its request with the ended take:
        # the request names the active one, whatever order the records are read in.
        if current is None or not current.active or lease.active:
            state.by_request[request_key] = lease.lease_id
        if lease.end_request_id is not None:
            state.revokes[lease.end_request_id] = lease.lease_id

    def _put(self, lease: Lease) -> None:
        state = self._state
        state.leases[lease.lease_id] = lease
        request_key = (lease.holder, lease.request_id)
        if request_key not in state.by_request:
            state.by_request[request_key] = lease.lease_id
        if lease.end_request_id is not None:
            state.revokes[lease.end_request_id] = lease.lease_id

    def _sweep(self, now: float) -> None:
        """Forget ended leases older than the retention window (they stay on disk).

        A scan of the book, so only every 1/16 of the window: an ended lease
        stays in memory for its retention and at most that much longer.
        """
        state = self._state
        if now - state.swept_at < self.retention_s / SWEEPS_PER_RETENTION:
            return
        state.swept_at = now
        horizon = now - self.retention_s
        old = [
            lease
            for _, lease in state.leases.items()
            if not lease.active and lease.ended_at is not None and lease.ended_at < horizon
        ]
        for lease in old:
            del state.leases[lease.lease_id]
            request_key = (lease.holder, lease.request_id)
            if state.by_request.get(request_key) == lease.lease_id:
                del state.by_request[request_key]
            if lease.end_request_id is not None and state.revokes.get(lease.end_request_id) == lease.lease_id:
                del state.revokes[lease.end_request_id]
