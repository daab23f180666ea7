"""Runs of execution bundles on the hardware: their records, statuses, and the pure translations.

A run is one bundle submitted to the broker: it waits for its resource's
lease, then runs as a Ray Job whose entrypoint is the local executor with
``--resume``. Its files live under ``runs/<run_id>/`` (seed ``000``):
``run_request.json`` (what was asked), ``run_record.json`` (what happened)
and ``artifacts.json`` (files found under the target's artifact dir).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from broker.core.compat import StrEnum
from broker.errors import InvalidRequest

__all__ = [
    "RunStatus",
    "TERMINAL_RUN_STATUSES",
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
# Exit codes of the local executor that are not plain failures (executor.local.EXIT_*).
_EXIT_AWAITING_GATE = 20
_EXIT_CANCELLED = 22
_EXIT_STALE_TOKEN = 8


class RunStatus(StrEnum):
    PENDING = "pending"  # waiting for the lease, or for Ray to start the job
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"  # cancelled, or stopped at an operator gate
    BLOCKED = "blocked"  # Ray is not installed or no cluster answers


TERMINAL_RUN_STATUSES = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.BLOCKED})


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
    resource: str | None
    command: str  # the exact entrypoint submitted to Ray
    workdir: str  # the target dir
    artifact_dir: str
    submission_id: str | None = None
    status: RunStatus = RunStatus.PENDING
    message: str = ""
    exit_code: int | None = None
    lease_id: str | None = None  # on disk only (0600); callers get lease_ref
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

    def public(self) -> RunRecord:
        """The record as any caller may see it: the lease id is the holder's capability."""
        return self.model_copy(update={"lease_id": None})


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
        command=" ".join(executor_command(python, str(target_dir))),
        workdir=str(target_dir),
        artifact_dir=str(target_dir / bundle.artifact_dir),
        bundle_sha256=bundle_sha256,
        created_at=now,
        message="waiting for the lease" if bundle.resource else "submitting",
    )
    return request, record


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


def run_status_from_job(job_status: str, exit_code: int | None) -> tuple[RunStatus, str]:
    """Ray job status (+ driver exit code) -> run status and a message. Unknown -> pending."""
    job_status = job_status.upper()
    if job_status == "SUCCEEDED":
        return RunStatus.SUCCEEDED, "all steps succeeded"
    if job_status == "STOPPED":
        return RunStatus.STOPPED, "stopped"
    if job_status == "FAILED":
        if exit_code == _EXIT_AWAITING_GATE:
            return RunStatus.STOPPED, "waiting at an operator gate: approve it, then submit again"
        if exit_code == _EXIT_CANCELLED:
            return RunStatus.STOPPED, "cancelled"
        if exit_code == _EXIT_STALE_TOKEN:
            return RunStatus.FAILED, "refused: stale fencing token (the lease was lost)"
        return RunStatus.FAILED, f"the executor exited with code {exit_code}" if exit_code is not None else "failed"
    if job_status == "RUNNING":
        return RunStatus.RUNNING, "running"
    return RunStatus.PENDING, f"Ray job {job_status.lower()}"


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
