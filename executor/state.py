"""The local engine's state machine for one bundle: statuses, the one transition table, what to do next. Pure.

``run_state.json`` in the target dir holds a :class:`RunState`; the engine
saves it after every transition, so a crash, a gate or a failure leaves a
state that ``--resume`` continues from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from broker.core.compat import StrEnum
from broker.errors import InvalidRequest
from targetgen.bundle import BundleStep, ExecutionBundle

__all__ = [
    "StepStatus",
    "BundleStatus",
    "STEP_TRANSITIONS",
    "Approval",
    "StepState",
    "RunState",
    "RunStep",
    "WaitAtGate",
    "SkipStep",
    "Finished",
    "next_action",
    "new_state",
    "move",
    "prepare_resume",
    "approve",
]


class StepStatus(StrEnum):
    PENDING = "pending"
    AWAITING_GATE = "awaiting_gate"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class BundleStatus(StrEnum):
    PENDING = "pending"
    AWAITING_GATE = "awaiting_gate"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


# The one table of legal step moves. RUNNING -> PENDING and FAILED -> PENDING
# are what --resume does after a crash or a fix.
STEP_TRANSITIONS: Mapping[StepStatus, frozenset[StepStatus]] = {
    StepStatus.PENDING: frozenset({StepStatus.RUNNING, StepStatus.AWAITING_GATE, StepStatus.SKIPPED}),
    StepStatus.AWAITING_GATE: frozenset({StepStatus.RUNNING, StepStatus.SKIPPED}),
    StepStatus.RUNNING: frozenset({StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.PENDING}),
    StepStatus.FAILED: frozenset({StepStatus.PENDING}),
    StepStatus.SUCCEEDED: frozenset(),
    StepStatus.SKIPPED: frozenset(),
}
_DONE = frozenset({StepStatus.SUCCEEDED, StepStatus.SKIPPED})


class Approval(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    by: str
    at: float
    decision: str = "approve"  # or "skip"


class StepState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    message: str = ""
    approval: Approval | None = None
    log: str = ""


class RunState(BaseModel):
    """``run_state.json``: where one bundle's execution stands."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    target: str
    bundle_sha256: str
    status: BundleStatus = BundleStatus.PENDING
    message: str = ""
    steps: tuple[StepState, ...] = Field(default_factory=tuple)
    started_at: float | None = None
    updated_at: float | None = None
    ended_at: float | None = None
    fencing_token: int | None = None
    # A pool bundle's run: the key(s) its hardware steps were bound to. A resumed run goes on
    # only on the same keys (its finished steps touched them).
    resources: tuple[str, ...] = ()

    def step(self, step_id: str) -> StepState:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise InvalidRequest(f"no step {step_id!r} in this run", "step")

    def with_step(self, updated: StepState, now: float) -> RunState:
        steps = tuple(updated if step.id == updated.id else step for step in self.steps)
        return self.model_copy(update={"steps": steps, "updated_at": now})


def new_state(bundle: ExecutionBundle, bundle_sha256: str) -> RunState:
    return RunState(
        target=bundle.target,
        bundle_sha256=bundle_sha256,
        steps=tuple(StepState(id=step.id, log=f"logs/{step.id}.log") for step in bundle.steps),
    )


def move(state: RunState, step_id: str, target: StepStatus, now: float, **fields: object) -> RunState:
    """Move one step through the transition table; ``InvalidRequest`` names an illegal move."""
    current = state.step(step_id)
    if target not in STEP_TRANSITIONS[current.status]:
        raise InvalidRequest(f"step {step_id!r} cannot go from {current.status.value} to {target.value}", "step")
    return state.with_step(current.model_copy(update={"status": target, **fields}), now)


@dataclass(frozen=True)
class RunStep:
    step: BundleStep


@dataclass(frozen=True)
class WaitAtGate:
    step: BundleStep


@dataclass(frozen=True)
class SkipStep:
    step: BundleStep


@dataclass(frozen=True)
class Finished:
    status: BundleStatus
    message: str = ""


def next_action(bundle: ExecutionBundle, state: RunState) -> RunStep | WaitAtGate | SkipStep | Finished:
    """What the engine does next: the first step that is not done decides."""
    for step in bundle.steps:
        current = state.step(step.id)
        if current.status in _DONE:
            continue
        if current.status is StepStatus.FAILED:
            return Finished(BundleStatus.FAILED, f"step {step.id!r} failed: {current.message}")
        if current.status is StepStatus.RUNNING:
            # Only a crashed engine leaves RUNNING behind; --resume resets it first.
            return Finished(BundleStatus.FAILED, f"step {step.id!r} was interrupted; run again with --resume")
        approval = current.approval
        if approval is not None and approval.decision == "skip":
            return SkipStep(step)
        if step.gate is not None and approval is None:
            return WaitAtGate(step)
        return RunStep(step)
    return Finished(BundleStatus.SUCCEEDED)


def prepare_resume(state: RunState, now: float) -> RunState:
    """Before resuming: re-run a step a crash interrupted, retry a failed one."""
    for step in state.steps:
        if step.status in (StepStatus.RUNNING, StepStatus.FAILED):
            state = move(
                state, step.id, StepStatus.PENDING, now, message=f"retrying after: {step.message or step.status.value}"
            )
    return state.model_copy(update={"status": BundleStatus.PENDING, "message": "", "ended_at": None})


def approve(
    bundle: ExecutionBundle, state: RunState, step_id: str, by: str, now: float, *, skip: bool = False
) -> RunState:
    """Record an operator's decision on a gated step (before or while the run waits there)."""
    step = bundle.step(step_id)
    current = state.step(step_id)
    if step.gate is None and not skip:
        raise InvalidRequest(f"step {step_id!r} has no operator gate to approve", "step")
    if current.status not in (StepStatus.PENDING, StepStatus.AWAITING_GATE):
        raise InvalidRequest(f"step {step_id!r} is {current.status.value}; only a waiting step can be approved", "step")
    decision = Approval(by=by, at=now, decision="skip" if skip else "approve")
    return state.with_step(current.model_copy(update={"approval": decision}), now)
