"""One job-handle interface for both engines (seed 003), and ``wait_all``.

``LocalJobHandle`` runs a target dir in a thread of this process;
``RayJobHandle`` follows a run queued on the broker; ``BlockedJobHandle`` is
what a submission becomes when Ray is missing or no cluster answers — its
run record is still written, with the command to run in its message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from broker.core.runs import TERMINAL_RUN_STATUSES, RunRecord, RunStatus
from broker.errors import BrokerError
from executor.state import BundleStatus, RunState

__all__ = [
    "JobStatus",
    "JobHandle",
    "JobFailed",
    "LocalJobHandle",
    "RayJobHandle",
    "BlockedJobHandle",
    "wait_all",
]

JobStatus = RunStatus  # pending running succeeded failed stopped, plus blocked
_FAILED = frozenset({JobStatus.FAILED, JobStatus.BLOCKED})


class JobFailed(BrokerError):
    """A job ended failed (or could not start: blocked)."""

    exit_code = 21

    def __init__(self, job_id: str, status: str, message: str = ""):
        super().__init__(job_id, status, message)
        self.job_id = job_id
        self.status = status
        self.message = message

    def __str__(self) -> str:
        tail = f": {self.message}" if self.message else ""
        return f"job {self.job_id} {self.status}{tail}"


class JobHandle(Protocol):
    @property
    def job_id(self) -> str: ...

    def status(self) -> JobStatus: ...

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> JobStatus: ...

    def terminate(self) -> None: ...


def _wait(handle: JobHandle, timeout: float | None, raise_on_failure: bool, poll_s: float) -> JobStatus:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = handle.status()
        if status in TERMINAL_RUN_STATUSES:
            if raise_on_failure and status in _FAILED:
                raise JobFailed(handle.job_id, status.value, getattr(handle, "message", ""))
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return status
        time.sleep(poll_s)


_BUNDLE_TO_JOB = {
    BundleStatus.SUCCEEDED: JobStatus.SUCCEEDED,
    BundleStatus.FAILED: JobStatus.FAILED,
    BundleStatus.CANCELLED: JobStatus.STOPPED,
    BundleStatus.AWAITING_GATE: JobStatus.STOPPED,
}


class LocalJobHandle:
    """A target dir run by the local engine in a background thread."""

    def __init__(self, target_dir: Path, *, resume: bool = False, fence: Any = None):
        from executor.local import LocalEngine

        self._engine = LocalEngine(target_dir, fence=fence)
        self._resume = resume
        self._result: RunState | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"merlin-local-{Path(target_dir).name}", daemon=True)
        self._thread.start()

    @property
    def job_id(self) -> str:
        return f"local:{self._engine.target_dir}"

    @property
    def message(self) -> str:
        if self._error is not None:
            return str(self._error)
        return self._result.message if self._result is not None else ""

    def _run(self) -> None:
        try:
            self._result = self._engine.run(resume=self._resume)
        except BaseException as exc:  # noqa: BLE001 - reported through status()
            self._error = exc

    def status(self) -> JobStatus:
        if self._thread.is_alive():
            return JobStatus.RUNNING
        if self._error is not None or self._result is None:
            return JobStatus.FAILED
        return _BUNDLE_TO_JOB.get(self._result.status, JobStatus.FAILED)

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> JobStatus:
        return _wait(self, timeout, raise_on_failure, 0.05)

    def terminate(self) -> None:
        self._engine.stop.set()
        self._thread.join(timeout=30)


class RayJobHandle:
    """A run on the broker: its status is the run record's."""

    def __init__(self, client: Any, record: RunRecord):
        self._client = client
        self.record = record

    @property
    def job_id(self) -> str:
        return self.record.run_id

    @property
    def message(self) -> str:
        return self.record.message

    def status(self) -> JobStatus:
        if not self.record.finished:
            self.record = self._client.call("run", self.record.run_id)
        return self.record.status

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> JobStatus:
        return _wait(self, timeout, raise_on_failure, 0.25)

    def terminate(self) -> None:
        self.record = self._client.call("cancel", self.record.run_id)


class BlockedJobHandle:
    """A submission that could not reach Ray; its record says what to run."""

    def __init__(self, record: RunRecord):
        self.record = record

    @property
    def job_id(self) -> str:
        return self.record.run_id

    @property
    def message(self) -> str:
        return self.record.message

    def status(self) -> JobStatus:
        return JobStatus.BLOCKED

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> JobStatus:
        return _wait(self, timeout, raise_on_failure, 0.0)

    def terminate(self) -> None:
        return None


def wait_all(
    handles: Sequence[JobHandle], timeout: float | None = None, raise_on_failure: bool = True
) -> list[JobStatus]:
    """Wait for every job; with ``raise_on_failure`` raise ``JobFailed`` the moment any one fails.

    Returns the statuses in the order of ``handles`` (some may still be
    running if ``timeout`` ran out).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    statuses = [handle.status() for handle in handles]
    while True:
        for index, handle in enumerate(handles):
            if statuses[index] not in TERMINAL_RUN_STATUSES:
                statuses[index] = handle.status()
            if raise_on_failure and statuses[index] in _FAILED:
                raise JobFailed(handle.job_id, statuses[index].value, getattr(handle, "message", ""))
        if all(status in TERMINAL_RUN_STATUSES for status in statuses):
            return statuses
        if deadline is not None and time.monotonic() >= deadline:
            return statuses
        time.sleep(0.05)
