"""Runs of execution bundles on the hardware: their records, statuses, and the pure translations.

A run is one bundle submitted to the broker: it waits for its resource's
lease, then runs as a Ray Job whose entrypoint is the local executor with
``--resume``. A pool bundle's run waits on the pool (``resource_labels``,
``count``) and is *bound* when its group lease is granted: ``resources`` says
which keys it got (``resource`` too, for one key), ``fencing_tokens`` their
tokens. A bound run stays bound: a run that queues again (its lease expired
while the broker was away) asks for the same keys, because its finished
steps touched those boards. Its files live under ``runs/<run_id>/`` (seed ``000``):
``run_request.json`` (what was asked), ``run_record.json`` (what happened)
and ``artifacts.json`` (files found under the target's artifact dir).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, computed_field

from broker.core.compat import StrEnum
from broker.errors import RUN_EXIT_CODES, InvalidRequest, RunEnd

__all__ = [
    "RunStatus",
    "TERMINAL_RUN_STATUSES",
    "RUN_TRANSITIONS",
    "END_STATUS",
    "advance",
    "end_run",
    "RunRequest",
    "RunRecord",
    "StepTiming",
    "Artifact",
    "new_run",
    "new_run_id",
    "check_run_id",
    "executor_command",
    "run_status_from_job",
    "scan_artifacts",
    "safe_artifact_path",
]

_RUN_ID = re.compile(r"^run-\d{8}-\d{6}-[0-9a-f]{8}$")


class RunStatus(StrEnum):
    PENDING = "pending"  # waiting for the lease, or for Ray to start the job
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # cancelled, or stopped at an operator gate
    BLOCKED = "blocked"  # Ray is not installed or no cluster answers


TERMINAL_RUN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.BLOCKED})

# The run lifecycle's one table of legal moves (a job may end before anyone saw it running).
RUN_TRANSITIONS: Mapping[RunStatus, frozenset[RunStatus]] = {
    RunStatus.PENDING: frozenset({RunStatus.RUNNING, *TERMINAL_RUN_STATUSES}),
    RunStatus.RUNNING: frozenset({RunStatus.PENDING, *TERMINAL_RUN_STATUSES} - {RunStatus.BLOCKED}),
    RunStatus.SUCCEEDED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.STOPPED: frozenset(),
    RunStatus.BLOCKED: frozenset(),
}
# RUNNING -> PENDING: the run lost its lease to an expiry (e.g. the cluster was down) and queues again.
# PENDING -> BLOCKED: it never reached a broker (recorded so the person sees what to run).

# The status each way of ending leaves a run in.
END_STATUS: Mapping[RunEnd, RunStatus] = {
    RunEnd.SUCCEEDED: RunStatus.SUCCEEDED,
    RunEnd.STALE_TOKEN: RunStatus.FAILED,
    RunEnd.NOT_SUBMITTED: RunStatus.BLOCKED,
    RunEnd.AWAITING_GATE: RunStatus.STOPPED,
    RunEnd.STEP_FAILED: RunStatus.FAILED,
    RunEnd.CANCELLED: RunStatus.STOPPED,
    RunEnd.LEASE_LOST: RunStatus.STOPPED,
    RunEnd.BROKER_ERROR: RunStatus.FAILED,
}
_END_OF_EXIT_CODE = {code: end for end, code in RUN_EXIT_CODES.items()}


class RunRequest(BaseModel):
    """``run_request.json``: what was asked, as it was asked."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    target_dir: str
    holder: str
    priority: int = 0
    request_id: str
    source: str
    submitted_at: float


class StepTiming(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    status: str
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    resource: str | None = None


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the artifact dir
    size: int
    sha256: str


class RunRecord(BaseModel):
    """``run_record.json``: target, workflow, source, command, dirs, Ray submission, status and why."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    target: str
    workflow: str
    target_class: str = ""
    source: str
    holder: str
    priority: int = 0
    request_id: str
    resource: str | None  # the key it holds (a pool run: once bound to one key)
    resource_labels: str | None = None  # a pool run: the selector it waits on (canonical text)
    resource_keys: tuple[str, ...] = ()  # a set run: the keys it holds together
    count: int = 1  # a pool run: how many of the pool's keys it holds
    resources: tuple[str, ...] = ()  # a pool run: the keys it was bound to (empty until then)
    fencing_tokens: dict[str, int] = {}  # a pool run: each bound key's token
    group_lease_id: str | None = None  # a pool run's group lease: on disk only (0600), like lease_id
    lease_ids: dict[str, str] = {}  # a pool run: each bound key's lease (the group's members); on disk only
    command: str  # the exact entrypoint submitted to Ray
    workdir: str  # the target dir
    artifact_dir: str
    job_attempt: int | None = None  # which job this run's current lease launched (None: none yet)
    status: RunStatus = RunStatus.PENDING
    message: str = ""
    exit_code: int | None = None
    end: RunEnd | None = None  # how it ended (None while it has not)
    lease_id: str | None = None  # on disk only (0600); callers get lease_ref
    lease_request_id: str | None = None  # random, on disk only: a restarted coordinator re-joins its queue
    lease_attempt: int = 0  # leases taken so far (a run whose lease expired queues for a new one)
    lease_ref: str | None = None
    fencing_token: int | None = None
    bundle_sha256: str = ""
    created_at: float
    granted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    steps: tuple[StepTiming, ...] = ()
    artifacts: int = 0

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES

    @property
    def pool(self) -> bool:
        """Bound through a group lease: a pool's member(s), or a set of keys together."""
        return self.resource_labels is not None or bool(self.resource_keys)

    @property
    def where(self) -> str:
        """Its hardware, for people: the key(s) it holds, or what it waits on (``any of board=u250``)."""
        if self.resources:
            return ",".join(self.resources)
        if self.resource_keys:
            return "all of " + ",".join(self.resource_keys)
        if self.resource_labels is not None:
            return f"{'any' if self.count == 1 else f'any {self.count}'} of {self.resource_labels}"
        return self.resource or "-"

    @property
    def needs_lease(self) -> bool:
        return self.resource is not None or self.pool

    @property
    def held(self) -> dict[str, str]:
        """Each key the run holds now -> its lease id (empty while it waits)."""
        if self.pool:
            return dict(self.lease_ids)
        return {self.resource: self.lease_id} if self.resource is not None and self.lease_id is not None else {}

    def public(self) -> RunRecord:
        """The record as any caller may see it: the lease id is the holder's capability, and a
        request id would let a stranger replay the request and learn it."""
        return self.model_copy(
            update={
                "lease_id": None,
                "lease_request_id": None,
                "request_id": "",
                "group_lease_id": None,
                "lease_ids": {},
            }
        )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def submission_id(self) -> str | None:
        """The Ray job of the current lease attempt (a new lease gets a new job)."""
        if self.job_attempt is None:
            return None
        return f"merlin-{self.run_id}" if self.job_attempt == 0 else f"merlin-{self.run_id}-{self.job_attempt}"


def advance(record: RunRecord, status: RunStatus, now: float, **fields: Any) -> RunRecord:
    """Move a run through :data:`RUN_TRANSITIONS`; ``InvalidRequest`` names an illegal move."""
    if status is not record.status and status not in RUN_TRANSITIONS[record.status]:
        raise InvalidRequest(f"run {record.run_id} cannot go from {record.status.value} to {status.value}", "status")
    update: dict[str, Any] = {"status": status, **fields}
    if status is RunStatus.RUNNING and record.started_at is None:
        update["started_at"] = now
    if status in TERMINAL_RUN_STATUSES:
        update.setdefault("ended_at", now)
    return record.model_copy(update=update)


def end_run(record: RunRecord, end: RunEnd, message: str, now: float, **fields: Any) -> RunRecord:
    """The run's last move: its status follows from how it ended (:data:`END_STATUS`)."""
    return advance(record, END_STATUS[end], now, end=end, message=message, **fields)


def new_run(
    target_dir: Path,
    bundle: Any,
    *,
    holder: str,
    priority: int,
    request_id: str,
    source: str,
    python: str,
    run_id: str | None = None,
    now: float | None = None,
    bundle_sha256: str = "",
) -> tuple[RunRequest, RunRecord]:
    """The request and the first record of a run of ``bundle`` (an ExecutionBundle) from ``target_dir``."""
    now = time.time() if now is None else now
    run_id = run_id or new_run_id(now)
    request = RunRequest(
        run_id=run_id,
        target_dir=str(target_dir),
        holder=holder,
        priority=priority,
        request_id=request_id,
        source=source,
        submitted_at=now,
    )
    record = RunRecord(
        run_id=run_id,
        target=bundle.target,
        workflow=bundle.workflow,
        target_class=bundle.target_class,
        source=source,
        holder=holder,
        priority=priority,
        request_id=request_id,
        resource=bundle.resource,
        resource_labels=bundle.resource_labels,
        resource_keys=bundle.resource_keys,
        count=bundle.count,
        command=" ".join(executor_command(python, str(target_dir))),
        workdir=str(target_dir),
        artifact_dir=str(target_dir / bundle.artifact_dir),
        bundle_sha256=bundle_sha256,
        created_at=now,
        message=_first_message(bundle),
    )
    return request, record


def _first_message(bundle: Any) -> str:
    if bundle.resource_keys:
        return f"waiting for all of {', '.join(bundle.resource_keys)}"
    labels = bundle.resource_labels
    if labels is not None:
        count = bundle.count
        return f"waiting for {'any' if count == 1 else count} of {labels}"
    return "waiting for the lease" if bundle.resource else "submitting"


def new_run_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"run-{stamp}-{secrets.token_hex(4)}"


def check_run_id(run_id: Any) -> str:
    """A run id, or ``InvalidRequest``: it becomes a path, so nothing else gets through."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        shown = run_id if isinstance(run_id, str) and len(run_id) < 80 else type(run_id).__name__
        raise InvalidRequest(f"not a run id: {shown!r} (expected run-YYYYMMDD-HHMMSS-xxxxxxxx)", "run_id")
    return run_id


def executor_command(python: str, target_dir: str) -> list[str]:
    """The Ray Job's entrypoint: the local executor, resuming (absolute interpreter path)."""
    return [
        python,
        "-m",
        "broker.cli",
        "targetgen",
        "execute",
        "--engine",
        "local",
        "--from-dir",
        target_dir,
        "--resume",
    ]


def run_status_from_job(
    job_status: str, exit_code: int | None, job_message: str = ""
) -> tuple[RunStatus, RunEnd | None, str]:
    """Ray job status (+ the executor's exit code) -> run status, how it ended, a message.

    Unknown statuses are pending (a safe default: the run is watched again).
    """
    job_status = job_status.upper()
    if job_status == "SUCCEEDED":
        return RunStatus.SUCCEEDED, RunEnd.SUCCEEDED, "all steps succeeded"
    if job_status == "STOPPED":
        return RunStatus.STOPPED, RunEnd.CANCELLED, "stopped"
    if job_status == "FAILED":
        end = _END_OF_EXIT_CODE.get(exit_code, RunEnd.STEP_FAILED) if exit_code is not None else RunEnd.STEP_FAILED
        messages = {
            RunEnd.AWAITING_GATE: "waiting at an operator gate: approve it, then submit again",
            RunEnd.CANCELLED: "cancelled",
            RunEnd.STALE_TOKEN: "refused: stale fencing token (the lease was lost)",
            RunEnd.LEASE_LOST: "lease lost while a step ran: the step was stopped",
        }
        default = f"the executor exited with code {exit_code}" if exit_code is not None else "failed"
        if exit_code is None and job_message:
            default = f"failed: {job_message}"
        return END_STATUS[end], end, messages.get(end, default)
    if job_status == "RUNNING":
        return RunStatus.RUNNING, None, "running"
    return RunStatus.PENDING, None, f"Ray job {job_status.lower()}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan_artifacts(artifact_dir: Path) -> list[Artifact]:
    """Regular files under ``artifact_dir`` (symlinks are not followed), with size and sha256."""
    found: list[Artifact] = []
    if not artifact_dir.is_dir():
        return found
    for root, dirs, files in os.walk(artifact_dir, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if path.is_symlink() or not path.is_file():
                continue
            found.append(
                Artifact(path=str(path.relative_to(artifact_dir)), size=path.stat().st_size, sha256=_sha256(path))
            )
    return found


def safe_artifact_path(artifact_dir: Path, relative: str) -> Path:
    """``artifact_dir/relative`` if it stays inside (no ``..``, not absolute, no escaping symlink)."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise InvalidRequest(
            f"invalid artifact path {relative!r}: must be relative, inside the run's artifacts", "path"
        )
    base = artifact_dir.resolve()
    candidate = (artifact_dir / relative).resolve()
    if not candidate.is_relative_to(base):
        raise InvalidRequest(f"invalid artifact path {relative!r}: it leads outside the run's artifacts", "path")
    return candidate
