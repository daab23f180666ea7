"""Health probes: the pure rules, and the prober in the real coordinator on the FakeSystem (its jobs
are the fake job runner's, moved on by the test)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.actors.coordinator import BrokerActor
from broker.core.catalog import parse_catalog
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
from broker.errors import InvalidRequest, ResourceBusy
from broker.http.metrics import Exposition
from broker.models import ResourceState
from broker.seam import ActorRef, Spawn
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from tests.unit.test_shells import run, until

CHECK = HealthCheck(run=("probe", "k"), every="30m", after_leases=3, timeout="10s", quarantine_after=2)
FREE = KeyNow(leased=False, maintenance_reason=None, grants=0)


def test_a_probe_is_due_first_then_every_period_or_after_some_leases_never_during_one():
    record = HealthRecord(key="k")
    assert probe_due(CHECK, record, FREE, 1000.0)
    assert not probe_due(CHECK, record, KeyNow(True, None, 0), 1000.0)  # never during a lease
    assert not probe_due(CHECK, record, KeyNow(False, "fan swap", 0), 1000.0)  # an admin's maintenance
    record, _ = after_probe(CHECK, record, ProbeResult(at=1000.0, ok=True), grants=0)
    assert not probe_due(CHECK, record, FREE, 1010.0)
    assert probe_due(CHECK, record, FREE, 1000.0 + 1800.0)
    assert probe_due(CHECK, record, KeyNow(False, None, 3), 1010.0)  # three grants since


def test_failures_in_a_row_quarantine_and_a_pass_restores_only_its_own_quarantine():
    record = HealthRecord(key="k")
    record, action = after_probe(CHECK, record, ProbeResult(at=1.0, ok=False, detail="x"), 0)
    assert action is HealthAction.NONE and record.failures_in_a_row == 1
    record, action = after_probe(CHECK, record, ProbeResult(at=2.0, ok=False, detail="x"), 0)
    assert action is HealthAction.QUARANTINE and record.quarantined and record.failures_total == 2
    quarantined = KeyNow(False, QUARANTINE_PREFIX + "x", 0)
    assert probe_due(CHECK, record, quarantined, 2.0 + 1800.0)  # its own quarantine is probed again
    assert not probe_due(CHECK, record, KeyNow(False, "an admin's", 0), 2.0 + 1800.0)
    record, action = after_probe(CHECK, record, ProbeResult(at=3.0, ok=True), 0)
    assert action is HealthAction.RESTORE and not record.quarantined and record.failures_in_a_row == 0


def test_a_bad_health_check_in_the_catalog_is_refused():
    base = {"resources": {"k": {"health_check": {"run": ["probe"], "every": "soon"}}}}
    with pytest.raises(InvalidRequest):
        parse_catalog(base)
    with pytest.raises(InvalidRequest):
        parse_catalog({"resources": {"k": {"health_check": {"run": []}}}})
    spec = parse_catalog({"resources": {"k": {"health_check": {"run": ["probe", "k"], "every": "10m"}}}})
    assert spec.resources["k"].health_check.every_s == 600.0


NS = "health"
LAB = {
    "version": 1,
    "resources": {
        "board": {"health_check": {"run": ["probe", "board"], "every": "1h", "timeout": "20s", "quarantine_after": 2}},
        "lane": {},
    },
}


async def _up(state_dir: Path, system: FakeSystem) -> ActorRef:
    broker = ActorRef(system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(state_dir), NS, "127.0.0.1", None)))
    await system.call(broker, "apply_catalog", LAB)
    return broker


async def _probe(system: FakeSystem, broker: ActorRef, status: str, exit_code: int | None) -> dict:
    before = len(system.jobs.specs)
    asking = asyncio.ensure_future(system.call(broker, "health", "board", True))
    specs = await system.jobs.submitted(before + 1)
    job = specs[-1]
    assert job.entrypoint == "probe board" and job.env["MERLIN_RESOURCE"] == "board"
    book = system.instance("resource:board", NS)._book
    if book.maintenance is None:  # a probe holds the key's lease: nobody is granted it meanwhile
        assert book.granted is not None and book.granted.holder == PROBER
        with pytest.raises(ResourceBusy):
            await system.call(broker, "reserve", "board", "alice")
    system.jobs.set_status(job.submission_id, status, exit_code)
    return await asking


def test_a_failing_probe_quarantines_the_key_and_a_passing_one_brings_it_back(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await _up(tmp_path, system)
        first = await _probe(system, broker, "SUCCEEDED", 0)
        assert first["ok"] is True and first["failures_in_a_row"] == 0
        await _probe(system, broker, "FAILED", 3)
        second = await _probe(system, broker, "FAILED", 3)
        assert second["quarantined"] and second["failures_in_a_row"] == 2
        status = next(s for s in await system.call(broker, "resources") if s.key == "board")
        assert status.state is ResourceState.MAINTENANCE and status.maintenance_reason.startswith(QUARANTINE_PREFIX)
        with pytest.raises(ResourceBusy):
            await system.call(broker, "reserve", "board", "alice")
        restored = await _probe(system, broker, "SUCCEEDED", 0)
        assert restored["ok"] and not restored["quarantined"]
        status = next(s for s in await system.call(broker, "resources") if s.key == "board")
        assert status.state is ResourceState.FREE
        lease = await system.call(broker, "reserve", "board", "alice")
        assert lease.holder == "alice"
        # Never during a lease: asked now, it does not run, and no job was submitted.
        jobs = len(system.jobs.specs)
        held = await system.call(broker, "health", "board", True)
        assert len(system.jobs.specs) == jobs and held["ok"] is True
        # An admin's maintenance is never lifted by the prober, nor probed.
        await system.call(broker, "release", lease.lease_id)
        await system.call(broker, "set_maintenance", "board", True, "fan swap", by="admin")
        await system.call(broker, "health", "board", True)
        assert len(system.jobs.specs) == jobs
        journal = (tmp_path / "events.jsonl").read_text()
        assert '"health.quarantined"' in journal and '"health.restored"' in journal

    run(body)


def test_a_probe_that_does_not_end_in_time_fails(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        catalog = {"version": 1, "resources": {"board": {"health_check": {"run": ["probe"], "timeout": "0.3s"}}}}
        broker = ActorRef(system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(tmp_path), NS, "127.0.0.1", None)))
        await system.call(broker, "apply_catalog", catalog)
        result = await system.call(broker, "health", "board", True)
        assert result["ok"] is False and "timed out" in result["results"][-1]["detail"]
        assert system.jobs.stopped  # the probe's job was stopped
        await until(lambda: system.instance("resource:board", NS)._book.granted is None, "the probe's lease released")

    run(body)


def test_a_waiter_queued_behind_a_failing_probe_is_not_granted_the_broken_unit(tmp_path):
    """The probe quarantines the key while it still holds its lease, then releases: the waiter stays queued."""

    async def body() -> None:
        system = FakeSystem()
        catalog = {
            "version": 1,
            "resources": {"board": {"health_check": {"run": ["probe", "board"], "quarantine_after": 1}}},
        }
        broker = ActorRef(system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(tmp_path), NS, "127.0.0.1", None)))
        await system.call(broker, "apply_catalog", catalog)
        asking = asyncio.ensure_future(system.call(broker, "health", "board", True))
        (job,) = await system.jobs.submitted(1)
        book = system.instance("resource:board", NS)._book
        assert book.granted is not None and book.granted.holder == PROBER
        alice = asyncio.ensure_future(system.call(broker, "reserve", "board", "alice", wait=True, ttl_s=60))
        await until(lambda: len(book.queue) == 1, "alice queued behind the probe")
        system.jobs.set_status(job.submission_id, "FAILED", 3)
        result = await asking
        assert result["quarantined"] is True
        assert book.granted is None  # the probe's lease is released ...
        assert book.maintenance is not None and book.maintenance.by == PROBER  # ... after the quarantine
        assert [lease.holder for lease in book.queue] == ["alice"] and not alice.done()
        # A passing probe lifts the quarantine: now alice gets the (working) unit.
        again = asyncio.ensure_future(system.call(broker, "health", "board", True))
        second = (await system.jobs.submitted(2))[-1]
        system.jobs.set_status(second.submission_id, "SUCCEEDED", 0)
        assert (await again)["quarantined"] is False
        granted = await alice
        assert granted.holder == "alice"

    run(body)


ONE_STRIKE = {
    "version": 1,
    "resources": {"board": {"health_check": {"run": ["probe", "board"], "quarantine_after": 1}}},
}


def test_an_admins_maintenance_set_while_a_probe_runs_is_neither_relabelled_nor_lifted(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = ActorRef(system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(tmp_path), NS, "127.0.0.1", None)))
        await system.call(broker, "apply_catalog", ONE_STRIKE)

        async def board():
            return next(s for s in await system.call(broker, "resources") if s.key == "board")

        async def probe_with(status: str, exit_code: int, admin_reason: str) -> dict:
            """A probe, during which an admin puts the key into maintenance; then it ends."""
            asking = asyncio.ensure_future(system.call(broker, "health", "board", True))
            job = (await system.jobs.submitted(len(system.jobs.specs) + 1))[-1]
            await system.call(broker, "set_maintenance", "board", True, admin_reason, by="admin")
            system.jobs.set_status(job.submission_id, status, exit_code)
            return await asking

        # A failing probe finds an admin's maintenance: its quarantine is not applied over it.
        failed = await probe_with("FAILED", 3, "fan swap")
        assert failed["ok"] is False and failed["quarantined"] is False
        status = await board()
        assert (status.maintenance_reason, status.maintenance_by) == ("fan swap", "admin")
        jobs = len(system.jobs.specs)
        await system.call(broker, "health", "board", True)  # an admin's maintenance is not probed
        assert len(system.jobs.specs) == jobs
        await system.call(broker, "set_maintenance", "board", False, by="admin")
        # A failing probe quarantines the key; during the next probe an admin takes the key over ...
        asking = asyncio.ensure_future(system.call(broker, "health", "board", True))
        job = (await system.jobs.submitted(jobs + 1))[-1]
        system.jobs.set_status(job.submission_id, "FAILED", 3)
        assert (await asking)["quarantined"] is True and (await board()).maintenance_by == PROBER
        # ... and the probe's pass does not lift the admin's maintenance.
        passed = await probe_with("SUCCEEDED", 0, "cable reseat")
        assert passed["ok"] is True and passed["quarantined"] is False
        status = await board()
        assert status.state is ResourceState.MAINTENANCE
        assert (status.maintenance_reason, status.maintenance_by) == ("cable reseat", "admin")
        journal = (tmp_path / "events.jsonl").read_text()
        assert '"health.quarantine_skipped"' in journal and '"health.restore_skipped"' in journal

    run(body)


def _health_samples(exposition: Exposition) -> dict[tuple[str, str], float]:
    """The health samples of a scrape of /metrics: (name, resource) -> value."""
    text = exposition.render().decode()
    return {
        (sample.name, sample.labels["resource"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("merlin_broker_health")
    }


def test_health_metrics_read_back_the_last_result_and_the_failures_so_far(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await _up(tmp_path, system)
        exposition = Exposition(system.instance(COORDINATOR_NAME, NS)._board)  # one cache across the probes
        ok, failures = "merlin_broker_health_ok", "merlin_broker_health_check_failures_total"
        await _probe(system, broker, "FAILED", 3)
        assert _health_samples(exposition) == {(ok, "board"): 0.0, (failures, "board"): 1.0}  # no probe, no lane
        await _probe(system, broker, "SUCCEEDED", 0)
        assert _health_samples(exposition) == {(ok, "board"): 1.0, (failures, "board"): 1.0}

    run(body)
