"""Health probes of a key, pure: when one is due, and what its results do to the key.

A catalog entry may give a probe::

    health_check: {run: [merlin-standin-probe, --key, firesim_u250], every: 30m,
                   after_leases: 10, timeout: 2m, quarantine_after: 2}

Rules (README "Health probes"):

* a probe runs only while no lease holds the key: the prober takes the key's
  lease itself (holder :data:`PROBER`), so a grant waits for a probe in
  flight, and a probe never runs during someone's lease;
* it is due ``every`` after the last one, or after ``after_leases`` grants
  since the last one, whichever comes first; a key never probed is due;
* ``quarantine_after`` failures in a row put the key into maintenance with
  reason ``health check failed: …`` and ``by`` :data:`PROBER`; while so
  quarantined, the probe keeps running (every ``every``) and the first pass
  lifts the quarantine. An admin's maintenance is never lifted, and a key in an
  admin's maintenance is not probed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.core.compat import StrEnum
from broker.core.durations import parse_duration
from broker.errors import InvalidRequest

__all__ = [
    "PROBER",
    "QUARANTINE_PREFIX",
    "HealthCheck",
    "ProbeResult",
    "HealthRecord",
    "HealthAction",
    "probe_due",
    "after_probe",
    "MAX_RESULTS",
    "KeyNow",
]

PROBER = "merlin-health"  # the holder of a probe's lease, and the `by` of its quarantine
QUARANTINE_PREFIX = "health check failed: "
MAX_RESULTS = 20  # results kept per key


class HealthCheck(BaseModel):
    """The catalog's ``health_check:`` of one key."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    run: tuple[str, ...] = Field(min_length=1, max_length=64)
    every_s: float = Field(default=1800.0, alias="every", gt=0)
    after_leases: int | None = Field(default=None, ge=1)
    timeout_s: float = Field(default=120.0, alias="timeout", gt=0)
    quarantine_after: int = Field(default=2, ge=1, le=100)

    @field_validator("every_s", "timeout_s", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: Any) -> float:
        field = getattr(info, "field_name", "duration").removesuffix("_s")
        try:
            return parse_duration(value, field=field)
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from None

    @field_validator("run")
    @classmethod
    def _argv(cls, run: tuple[str, ...]) -> tuple[str, ...]:
        for arg in run:
            if not arg or len(arg) > 1024 or "\0" in arg:
                raise ValueError("each argument is 1 to 1024 characters, with no NUL")
        return run


class ProbeResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    at: float
    ok: bool
    detail: str = ""  # why it failed (exit code, timeout), one line
    duration_s: float = 0.0


class HealthRecord(BaseModel):
    """``health/<key>.json``: what the prober knows of a key, across restarts."""

    model_config = ConfigDict(frozen=True)

    key: str
    results: tuple[ProbeResult, ...] = ()  # newest last, at most MAX_RESULTS
    failures_in_a_row: int = 0
    failures_total: int = 0
    grants_at_last_probe: int = 0  # the key's grant counter when the last probe ran
    quarantined: bool = False  # put into maintenance by the prober (only the prober lifts it)

    @property
    def last(self) -> ProbeResult | None:
        return self.results[-1] if self.results else None

    @property
    def ok(self) -> bool | None:
        return None if self.last is None else self.last.ok


class HealthAction(StrEnum):
    NONE = "none"
    QUARANTINE = "quarantine"
    RESTORE = "restore"


@dataclass(frozen=True)
class KeyNow:
    """What the prober sees of a key at a pass."""

    leased: bool
    maintenance_reason: str | None  # None: not in maintenance
    grants: int  # grants so far (the key's counter)


def probe_due(check: HealthCheck, record: HealthRecord, key: KeyNow, now: float) -> bool:
    """Should the prober probe the key now?"""
    if key.maintenance_reason is not None and not (
        record.quarantined and key.maintenance_reason.startswith(QUARANTINE_PREFIX)
    ):
        return False  # an admin's maintenance: the key is theirs to look at
    if key.leased:
        return False  # never during a lease
    last = record.last
    if last is None:
        return True
    if now - last.at >= check.every_s:
        return True
    return (
        not record.quarantined
        and check.after_leases is not None
        and key.grants - record.grants_at_last_probe >= check.after_leases
    )


def after_probe(
    check: HealthCheck, record: HealthRecord, result: ProbeResult, grants: int
) -> tuple[HealthRecord, HealthAction]:
    """The record after ``result``, and what to do to the key."""
    failures = 0 if result.ok else record.failures_in_a_row + 1
    action = HealthAction.NONE
    quarantined = record.quarantined
    if not result.ok and failures >= check.quarantine_after and not quarantined:
        action, quarantined = HealthAction.QUARANTINE, True
    elif result.ok and quarantined:
        action, quarantined = HealthAction.RESTORE, False
    updated = record.model_copy(
        update={
            "results": (record.results + (result,))[-MAX_RESULTS:],
            "failures_in_a_row": failures,
            "failures_total": record.failures_total + (0 if result.ok else 1),
            "grants_at_last_probe": grants,
            "quarantined": quarantined,
        }
    )
    return updated, action
