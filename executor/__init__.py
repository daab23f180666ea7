"""Runs execution bundles: the local engine (in-process, resumable, gated) and the Ray engine (via the broker).

Start with :mod:`executor.state` (the state machine, pure), then
:mod:`executor.local` (the engine), :mod:`executor.handles` (one handle for
both engines, ``wait_all``) and :mod:`executor.engines`.
"""

from executor.handles import BlockedJobHandle, JobFailed, JobHandle, JobStatus, LocalJobHandle, RayJobHandle, wait_all
from executor.state import BundleStatus, RunState, StepStatus

__all__ = [
    "JobStatus",
    "JobHandle",
    "JobFailed",
    "LocalJobHandle",
    "RayJobHandle",
    "BlockedJobHandle",
    "wait_all",
    "BundleStatus",
    "StepStatus",
    "RunState",
]
