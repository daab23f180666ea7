"""The actor shells under plain asyncio: resource actor, coordinator and run manager on the
in-process FakeSystem (no Ray), with real state dirs. What only Ray can show — real processes,
kill -9, job submission, token auth — stays in tests/integration."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from broker.actors.coordinator import BrokerActor
from broker.core.runs import RunStatus
from broker.errors import BrokerUnavailable, InvalidRequest, LeaseNotHeld, ResourceBusy, UnknownResource
from broker.models import LeaseState, ResourceState
from broker.seam import ActorRef, RetryPolicy, Spawn
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from targetgen.bundle import ExecutionBundle, write_bundle

NS = "shells"
CATALOG = {
    "version": 1,
    "resources": {
        "firesim_u250": {"labels": {"kind": "fpga"}},
        "radiance_sim_lane_a": {"labels": {"kind": "sim"}},
    },
}
T = TypeVar("T")


def run(body: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(body(), 60))


async def until(condition: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    """Wait for a condition (never a bare sleep as synchronisation)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def up(state_dir: Path, system: FakeSystem) -> ActorRef:
    spawn = Spawn(BrokerActor, (str(state_dir), NS, "127.0.0.1", None))
    broker = ActorRef(system, COORDINATOR_NAME, NS, spawn)
    await system.call(broker, "apply_catalog", CATALOG)
    return broker


def queue_of(system: FakeSystem, key: str) -> int:
    return len(system.instance(f"resource:{key}", NS)._book.queue)


def test_reserve_release_and_handoff_to_a_waiter(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        alice = await system.call(broker, "reserve", "firesim_u250", "alice", ttl_s=60)
        assert alice.state is LeaseState.GRANTED and alice.fencing_token == 1
        with pytest.raises(ResourceBusy):
            await system.call(broker, "reserve", "firesim_u250", "bob")
        bob = asyncio.ensure_future(system.call(broker, "reserve", "firesim_u250", "bob", wait=True, request_id="b1"))
        await until(lambda: queue_of(system, "firesim_u250") == 1, "bob queued")
        assert not bob.done()
        await system.call(broker, "release", alice.lease_id)
        granted = await bob
        assert granted.holder == "bob" and granted.fencing_token == 2

    run(body)


def test_errors_keep_their_type_and_bad_calls_change_nothing(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        with pytest.raises(UnknownResource):
            await system.call(broker, "reserve", "no_such_key", "alice")
        with pytest.raises(InvalidRequest):
            await system.call(broker, "reserve", "firesim_u250", "alice", ttl_s=-5)
        statuses = await system.call(broker, "resources")
        assert [s.state for s in statuses] == [ResourceState.FREE, ResourceState.FREE]

    run(body)


def test_resource_actor_restart_rebuilds_lease_and_queue_from_disk(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        alice = await system.call(broker, "reserve", "firesim_u250", "alice", ttl_s=60)
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve", "firesim_u250", "bob", wait=True, ttl_s=60, request_id="bob-1")
        )
        await until(lambda: queue_of(system, "firesim_u250") == 1, "bob queued")
        system.crash("resource:firesim_u250", NS)  # kill -9: bob's call in flight dies with it
        await asyncio.sleep(0.05)  # the coordinator's retries are failing now (the actor is down)
        assert not waiting.done()
        system.restart("resource:firesim_u250", NS)
        status = await system.call(broker, "resources")
        assert status[0].holder == "alice" and status[0].fencing_token == alice.fencing_token
        assert [entry.holder for entry in status[0].queue] == ["bob"]
        await system.call(broker, "release", alice.lease_id)
        bob = await waiting  # the retried call (same request id) is the queued request, now granted
        assert bob.holder == "bob" and bob.fencing_token == alice.fencing_token + 1
        assert bob.request_id == "bob-1"

    run(body)


def test_an_actor_that_does_not_come_back_is_broker_unavailable(tmp_path):
    async def body() -> None:
        system = FakeSystem(RetryPolicy(window_s=0.2, first_delay_s=0.01, max_delay_s=0.02))
        broker = await up(tmp_path, system)
        system.crash("resource:firesim_u250", NS)
        with pytest.raises(BrokerUnavailable, match="did not come back"):
            await system.call(broker, "reserve", "firesim_u250", "alice")
        statuses = await system.call(broker, "resources")  # reads do not wait: the key shows down
        assert statuses[0].state is ResourceState.DOWN

    run(body)


def test_coordinator_restart_keeps_leases_and_catalog(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        alice = await system.call(broker, "reserve", "radiance_sim_lane_a", "alice", ttl_s=60)
        system.restart(COORDINATOR_NAME, NS)
        got = await system.call(broker, "lease", alice.lease_id)
        assert got.state is LeaseState.GRANTED and got.holder == "alice"
        await system.call(broker, "release", alice.lease_id)
        with pytest.raises(LeaseNotHeld):
            await system.call(broker, "renew", alice.lease_id)

    run(body)


def bundle_dir(root: Path, name: str, resource: str | None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    step = {"id": "hold", "argv": [sys.executable, "-c", "pass"], "resource": resource}
    bundle = ExecutionBundle.model_validate(
        {"target": name, "target_class": "silicon_board", "resource": resource, "steps": [step]}
    )
    write_bundle(directory, bundle)
    return directory


def test_run_lifecycle_lease_job_and_release(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record = await system.call(
            broker, "submit", str(bundle_dir(tmp_path, "a", "firesim_u250")), holder="ci", request_id="r1"
        )
        assert record.status is RunStatus.PENDING
        (spec,) = await system.jobs.submitted(1)
        assert spec.env["MERLIN_RUN_ID"] == record.run_id and spec.env["MERLIN_FENCING_TOKEN"] == "1"
        status = (await system.call(broker, "resources"))[0]
        assert status.holder == "ci"  # the run holds its key while its job runs

        def status_is(*wanted: RunStatus) -> Callable[[], Awaitable[Any]]:
            async def check() -> Any:
                got = await system.call(broker, "run", record.run_id)
                return got if got.status in wanted else None

            return check

        system.jobs.set_status(spec.submission_id, "RUNNING")
        await until(status_is(RunStatus.RUNNING), "run running")
        system.jobs.set_status(spec.submission_id, "SUCCEEDED", 0)
        final = await until(status_is(RunStatus.SUCCEEDED, RunStatus.FAILED), "run finished")
        assert final.status is RunStatus.SUCCEEDED and final.lease_id is None  # callers never see the id
        assert (await system.call(broker, "resources"))[0].holder is None  # released with the job's end
        again = await system.call(
            broker, "submit", str(tmp_path / "a"), holder="ci", request_id="r1"
        )  # the same request is the same run
        assert again.run_id == record.run_id

    run(body)


def test_cancel_of_a_queued_run_leaves_the_queue(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        alice = await system.call(broker, "reserve", "firesim_u250", "alice", ttl_s=60)
        record = await system.call(broker, "submit", str(bundle_dir(tmp_path, "a", "firesim_u250")), holder="ci")
        await until(lambda: queue_of(system, "firesim_u250") == 1, "run queued for its lease")
        cancelled = await system.call(broker, "cancel", record.run_id)
        assert cancelled.status is RunStatus.STOPPED
        assert queue_of(system, "firesim_u250") == 0
        assert system.jobs.specs == {}  # never submitted
        await system.call(broker, "release", alice.lease_id)

    run(body)


def _status_is(system: FakeSystem, broker: ActorRef, run_id: str, *wanted: RunStatus) -> Callable[[], Awaitable[Any]]:
    async def check() -> Any:
        got = await system.call(broker, "run", run_id)
        return got if got.status in wanted else None

    return check


async def running_run(system: FakeSystem, broker: ActorRef, tmp_path: Path) -> tuple[Any, Any]:
    """A run on firesim_u250 whose job is running: its record and its job's spec."""
    record = await system.call(broker, "submit", str(bundle_dir(tmp_path, "a", "firesim_u250")), holder="ci")
    (spec,) = await system.jobs.submitted(1)
    system.jobs.set_status(spec.submission_id, "RUNNING")
    await until(_status_is(system, broker, record.run_id, RunStatus.RUNNING), "running")
    return record, spec


def test_a_revoked_run_lease_stops_its_job_at_once_and_says_why(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record, spec = await running_run(system, broker, tmp_path)
        await system.call(broker, "revoke", "firesim_u250", "board needed for a demo", by="bob")
        final = await until(_status_is(system, broker, record.run_id, RunStatus.STOPPED), "stopped")
        assert system.jobs.stopped == [spec.submission_id]  # told by the resource actor, not at the next renew
        assert final.end.value == "lease_lost" and final.message.startswith("lease lost: revoked by bob")
        assert final.exit_code is None

    run(body)


def test_a_run_whose_lease_expired_while_the_coordinator_was_away_queues_again(tmp_path, monkeypatch):
    from broker.actors import run_manager

    monkeypatch.setattr(run_manager, "RUN_LEASE_TTL_S", 1.0)

    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record, first = await running_run(system, broker, tmp_path)
        system.crash(COORDINATOR_NAME, NS)  # nobody renews now

        async def expired() -> bool:
            status = await system.call(ActorRef(system, "resource:firesim_u250", NS), "status")
            return status.holder is None

        await until(expired, "the run's lease to expire", timeout_s=10)
        system.restart(COORDINATOR_NAME, NS)  # re-attaches: its lease is gone
        first_stopped_then_second = await system.jobs.submitted(2)
        second = first_stopped_then_second[1]
        assert system.jobs.stopped == [first.submission_id]
        assert second.submission_id != first.submission_id
        assert second.env["MERLIN_FENCING_TOKEN"] == "2"  # a new lease, never the dead one's token
        system.jobs.set_status(second.submission_id, "SUCCEEDED", 0)
        final = await until(_status_is(system, broker, record.run_id, RunStatus.SUCCEEDED), "succeeded")
        assert final.lease_attempt == 1

    run(body)


def test_a_succeeded_target_dir_needs_restart_to_run_again(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        target = bundle_dir(tmp_path, "a", None)
        (target / "run_state.json").write_text(
            '{"target": "a", "bundle_sha256": "x", "status": "succeeded", "steps": []}'
        )
        with pytest.raises(InvalidRequest, match="--restart"):
            await system.call(broker, "submit", str(target), holder="ci")
        assert await system.call(broker, "runs") == []  # refused: nothing recorded
        record = await system.call(broker, "submit", str(target), holder="ci", restart=True)
        assert not (target / "run_state.json").exists()  # the old state is kept aside, renamed
        assert len(list(target.glob("run_state.*.json"))) == 1
        (spec,) = await system.jobs.submitted(1)
        assert spec.entrypoint == record.command

    run(body)


def test_a_run_whose_lease_was_revoked_while_the_coordinator_was_away_ends_lease_lost(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record, spec = await running_run(system, broker, tmp_path)
        system.crash(COORDINATOR_NAME, NS)
        resource = ActorRef(system, "resource:firesim_u250", NS)
        await system.call(resource, "revoke", "needed elsewhere", by="bob")
        system.restart(COORDINATOR_NAME, NS)
        final = await until(_status_is(system, broker, record.run_id, RunStatus.STOPPED), "stopped")
        assert final.end.value == "lease_lost" and "revoked by bob" in final.message
        assert system.jobs.stopped == [spec.submission_id]
        assert queue_of(system, "firesim_u250") == 0  # it did not queue for the key again
        assert len(system.jobs.specs) == 1

    run(body)
