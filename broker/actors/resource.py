"""``resource:<key>``: the async Ray actor that owns one key's leases.

A thin shell around :class:`broker.core.book.LeaseBook`. Each call runs one book
command and appends what it changed to the ledger's log at once (nothing awaits
between the two, so calls never interleave inside one state change and the
log's order is the book's); it answers, wakes waiters and logs only once the
fdatasync covering that record returned. Syncs run one at a time off the event
loop and each covers every record appended while the one before ran (group
commit, :mod:`broker.disk.group_commit`). Reads and refusals wait the same way
for what they saw, so nobody hears of a change before it is on disk. A failed
sync fails every call it covered and puts the book back to what the disk holds.

Lifecycle: created detached by the coordinator, restarted by Ray forever. On
(re)start the constructor rebuilds the book from the ledger — granted leases
keep holder, id and token; queued requests keep their order; leases whose
time ran out are expired — and arms one timer for the next deadline. There
is no polling loop: a release, an expiry or a timeout grants the next waiter
in the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import time
from typing import Any

from broker.core.book import Change, HostDown, LeaseBook, Outcome, release_ended
from broker.core.catalog import Catalog, ResourceSpec
from broker.core.clock import ActorClock
from broker.core.placement_rules import host_down_reason
from broker.core.usage import ResourceSnapshot, UsageCounters
from broker.disk.group_commit import GroupCommitter
from broker.disk.journal import EventSink
from broker.disk.store import ResourceLedger, ResourceMeta, StateDir, read_json
from broker.errors import BrokerError, BrokerUnavailable, InvalidRequest, LeaseNotFound, LeaseNotHeld, WaitTimeout
from broker.models import (
    EndReason,
    Holder,
    Lease,
    LeaseEnded,
    LeaseEvent,
    LeaseState,
    QueueEntry,
    Reason,
    RequestId,
    ReserveRequest,
    ResourceState,
    ResourceStatus,
    SessionId,
    TtlSeconds,
    checked,
    resource_of_lease_id,
    validated,
)
from broker.seam import ActorRef, ActorSystem, ray_system
from broker.seam.placement import COORDINATOR_NAME

__all__ = ["ResourceActor", "resource_status"]

_ENDS_OF_A_GRANT = frozenset({LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED})
# Metrics snapshots trail state changes by at most this long (Prometheus scrapes every ~15 s).
PUSH_DELAY_S = 0.1


def resource_status(book: LeaseBook) -> ResourceStatus:
    """What anyone may see of a book: no lease ids, only public refs."""
    granted = book.granted
    maintenance = book.maintenance
    host_down = book.host_down
    if host_down is not None:
        state = ResourceState.DOWN
    elif maintenance is not None:
        state = ResourceState.MAINTENANCE
    elif granted is not None:
        state = ResourceState.LEASED
    else:
        state = ResourceState.FREE
    queue = tuple(
        QueueEntry(
            position=index + 1,
            holder=lease.holder,
            priority=lease.priority,
            queued_at=lease.queued_at,
            note=lease.note,
            ref=lease.ref,
            group=lease.group,
        )
        for index, lease in enumerate(book.queue)
    )
    return ResourceStatus(
        key=book.resource,
        state=state,
        holder=granted.holder if granted else None,
        lease_ref=granted.ref if granted else None,
        fencing_token=granted.fencing_token if granted else None,
        granted_at=granted.granted_at if granted else None,
        expires_at=granted.expires_at if granted else None,
        queue=queue,
        maintenance_reason=maintenance.reason if maintenance else None,
        maintenance_since=maintenance.since if maintenance else None,
        maintenance_by=maintenance.by if maintenance else None,
        down_reason=host_down.reason if host_down else None,
        free_since=book.freed_at if granted is None else None,
        ready_for_group=book.ready_for_group,
    )


class ResourceActor:
    """Owns one key: its book, its ledger, its waiters and its expiry timer."""

    def __init__(self, key: str, state_dir: str, namespace: str, *, system: ActorSystem | None = None):
        self._key = key
        self._namespace = namespace  # the actors' own; not the creating job's (the runtime context's)
        self._system = system or ray_system()
        self._state = StateDir.from_env(state_dir).ensure()
        self._loop = asyncio.get_running_loop()  # async actors construct inside their loop
        self._ledger = ResourceLedger(self._state, key, defer=self._after_answer)
        self._events = EventSink(self._state.events_path, f"resource:{key}", self._state.logs_dir)
        self._spec, settings = self._read_catalog()
        self._waiters: dict[str, list[asyncio.Future[Lease]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._ended: list[LeaseEnded] = []  # granted leases ended since the last push (runs watch theirs)
        self._warned: set[str] = set()  # leases told their max hold is near (lease.expiring)
        self._started_at = time.time()
        self._clock = ActorClock()  # TTLs run on the monotonic clock; re-based from the wall clock at each start
        contents = self._ledger.load()
        for moved_to, error in contents.corrupt:
            self._events.emit("ledger.corrupt_record", level="error", resource=key, moved_to=str(moved_to), error=error)
        if contents.torn_bytes:  # an append that never returned (a crash mid-write): not acknowledged, dropped
            self._events.emit("ledger.torn_tail", level="warning", resource=key, dropped_bytes=contents.torn_bytes)
        try:
            self._ledger.checkpoint(contents)  # the files catch up with the log; the log starts empty
        except OSError as exc:  # read-only disk: the log stays and is replayed again next start
            self._events.emit("ledger.checkpoint_failed", level="error", resource=key, error=str(exc))
        self._counters = UsageCounters.from_leases(contents.leases)
        self._snapshot_seq = 0
        self._push_pending = False
        self._coordinator = ActorRef(self._system, COORDINATOR_NAME, namespace)
        # Asked before the book grants anything on restore: a restarted actor never grants on
        # an absent host before the coordinator's next health pass says so.
        down_reason = self._host_down_reason()
        fixes = self._restore(
            contents,
            HostDown(down_reason, self._clock.now()) if down_reason else None,
            max_hold_s=self._spec.max_hold_s,
            warn_before_s=self._spec.warn_before_s,
            claim_s=settings.claim_s,
            retention_s=settings.retention_s,
        )
        self._committer = GroupCommitter(self._ledger, self._loop, self._after_failed_sync)
        self._deliver(fixes)
        if self._book.host_down is not None:
            self._log_change(Change(LeaseEvent.DOWN))
        self._events.emit(
            "resource.started",
            resource=key,
            pid=os.getpid(),
            granted=self._book.granted.ref if self._book.granted else None,
            queued=len(self._book.queue),
            fencing_counter=self._book.fencing_counter,
        )
        self._arm_timer()
        self._schedule_push()

    # ------------------------------------------------------------------ lease calls

    async def reserve(
        self,
        holder: str,
        *,
        ttl_s: float = 3600.0,
        wait: bool = False,
        timeout_s: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        note: str = "",
        group: str | None = None,
        session: str | None = None,
        bind_session: bool = True,
    ) -> Lease:
        request = validated(
            ReserveRequest,
            resource=self._key,
            holder=holder,
            ttl_s=ttl_s,
            wait=wait,
            timeout_s=timeout_s,
            priority=priority,
            request_id=request_id if request_id is not None else secrets.token_hex(16),
            note=note,
            group=group,
            session=session,
            bind_session=bind_session,
        )
        lease_id = f"{self._key}.{secrets.token_hex(16)}"
        try:
            outcome, durable = self._stage(lambda now: self._book.reserve(request, lease_id, now))
        except BrokerError:
            await self._committer.settled()
            raise
        lease: Lease = outcome.result  # type: ignore[assignment]
        future: asyncio.Future[Lease] | None = None
        # A group's entry: the coordinator takes it, and answers the group's caller.
        if lease.state is LeaseState.QUEUED and request.wait and lease.group is None:
            # Waiting from now, not from when the record is on disk: a grant in a later
            # record of the same sync is delivered right after this one's.
            future = self._loop.create_future()
            self._waiters.setdefault(lease.lease_id, []).append(future)
        try:
            await self._settle(durable)
            if lease.state is LeaseState.CANCELLED:
                raise self._cancelled_error(lease)
            return lease if future is None else await future
        except BrokerUnavailable:
            if future is not None:
                self._forget_waiter(lease.lease_id, future)
            raise
        except asyncio.CancelledError:
            if future is None:
                raise
            # The caller went away (ray.cancel, Ctrl-C): leave the queue, unless
            # another call for the same request is still waiting.
            self._forget_waiter(lease.lease_id, future)
            if not self._waiters.get(lease.lease_id):
                with contextlib.suppress(LeaseNotHeld, LeaseNotFound, BrokerUnavailable):  # granted or gone already
                    went_away = self._stage(
                        lambda now: self._book.cancel(lease.lease_id, now, EndReason.WAITER_WENT_AWAY)
                    )
                    self._in_background(went_away[1])
            raise

    async def release(self, lease_id: str) -> Lease:
        self._own(lease_id)
        try:
            return (await self._apply(lambda now: self._book.release(lease_id, now))).result  # type: ignore[return-value]
        except LeaseNotFound:
            return release_ended(self._from_disk(lease_id))

    async def renew(self, lease_id: str, ttl_s: float | None = None) -> Lease:
        self._own(lease_id)
        ttl = None if ttl_s is None else checked(TtlSeconds, ttl_s, "ttl_s")
        try:
            return (await self._apply(lambda now: self._book.renew(lease_id, ttl, now))).result  # type: ignore[return-value]
        except LeaseNotFound:
            ended = self._from_disk(lease_id)
            raise LeaseNotHeld(lease_id, ended.state.value, ended.end_reason) from None

    async def cancel(self, lease_id: str, reason: str = "cancelled", by: str = "") -> Lease:
        self._own(lease_id)
        reason, by = checked(Reason, reason, "reason"), checked(Reason, by, "by")  # an admin's withdraw says why
        return (await self._apply(lambda now: self._book.cancel(lease_id, now, reason, by=by))).result  # type: ignore[return-value]

    async def withdraw(self, holder: str, request_id: str) -> Lease | None:
        """Cancel the queued request ``(holder, request_id)``; None if there is none."""

        def find() -> Lease | None:
            return self._book.find_request(holder, request_id) if isinstance(request_id, str) else None

        lease = find()
        if lease is None or lease.state is not LeaseState.QUEUED:
            return await self._read(find)
        return (await self._apply(lambda now: self._book.cancel(lease.lease_id, now, EndReason.WITHDRAWN))).result

    async def take_for_group(self, lease_id: str, awaited: bool = True) -> Lease:
        """The coordinator takes this key for a group whose entry heads the queue (``ResourceBusy`` if not)."""
        self._own(lease_id)
        outcome = await self._apply(lambda now: self._book.take_for_group(lease_id, now, awaited=awaited is not False))
        return outcome.result  # type: ignore[return-value]

    async def requeue_group_member(self, lease_id: str) -> Lease:
        """The coordinator could not take the group's other keys: undo this take, keep the queue place."""
        self._own(lease_id)
        new_id = f"{self._key}.{secrets.token_hex(16)}"
        return (await self._apply(lambda now: self._book.requeue_group_member(lease_id, new_id, now))).result  # type: ignore[return-value]

    async def lease(self, lease_id: str) -> Lease:
        self._own(lease_id)

        def find() -> Lease:
            try:
                return self._book.get(lease_id)
            except LeaseNotFound:
                return self._from_disk(lease_id)

        return await self._read(find)

    async def revoke(
        self,
        reason: str,
        *,
        expected_holder: str | None = None,
        by: str = "",
        request_id: str | None = None,
    ) -> Lease:
        reason = checked(Reason, reason, "reason")
        if not reason.strip():
            raise InvalidRequest("invalid reason='': a revoke needs a reason", "reason")
        if expected_holder is not None:
            expected_holder = checked(Holder, expected_holder, "expected_holder")
        by = checked(Reason, by, "by")
        if request_id is not None:
            request_id = checked(RequestId, request_id, "request_id")
        outcome = await self._apply(
            lambda now: self._book.revoke(reason, now, expected_holder=expected_holder, by=by, request_id=request_id)
        )
        return outcome.result  # type: ignore[return-value]

    async def set_maintenance(
        self, on: bool, reason: str = "", by: str = "", *, only_own: bool = False
    ) -> ResourceStatus:
        """Maintenance on or off; ``only_own``: only if the key's maintenance is none or ``by``'s
        (a compare-and-set: the answer's ``maintenance_by`` says whose it is now)."""
        if not isinstance(on, bool):
            raise InvalidRequest(f"invalid on={on!r}: must be true or false", "on")
        if not isinstance(only_own, bool):
            raise InvalidRequest(f"invalid only_own={only_own!r}: must be true or false", "only_own")
        reason, by = checked(Reason, reason, "reason"), checked(Reason, by, "by")
        await self._apply(lambda now: self._book.set_maintenance(on, reason, now, by, only_own=only_own))
        return await self._read(lambda: resource_status(self._book))

    async def session_gone(self, session: str) -> int:
        """The coordinator saw the caller's session ``session`` end: what is tied to it ends.

        Returns how many requests and leases it ended (0 when told again: idempotent).
        """
        session = checked(SessionId, session, "session")
        outcome = await self._apply(lambda now: self._book.end_session(session, now))
        return sum(1 for lease in outcome.changed_leases if lease.session == session and not lease.active)

    async def set_host_down(self, reason: str | None) -> ResourceStatus:
        """The coordinator's health pass: this key's host is absent (``reason``) or present (None)."""
        if reason is not None:
            reason = checked(Reason, reason, "reason")
        if self._spec.host is None:
            reason = None  # the catalog changed under the pass: a key with no host is never host-down
        await self._apply(lambda now: self._book.set_host_down(reason, now))
        return await self._read(lambda: resource_status(self._book))

    async def check_fence(self, lease_id: str, fencing_token: int) -> Lease:
        self._own(lease_id)
        if isinstance(fencing_token, bool) or not isinstance(fencing_token, int):
            raise InvalidRequest(f"invalid fencing_token={fencing_token!r}: must be an integer", "fencing_token")
        return await self._read(lambda: self._book.check_fence(lease_id, fencing_token, self._clock.now()))

    # ------------------------------------------------------------------ reads

    async def status(self) -> ResourceStatus:
        return await self._read(lambda: resource_status(self._book))

    async def queue_position(self, holder: str, request_id: str) -> int | None:
        def position() -> int | None:
            lease = self._book.find_request(holder, request_id) if isinstance(request_id, str) else None
            return self._book.position(lease.lease_id) if lease is not None else None

        return await self._read(position)

    async def ping(self) -> dict[str, Any]:
        return {"key": self._key, "pid": os.getpid(), "started_at": self._started_at}

    async def snapshot(self) -> tuple[ResourceSnapshot, float]:
        """The metrics snapshot and this actor life's start time (the coordinator's pull)."""
        return await self._read(lambda: (self._make_snapshot(), self._started_at))

    def close(self) -> None:
        """Stop this instance's timers (an in-process host stopping it; on Ray the process just dies)."""
        self._closed = True
        self._committer.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def reconfigure(self) -> None:
        """Re-read this key's settings from the catalog the coordinator wrote."""
        self._spec, settings = self._read_catalog()
        self._book.max_hold_s = self._spec.max_hold_s
        self._book.warn_before_s = self._spec.warn_before_s
        self._book.claim_s = settings.claim_s
        self._book.retention_s = settings.retention_s
        reason = self._host_down_reason()
        with contextlib.suppress(BrokerUnavailable):  # a grant on the host's return could not be written
            await self._apply(lambda now: self._book.set_host_down(reason, now))

    def _host_down_reason(self) -> str | None:
        """Why this key's host is not in the cluster now, or None (no host, or it is there)."""
        if self._spec.host is None:
            return None
        try:
            nodes = self._system.alive_nodes()
        except Exception as exc:  # noqa: BLE001 - no node list now: the coordinator's pass decides
            self._events.emit("resource.nodes_unknown", level="warning", resource=self._key, error=str(exc)[:200])
            return None
        return host_down_reason(self._spec.host, nodes)

    # ------------------------------------------------------------------ shell

    async def _apply(self, command: Any) -> Outcome:
        """Run one book command, make it durable, then answer (everyone else was told by then)."""
        try:
            outcome, durable = self._stage(command)
        except BrokerError:
            await self._committer.settled()  # a refusal may rest on changes still in flight
            raise
        await self._settle(durable)
        return outcome

    def _stage(self, command: Any) -> tuple[Outcome, asyncio.Future[None]]:
        """Run one book command and append what it changed to the log, now; the future is done once it is on disk.

        Whoever else the command concerns (a woken waiter, the journal, the coordinator)
        is told by the committer once the record is on disk, in the log's order. The future
        covers every record appended so far: an outcome that wrote nothing (a retried
        request's lease) may show one still in flight.

        Raises:
            BrokerUnavailable: the record could not be appended; the book is as it was.
        """
        outcome: Outcome = command(self._clock.now())
        if outcome.wrote_anything:
            meta = None
            if outcome.maintenance_changed:
                maintenance = self._book.maintenance
                meta = ResourceMeta(
                    key=self._key,
                    fencing_counter=self._book.fencing_counter,
                    maintenance_reason=maintenance.reason if maintenance else None,
                    maintenance_since=maintenance.since if maintenance else None,
                    maintenance_by=maintenance.by if maintenance else "",
                    updated_at=self._clock.now(),
                )
            try:
                self._committer.append(outcome.changed_leases, meta, functools.partial(self._deliver, outcome))
            except OSError as exc:
                self._book.rollback()  # the append follows the command at once: it is the book's last
                raise self._write_failed(exc) from None
        else:
            self._deliver(outcome)
        self._arm_timer()
        return outcome, self._committer.durable(self._committer.last)

    async def _settle(self, durable: asyncio.Future[None]) -> None:
        """Wait for ``durable``; a failed sync is this call's failure (its change is not on disk)."""
        try:
            await durable
        except Exception as exc:  # noqa: BLE001 - whatever the sync raised, the change is not durable
            raise self._write_failed(exc) from None

    async def _read(self, compute: Any) -> Any:
        """``compute()`` from the book as it is now, answered once all it saw is on disk.

        If those changes are dropped instead (a failed sync), the book is back to the disk's
        state: compute again. A refusal (``BrokerError``) is answered the same way.
        """
        while True:
            try:
                answer, error = compute(), None
            except BrokerError as exc:
                answer, error = None, exc
            try:
                await self._committer.durable(self._committer.last)
            except Exception:  # noqa: BLE001 - dropped: read the restored book
                continue
            if error is not None:
                raise error
            return answer

    def _write_failed(self, exc: BaseException) -> BrokerUnavailable:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        self._events.emit("ledger.write_failed", level="error", resource=self._key, error=str(exc))
        return BrokerUnavailable(
            f"cannot write the state dir for {self._key!r} ({detail}); nothing was changed",
            f"check {self._state.root} is writable",
        )

    def _restore(self, contents: Any, host_down: HostDown | None, **options: Any) -> Outcome:
        """Rebuild the book from ``contents``; write its fixes (expiries due) durably; return them."""
        self._book, fixes = LeaseBook.restore(
            self._key,
            contents.leases,
            # A corrupt record may have held the newest token: stay above it.
            fencing_floor=contents.meta.fencing_counter + len(contents.corrupt),
            maintenance=contents.meta.maintenance,
            host_down=host_down,
            now=self._clock.now(),
            **options,
        )
        try:
            self._ledger.write(fixes.changed_leases)
        except OSError as exc:
            # Read-only disk: nothing that is not on disk may be told to anyone. Serve what
            # was loaded; the timer retries the expiries while the disk refuses.
            self._book.rollback()
            self._events.emit("ledger.write_failed", level="error", resource=self._key, error=str(exc))
            return Outcome()
        return fixes

    def _after_failed_sync(self, error: BaseException) -> None:
        """A sync failed: its records were cut from the log; the book goes back to what the disk holds.

        Called before any of the failed calls hears of it. Queued requests come back as after
        a restart (unclaimed until their holder renews or asks again); their waiters stay.
        """
        self._events.emit("ledger.sync_failed", level="error", resource=self._key, error=str(error)[:200])
        try:
            contents = self._ledger.reload()
        except OSError as exc:
            # Neither written nor readable: the book holds what the disk may not. Die; Ray
            # restarts the actor, which serves what the disk holds (or does not start).
            self._events.emit("ledger.unreadable", level="error", resource=self._key, error=str(exc)[:200])
            os._exit(70)
        book = self._book
        fixes = self._restore(
            contents,
            book.host_down,
            max_hold_s=book.max_hold_s,
            warn_before_s=book.warn_before_s,
            claim_s=book.claim_s,
            retention_s=book.retention_s,
        )
        self._deliver(fixes)
        self._schedule_push()
        # Not at once: with the disk failing every sync, a due expiry would retry in a loop.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(1.0, self._on_timer)

    def _in_background(self, durable: asyncio.Future[None]) -> None:
        """Nobody awaits ``durable`` (a timer's or a departed caller's change): only its error is read."""
        durable.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _deliver(self, outcome: Outcome) -> None:
        if outcome.changes:
            self._schedule_push()
            self._tell_if_ready_for_group()
        for change in outcome.changes:
            self._counters.observe(change.event, change.lease)
            self._log_change(change)
            lease = change.lease
            if lease is None:
                continue
            if lease.state is LeaseState.GRANTED:
                self._wake(lease.lease_id, result=lease)
            elif lease.granted_at is not None and lease.state in _ENDS_OF_A_GRANT:
                self._ended.append(LeaseEnded(lease.ref, lease.state, lease.end_reason or "", lease.ended_by or ""))
            elif lease.state is LeaseState.CANCELLED:
                self._wake(lease.lease_id, error=self._cancelled_error(lease))

    def _log_change(self, change: Change) -> None:
        lease = change.lease
        if change.event in (LeaseEvent.DOWN, LeaseEvent.UP):
            down = self._book.host_down
            self._events.emit(
                change.event,
                level="warning" if down is not None else "info",
                resource=self._key,
                host=self._spec.host,
                reason=down.reason if down else None,
            )
            return
        if lease is None:
            maintenance = self._book.maintenance
            self._events.emit(
                change.event,
                resource=self._key,
                on=maintenance is not None,
                reason=maintenance.reason if maintenance else None,
                by=(maintenance.by if maintenance else change.by) or None,  # off says who, too
            )
            return
        fields: dict[str, Any] = {
            "resource": self._key,
            "holder": lease.holder,
            "lease": lease.ref,
            "priority": lease.priority,
            "fencing_token": lease.fencing_token,
        }
        if lease.session is not None:  # whose process it is tied to (a job id, not a capability)
            fields["session"] = lease.session
        if lease.group is not None:
            fields["group"] = lease.group  # the chaos checker ties a key's grant to its group's
        if change.event is LeaseEvent.GRANTED:
            fields["wait_s"] = round((lease.granted_at or 0.0) - lease.queued_at, 6)
            fields["expires_at"] = lease.expires_at
        elif change.event in (LeaseEvent.RENEWED, LeaseEvent.QUEUED, LeaseEvent.CLAIMED):
            fields["expires_at"] = lease.expires_at
            fields["position"] = self._book.position(lease.lease_id)
        else:
            fields["reason"] = lease.end_reason or None
            fields["by"] = lease.ended_by or None
            if lease.granted_at is not None and lease.ended_at is not None:
                fields["hold_s"] = round(lease.ended_at - lease.granted_at, 6)
        self._events.emit(change.event, **fields)

    def _after_answer(self, work: Any) -> None:
        """Run ``work`` (the ledger's file updates) once the current call has answered."""

        def run() -> None:
            if self._closed:
                return
            try:
                work()
            except OSError as exc:
                self._events.emit("ledger.files_behind", level="error", resource=self._key, error=str(exc))

        self._loop.call_soon(run)

    def _make_snapshot(self) -> ResourceSnapshot:
        self._snapshot_seq += 1
        book = self._book
        granted, maintenance, queue = book.granted, book.maintenance, book.queue
        if book.host_down is not None:
            state = ResourceState.DOWN
        elif maintenance is not None:
            state = ResourceState.MAINTENANCE
        else:
            state = ResourceState.LEASED if granted is not None else ResourceState.FREE
        return ResourceSnapshot(
            key=self._key,
            pid=os.getpid(),
            seq=self._snapshot_seq,
            state=state,
            queue_depth=len(queue),
            granted_at=granted.granted_at if granted else None,
            expires_at=granted.expires_at if granted else None,
            oldest_queued_at=min((lease.queued_at for lease in queue), default=None),
            maintenance_since=maintenance.since if maintenance else None,
            counters=self._counters.copy(),
            sessions=tuple(sorted(book.sessions().items())),
            queued_groups=tuple(lease.group for lease in queue if lease.group is not None),
        )

    def _tell_if_ready_for_group(self) -> None:
        """A free key headed by a group's entry waits for the coordinator: tell it now, not at the next push."""
        group = self._book.ready_for_group
        if group is not None and not self._closed:
            self._system.tell(self._coordinator, "group_key_ready", self._key, group)

    def _schedule_push(self) -> None:
        """Push one snapshot shortly after a change; changes in the meantime ride along.

        Off the caller's path (the call has answered by then), and at most one
        push per PUSH_DELAY_S however busy the key is.
        """
        if not self._push_pending:
            self._push_pending = True
            self._loop.call_later(PUSH_DELAY_S, self._push)

    def _push(self) -> None:
        self._push_pending = False
        if self._closed:
            return
        ended, self._ended = tuple(self._ended), []
        snapshot = self._make_snapshot()
        # Sent once what it shows is on disk (at once if nothing is in flight).
        durable = self._committer.durable(self._committer.last)
        durable.add_done_callback(functools.partial(self._send_push, snapshot, ended))

    def _send_push(
        self, snapshot: ResourceSnapshot, ended: tuple[LeaseEnded, ...], durable: asyncio.Future[None]
    ) -> None:
        if durable.cancelled() or durable.exception() is not None:
            self._ended[:0] = ended  # what it showed was dropped: push the restored state instead
            self._schedule_push()
            return
        if not self._closed:
            # Fire and forget: with no coordinator now, it pulls snapshots when it is back.
            self._system.tell(self._coordinator, "push_snapshot", snapshot, self._started_at, ended)

    def _wake(self, lease_id: str, *, result: Lease | None = None, error: BaseException | None = None) -> None:
        for future in self._waiters.pop(lease_id, []):
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

    def _forget_waiter(self, lease_id: str, future: asyncio.Future[Lease]) -> None:
        waiters = self._waiters.get(lease_id, [])
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            self._waiters.pop(lease_id, None)

    def _cancelled_error(self, lease: Lease) -> Exception:
        if lease.end_reason is EndReason.WAIT_TIMED_OUT:
            waited = (lease.ended_at or lease.queued_at) - lease.queued_at
            return WaitTimeout(self._key, round(waited, 3), lease.lease_id)
        return LeaseNotHeld(lease.lease_id, lease.state.value, lease.end_reason)

    def _pending_warning(self) -> Lease | None:
        granted = self._book.granted
        if granted is None or granted.warn_at is None or granted.lease_id in self._warned:
            return None
        return granted

    def _arm_timer(self) -> None:
        """One timer for the next thing due: an expiry, a wait deadline, or a max-hold warning."""
        deadline = self._book.next_deadline()
        warning = self._pending_warning()
        if warning is not None:
            deadline = warning.warn_at if deadline is None else min(deadline, warning.warn_at)  # type: ignore[type-var]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_later(self._clock.delay_until(deadline), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self._clock.now()
        warning = self._pending_warning()
        if warning is not None and (warning.warn_at or 0.0) <= now:
            self._warned.add(warning.lease_id)
            self._events.emit(
                LeaseEvent.EXPIRING,
                level="warning",
                resource=self._key,
                holder=warning.holder,
                lease=warning.ref,
                must_end_by=warning.must_end_by,
                seconds_left=round((warning.must_end_by or 0.0) - now, 3),
            )
        try:
            self._in_background(self._stage(self._book.tick)[1])  # a failed sync restores the book and re-arms
        except BrokerUnavailable:
            # The disk refused; the book is unchanged. Try again shortly.
            self._timer = self._loop.call_later(1.0, self._on_timer)

    def _own(self, lease_id: str) -> None:
        if resource_of_lease_id(lease_id) != self._key:
            raise LeaseNotFound(lease_id)

    def _from_disk(self, lease_id: str) -> Lease:
        lease = self._ledger.read_lease(lease_id)
        if lease is None:
            raise LeaseNotFound(lease_id)
        return lease

    def _read_catalog(self) -> tuple[ResourceSpec, Any]:
        """This key's settings; defaults if the catalog is missing or unreadable (never a crash loop)."""
        path = self._state.catalog_path
        try:
            catalog = Catalog.model_validate(read_json(path))
            return catalog.resources.get(self._key, ResourceSpec()), catalog.broker
        except FileNotFoundError:
            return ResourceSpec(), Catalog(resources={self._key: ResourceSpec()}).broker
        except (OSError, ValueError) as exc:
            self._events.emit("resource.catalog_unreadable", level="error", resource=self._key, error=str(exc)[:200])
        return ResourceSpec(), Catalog(resources={self._key: ResourceSpec()}).broker
