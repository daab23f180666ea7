"""The coordinator's run queue: bundles wait for their lease, then run as Ray Jobs.

One asyncio task drives each active run through its record:

    pending (queued for the lease) -> lease granted -> job submitted -> running -> ended

Every step is written to ``runs/<run_id>/run_record.json`` before the next
one starts, and each Ray-facing act is idempotent (the lease request and the
job submission id derive from the run id), so a restarted coordinator
re-attaches to every unfinished run from its record: it waits for the same
queued request, finds the same job, and keeps renewing the same lease.
The lease is released when the job ends, whatever the end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from broker.core.runs import (
    TERMINAL_RUN_STATUSES,
    RunRecord,
    RunStatus,
    StepTiming,
    check_run_id,
    new_run,
    run_status_from_job,
    scan_artifacts,
)
from broker.disk.journal import EventSink
from broker.disk.store import StateDir, atomic_write, read_json
from broker.errors import BrokerError, BrokerUnavailable, InvalidRequest, LeaseNotFound, LeaseNotHeld
from broker.http.metrics import RunStats
from broker.models import Lease, LeaseState, lease_ref
from broker.seam.jobs import JobRunner, JobSpec

__all__ = ["RunManager", "RUN_LEASE_TTL_S"]

# A run's lease is short and renewed while its job runs: if the coordinator
# is gone for longer, the lease lapses and the job's fencing check refuses.
RUN_LEASE_TTL_S = 60.0
POLL_S = 0.25
CANCEL_WAIT_S = 30.0

Call = Callable[..., Awaitable[Any]]


class RunManager:
    """Owns ``runs/``: records, one driving task per active run, and the run metrics."""

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
    ):
        self._namespace = namespace
        self._state = state
        self._events = events
        self._call = call  # the coordinator's retrying call on resource:<key>
        self._publish = publish  # to the metrics board
        self._python = python
        self._records: dict[str, RunRecord] = {}
        self._by_request: dict[tuple[str, str], str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._jobs = jobs
        self.stats = RunStats()

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> None:
        """Read every run record; start driving the unfinished ones (a restart re-attaches here)."""
        self._state.runs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path in sorted(self._state.runs_dir.glob("run-*/run_record.json")):
            try:
                record = RunRecord.model_validate(read_json(path))
            except (OSError, ValueError) as exc:
                self._events.emit("run.record_unreadable", level="error", path=str(path), error=str(exc)[:200])
                continue
            self._records[record.run_id] = record
            self._by_request[(record.holder, record.request_id)] = record.run_id
        self._recount()
        for record in self._records.values():
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
    ) -> RunRecord:
        """Record a new run (or return the one this request already made) and start driving it."""
        existing = self._by_request.get((holder, request_id))
        if existing is not None:
            return self._records[existing]
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
        run_id = record.run_id
        run_dir = self._run_dir(run_id)
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(run_dir / "run_request.json", request.model_dump_json(indent=2).encode())
        self._save(record)
        self._by_request[(holder, request_id)] = run_id
        self._events.emit("run.queued", run_id=run_id, resource=bundle.resource, holder=holder, target=bundle.target)
        self._start(run_id)
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
                await self._withdraw_or_release(record)
                record = await self._finish(record, RunStatus.STOPPED, "cancelled before it started", None)
            return record
        await self._jobs.stop(record.submission_id)
        self._events.emit("run.cancel_requested", run_id=record.run_id)
        task = self._tasks.get(record.run_id)
        if task is not None:
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
        return self._records[record.run_id]

    async def logs(self, run_id: Any) -> str:
        """The Ray job's output (the executor's own log lines); step logs stay in the target dir."""
        record = self.get(run_id)
        if record.submission_id is None:
            return ""
        try:
            return await self._jobs.logs(record.submission_id)
        except Exception as exc:  # noqa: BLE001 - the job may be gone from Ray after a cluster restart
            return f"(Ray has no logs for {record.submission_id}: {str(exc).splitlines()[0][:200]})\n"

    # ------------------------------------------------------------------ driving a run

    def _start(self, run_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(run_id))
        self._tasks[run_id] = task
        task.add_done_callback(lambda _task, run_id=run_id: self._tasks.pop(run_id, None))

    async def _drive(self, run_id: str) -> None:
        try:
            record = self._records[run_id]
            if record.resource is not None and record.lease_id is None:
                record = await self._acquire(record)
            if record.submission_id is None or await self._jobs.info(record.submission_id) is None:
                record = await self._submit_job(record)
            await self._watch(record)
        except asyncio.CancelledError:
            raise
        except BrokerError as exc:
            record = self._records[run_id]
            await self._withdraw_or_release(record)
            await self._finish(record, RunStatus.FAILED, str(exc), None)
        except Exception as exc:  # noqa: BLE001 - a run must end in a record, never in a dead task
            record = self._records[run_id]
            self._events.emit("run.error", level="error", run_id=run_id, error=f"{type(exc).__name__}: {exc}")
            await self._withdraw_or_release(record)
            await self._finish(record, RunStatus.FAILED, f"{type(exc).__name__}: {str(exc)[:300]}", None)

    async def _acquire(self, record: RunRecord) -> RunRecord:
        """Wait for the run's lease; the request id is the run's, so a restart re-joins the queue."""
        attempt = 0
        while True:
            request_id = f"{record.run_id}:lease:{attempt}"
            lease: Lease = await self._call(
                record.resource,
                "reserve",
                record.holder,
                ttl_s=RUN_LEASE_TTL_S,
                wait=True,
                priority=record.priority,
                request_id=request_id,
                note=f"run {record.run_id} ({record.target})",
            )
            if lease.state is LeaseState.GRANTED:
                break
            attempt += 1  # granted while nobody watched and already expired: queue again
        record = record.model_copy(
            update={
                "lease_id": lease.lease_id,
                "lease_ref": lease_ref(lease.lease_id),
                "fencing_token": lease.fencing_token,
                "granted_at": lease.granted_at,
                "message": "lease granted; submitting the Ray job",
            }
        )
        self._save(record)
        self._events.emit("run.lease_granted", run_id=record.run_id, resource=record.resource, lease=record.lease_ref,
                          fencing_token=record.fencing_token)  # fmt: skip
        return record

    async def _submit_job(self, record: RunRecord) -> RunRecord:
        submission_id = f"merlin-{record.run_id}"
        record = record.model_copy(update={"submission_id": submission_id})
        self._save(record)  # the id first: a restart looks for this job before submitting again
        env = {
            "MERLIN_RUN_ID": record.run_id,
            "MERLIN_STATE_DIR": str(self._state.root),
            "MERLIN_RAY_NAMESPACE": self._namespace,
        }
        if record.lease_id is not None:
            env["MERLIN_LEASE_ID"] = record.lease_id
            env["MERLIN_FENCING_TOKEN"] = str(record.fencing_token)
        await self._jobs.submit(
            JobSpec(
                submission_id=submission_id,
                entrypoint=record.command,
                env=env,
                metadata={"merlin_run_id": record.run_id, "target": record.target},
            )
        )
        self._events.emit("run.submitted", run_id=record.run_id, submission_id=submission_id)
        return record

    async def _watch(self, record: RunRecord) -> None:
        """Poll the job until it ends, renewing the lease; then end the run."""
        renew_every = RUN_LEASE_TTL_S / 3
        last_renew = time.monotonic() - renew_every  # renew at once: a re-attach may be late
        while True:
            if record.lease_id is not None and time.monotonic() - last_renew >= renew_every:
                record = await self._renew(record)
                last_renew = time.monotonic()
            info = await self._jobs.info(record.submission_id)
            if info is None:
                raise BrokerUnavailable(f"Ray no longer knows job {record.submission_id}")
            status, message = run_status_from_job(info.status, info.exit_code)
            if status is RunStatus.RUNNING and record.status is not RunStatus.RUNNING:
                record = record.model_copy(
                    update={"status": RunStatus.RUNNING, "started_at": time.time(), "message": message}
                )
                self._save(record)
                self._recount()
                self._events.emit("run.started", run_id=record.run_id, resource=record.resource, holder=record.holder,
                                  lease=record.lease_ref)  # fmt: skip
            if status in TERMINAL_RUN_STATUSES:
                await self._withdraw_or_release(record)
                await self._finish(record, status, message, info.exit_code)
                return
            await asyncio.sleep(POLL_S)

    async def _renew(self, record: RunRecord) -> RunRecord:
        try:
            await self._call(record.resource, "renew", record.lease_id, RUN_LEASE_TTL_S)
        except (LeaseNotHeld, LeaseNotFound) as exc:
            # Lost (the coordinator was away too long, or an admin revoked it): the job's
            # fencing check refuses its next hardware step; the record says why.
            record = record.model_copy(update={"message": f"lease lost while running: {exc}"})
            self._save(record)
            self._events.emit("run.lease_lost", level="warning", run_id=record.run_id, resource=record.resource)
        return record

    async def _withdraw_or_release(self, record: RunRecord) -> None:
        """Give the lease back, or take the run's request out of the queue."""
        if record.resource is None:
            return
        try:
            if record.lease_id is not None:
                await self._call(record.resource, "release", record.lease_id)
                return
            attempt = 0
            while True:
                lease = await self._call(record.resource, "withdraw", record.holder, f"{record.run_id}:lease:{attempt}")
                if lease is None:
                    return
                if lease.state is LeaseState.GRANTED:  # granted just before the cancel
                    await self._call(record.resource, "release", lease.lease_id)
                if lease.state is not LeaseState.EXPIRED:
                    return
                attempt += 1
        except (LeaseNotHeld, LeaseNotFound):
            return  # already ended: nothing to give back
        except BrokerUnavailable as exc:
            self._events.emit("run.release_failed", level="error", run_id=record.run_id, error=str(exc))

    async def _finish(self, record: RunRecord, status: RunStatus, message: str, exit_code: int | None) -> RunRecord:
        target_dir = Path(record.workdir)
        artifacts = await asyncio.to_thread(scan_artifacts, Path(record.artifact_dir))
        atomic_write(
            self._run_dir(record.run_id) / "artifacts.json",
            json.dumps(
                {
                    "run_id": record.run_id,
                    "artifact_dir": record.artifact_dir,
                    "artifacts": [a.model_dump() for a in artifacts],
                },
                indent=2,
            ).encode(),
        )
        record = record.model_copy(
            update={
                "status": status,
                "message": message,
                "exit_code": exit_code,
                "ended_at": time.time(),
                "steps": _step_timings(target_dir),
                "artifacts": len(artifacts),
            }
        )
        self._save(record)
        self._recount()
        self._events.emit(
            "run.finished",
            run_id=record.run_id,
            resource=record.resource,
            holder=record.holder,
            status=status.value,
            exit_code=exit_code,
            lease=record.lease_ref,
            reason=message,
        )
        return record

    # ------------------------------------------------------------------ plumbing

    def _run_dir(self, run_id: str) -> Path:
        return self._state.runs_dir / check_run_id(run_id)

    def _save(self, record: RunRecord) -> None:
        atomic_write(self._run_dir(record.run_id) / "run_record.json", record.model_dump_json(indent=2).encode())
        self._records[record.run_id] = record

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


def _step_timings(target_dir: Path) -> tuple[StepTiming, ...]:
    """Step times from the executor's ``run_state.json`` (what the tests check for overlap)."""
    try:
        state = json.loads((target_dir / "run_state.json").read_text())
        bundle = json.loads((target_dir / "bundle.json").read_text())
    except (OSError, ValueError):
        return ()
    resources = {step["id"]: step.get("resource") for step in bundle.get("steps", [])}
    return tuple(
        StepTiming(
            id=step["id"],
            status=step["status"],
            started_at=step.get("started_at"),
            ended_at=step.get("ended_at"),
            exit_code=step.get("exit_code"),
            resource=resources.get(step["id"]),
        )
        for step in state.get("steps", [])
    )


def _file_sha256(path: Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
