"""Keys on hosts, in the shells under plain asyncio (FakeSystem's node list stands in for Ray's):
the coordinator's health pass sets and lifts the host-down flag, a restarted resource actor
knows it before granting, and a run's job spec carries its placement and resources."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.actors.coordinator import BrokerActor
from broker.core.placement_rules import HOST_LABEL, MARKET_TYPE_LABEL, NodeInfo
from broker.core.runs import RunStatus
from broker.errors import InvalidRequest, ResourceBusy
from broker.models import LeaseState, ResourceState
from broker.seam import ActorRef, Spawn
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from targetgen.bundle import ExecutionBundle, write_bundle
from tests.unit.test_shells import run, until

NS = "nodes"
CATALOG = {
    "version": 1,
    "resources": {
        "bench_board": {"host": "bench-02"},
        "sim_lane": {},
    },
}
BENCH = NodeInfo(
    "bench",
    {HOST_LABEL: "bench-02", MARKET_TYPE_LABEL: "spot"},
    {"CPU": 1.0, "memory": 2.0 * 1024**3, "bench_gpu": 1.0},
)


async def up(state_dir: Path, system: FakeSystem) -> ActorRef:
    spawn = Spawn(BrokerActor, (str(state_dir), NS, "127.0.0.1", None))
    broker = ActorRef(system, COORDINATOR_NAME, NS, spawn)
    await system.call(broker, "apply_catalog", CATALOG)
    return broker


async def state_of(system: FakeSystem, broker: ActorRef, key: str) -> Any:
    return next(status for status in await system.call(broker, "resources") if status.key == key)


async def health_pass(system: FakeSystem) -> None:
    await system.instance(COORDINATOR_NAME, NS)._health_pass()


def journal(state_dir: Path, event: str) -> list[dict[str, Any]]:
    lines = (state_dir / "events.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


def bundle_dir(root: Path, name: str, resource: str, job: dict[str, Any] | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    step = {"id": "s", "argv": [sys.executable, "-c", "pass"], "resource": resource}
    write_bundle(
        directory,
        ExecutionBundle.model_validate(
            {"target": name, "target_class": "silicon_board", "resource": resource, "job": job, "steps": [step]}
        ),
    )
    return directory


def test_a_key_whose_host_is_absent_is_down_refuses_grants_and_comes_back_with_its_node(tmp_path):
    async def body() -> None:
        system = FakeSystem()  # only the head node: bench-02 is not in the cluster
        broker = await up(tmp_path, system)
        down = await state_of(system, broker, "bench_board")
        assert down.state is ResourceState.DOWN and "bench-02" in (down.down_reason or "")
        assert (await state_of(system, broker, "sim_lane")).state is ResourceState.FREE
        with pytest.raises(ResourceBusy) as busy:
            await system.call(broker, "reserve", "bench_board", "alice")
        assert busy.value.down_reason == down.down_reason
        waiter = asyncio.ensure_future(system.call(broker, "reserve", "bench_board", "bob", wait=True))
        await until(lambda: system.instance("resource:bench_board", NS)._book.queue, "bob queued")
        status = await system.call(broker, "status")
        assert status.down == ("bench_board",) and not status.healthy

        system.nodes.append(BENCH)
        await health_pass(system)
        granted = await waiter  # the host is back: the waiter is granted in the same step
        assert granted.state is LeaseState.GRANTED and granted.holder == "bob"
        assert [e["host"] for e in journal(tmp_path, "resource.down")] == ["bench-02"]
        assert [e["host"] for e in journal(tmp_path, "resource.up")] == ["bench-02"]

        system.nodes.remove(BENCH)
        await health_pass(system)
        again = await state_of(system, broker, "bench_board")
        assert again.state is ResourceState.DOWN and again.holder == "bob"  # the holder keeps its lease

    run(body)


def test_a_restarted_resource_actor_never_grants_on_an_absent_host(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        system.nodes.append(BENCH)
        broker = await up(tmp_path, system)
        alice = await system.call(broker, "reserve", "bench_board", "alice", ttl_s=60)
        waiter = asyncio.ensure_future(system.call(broker, "reserve", "bench_board", "bob", wait=True, request_id="b"))
        await until(lambda: system.instance("resource:bench_board", NS)._book.queue, "bob queued")
        await system.call(broker, "release", alice.lease_id)
        bob = await waiter
        system.nodes.remove(BENCH)
        queued = asyncio.ensure_future(system.call(broker, "reserve", "bench_board", "carol", wait=True))
        await until(lambda: system.instance("resource:bench_board", NS)._book.queue, "carol queued")
        system.restart("resource:bench_board", NS)  # Ray's restart: the book is rebuilt from disk
        await system.call(broker, "release", bob.lease_id)  # the key is free now, and its host is absent
        book = system.instance("resource:bench_board", NS)._book
        assert book.host_down is not None and book.granted is None
        assert [lease.holder for lease in book.queue] == ["carol"]  # restored, waiting, not granted
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)

    run(body)


def test_a_run_job_is_placed_on_its_host_with_its_resources_and_an_impossible_one_is_refused(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        system.nodes.append(BENCH)
        broker = await up(tmp_path / "state", system)
        job = {"num_cpus": 1, "memory": "1m", "resources": {"bench_gpu": 1}}
        record = await system.call(broker, "submit", str(bundle_dir(tmp_path, "a", "bench_board", job)), holder="ci")
        (spec,) = await system.jobs.submitted(1)
        assert spec.label_selector == {HOST_LABEL: "bench-02"}
        assert (spec.num_cpus, spec.memory_bytes, dict(spec.resources)) == (1.0, 1024**2, {"bench_gpu": 1.0})
        assert record.resource == "bench_board"

        plain = await system.call(broker, "submit", str(bundle_dir(tmp_path, "b", "sim_lane")), holder="ci")
        specs = await system.jobs.submitted(2)
        assert plain.resource == "sim_lane" and specs[1].label_selector == {} and specs[1].num_cpus == 0.0

        for name, key, bad in [
            ("c", "bench_board", {"num_cpus": 2}),  # bench-02 has one CPU
            ("d", "bench_board", {"preemptible": False}),  # bench-02 is a spot node
            ("e", "sim_lane", {"resources": {"unobtainium": 1}}),
        ]:
            with pytest.raises(InvalidRequest):
                await system.call(broker, "submit", str(bundle_dir(tmp_path, name, key, bad)), holder="ci")
        assert len(await system.call(broker, "runs")) == 2  # refused at submit: no record, nothing pending

    run(body)


def test_a_run_accepted_while_its_host_was_down_ends_clearly_if_the_host_returns_too_small(tmp_path):
    async def body() -> None:
        system = FakeSystem()  # bench-02 is absent: the run is accepted and waits for the key
        broker = await up(tmp_path / "state", system)
        job = {"resources": {"bench_gpu": 4}}
        record = await system.call(broker, "submit", str(bundle_dir(tmp_path, "big", "bench_board", job)), holder="ci")
        assert record.status is RunStatus.PENDING
        system.nodes.append(BENCH)  # back, with one bench_gpu
        await health_pass(system)

        async def ended() -> Any:
            got = await system.call(broker, "run", record.run_id)
            return got if got.finished else None

        final = await until(ended, "the run to end")
        assert final.status is RunStatus.FAILED and "4 bench_gpu (most: 1)" in final.message
        assert system.jobs.specs == {}  # never submitted to sit pending forever
        assert (await state_of(system, broker, "bench_board")).holder is None  # its lease was given back

    run(body)
