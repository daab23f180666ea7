"""The coordinator's health prober: runs each key's probe on its host while nobody holds the key.

The rules are pure (:mod:`broker.core.health`). Each health pass of the
coordinator asks every key with a ``health_check`` whether a probe is due;
a due probe takes the key's lease as :data:`PROBER` (``wait=False``: a busy
key is probed at a later pass, so a probe never runs during someone's lease
and a grant waits for a probe in flight), runs the probe as a Ray job placed
on the key's host, writes ``health/<key>.json``, and releases the lease.
Failures beyond the threshold put the key into maintenance with reason
``health check failed: …`` — before the probe's lease is released, so a waiter
queued behind the probe is never granted the broken unit; a later passing
probe lifts it. Both are compare-and-sets on the key (``only_own``): the prober
never relabels nor lifts maintenance somebody else set.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from broker.core.catalog import Catalog
from broker.core.health import (
    PROBER,
    QUARANTINE_PREFIX,
    HealthAction,
    HealthCheck,
    HealthRecord,
    KeyNow,
    ProbeResult,
    after_probe,
    probe_due,
)
from broker.core.placement_rules import Placement
from broker.disk.journal import EventSink
from broker.disk.store import DIR_MODE, StateDir, atomic_write, read_json
from broker.errors import BrokerError, BrokerUnavailable, LeaseNotHeld, ResourceBusy
from broker.models import Lease, ResourceStatus
from broker.seam.jobs import JobRunner, JobSpec

__all__ = ["HealthProber"]

POLL_S = 0.2
_ENDED = ("SUCCEEDED", "FAILED", "STOPPED")


class HealthProber:
    def __init__(
        self,
        state: StateDir,
        events: EventSink,
        call: Callable[..., Awaitable[Any]],
        status_of: Callable[[str], Awaitable[ResourceStatus]],
        jobs: JobRunner,
        place: Callable[[str], Placement],
        catalog: Callable[[], Catalog | None],
        grants_of: Callable[[str], int],
        on_result: Callable[[str, HealthRecord], None] | None = None,
    ):
        self._root = state.root / "health"
        self._state = state
        self._events = events
        self._call = call
        self._status_of = status_of
        self._jobs = jobs
        self._place = place
        self._catalog = catalog
        self._grants_of = grants_of
        self._on_result = on_result
        self._running: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ records

    def record(self, key: str) -> HealthRecord:
        path = self._root / f"{key}.json"
        try:
            return HealthRecord.model_validate(read_json(path))
        except FileNotFoundError:
            return HealthRecord(key=key)
        except (OSError, ValueError) as exc:  # unreadable: start again (the probe re-learns it)
            self._events.emit("health.record_unreadable", level="error", resource=key, error=str(exc)[:200])
            return HealthRecord(key=key)

    def _save(self, record: HealthRecord) -> None:
        self._root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        atomic_write(self._root / f"{record.key}.json", record.model_dump_json(indent=2).encode())

    def publish_all(self) -> None:
        """Tell the metrics what is on disk (a restarted coordinator)."""
        catalog = self._catalog()
        if catalog is None or self._on_result is None:
            return
        for key, spec in catalog.resources.items():
            if spec.health_check is not None:
                self._on_result(key, self.record(key))

    # ------------------------------------------------------------------ the pass

    def tick(self) -> None:
        """Start every due probe (each in its own task; a slow probe holds up no other key)."""
        catalog = self._catalog()
        if catalog is None:
            return
        for key, spec in catalog.resources.items():
            check = spec.health_check
            if check is None or key in self._running:
                continue
            task = asyncio.ensure_future(self._maybe_probe(key, check))
            self._running[key] = task
            task.add_done_callback(self._forget(key))

    def _forget(self, key: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_done: asyncio.Task[None]) -> None:
            self._running.pop(key, None)

        return forget

    async def probe_now(self, key: str) -> HealthRecord:
        """Probe ``key`` at once if no lease holds it (``merlin ray resources health KEY --now``)."""
        catalog = self._catalog()
        spec = catalog.resources.get(key) if catalog else None
        if spec is None or spec.health_check is None:
            return self.record(key)
        running = self._running.get(key)
        if running is not None:
            await asyncio.shield(running)
            return self.record(key)
        await self._maybe_probe(key, spec.health_check, force=True)
        return self.record(key)

    async def _maybe_probe(self, key: str, check: HealthCheck, *, force: bool = False) -> None:
        try:
            status = await self._status_of(key)
            # Whose maintenance it is, the key says (not the record): an admin's may have replaced
            # the quarantine, or the answer to the prober's last change may have been lost.
            own = status.maintenance_reason is not None and status.maintenance_by == PROBER
            record = self.record(key)
            if record.quarantined != own:
                record = record.model_copy(update={"quarantined": own})
            grants = self._grants_of(key)
            now_key = KeyNow(status.holder is not None, status.maintenance_reason, grants)
            due = probe_due(check, record, now_key, time.time())
            if force:  # asked for now: whenever the rules would let it run at all
                due = not now_key.leased and (status.maintenance_reason is None or own)
            if not due:
                return
            lease: Lease | None = None
            if not own:  # a quarantined key grants nobody: probe it without a lease
                try:
                    lease = await self._call(
                        key, "reserve", PROBER, ttl_s=check.timeout_s + 60.0, wait=False, note="health probe"
                    )
                except ResourceBusy:
                    return  # someone holds it or waits: a later pass
            try:
                result = await self._run(key, check)
                updated, action = after_probe(check, record, result, grants + (1 if lease is not None else 0))
                self._events.emit(
                    "health.passed" if result.ok else "health.failed",
                    level="info" if result.ok else "warning",
                    resource=key,
                    detail=result.detail or None,
                    failures_in_a_row=updated.failures_in_a_row,
                    duration_s=round(result.duration_s, 3),
                )
                try:
                    # Quarantine while the probe still holds the key: released first, the key would be
                    # granted to a waiter queued behind the probe, who would keep the broken unit.
                    updated = await self._act(key, action, result, updated)
                finally:
                    self._save(updated)  # its quarantined flag is checked against the key at the next pass
            finally:
                if lease is not None:
                    with contextlib.suppress(LeaseNotHeld):
                        await self._call(key, "release", lease.lease_id)
            if self._on_result is not None:
                self._on_result(key, updated)
        except BrokerUnavailable as exc:
            self._events.emit("health.deferred", level="warning", resource=key, error=str(exc)[:200])
        except BrokerError as exc:
            self._events.emit("health.error", level="error", resource=key, error=str(exc)[:200])

    async def _act(self, key: str, action: HealthAction, result: ProbeResult, updated: HealthRecord) -> HealthRecord:
        """Quarantine or restore the key, compare-and-set: the prober changes only its own maintenance.

        An admin's maintenance set between the prober's look and its act is neither relabelled as
        a quarantine (so never lifted by a later pass) nor lifted. Returns the record as it is now.
        """
        if action is HealthAction.QUARANTINE:
            reason = (QUARANTINE_PREFIX + (result.detail or "failed"))[:500]
            status = await self._call(key, "set_maintenance", True, reason, PROBER, only_own=True)
            if status.maintenance_by == PROBER:
                self._events.emit("health.quarantined", level="warning", resource=key, reason=reason)
                return updated
            self._events.emit(
                "health.quarantine_skipped",
                level="warning",
                resource=key,
                reason=reason,
                maintenance_by=status.maintenance_by,  # someone else's maintenance came first
            )
            return updated.model_copy(update={"quarantined": False})
        if action is HealthAction.RESTORE:
            status = await self._call(key, "set_maintenance", False, "", PROBER, only_own=True)
            if status.maintenance_reason is None:
                self._events.emit("health.restored", resource=key)
            else:  # an admin's maintenance replaced the quarantine: theirs to lift
                self._events.emit("health.restore_skipped", resource=key, maintenance_by=status.maintenance_by)
        return updated

    async def _run(self, key: str, check: HealthCheck) -> ProbeResult:
        """Run the probe as a job on the key's host; its exit (or its timeout) is the result."""
        started = time.time()
        where = self._place(key)
        submission_id = f"merlin-health-{key}-{secrets.token_hex(6)}"
        spec = JobSpec(
            submission_id=submission_id,
            # "{python}" is the broker's own interpreter (the one with this package), wherever it lives.
            entrypoint=shlex.join(sys.executable if arg == "{python}" else arg for arg in check.run),
            env={"MERLIN_RESOURCE": key, "MERLIN_STATE_DIR": str(self._state.root), "MERLIN_HEALTH_PROBE": "1"},
            metadata={"merlin_health": key},
            num_cpus=where.needs.num_cpus,
            memory_bytes=where.needs.memory_bytes,
            resources=dict(where.needs.resources),
            label_selector=dict(where.label_selector),
        )
        try:
            await self._jobs.submit(spec)
        except Exception as exc:  # noqa: BLE001 - a probe that cannot start is a failed probe
            return ProbeResult(at=started, ok=False, detail=f"could not start: {str(exc)[:200]}")
        deadline = time.monotonic() + check.timeout_s
        while time.monotonic() < deadline:
            info = await self._jobs.info(submission_id)
            if info is not None and info.status.upper() in _ENDED:
                ok = info.status.upper() == "SUCCEEDED"
                detail = (
                    ""
                    if ok
                    else f"{' '.join(check.run)[:120]} ended {info.status.lower()}"
                    + (f" (exit {info.exit_code})" if info.exit_code is not None else "")
                )
                return ProbeResult(at=started, ok=ok, detail=detail, duration_s=time.time() - started)
            await asyncio.sleep(POLL_S)
        with contextlib.suppress(Exception):
            await self._jobs.stop(submission_id)
        return ProbeResult(
            at=started, ok=False, detail=f"timed out after {check.timeout_s:g} s", duration_s=time.time() - started
        )

    def close(self) -> None:
        for task in list(self._running.values()):
            task.cancel()


def health_path(state: StateDir, key: str) -> Path:
    return state.root / "health" / f"{key}.json"
