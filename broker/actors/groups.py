"""The coordinator's group leases: "any free U250", "two sim lanes", "this board and that lane together".

The rules are pure (:mod:`broker.core.groups`); this is the shell that applies
them across the keys' actors, one group at a time (one lock):

1. A request is resolved against the catalog at once (an unsatisfiable one is
   refused, never a wait forever), written to ``groups/<ref>.json``, then one
   *entry* is queued on every key it may use (a fixed request id per key, so
   queueing again is a retry). Entries are queued one group after another.
2. Whenever a key comes free with a group's entry at the head of its queue
   (the key's actor tells at once), a pass looks at the waiting groups in
   order and takes the keys of each that has ``count`` of them ready — all
   of them, or, if one was lost to a race, gives the taken ones back to their
   queue places (:meth:`LeaseBook.requeue_group_member`). The record says
   ``granted`` only after every key is taken; entries the group no longer
   needs are withdrawn after that.
3. A granted group ends as a whole: when one of its keys' leases ends
   (released, expired, revoked), the others are released.

On restart, :meth:`GroupManager.recover` finishes what a crash interrupted,
from the record and what each key says: a waiting group whose keys were
partly taken gives them back; a granted group whose key ended ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from broker.core.book import SWEEPS_PER_RETENTION
from broker.core.catalog import Catalog
from broker.core.groups import (
    GroupRecord,
    KeyView,
    check_same_ask,
    choose_members,
    gating_place,
    group_order,
    open_to_new,
    past_retention,
    resolve_ask,
)
from broker.disk.group_records import GroupRecords
from broker.disk.journal import EventSink
from broker.disk.store import StateDir
from broker.errors import (
    BrokerError,
    BrokerUnavailable,
    InvalidRequest,
    LeaseNotFound,
    LeaseNotHeld,
    ResourceBusy,
    StaleFencingToken,
    UnknownResource,
    WaitTimeout,
)
from broker.models import (
    EndReason,
    GroupLease,
    GroupMember,
    Holder,
    Lease,
    LeaseEnded,
    LeaseState,
    Note,
    Priority,
    RequestId,
    ResourceState,
    ResourceStatus,
    SessionId,
    TtlSeconds,
    WaitSeconds,
    checked,
    is_group_lease_id,
    lease_ref,
)

__all__ = ["GroupManager"]

Call = Callable[..., Awaitable[Any]]
_ENDED_ENTRY = (LeaseNotHeld, LeaseNotFound, WaitTimeout)  # what asking an ended entry's request again raises


class GroupManager:
    """Group requests and leases of one coordinator. See the module docstring."""

    def __init__(
        self,
        state: StateDir,
        events: EventSink,
        call: Call,
        status_of: Callable[[str], Awaitable[ResourceStatus]],
        catalog: Callable[[], Catalog | None],
        observe_wait: Callable[[float], None] | None = None,
        aftercare: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ):
        self._records = GroupRecords(state)
        # Runs a cancelled wait's clean-up to its end (ActorSystem.aftercare: outside the cancelled call).
        self._aftercare = aftercare or _shielded
        self._observe_wait = observe_wait  # each grant's wait (seconds), for the metrics histogram
        self._events = events
        self._call = call
        self._status_of = status_of
        self._catalog = catalog
        self._groups: dict[str, GroupRecord] = {}  # by ref
        self._by_request: dict[tuple[str, str], str] = {}
        self._by_id: dict[str, str] = {}  # group lease id -> ref
        self._by_member: dict[str, str] = {}  # a granted key lease's ref -> its group's ref
        self._waiters: dict[str, list[asyncio.Future[GroupLease]]] = {}
        self._awaited: set[str] = set()  # groups whose caller asked in this coordinator's life
        self._unclaimed: set[str] = set()  # granted while nobody awaited them: capped at the claim window
        self._lock = asyncio.Lock()
        self._seq = 0
        self._passing = False
        self._again = False
        self._passes_done = asyncio.Event()  # set whenever no pass runs or is asked for
        self._passes_done.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._swept_at = -math.inf  # when ended groups past the retention window were last forgotten

    # ------------------------------------------------------------------ load and recover

    def load(self) -> None:
        records, corrupt = self._records.load_all()
        for moved_to, error in corrupt:
            self._events.emit("group.corrupt_record", level="error", moved_to=str(moved_to), error=error)
        for record in records:
            self._index(record)
            self._seq = max(self._seq, record.lease.seq)
            if self._observe_wait is not None and record.lease.granted_at is not None:
                self._observe_wait(record.lease.granted_at - record.lease.queued_at)  # a restart resets nothing
        self.sweep(time.time())

    async def recover(self) -> None:
        """Finish what a crash left between a record and its keys; then grant what can be."""
        async with self._lock:
            for record in list(self._groups.values()):
                try:
                    deadline = record.lease.wait_deadline
                    if record.lease.state is LeaseState.QUEUED and deadline is not None and deadline <= time.time():
                        # Its wait ran out while no coordinator ran: never granted late (as for a single key).
                        await self._end_waiting(record.ref, EndReason.WAIT_TIMED_OUT, LeaseState.CANCELLED, locked=True)
                    elif record.lease.state is LeaseState.QUEUED:
                        await self._ensure_entries(record, recovering=True)
                    elif record.lease.state is LeaseState.GRANTED:
                        await self._check_granted(record)
                except BrokerUnavailable as exc:  # that key's actor is restarting: the next pass retries
                    self._events.emit("group.recover_deferred", level="warning", group=record.ref, error=str(exc))
        await self.schedule()

    # ------------------------------------------------------------------ requests

    async def reserve(
        self,
        holder: str,
        *,
        keys: list[str] | tuple[str, ...] | None = None,
        labels: str | None = None,
        count: int | None = None,
        ttl_s: float = 3600.0,
        wait: bool = False,
        timeout_s: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        note: str = "",
        session: str | None = None,
        one_host: bool = False,
    ) -> GroupLease:
        holder = checked(Holder, holder, "holder")
        if session is not None:
            session = checked(SessionId, session, "session")
        ttl_s = checked(TtlSeconds, ttl_s, "ttl_s")
        priority = checked(Priority, priority, "priority")
        note = checked(Note, note, "note")
        if not isinstance(wait, bool):
            raise InvalidRequest(f"invalid wait={wait!r}: must be true or false", "wait")
        if not isinstance(one_host, bool):
            raise InvalidRequest(f"invalid one_host={one_host!r}: must be true or false", "one_host")
        if timeout_s is not None:
            timeout_s = checked(WaitSeconds, timeout_s, "timeout_s")
        request_id = (
            checked(RequestId, request_id, "request_id") if request_id is not None else f"group-{secrets.token_hex(12)}"
        )
        catalog = self._catalog()
        if catalog is None:
            raise UnknownResource(str(keys or labels), ())
        ask = resolve_ask(
            {key: spec.labels for key, spec in catalog.resources.items()},
            keys=list(keys) if isinstance(keys, (list, tuple)) else keys,
            labels=labels,
            count=count,
            one_host={key: spec.host for key, spec in catalog.resources.items()} if one_host else None,
        )
        ref = self._by_request.get((holder, request_id))
        if ref is not None:  # a retry, or the same id reused for another ask (refused)
            check_same_ask(self._groups[ref].lease, ask, one_host=one_host)
        try:
            if ref is None:
                if not wait and not await self._could_take_now(ask.candidates, ask.count):
                    raise self._busy(ask.selector or ",".join(ask.candidates), ask.candidates)
                async with self._lock:
                    ref = self._by_request.get((holder, request_id))  # a concurrent retry may have made it
                    if ref is None:
                        ref = await self._create(
                            holder, request_id, ask, ttl_s, wait, timeout_s, priority, note, session, one_host
                        )
                    else:
                        check_same_ask(self._groups[ref].lease, ask, one_host=one_host)
            record = self._groups[ref]
            self._awaited.add(ref)
            if ref in self._unclaimed and record.lease.state is LeaseState.GRANTED:
                self._unclaimed.discard(ref)  # its caller is back: the whole TTL, as for a single key
                with contextlib.suppress(LeaseNotHeld):
                    await self.renew(record.lease.lease_id)
                record = self._groups[ref]
            if record.lease.state is LeaseState.QUEUED:
                async with self._lock:
                    await self._ensure_entries(self._groups[ref])
                await self.schedule()
            return await self._answer(ref, wait)
        except asyncio.CancelledError:
            # The caller went away (ray.cancel — Ray Serve's when an HTTP client disconnects —, Ctrl-C) at
            # whichever step, also while its request was being written and queued on its keys: the request
            # leaves every queue (a waiter's grant that raced the cancel is given back), unless another
            # call for the same request still waits. Ray cancels the calls a cancelled call makes too:
            # the clean-up runs outside it, to its end.
            gone = self._by_request.get((holder, request_id))
            if gone is not None and not self._waiters.get(gone):
                with contextlib.suppress(BrokerError):
                    await self._aftercare(
                        self._end_waiting(gone, EndReason.WAITER_WENT_AWAY, LeaseState.CANCELLED, release_granted=wait)
                    )
            raise

    async def _create(
        self,
        holder: str,
        request_id: str,
        ask: Any,
        ttl_s: float,
        wait: bool,
        timeout_s: float | None,
        priority: int,
        note: str,
        session: str | None = None,
        one_host: bool = False,
    ) -> str:
        now = time.time()
        self._seq += 1
        lease = GroupLease(
            lease_id=f"group:{secrets.token_hex(16)}",
            holder=holder,
            request_id=request_id,
            state=LeaseState.QUEUED,
            count=ask.count,
            candidates=ask.candidates,
            selector=ask.selector,
            priority=priority,
            seq=self._seq,
            ttl_s=ttl_s,
            queued_at=now,
            wait_deadline=now + timeout_s if (wait and timeout_s is not None) else None,
            note=note,
            session=session,
            one_host=one_host and ask.count > 1,
        )
        record = GroupRecord(lease=lease, entry_salt=lease.ref)
        self._save(record)  # on disk before any key hears of it: recover() finishes the rest
        self._events.emit(
            "group.queued",
            group=record.ref,
            holder=holder,
            keys=list(ask.candidates),
            count=ask.count,
            selector=ask.selector or None,
            priority=priority,
        )
        await self._ensure_entries(record)
        return record.ref

    async def _answer(self, ref: str, wait: bool) -> GroupLease:
        record = self._groups[ref]
        if record.lease.state is LeaseState.GRANTED or not record.lease.active:
            return self._ended_or_granted(record)
        if not wait:
            await self._end_waiting(ref, EndReason.CANCELLED, LeaseState.CANCELLED)
            current = self._groups[ref]
            if current.lease.state is LeaseState.GRANTED:  # a pass granted it as it was being withdrawn: the
                return current.lease  # caller's (refusing it would leave the keys held for nobody)
            raise self._busy(record.lease.selector or ",".join(record.lease.candidates), record.lease.candidates)
        future: asyncio.Future[GroupLease] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ref, []).append(future)
        deadline = record.lease.wait_deadline
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.time())
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        except asyncio.TimeoutError:
            self._forget_waiter(ref, future)  # this caller hears the timeout, not the end it causes
            await self._end_waiting(ref, EndReason.WAIT_TIMED_OUT, LeaseState.CANCELLED)
            current = self._groups[ref]
            if current.lease.state is LeaseState.GRANTED:  # granted as the time ran out: it is the caller's
                return current.lease
            raise WaitTimeout(
                current.lease.selector or ",".join(current.lease.candidates), (deadline or 0) - current.lease.queued_at
            ) from None
        finally:  # cancelled too: the caller's reserve ends the wait (see there)
            self._forget_waiter(ref, future)

    def _forget_waiter(self, ref: str, future: asyncio.Future[GroupLease]) -> None:
        waiters = self._waiters.get(ref, [])
        if future in waiters:
            waiters.remove(future)

    def _ended_or_granted(self, record: GroupRecord) -> GroupLease:
        lease = record.lease
        if lease.state is LeaseState.CANCELLED:  # as a single key's reserve answers a cancelled request
            if lease.end_reason == EndReason.WAIT_TIMED_OUT:
                shown = lease.selector or ",".join(lease.candidates)
                raise WaitTimeout(shown, round((lease.ended_at or lease.queued_at) - lease.queued_at, 3))
            raise LeaseNotHeld(lease.lease_id, lease.state.value, lease.end_reason)
        return lease

    async def _could_take_now(self, candidates: tuple[str, ...], count: int) -> bool:
        statuses = await asyncio.gather(*(self._status_of(key) for key in candidates))
        free = [s for s in statuses if open_to_new(s.state, len(s.queue))]
        return len(free) >= count

    def _busy(self, shown: str, candidates: tuple[str, ...]) -> ResourceBusy:
        return ResourceBusy(shown, None, None, 0, None)

    # ------------------------------------------------------------------ held groups

    def owns(self, lease_id: Any) -> bool:
        return is_group_lease_id(lease_id)

    def get(self, lease_id: str) -> GroupLease:
        return self._record_of(lease_id).lease

    async def release(self, lease_id: str) -> GroupLease:
        """Release every key of the group (or withdraw it while it waits); idempotent once released."""
        record = self._record_of(lease_id)
        if record.lease.state is LeaseState.QUEUED:
            await self._end_waiting(
                record.ref, EndReason.RELEASED_WHILE_QUEUED, LeaseState.CANCELLED, release_granted=True
            )
            return self._groups[record.ref].lease
        if record.lease.state is LeaseState.GRANTED:
            async with self._lock:
                await self._end_granted(record.ref, LeaseState.RELEASED, EndReason.RELEASED, "")
            return self._groups[record.ref].lease
        if record.lease.state in (LeaseState.RELEASED, LeaseState.CANCELLED):
            return record.lease
        raise LeaseNotHeld(lease_id, record.lease.state.value, record.lease.end_reason)

    def member_lease_ids(self, lease_id: str) -> dict[str, str]:
        """Each key of a granted group -> the id of its key lease (the group's member there).

        For the coordinator's own run manager only (in-process, never an actor method): a run
        bound through a group renews, fences and watches its keys' leases like a single key's.

        Raises:
            LeaseNotFound: no such group.
            LeaseNotHeld: the group is not granted (waiting, or ended).
        """
        record = self._record_of(lease_id)
        if record.lease.state is not LeaseState.GRANTED:
            raise LeaseNotHeld(lease_id, record.lease.state.value, record.lease.end_reason)
        return {key: record.entries[key] for key in record.lease.keys}

    async def withdraw(self, holder: str, request_id: str) -> GroupLease | None:
        """The caller's own request ``(holder, request_id)`` leaves every queue (or, granted, is released)."""
        ref = self._by_request.get((holder, request_id)) if isinstance(request_id, str) else None
        if ref is None:
            return None
        await self._end_waiting(ref, EndReason.WITHDRAWN, LeaseState.CANCELLED, release_granted=True)
        return self._groups[ref].lease

    async def renew(self, lease_id: str, ttl_s: float | None = None) -> GroupLease:
        """Renew every key; if one of them is lost, the group ends and this raises ``LeaseNotHeld``."""
        record = self._record_of(lease_id)
        lease = record.lease
        if lease.state is not LeaseState.GRANTED:
            detail = "not granted yet" if lease.state is LeaseState.QUEUED else lease.end_reason
            raise LeaseNotHeld(lease_id, lease.state.value, detail)
        results = await asyncio.gather(
            *(self._call(key, "renew", record.entries[key], ttl_s) for key in lease.keys), return_exceptions=True
        )
        lost = [r for r in results if isinstance(r, (LeaseNotHeld, LeaseNotFound))]
        failed = [r for r in results if isinstance(r, BaseException) and r not in lost]
        if lost:
            async with self._lock:
                await self._end_granted(record.ref, LeaseState.EXPIRED, EndReason.GROUP_MEMBER_ENDED, "")
            current = self._groups[record.ref].lease
            raise LeaseNotHeld(lease_id, current.state.value, current.end_reason)
        if failed:
            raise failed[0]
        renewed = [r for r in results if isinstance(r, Lease)]
        expires_at = min((r.expires_at or 0.0) for r in renewed)
        latest = self._groups[record.ref]  # a key may have ended (and the group with it) during the renewals
        if latest.lease.state is not LeaseState.GRANTED:
            raise LeaseNotHeld(lease_id, latest.lease.state.value, latest.lease.end_reason)
        updated = latest.model_copy(
            update={"lease": latest.lease.model_copy(update={"expires_at": expires_at, "ttl_s": ttl_s or lease.ttl_s})}
        )
        self._groups[record.ref] = updated  # the keys' books are the authority on expiry: no write per renewal
        return updated.lease

    async def check_fence(self, lease_id: str, fencing_tokens: Any) -> GroupLease:
        """The group if it still holds every key with these tokens (``{key: token}``), else ``StaleFencingToken``."""
        record = self._record_of(lease_id)
        if not isinstance(fencing_tokens, dict):
            raise InvalidRequest(
                "a group lease's fence is checked with {key: fencing_token} for its keys", "fencing_token"
            )
        for key, token in fencing_tokens.items():
            if key not in record.lease.keys:
                raise StaleFencingToken(str(key), token if isinstance(token, int) else -1, None)
            await self._call(key, "check_fence", record.entries[key], token)
        return record.lease

    def names_request(self, holder: Any, request_id: Any) -> bool:
        """Is ``(holder, request_id)`` a group request this broker still answers for (within retention)?"""
        return isinstance(holder, str) and isinstance(request_id, str) and (holder, request_id) in self._by_request

    def request_ids(self, now: float) -> list[tuple[str, str, float]]:
        """``(holder, request_id, last activity)`` of every group this broker still answers for."""
        return [
            (r.lease.holder, r.lease.request_id, r.lease.ended_at if r.lease.ended_at is not None else now)
            for r in self._groups.values()
        ]

    def listing(self) -> list[dict[str, Any]]:
        """Every active group, as anyone may see it (no lease ids)."""
        active = [r.lease for r in self._groups.values() if r.lease.active]
        return [lease.public() for lease in sorted(active, key=group_order)]

    def waiting_within(self, keys: tuple[str, ...]) -> int:
        """Waiting group requests that may use one of ``keys`` (a pool's members)."""
        wanted = set(keys)
        return sum(
            1 for r in self._groups.values() if r.lease.state is LeaseState.QUEUED and wanted & set(r.lease.candidates)
        )

    async def position(self, holder: str, request_id: str) -> int | None:
        """A waiting group request's place in line (1 = next), or None: the place that gates its grant,
        the ``count``-th best over the queues of the keys it may use (:func:`gating_place`)."""
        ref = self._by_request.get((holder, request_id)) if isinstance(request_id, str) else None
        record = self._groups.get(ref) if ref else None
        if record is None or record.lease.state is not LeaseState.QUEUED:
            return None
        places = []
        for status in await asyncio.gather(*(self._status_of(key) for key in record.lease.candidates)):
            places += [entry.position for entry in status.queue if entry.group == ref]
        return gating_place(places, record.lease.count)

    # ------------------------------------------------------------------ events from the keys

    def key_ready(self, key: str, group: str) -> None:
        """A key's actor says it is free with ``group``'s entry at its head (fire and forget)."""
        if group in self._groups:
            self._spawn(self.schedule())

    def leases_ended(self, ended: tuple[LeaseEnded, ...]) -> None:
        """Granted key leases ended (pushed by their actors): a group with one of them ends as a whole."""
        for lease_end in ended:
            ref = self._by_member.get(lease_end.ref)
            if ref is not None:
                self._spawn(self._member_ended(ref, lease_end))

    async def _member_ended(self, ref: str, lease_end: LeaseEnded) -> None:
        async with self._lock:
            await self._end_granted(ref, lease_end.state, lease_end.reason, lease_end.by)

    async def tick(self) -> None:
        """The coordinator's health pass: end waits whose deadline passed, retry what a push may have lost."""
        now = time.time()
        self.sweep(now)
        for ref, record in list(self._groups.items()):
            deadline = record.lease.wait_deadline
            if (
                record.lease.state is LeaseState.QUEUED
                and deadline is not None
                and deadline <= now
                and not self._waiters.get(ref)
            ):
                await self._end_waiting(ref, EndReason.WAIT_TIMED_OUT, LeaseState.CANCELLED)
        await self.schedule()

    def sweep(self, now: float) -> int:
        """Forget ended groups past the catalog's retention (:func:`past_retention`), records and all.

        A scan of every group, so at most every 1/SWEEPS_PER_RETENTION of the window, as a book
        sweeps its ended leases. Returns how many were forgotten."""
        catalog = self._catalog()
        if catalog is None:
            return 0
        retention_s = catalog.broker.retention_s
        if now - self._swept_at < retention_s / SWEEPS_PER_RETENTION:
            return 0
        self._swept_at = now
        old = [ref for ref, record in self._groups.items() if past_retention(record.lease, now, retention_s)]
        for ref in old:
            self._forget(ref)
        return len(old)

    def _forget(self, ref: str) -> None:
        record = self._groups.pop(ref)
        lease = record.lease
        if self._by_request.get((lease.holder, lease.request_id)) == ref:
            del self._by_request[(lease.holder, lease.request_id)]
        if self._by_id.get(lease.lease_id) == ref:
            del self._by_id[lease.lease_id]
        for lease_id in record.entries.values():
            if self._by_member.get(lease_ref(lease_id)) == ref:
                del self._by_member[lease_ref(lease_id)]
        self._awaited.discard(ref)
        self._unclaimed.discard(ref)
        try:
            self._records.remove(ref)
        except OSError as exc:  # forgotten here anyway; the next start finds it and sweeps it again
            self._events.emit("group.sweep_failed", level="warning", group=ref, error=str(exc)[:200])

    # ------------------------------------------------------------------ the pass

    async def schedule(self) -> None:
        """Grant every waiting group that can be granted now; returns once a pass begun after the call
        has run (a pass asked for while one runs runs after it): a caller that just queued a request
        then sees whether it was granted (``wait=False`` answers from that)."""
        if self._passing:
            self._again = True
            await self._passes_done.wait()
            return
        self._passing = True
        self._passes_done.clear()
        try:
            while True:
                self._again = False
                async with self._lock:
                    await self._pass()
                if not self._again:
                    return
        finally:
            self._passing = False
            self._passes_done.set()

    async def _pass(self) -> None:
        waiting = sorted(
            (r for r in self._groups.values() if r.lease.state is LeaseState.QUEUED), key=lambda r: group_order(r.lease)
        )
        if not waiting:
            return
        keys = sorted({key for record in waiting for key in record.lease.candidates})
        statuses = dict(zip(keys, await asyncio.gather(*(self._status_of(key) for key in keys))))
        catalog = self._catalog()
        hosts = {key: spec.host for key, spec in catalog.resources.items()} if catalog else {}
        for record in waiting:
            lease = record.lease
            if lease.wait_deadline is not None and lease.wait_deadline <= time.time():
                # Never granted after its wait ran out (a pass after a restart, or a late one): it ends
                # here unless its caller's own wait is about to end it.
                if not self._waiters.get(record.ref):
                    await self._end_waiting(record.ref, EndReason.WAIT_TIMED_OUT, LeaseState.CANCELLED, locked=True)
                    self._again = True
                continue
            if any(_entry_missing(statuses[key], record.ref) for key in lease.candidates):
                # Withdrawn by an admin, or a take whose give-back failed: asking again says which.
                await self._ensure_entries(record)
                self._again = True
                continue
            views = [
                KeyView(key, statuses[key].ready_for_group, statuses[key].free_since, hosts.get(key))
                for key in lease.candidates
            ]
            chosen = choose_members(record.ref, lease.count, views, one_host=lease.one_host)
            if chosen is None:
                continue
            if await self._take(record, chosen):
                self._again = True  # entries it withdrew may make other keys ready for the next group

    async def _take(self, record: GroupRecord, chosen: tuple[str, ...]) -> bool:
        awaited = record.ref in self._awaited
        if not awaited:
            self._unclaimed.add(record.ref)
        results = await asyncio.gather(
            *(self._call(key, "take_for_group", record.entries[key], awaited) for key in chosen), return_exceptions=True
        )
        taken = {key: r for key, r in zip(chosen, results) if isinstance(r, Lease)}
        if len(taken) < len(chosen):
            entries = dict(record.entries)
            for key, lease in taken.items():
                back: Lease = await self._call(key, "requeue_group_member", lease.lease_id)
                entries[key] = back.lease_id
            self._save(record.model_copy(update={"entries": entries}))
            self._events.emit("group.take_aborted", level="warning", group=record.ref, keys=list(chosen))
            return False
        catalog = self._catalog()
        specs = catalog.resources if catalog else {}
        members = tuple(
            GroupMember(
                key=key,
                fencing_token=taken[key].fencing_token,
                host=specs[key].host if key in specs else None,
                labels=dict(specs[key].labels) if key in specs else {},
                properties=dict(specs[key].properties) if key in specs else {},
            )
            for key in chosen
        )
        now = time.time()
        granted = record.lease.model_copy(
            update={
                "state": LeaseState.GRANTED,
                "granted_at": now,
                "wait_deadline": None,
                "expires_at": min(taken[key].expires_at or now for key in chosen),
                "members": members,
            }
        )
        leftover = {key: lease_id for key, lease_id in record.entries.items() if key not in taken}
        entries = {key: taken[key].lease_id for key in chosen}
        updated = record.model_copy(update={"lease": granted, "entries": entries})
        self._save(updated)  # granted once every key is: a crash before this gives the keys back (recover)
        self._events.emit(
            "group.granted",
            group=record.ref,
            holder=granted.holder,
            keys=list(chosen),
            fencing_tokens=[taken[key].fencing_token for key in chosen],
            wait_s=round(now - granted.queued_at, 6),
        )
        if self._observe_wait is not None:
            self._observe_wait(now - granted.queued_at)
        for future in self._waiters.pop(record.ref, []):
            if not future.done():
                future.set_result(granted)
        await self._withdraw_entries(record, leftover)
        return True

    # ------------------------------------------------------------------ entries and ends

    async def _ensure_entries(self, record: GroupRecord, *, recovering: bool = False) -> None:
        """Queue the group's entry on every key it may use (a retry for those it has). Lock held."""
        record = self._groups.get(record.ref, record)
        lease = record.lease
        if lease.state is not LeaseState.QUEUED:
            return  # granted or ended while the caller waited for the lock
        results = await asyncio.gather(
            *(
                self._call(
                    key,
                    "reserve",
                    lease.holder,
                    ttl_s=lease.ttl_s,
                    wait=True,
                    priority=lease.priority,
                    request_id=record.entry_id(key),
                    note=lease.note,
                    group=record.ref,
                    # Each entry, and each key it takes, ends with the caller's session: a member
                    # ending ends the group as a whole; a cancelled entry cancels the waiting group.
                    session=lease.session,
                )
                for key in lease.candidates
            ),
            return_exceptions=True,
        )
        entries = dict(record.entries)
        gone = False
        for key, result in zip(lease.candidates, results):
            if isinstance(result, Lease):
                if result.state is LeaseState.GRANTED:  # taken before a crash, never recorded: give it back
                    result = await self._call(key, "requeue_group_member", result.lease_id)
                if result.state is LeaseState.QUEUED:
                    entries[key] = result.lease_id
                    continue
                gone = True
            elif isinstance(result, _ENDED_ENTRY):
                gone = True  # its entry ended (withdrawn by an admin, or timed out): the group cannot wait on it
            elif isinstance(result, BaseException):
                if entries != record.entries:
                    self._save(record.model_copy(update={"entries": entries}))
                raise result
        record = record.model_copy(update={"entries": entries})
        self._save(record)
        if gone:
            self._events.emit("group.entry_lost", level="warning", group=record.ref, recovering=recovering or None)
            await self._end_waiting(record.ref, EndReason.CANCELLED, LeaseState.CANCELLED, locked=True)

    async def _withdraw_entries(self, record: GroupRecord, entries: dict[str, str]) -> None:
        for key in entries:
            with contextlib.suppress(BrokerError):
                await self._call(key, "withdraw", record.lease.holder, record.entry_id(key))

    async def _end_waiting(
        self,
        ref: str,
        reason: EndReason,
        state: LeaseState,
        *,
        release_granted: bool = False,
        locked: bool = False,
    ) -> None:
        """End a waiting group: its entries leave their queues, then the record says so."""
        if not locked:
            async with self._lock:
                await self._end_waiting(ref, reason, state, release_granted=release_granted, locked=True)
            return
        record = self._groups[ref]
        if record.lease.state is LeaseState.GRANTED:
            if release_granted:
                await self._end_granted(ref, LeaseState.RELEASED, reason, "")
            return
        if record.lease.state is not LeaseState.QUEUED:
            return
        # Every key it may use, not only the recorded entries: a caller cancelled while its
        # entries were being queued leaves some that the record does not name yet.
        await self._withdraw_entries(record, {key: "" for key in record.lease.candidates})
        ended = record.lease.model_copy(
            update={"state": state, "ended_at": time.time(), "end_reason": reason, "wait_deadline": None}
        )
        self._save(record.model_copy(update={"lease": ended, "entries": {}}))
        self._events.emit("group.cancelled", group=ref, holder=ended.holder, reason=reason.value)
        for future in self._waiters.pop(ref, []):
            if not future.done():  # the waiting caller hears why, as a single key's waiter does
                future.set_exception(LeaseNotHeld(ended.lease_id, ended.state.value, ended.end_reason))

    async def _end_granted(self, ref: str, state: LeaseState, reason: str, by: str) -> None:
        """End a granted group as a whole: release the keys it still holds, then record why (lock held)."""
        record = self._groups[ref]
        if record.lease.state is not LeaseState.GRANTED:
            return
        for key, lease_id in record.entries.items():
            with contextlib.suppress(LeaseNotHeld, LeaseNotFound):  # the key whose end started this
                await self._call(key, "release", lease_id)
        ended = record.lease.model_copy(
            update={"state": state, "ended_at": time.time(), "end_reason": str(reason), "ended_by": by}
        )
        self._save(record.model_copy(update={"lease": ended}))
        self._events.emit(
            f"group.{state.value}", group=ref, holder=ended.holder, keys=list(ended.keys), reason=str(reason) or None
        )

    async def _check_granted(self, record: GroupRecord) -> None:
        """After a restart: a granted group whose key lease ended while nobody listened ends too."""
        for key, lease_id in record.entries.items():
            lease: Lease = await self._call(key, "lease", lease_id)
            if lease.state is not LeaseState.GRANTED:
                await self._end_granted(
                    record.ref, lease.state, lease.end_reason or EndReason.GROUP_MEMBER_ENDED, lease.ended_by
                )
                return
        leftover = [key for key in record.lease.candidates if key not in record.entries]
        await self._withdraw_entries(record, {key: "" for key in leftover})

    # ------------------------------------------------------------------ plumbing

    def _record_of(self, lease_id: Any) -> GroupRecord:
        ref = self._by_id.get(lease_id) if isinstance(lease_id, str) else None
        if ref is None:
            raise LeaseNotFound(lease_id if isinstance(lease_id, str) else "?")
        return self._groups[ref]

    def _save(self, record: GroupRecord) -> None:
        try:
            self._records.save(record)
        except OSError as exc:
            raise BrokerUnavailable(
                f"cannot write the group record ({exc.strerror or exc}); nothing more was changed",
                "check the state dir is writable",
            ) from None
        self._index(record)

    def _index(self, record: GroupRecord) -> None:
        lease = record.lease
        self._groups[record.ref] = record
        self._by_request[(lease.holder, lease.request_id)] = record.ref
        self._by_id[lease.lease_id] = record.ref
        if lease.state is LeaseState.GRANTED:
            for lease_id in record.entries.values():
                self._by_member[lease_ref(lease_id)] = record.ref

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


async def _shielded(work: Awaitable[Any]) -> Any:
    """Run ``work`` to its end although the caller is cancelled (without an actor system's aftercare)."""
    return await asyncio.shield(asyncio.ensure_future(work))


def _entry_missing(status: ResourceStatus, ref: str) -> bool:
    """Does ``status`` show a key whose queue no longer holds the group's entry (and not held by it)?"""
    if status.state is ResourceState.DOWN and status.down_reason is None:
        return False  # its actor did not answer: nothing is known
    return status.ready_for_group != ref and not any(entry.group == ref for entry in status.queue)
