"""The coordinator's run queue: bundles wait for their lease, then run as jobs on the cluster.

One asyncio task drives each active run through its record (the lifecycle's
table is :data:`broker.core.runs.RUN_TRANSITIONS`):

    pending (queued for the lease) -> lease granted -> job submitted -> running -> ended
       ^                                                                   |
       +------------- the lease expired (e.g. the cluster was down) -------+

Every step is written to ``runs/<run_id>/run_record.json``
(:class:`broker.disk.run_records.RunRecords`) before the next one starts, and
each act is idempotent — the lease request id is random but recorded before
the request is sent, the job's submission id derives from the run id and the
lease attempt — so a restarted coordinator re-attaches to every unfinished
run: it re-joins the same queued request, finds the same job, and renews the
same lease. A lease that *expired* meanwhile is not reused: the run stops its
job, queues for a new lease (a new fencing token) and resumes from its last
finished step. A lease that was *revoked* (or otherwise ended by someone
else) stops the run at once: the resource actor reports the end with its next
snapshot push (≤ 0.1 s), the job is stopped, and the record ends
``stopped: lease lost: …``. The lease is released when the job ends, whatever
the end.

A pool bundle's run (``resource_labels``, ``count``; or a set, ``resource_keys``) queues on the pool through
the coordinator's :class:`~broker.actors.groups.GroupManager` (one group
request, the same random-id-recorded-first rule) and is bound to the keys its
group lease gets: the record says which (``resources``, ``fencing_tokens``),
the job is placed on their host, and the run then holds each key's lease (the
group's members) like a single key's — renewed (through the group, so the
group stays current), watched for a loss (any member's end stops the run; the
group ends as a whole), fenced by the executor, released as a whole at the
end. A bound run that queues again asks for the same keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.core.placement_rules import JobNeeds, Placement, placement
from broker.core.runs import (
    RunRecord,
    RunStatus,
    StepTiming,
    advance,
    check_run_id,
    end_run,
    new_run,
    run_status_from_job,
    scan_artifacts,
)
from broker.disk.journal import EventSink
from broker.disk.run_records import RunRecords
from broker.disk.store import FILE_MODE, StateDir, atomic_write
from broker.errors import BrokerError, BrokerUnavailable, InvalidRequest, LeaseNotFound, LeaseNotHeld, RunEnd
from broker.http.metrics import RunStats
from broker.models import GroupLease, Lease, LeaseEnded, LeaseState, lease_ref
from broker.seam.jobs import JobRunner, JobSpec
from executor.local import archive_state, load_state, settle_state
from executor.state import BundleStatus

if TYPE_CHECKING:
    from broker.actors.groups import GroupManager

__all__ = ["RunManager", "RUN_LEASE_TTL_S", "LeaseEnded"]

# A run's lease is short and renewed while its job runs: if the coordinator
# is gone for longer, the lease lapses and the job's fencing check refuses.
RUN_LEASE_TTL_S = 60.0
POLL_S = 0.25
CANCEL_WAIT_S = 30.0
STOP_WAIT_S = 15.0  # after a lease loss: how long the job gets to stop before the record ends anyway
LEASE_FILE = "lease.json"

Call = Callable[..., Awaitable[Any]]
# How a member's end is told when a group's keys ended at once: a revoke ends the run, an
# expiry queues it again; the other keys were released by the group ending as a whole.
_END_RANK = {LeaseState.REVOKED: 0, LeaseState.EXPIRED: 1}


class _Next(Enum):
    DONE = "done"
    REQUEUE = "requeue"


class RunManager:
    """Owns the active runs: one driving task each, their records, and the run metrics."""

    def __init__(
        self,
        state: StateDir,
        events: EventSink,
        call: Call,
        publish: Callable[[RunStats], None],
        jobs: JobRunner,
        *,
        namespace: str,
        python: str = sys.executable,
        place: Callable[[str | None, Any], Placement] | None = None,
        groups: Callable[[], Awaitable[GroupManager]] | None = None,
    ):
        self._namespace = namespace
        # The coordinator's group leases, once its restart recovery has run (pool runs only).
        self._groups = groups
        # (resource, the bundle's job needs) -> where its job runs: the coordinator knows the hosts.
        self._place = place or (lambda resource, job: placement(None, JobNeeds()))
        self._state = state
        self._store = RunRecords(state)
        self._events = events
        self._call = call  # the coordinator's retrying call on resource:<key>
        self._publish = publish  # to the metrics board
        self._jobs = jobs
        self._python = python
        self._records: dict[str, RunRecord] = {}
        self._by_request: dict[tuple[str, str], str] = {}
        self._by_lease: dict[str, str] = {}  # lease ref -> run id, while the run holds that lease
        self._lost: dict[str, LeaseEnded] = {}  # run id -> how its lease ended under it
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.stats = RunStats()

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Read every run record; start driving the unfinished ones (a restart re-attaches here)."""
        self._state.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        records, unreadable = self._store.load_all()
        for path, error in unreadable:
            self._events.emit("run.record_unreadable", level="error", path=str(path), error=error)
        for record in records:
            self._records[record.run_id] = record
            self._by_request[(record.holder, record.request_id)] = record.run_id
            if not record.finished:
                for lease_id in record.held.values():
                    self._by_lease[lease_ref(lease_id)] = record.run_id
        self._recount()
        for record in records:
            if not record.finished:
                self._events.emit("run.reattached", run_id=record.run_id, status=record.status.value)
                self._start(record.run_id)

    async def submit(
        self,
        target_dir: Path,
        bundle: Any,
        *,
        holder: str,
        priority: int,
        request_id: str,
        source: str,
        run_id: str | None = None,
        restart: bool = False,
    ) -> RunRecord:
        """Record a new run (or return the one this request already made) and start driving it.

        Raises:
            InvalidRequest: the target dir already ran to success (``restart=True`` runs it
                again from its first step), or another active run uses the same target dir.
        """
        existing = self._by_request.get((holder, request_id))
        if existing is not None:
            return self._records[existing]
        busy = next((r for r in self._records.values() if not r.finished and r.workdir == str(target_dir)), None)
        if busy is not None:
            raise InvalidRequest(f"{target_dir} is already {busy.status.value} as {busy.run_id}", "bundle")
        previous = await asyncio.to_thread(load_state, target_dir)
        if previous is not None and previous.status is BundleStatus.SUCCEEDED and not restart:
            raise InvalidRequest(
                f"{target_dir} already ran to success; submit with --restart (restart=True) to run it again",
                "restart",
            )
        if restart:
            await asyncio.to_thread(archive_state, target_dir)
        request, record = new_run(
            target_dir,
            bundle,
            holder=holder,
            priority=priority,
            request_id=request_id,
            source=source,
            python=self._python,
            run_id=run_id,
            bundle_sha256=_file_sha256(target_dir / "bundle.json"),
        )
        self._store.create(request, record)
        self._records[record.run_id] = record
        self._by_request[(holder, request_id)] = record.run_id
        self._events.emit(
            "run.queued",
            run_id=record.run_id,
            resource=bundle.resource,
            labels=bundle.resource_labels,
            keys=list(bundle.resource_keys) or None,
            count=bundle.count if bundle.pool else None,
            holder=holder,
            target=bundle.target,
        )
        self._recount()
        self._start(record.run_id)
        return record

    def get(self, run_id: Any) -> RunRecord:
        run_id = check_run_id(run_id)
        try:
            return self._records[run_id]
        except KeyError:
            raise InvalidRequest(f"unknown run id {run_id!r}", "run_id") from None

    def list(self, active_only: bool = False) -> list[RunRecord]:
        records = sorted(self._records.values(), key=lambda record: record.created_at)
        return [record for record in records if not (active_only and record.finished)]

    async def cancel(self, run_id: Any) -> RunRecord:
        """Stop a run: a queued one leaves the queue, a running one's job is stopped; its lease is released."""
        record = self.get(run_id)
        if record.finished:
            return record
        if record.submission_id is None:
            task = self._tasks.get(record.run_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            record = self._records[record.run_id]
            if not record.finished:
                await self._give_back(record)
                record = await self._finish(record, RunEnd.CANCELLED, "cancelled before it started", None)
            return record
        await self._jobs.stop(record.submission_id)
        self._events.emit("run.cancel_requested", run_id=record.run_id)
        task = self._tasks.get(record.run_id)
        if task is not None:
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
        return self._records[record.run_id]

    async def logs(self, run_id: Any) -> str:
        """The job's output (the executor's own log lines); step logs stay in the target dir."""
        record = self.get(run_id)
        if record.submission_id is None:
            return ""
        try:
            return await self._jobs.logs(record.submission_id)
        except Exception as exc:  # noqa: BLE001 - the job may be gone from Ray after a cluster restart
            return f"(Ray has no logs for {record.submission_id}: {str(exc).splitlines()[0][:200]})\n"

    def close(self) -> None:
        """Stop driving (the records stay: a new coordinator re-attaches from them)."""
        for task in list(self._tasks.values()):
            task.cancel()

    def lease_ended(self, ended: LeaseEnded) -> None:
        """A resource actor reports a granted lease that ended; a run holding it stops at once."""
        run_id = self._by_lease.get(ended.ref)
        if run_id is None:
            return
        self._lost[run_id] = ended
        wake = self._wake.get(run_id)
        if wake is not None:
            wake.set()

    # ------------------------------------------------------------------ driving a run

    def _start(self, run_id: str) -> None:
        self._wake[run_id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._drive(run_id))
        self._tasks[run_id] = task

        def forget(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(run_id, None)

        task.add_done_callback(forget)

    async def _drive(self, run_id: str) -> None:
        try:
            while True:
                record = self._records[run_id]
                if record.finished:
                    return  # ended while re-attaching (its lease was revoked meanwhile)
                if record.needs_lease and not record.held:
                    record = await self._acquire(record)
                elif record.needs_lease:
                    record = await self._check_reattached_lease(record)
                    if not record.held:
                        continue  # it expired while nobody watched: queue again
                if (
                    record.job_attempt != record.lease_attempt
                    or await self._jobs.info(record.submission_id or "") is None
                ):
                    record = await self._submit_job(record)
                if await self._watch(record) is _Next.DONE:
                    return
        except asyncio.CancelledError:
            raise
        except BrokerError as exc:
            record = self._records[run_id]
            await self._give_back(record)
            await self._finish(record, RunEnd.BROKER_ERROR, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - a run must end in a record, never in a dead task
            record = self._records[run_id]
            self._events.emit("run.error", level="error", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
            await self._give_back(record)
            await self._finish(record, RunEnd.BROKER_ERROR, f"{type(exc).__name__}: {str(exc)[:300]}", None)
        finally:
            self._wake.pop(run_id, None)

    async def _acquire(self, record: RunRecord) -> RunRecord:
        """Wait for the run's lease. The request id is random and recorded first: a restart re-joins."""
        if record.pool:
            return await self._acquire_pool(record)
        assert record.resource is not None
        while True:
            if record.lease_request_id is None:
                record = self._save(record.model_copy(update={"lease_request_id": secrets.token_hex(16)}))
            lease: Lease = await self._call(
                record.resource,
                "reserve",
                record.holder,
                ttl_s=RUN_LEASE_TTL_S,
                wait=True,
                priority=record.priority,
                request_id=record.lease_request_id,
                note=f"run {record.run_id} ({record.target})",
            )
            if lease.state is LeaseState.GRANTED:
                break
            # Granted while nobody watched and already ended: queue again, with a new request.
            record = self._save(record.model_copy(update={"lease_request_id": None}))
        ref = lease_ref(lease.lease_id)
        record = self._save(
            record.model_copy(
                update={
                    "lease_id": lease.lease_id,
                    "lease_ref": ref,
                    "fencing_token": lease.fencing_token,
                    "granted_at": lease.granted_at,
                    "message": "lease granted; submitting the job",
                }
            )
        )
        self._by_lease[ref] = record.run_id
        self._events.emit(
            "run.lease_granted",
            run_id=record.run_id,
            resource=record.resource,
            lease=ref,
            fencing_token=record.fencing_token,
        )
        return record

    async def _acquire_pool(self, record: RunRecord) -> RunRecord:
        """Wait on the pool through a group request; bind the run to the keys it gets.

        A run bound before (it queues again after an expiry) asks for the same keys together.
        """
        groups = await self._group_manager()
        while True:
            if record.lease_request_id is None:
                record = self._save(record.model_copy(update={"lease_request_id": secrets.token_hex(16)}))
            where: dict[str, Any] = (
                {"keys": list(record.resources or record.resource_keys)}
                if record.resources or record.resource_keys
                else {"labels": record.resource_labels, "count": record.count}
            )
            group: GroupLease = await groups.reserve(
                record.holder,
                **where,
                ttl_s=RUN_LEASE_TTL_S,
                wait=True,
                priority=record.priority,
                request_id=record.lease_request_id,
                note=f"run {record.run_id} ({record.target})",
                one_host=True,  # the run's one job reaches every key it holds
            )
            if group.state is LeaseState.GRANTED:
                try:
                    members = groups.member_lease_ids(group.lease_id)
                    break
                except LeaseNotHeld:
                    pass  # it ended as it was granted (a member revoked at once): ask again
            # Granted while nobody watched and already ended: queue again, with a new request.
            record = self._save(record.model_copy(update={"lease_request_id": None}))
        keys, tokens = tuple(sorted(group.keys)), group.fencing_tokens
        one = keys[0] if len(keys) == 1 else None
        record = self._save(
            record.model_copy(
                update={
                    "group_lease_id": group.lease_id,
                    "lease_ref": group.ref,
                    "lease_ids": members,
                    "resources": keys,
                    "fencing_tokens": tokens,
                    "resource": one,
                    "fencing_token": tokens[one] if one is not None else None,
                    "granted_at": group.granted_at,
                    "message": f"bound to {', '.join(keys)}; submitting the job",
                }
            )
        )
        for lease_id in members.values():
            self._by_lease[lease_ref(lease_id)] = record.run_id
        self._events.emit(
            "run.lease_granted",
            run_id=record.run_id,
            resource=one,
            resources=list(keys),
            labels=record.resource_labels,
            lease=group.ref,
            fencing_tokens=tokens,
        )
        return record

    async def _group_manager(self) -> GroupManager:
        if self._groups is None:
            raise InvalidRequest("this broker runs no group leases: a pool bundle cannot be bound here", "bundle")
        return await self._groups()

    async def _check_reattached_lease(self, record: RunRecord) -> RunRecord:
        """A run picked up again (restart) still holds its lease(s), or reacts to how they ended."""
        ended = await self._ended_lease(record)
        return record if ended is None else await self._after_lease_loss(record, ended)

    async def _ended_lease(self, record: RunRecord) -> LeaseEnded | None:
        """How one of the run's key leases ended, or None while it holds them all.

        Of several ended keys (a group ends as a whole), the one whose end says most: a
        revoke, then an expiry; the others were released by the group's end.
        """
        ends = []
        for key, lease_id in record.held.items():
            lease: Lease | None
            try:
                lease = await self._call(key, "lease", lease_id)
            except LeaseNotFound:
                lease = None
            if lease is not None and lease.state is LeaseState.GRANTED:
                continue
            ends.append(
                LeaseEnded(
                    ref=lease_ref(lease_id),
                    state=lease.state if lease is not None else LeaseState.EXPIRED,
                    reason=(lease.end_reason if lease is not None else "") or "",
                    by=(lease.ended_by if lease is not None else "") or "",
                )
            )
        return min(ends, key=lambda end: _END_RANK.get(end.state, 2), default=None)

    async def _after_lease_loss(self, record: RunRecord, ended: LeaseEnded) -> RunRecord:
        """Stop the job; an expiry queues the run again, anything else ends it ``lease lost``."""
        self._by_lease.pop(ended.ref, None)
        for lease_id in record.held.values():
            self._by_lease.pop(lease_ref(lease_id), None)
        self._lost.pop(record.run_id, None)
        if record.submission_id is not None and record.job_attempt == record.lease_attempt:
            await self._stop_job(record)
        why = f"lease lost: {ended.state.value}" + (f" by {ended.by}" if ended.by else "")
        why += f" ({ended.reason})" if ended.reason else ""
        self._events.emit("run.lease_lost", level="warning", run_id=record.run_id, resource=record.resource,
                          lease=ended.ref, state=ended.state.value)  # fmt: skip
        if ended.state is LeaseState.EXPIRED:
            # Nobody took it from the run on purpose (the broker was away): a new lease, a new
            # token, and the executor resumes from its last finished step.
            return self._save(
                advance(
                    record,
                    RunStatus.PENDING,
                    time.time(),
                    lease_id=None,
                    lease_ref=None,
                    fencing_token=None,
                    lease_request_id=None,
                    # A pool run stays bound to its keys (resources): it asks for them again.
                    group_lease_id=None,
                    lease_ids={},
                    fencing_tokens={},
                    lease_attempt=record.lease_attempt + 1,
                    message=f"{why}; queued for a new lease",
                )
            )
        await asyncio.to_thread(settle_state, Path(record.workdir), BundleStatus.CANCELLED, why)
        finished = await self._finish(
            record.model_copy(update={"lease_id": None, "group_lease_id": None, "lease_ids": {}}),
            RunEnd.LEASE_LOST,
            why,
            None,
        )
        return finished

    async def _stop_job(self, record: RunRecord) -> None:
        """Stop the job and wait (bounded) until the job system says it ended."""
        assert record.submission_id is not None
        try:
            await self._jobs.stop(record.submission_id)
        except Exception as exc:  # noqa: BLE001 - a job that is gone already is stopped
            self._events.emit("run.stop_failed", level="warning", run_id=record.run_id, error=str(exc)[:200])
            return
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            info = await self._jobs.info(record.submission_id)
            if info is None or info.status.upper() in ("SUCCEEDED", "FAILED", "STOPPED"):
                return
            await asyncio.sleep(POLL_S)

    async def _submit_job(self, record: RunRecord) -> RunRecord:
        # The attempt first: a restart looks for this job before submitting again.
        record = self._save(record.model_copy(update={"job_attempt": record.lease_attempt}))
        assert record.submission_id is not None
        env = {
            "MERLIN_RUN_ID": record.run_id,
            "MERLIN_STATE_DIR": str(self._state.root),
            "MERLIN_RAY_NAMESPACE": self._namespace,
        }
        held = record.held
        if held:
            # The lease id is a capability: Ray logs a job's runtime_env in world-readable files,
            # so the job reads it from a 0600 file; only the (public) keys and tokens ride in the env.
            lease_file = self._store.run_dir(record.run_id) / LEASE_FILE
            tokens = {key: (record.fencing_tokens[key] if record.pool else record.fencing_token) for key in held}
            one = next(iter(held)) if len(held) == 1 else None
            body = {  # one key: as always; "leases": every key the run holds (a pool run may hold several)
                "lease_id": held[one] if one is not None else None,
                "fencing_token": tokens[one] if one is not None else None,
                "resource": one,
                "leases": {key: {"lease_id": held[key], "fencing_token": tokens[key]} for key in held},
            }
            atomic_write(lease_file, json.dumps(body).encode())
            lease_file.chmod(FILE_MODE)
            env["MERLIN_LEASE_FILE"] = str(lease_file)
            if one is not None:  # one key: its name and token, as always
                env["MERLIN_FENCING_TOKEN"] = str(tokens[one])
                env["MERLIN_RESOURCE"] = one
            if record.pool:  # a pool run: every key it was bound to, with its token
                env["MERLIN_RESOURCES"] = json.dumps(tokens, sort_keys=True)
        where = await asyncio.to_thread(self._placement_of, record)
        needs = where.needs
        await self._jobs.submit(
            JobSpec(
                submission_id=record.submission_id,
                entrypoint=record.command,
                env=env,
                metadata={"merlin_run_id": record.run_id, "target": record.target},
                num_cpus=needs.num_cpus,
                memory_bytes=needs.memory_bytes,
                resources=dict(needs.resources),
                label_selector=dict(where.label_selector),
            )
        )
        self._events.emit(
            "run.submitted",
            run_id=record.run_id,
            submission_id=record.submission_id,
            host=where.host,
            label_selector=dict(where.label_selector) or None,
        )
        return record

    def _placement_of(self, record: RunRecord) -> Placement:
        """The job's placement: the key's host, and the job needs of the bundle the executor will run.

        A run bound to several keys goes where their host is. Its keys share one host (the
        scheduler chooses them so, and a bundle no host could serve is refused at submit); a
        catalog changed meanwhile could still split them (``InvalidRequest``: the run ends and
        gives its keys back).
        """
        from targetgen.bundle import load_bundle

        bundle = load_bundle(Path(record.workdir))
        if not record.pool or len(record.resources) <= 1:
            return self._place(record.resource, bundle.job)
        places = [self._place(key, bundle.job) for key in record.resources]
        hosts = {tuple(sorted(place.label_selector.items())) for place in places if place.label_selector}
        if len(hosts) > 1:
            raise InvalidRequest(
                f"the run's keys {', '.join(record.resources)} are on different hosts: one job cannot run on all",
                "resource_labels",
            )
        return next((place for place in places if place.label_selector), places[0])

    async def _watch(self, record: RunRecord) -> _Next:
        """Follow the job until it ends, renewing the lease; a lease loss is handled at once."""
        submission_id = record.submission_id
        assert submission_id is not None
        renew_every = RUN_LEASE_TTL_S / 3
        last_renew = time.monotonic() - renew_every  # renew at once: a re-attach may be late
        wake = self._wake.setdefault(record.run_id, asyncio.Event())
        while True:
            lost = self._lost.get(record.run_id)
            if lost is None and record.held and time.monotonic() - last_renew >= renew_every:
                lost = await self._renew(record)
                last_renew = time.monotonic()
            if lost is not None:
                record = await self._after_lease_loss(record, lost)
                return _Next.DONE if record.finished else _Next.REQUEUE
            info = await self._jobs.info(submission_id)
            if info is None:
                raise BrokerUnavailable(f"the cluster no longer knows job {submission_id}")
            status, end, message = run_status_from_job(info.status, info.exit_code, info.message)
            if status is RunStatus.RUNNING and record.status is not RunStatus.RUNNING:
                record = self._save(advance(record, RunStatus.RUNNING, time.time(), message=message))
                self._recount()
                self._events.emit("run.started", run_id=record.run_id, resource=record.resource,
                                  resources=list(record.resources) or None, holder=record.holder,
                                  lease=record.lease_ref, node=info.node_id)  # fmt: skip
            if end is not None:
                if record.run_id in self._lost:
                    continue  # the job ended because its lease did: that is how the run ended
                await self._give_back(record)
                await asyncio.to_thread(
                    settle_state, Path(record.workdir), _BUNDLE_END.get(end, BundleStatus.FAILED), message
                )
                await self._finish(record, end, message, info.exit_code)
                return _Next.DONE
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # a lease loss wakes it early
                await asyncio.wait_for(wake.wait(), POLL_S)

    async def _renew(self, record: RunRecord) -> LeaseEnded | None:
        """Renew the run's lease; how it ended if it is not held any more."""
        if record.pool:
            try:
                await (await self._group_manager()).renew(record.group_lease_id or "", RUN_LEASE_TTL_S)
                return None
            except (LeaseNotHeld, LeaseNotFound):  # the group ended as a whole: which key, and how
                ended = await self._ended_lease(record)
                return ended or LeaseEnded(ref=record.lease_ref or "", state=LeaseState.EXPIRED)
        assert record.resource is not None
        try:
            await self._call(record.resource, "renew", record.lease_id, RUN_LEASE_TTL_S)
            return None
        except (LeaseNotHeld, LeaseNotFound):
            lease: Lease | None
            try:
                lease = await self._call(record.resource, "lease", record.lease_id)
            except LeaseNotFound:
                lease = None
            state = lease.state if lease is not None and lease.state is not LeaseState.GRANTED else LeaseState.EXPIRED
            return LeaseEnded(
                ref=record.lease_ref or "",
                state=state,
                reason=(lease.end_reason if lease is not None else "") or "",
                by=(lease.ended_by if lease is not None else "") or "",
            )

    async def _give_back(self, record: RunRecord) -> None:
        """Give the lease back, or take the run's request out of the queue."""
        if record.pool:
            await self._give_back_group(record)
            return
        if record.resource is None:
            return
        if record.lease_ref is not None:
            self._by_lease.pop(record.lease_ref, None)  # our own release is not a loss
        try:
            if record.lease_id is not None:
                await self._call(record.resource, "release", record.lease_id)
                return
            if record.lease_request_id is not None:
                lease = await self._call(record.resource, "withdraw", record.holder, record.lease_request_id)
                if lease is not None and lease.state is LeaseState.GRANTED:  # granted just before the cancel
                    await self._call(record.resource, "release", lease.lease_id)
        except (LeaseNotHeld, LeaseNotFound):
            return  # already ended: nothing to give back
        except BrokerUnavailable as exc:
            self._events.emit("run.release_failed", level="error", run_id=record.run_id, error=str(exc))

    async def _give_back_group(self, record: RunRecord) -> None:
        """Release a pool run's group (every key at once), or withdraw its waiting request."""
        for lease_id in record.held.values():
            self._by_lease.pop(lease_ref(lease_id), None)  # our own release is not a loss
        try:
            groups = await self._group_manager()
            if record.group_lease_id is not None:
                await groups.release(record.group_lease_id)
            elif record.lease_request_id is not None:
                await groups.withdraw(record.holder, record.lease_request_id)  # granted meanwhile: released
        except (LeaseNotHeld, LeaseNotFound):
            return  # already ended: nothing to give back
        except BrokerUnavailable as exc:
            self._events.emit("run.release_failed", level="error", run_id=record.run_id, error=str(exc))

    async def _finish(self, record: RunRecord, end: RunEnd, message: str, exit_code: int | None) -> RunRecord:
        target_dir = Path(record.workdir)
        artifacts = await asyncio.to_thread(scan_artifacts, Path(record.artifact_dir))
        self._store.write_artifacts(record, artifacts)
        record = self._save(
            end_run(
                record,
                end,
                message,
                time.time(),
                exit_code=exit_code,
                steps=_step_timings(target_dir, record.resources),
                artifacts=len(artifacts),
            )
        )
        (self._store.run_dir(record.run_id) / LEASE_FILE).unlink(missing_ok=True)
        self._recount()
        self._events.emit(
            "run.finished",
            run_id=record.run_id,
            resource=record.resource,
            resources=list(record.resources) or None,
            holder=record.holder,
            status=record.status.value,
            end=end.value,
            exit_code=exit_code,
            lease=record.lease_ref,
            reason=message,
        )
        return record

    # ------------------------------------------------------------------ plumbing

    def _save(self, record: RunRecord) -> RunRecord:
        self._store.save(record)
        self._records[record.run_id] = record
        return record

    def _recount(self) -> None:
        stats = RunStats()
        for record in self._records.values():
            if record.finished:
                stats.finished[record.status.value] = stats.finished.get(record.status.value, 0) + 1
                if record.started_at is not None and record.ended_at is not None:
                    stats.duration.observe(max(0.0, record.ended_at - record.started_at))
            else:
                stats.active += 1
        self.stats = stats
        self._publish(stats)


# How the target dir's state is settled when a job ended without recording its own end.
_BUNDLE_END = {
    RunEnd.SUCCEEDED: BundleStatus.SUCCEEDED,
    RunEnd.AWAITING_GATE: BundleStatus.AWAITING_GATE,
    RunEnd.CANCELLED: BundleStatus.CANCELLED,
    RunEnd.LEASE_LOST: BundleStatus.CANCELLED,
}


def _step_timings(target_dir: Path, bound: tuple[str, ...] = ()) -> tuple[StepTiming, ...]:
    """Step times from the executor's ``run_state.json`` (what the tests check for overlap);
    a pool bundle's hardware steps name the key(s) the run was ``bound`` to."""
    from targetgen.bundle import POOL_RESOURCE, load_bundle

    try:
        state = load_state(target_dir)
        bundle = load_bundle(target_dir)
    except BrokerError:
        return ()
    if state is None:
        return ()
    resources = {
        step.id: (",".join(bound) if step.resource == POOL_RESOURCE and bound else step.resource)
        for step in bundle.steps
    }
    return tuple(
        StepTiming(
            id=step.id,
            status=step.status.value,
            started_at=step.started_at,
            ended_at=step.ended_at,
            exit_code=step.exit_code,
            resource=resources.get(step.id),
        )
        for step in state.steps
    )


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
