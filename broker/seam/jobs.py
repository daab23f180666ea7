"""The job seam: what the run manager needs from a job system, and an in-process fake.

:class:`~broker.seam.ray_backend.RayJobRunner` runs jobs on Ray's job API;
:class:`FakeJobRunner` keeps jobs in memory and lets a test move them through
their states, so the run lifecycle is tested under plain asyncio.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["JobSpec", "JobInfo", "JobRunner", "FakeJobRunner"]


@dataclass(frozen=True)
class JobSpec:
    """One job: its entrypoint (a shell command), where and with what it runs."""

    submission_id: str
    entrypoint: str
    env: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    num_cpus: float = 0.0
    memory_bytes: int = 0
    resources: Mapping[str, float] = field(default_factory=dict)
    # Node labels the entrypoint's node must carry (Ray's label selector: "v", "!v", "in(a,b)").
    label_selector: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobInfo:
    """A job's state as the job system reports it (Ray's words: PENDING RUNNING SUCCEEDED FAILED STOPPED)."""

    submission_id: str
    status: str
    exit_code: int | None = None
    message: str = ""  # the job system's own words (why a job failed before its entrypoint could say)
    node_id: str | None = None  # the node the job's entrypoint runs on, once it started


class JobRunner(Protocol):
    async def submit(self, spec: JobSpec) -> bool:
        """Start the job; False if a job with this submission id exists already (idempotent)."""
        ...

    async def info(self, submission_id: str) -> JobInfo | None:
        """The job's state, or None if the job system does not know it."""
        ...

    async def stop(self, submission_id: str) -> None: ...

    async def logs(self, submission_id: str) -> str: ...


class FakeJobRunner:
    """Jobs in memory: submitted PENDING; a test calls :meth:`set_status` to move them on."""

    def __init__(self) -> None:
        self.specs: dict[str, JobSpec] = {}
        self.jobs: dict[str, JobInfo] = {}
        self.stopped: list[str] = []
        self.output: dict[str, str] = {}
        self._changed = asyncio.Event()

    async def submit(self, spec: JobSpec) -> bool:
        if spec.submission_id in self.jobs:
            return False
        self.specs[spec.submission_id] = spec
        self.jobs[spec.submission_id] = JobInfo(spec.submission_id, "PENDING")
        self._changed.set()
        return True

    async def info(self, submission_id: str) -> JobInfo | None:
        return self.jobs.get(submission_id)

    async def stop(self, submission_id: str) -> None:
        self.stopped.append(submission_id)
        if submission_id in self.jobs and self.jobs[submission_id].status in ("PENDING", "RUNNING"):
            self.set_status(submission_id, "STOPPED")

    async def logs(self, submission_id: str) -> str:
        return self.output.get(submission_id, "")

    def set_status(self, submission_id: str, status: str, exit_code: int | None = None) -> None:
        self.jobs[submission_id] = JobInfo(submission_id, status, exit_code)

    async def submitted(self, count: int = 1) -> list[JobSpec]:
        """Wait until at least ``count`` jobs were submitted; returns their specs in order."""
        while len(self.specs) < count:
            self._changed.clear()
            await self._changed.wait()
        return list(self.specs.values())
