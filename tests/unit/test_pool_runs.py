"""Pool runs on the in-process FakeSystem: a bundle with ``resource_labels`` waits on the pool, is
bound to whichever member frees first, says which in its record and its job's environment, holds
its keys like a single key's, and re-attaches after a coordinator restart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.core.runs import RunStatus
from broker.errors import InvalidRequest
from broker.models import LeaseState
from broker.seam import ActorRef
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from targetgen.bundle import POOL_RESOURCE, ExecutionBundle, write_bundle
from tests.unit.test_group_shells import LAB, NS, book, up
from tests.unit.test_shells import run, until


def pool_dir(root: Path, name: str, labels: str = "board=u250", count: int = 1) -> Path:
    """A target dir whose one hardware step runs on any ``count`` members of ``labels``."""
    directory = root / name
    directory.mkdir(parents=True)
    step = {"id": "hold", "argv": [sys.executable, "-c", "pass", "{resource}"], "resource": POOL_RESOURCE}
    bundle = ExecutionBundle.model_validate(
        {"target": name, "target_class": "fpga_emulation", "resource_labels": labels, "count": count, "steps": [step]}
    )
    write_bundle(directory, bundle)
    return directory


def status_is(system: FakeSystem, broker: ActorRef, run_id: str, *wanted: RunStatus) -> Any:
    async def check() -> Any:
        got = await system.call(broker, "run", run_id)
        return got if got.status in wanted else None

    return check


def lease_file(spec: Any) -> dict[str, Any]:
    return json.loads(Path(spec.env["MERLIN_LEASE_FILE"]).read_text())


def test_two_pool_runs_run_at_once_on_two_members_and_a_third_gets_the_first_freed(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        first = await system.call(broker, "submit", str(pool_dir(tmp_path, "a")), holder="alice")
        second = await system.call(broker, "submit", str(pool_dir(tmp_path, "b")), holder="bob")
        assert first.resource is None and first.resource_labels == "board=u250" and first.resources == ()
        assert first.where == "any of board=u250"  # what `merlin ray jobs list` shows while it waits
        specs = await system.jobs.submitted(2)  # both jobs start: nobody waits for the other slot
        by_run = {spec.env["MERLIN_RUN_ID"]: spec for spec in specs}
        a, b = [await system.call(broker, "run", r.run_id) for r in (first, second)]
        assert {a.resource, b.resource} == {"u250_a", "u250_b"} and a.resources == (a.resource,)
        assert a.where == a.resource
        for record in (a, b):
            spec = by_run[record.run_id]
            # The job is told which key and token it got: the one-key variables, and the JSON one.
            assert spec.env["MERLIN_RESOURCE"] == record.resource
            assert spec.env["MERLIN_FENCING_TOKEN"] == str(record.fencing_token)
            assert json.loads(spec.env["MERLIN_RESOURCES"]) == {record.resource: record.fencing_token}
            held = lease_file(spec)
            assert held["resource"] == record.resource and set(held["leases"]) == {record.resource}
            # The lease in the file is the key's own (the group's member): fenced like a single key's.
            assert held["lease_id"].startswith(f"{record.resource}.")
            assert book(system, record.resource).granted.lease_id == held["lease_id"]
            assert record.lease_id is None and record.group_lease_id is None and record.lease_ids == {}  # public
        groups = await system.call(broker, "groups")
        assert {g["members"][0]["key"] for g in groups} == {"u250_a", "u250_b"} and all(
            g["state"] == "granted" for g in groups
        )

        third = await system.call(broker, "submit", str(pool_dir(tmp_path, "c")), holder="carol")
        await until(lambda: len(book(system, "u250_a").queue) == 1, "the third run waits on the pool")
        assert len(book(system, "u250_b").queue) == 1  # on every member: whichever frees first
        system.jobs.set_status(by_run[b.run_id].submission_id, "SUCCEEDED", 0)
        done = await until(status_is(system, broker, b.run_id, RunStatus.SUCCEEDED), "b finished")
        assert done.resources == (b.resource,)
        specs = await system.jobs.submitted(3)
        c = await system.call(broker, "run", third.run_id)
        assert c.resource == b.resource  # the member b freed, not the one a still holds
        assert c.fencing_token == b.fencing_token + 1
        assert book(system, a.resource).queue == []  # its entry left the other member's queue
        events = [json.loads(line) for line in (tmp_path / "state" / "events.jsonl").read_text().splitlines()]
        bound = [e for e in events if e["event"] == "run.lease_granted" and e["run_id"] == c.run_id]
        assert bound[0]["resources"] == [c.resource] and bound[0]["labels"] == "board=u250"
        assert not any("group:" in json.dumps(e) for e in events)  # no group lease id in the journal

    run(body)


def test_a_pool_run_of_two_holds_both_keys_and_releases_them_together(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record = await system.call(broker, "submit", str(pool_dir(tmp_path, "lanes", "kind=sim", 2)), holder="ci")
        (spec,) = await system.jobs.submitted(1)
        bound = await system.call(broker, "run", record.run_id)
        assert bound.resources == ("lane_a", "lane_b") and bound.resource is None and bound.count == 2
        tokens = json.loads(spec.env["MERLIN_RESOURCES"])
        assert tokens == bound.fencing_tokens == {"lane_a": 1, "lane_b": 1}
        assert "MERLIN_RESOURCE" not in spec.env and "MERLIN_FENCING_TOKEN" not in spec.env  # several: the JSON one
        held = lease_file(spec)
        assert held["lease_id"] is None and set(held["leases"]) == {"lane_a", "lane_b"}
        assert all(book(system, key).granted.holder == "ci" for key in ("lane_a", "lane_b"))
        system.jobs.set_status(spec.submission_id, "RUNNING")
        await until(status_is(system, broker, record.run_id, RunStatus.RUNNING), "running")
        system.jobs.set_status(spec.submission_id, "SUCCEEDED", 0)
        await until(status_is(system, broker, record.run_id, RunStatus.SUCCEEDED), "succeeded")
        assert all(book(system, key).granted is None for key in ("lane_a", "lane_b"))  # released as a whole
        (group,) = [g for g in await system.call(broker, "groups")] or [None]
        assert group is None  # the group ended with the run
        assert not Path(spec.env["MERLIN_LEASE_FILE"]).exists()

    run(body)


def test_revoking_one_key_of_a_pool_run_stops_it_and_frees_the_other(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record = await system.call(broker, "submit", str(pool_dir(tmp_path, "lanes", "kind=sim", 2)), holder="ci")
        (spec,) = await system.jobs.submitted(1)
        system.jobs.set_status(spec.submission_id, "RUNNING")
        await until(status_is(system, broker, record.run_id, RunStatus.RUNNING), "running")
        await system.call(broker, "revoke", "lane_b", "lane needed", by="bob")
        final = await until(status_is(system, broker, record.run_id, RunStatus.STOPPED), "stopped")
        assert final.end.value == "lease_lost" and "revoked by bob" in final.message
        assert system.jobs.stopped == [spec.submission_id]
        await until(lambda: book(system, "lane_a").granted is None, "the other key freed with its group")

    run(body)


def test_a_pool_run_reattaches_after_a_coordinator_restart_and_a_waiting_one_keeps_its_place(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        alice = await system.call(broker, "reserve", "u250_a", "alice", ttl_s=600)
        running = await system.call(broker, "submit", str(pool_dir(tmp_path, "a")), holder="ci")
        (spec,) = await system.jobs.submitted(1)
        system.jobs.set_status(spec.submission_id, "RUNNING")
        await until(status_is(system, broker, running.run_id, RunStatus.RUNNING), "running")
        waiting = await system.call(broker, "submit", str(pool_dir(tmp_path, "b")), holder="ci2")
        await until(lambda: len(book(system, "u250_b").queue) == 1, "the second run waits on the pool")
        system.crash(COORDINATOR_NAME, NS)
        system.restart(COORDINATOR_NAME, NS)
        again = await system.call(broker, "run", running.run_id)
        assert again.status is RunStatus.RUNNING and again.resource == "u250_b"
        assert len(system.jobs.specs) == 1  # the same job, not a second one
        # The waiting run is still one request on each member (the same group, re-joined).
        assert len(book(system, "u250_a").queue) == 1 and len(book(system, "u250_b").queue) == 1
        await system.call(broker, "release", alice.lease_id)
        specs = await system.jobs.submitted(2)
        second = await system.call(broker, "run", waiting.run_id)
        assert second.resource == "u250_a" and specs[1].env["MERLIN_RESOURCE"] == "u250_a"
        system.jobs.set_status(spec.submission_id, "SUCCEEDED", 0)
        await until(status_is(system, broker, running.run_id, RunStatus.SUCCEEDED), "first finished")
        assert book(system, "u250_b").granted is None

    run(body)


def test_a_pool_run_whose_lease_expired_while_the_coordinator_was_away_asks_for_the_same_key(tmp_path, monkeypatch):
    from broker.actors import run_manager

    monkeypatch.setattr(run_manager, "RUN_LEASE_TTL_S", 1.0)

    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        record = await system.call(broker, "submit", str(pool_dir(tmp_path, "a")), holder="ci")
        (first,) = await system.jobs.submitted(1)
        system.jobs.set_status(first.submission_id, "RUNNING")
        await until(status_is(system, broker, record.run_id, RunStatus.RUNNING), "running")
        key = (await system.call(broker, "run", record.run_id)).resource
        system.crash(COORDINATOR_NAME, NS)  # nobody renews now
        await until(lambda: book(system, key).granted is None, "the run's key lease to expire", timeout_s=10)
        system.restart(COORDINATOR_NAME, NS)
        specs = await system.jobs.submitted(2)
        assert system.jobs.stopped == [first.submission_id]
        again = await system.call(broker, "run", record.run_id)
        # Its finished steps touched that board: a bound run stays bound (a new lease, a new token).
        assert again.resource == key and specs[1].env["MERLIN_RESOURCE"] == key
        assert int(specs[1].env["MERLIN_FENCING_TOKEN"]) > int(first.env["MERLIN_FENCING_TOKEN"])
        assert again.lease_attempt == 1

    run(body)


def test_a_pool_bundle_the_catalog_cannot_satisfy_is_refused_at_submit(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        with pytest.raises(InvalidRequest, match="match 2 key"):
            await system.call(broker, "submit", str(pool_dir(tmp_path, "a", "board=u250", 3)), holder="ci")
        with pytest.raises(InvalidRequest, match="match 0 key"):
            await system.call(broker, "submit", str(pool_dir(tmp_path, "b", "board=vcu118")), holder="ci")
        assert await system.call(broker, "runs") == [] and await system.call(broker, "groups") == []
        assert all(book(system, key).queue == [] for key in LAB["resources"])

    run(body)


def test_cancelling_a_waiting_pool_run_leaves_every_members_queue(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        held = await system.call(broker, "reserve_group", "alice", labels="board=u250", count=2, ttl_s=600)
        record = await system.call(broker, "submit", str(pool_dir(tmp_path, "a")), holder="ci")
        await until(lambda: len(book(system, "u250_a").queue) == 1, "queued on the pool")
        cancelled = await system.call(broker, "cancel", record.run_id)
        assert cancelled.status is RunStatus.STOPPED
        assert book(system, "u250_a").queue == [] and book(system, "u250_b").queue == []
        assert system.jobs.specs == {}
        released = await system.call(broker, "release", held.lease_id)
        assert released.state is LeaseState.RELEASED

    run(body)


# --- the executor's side: binding {resource} and fencing every key ------------------------------------


def pool_engine_target(root: Path, count: int = 1) -> Path:
    directory = root / "target"
    directory.mkdir(parents=True)
    code = (
        "import json, os, pathlib, sys; p = pathlib.Path('artifacts/bound.json'); p.parent.mkdir(exist_ok=True); "
        "p.write_text(json.dumps([sys.argv[1], os.environ['SLOT']]))"
    )
    steps = [
        {"id": "build", "argv": [sys.executable, "-c", "print('no hardware')"]},
        {
            "id": "flash",
            "argv": [sys.executable, "-c", code, "{resource}"],
            "env": {"SLOT": "{resource}"},
            "resource": POOL_RESOURCE,
            "gate": {"prompt": "flash {resource}?"},
            "needs": ["build"],
        },
    ]
    bundle = ExecutionBundle.model_validate(
        {"target": "pooled", "target_class": "fpga_emulation", "resource_labels": "kind=fpga", "count": count,
         "steps": steps}
    )  # fmt: skip
    write_bundle(directory, bundle)
    return directory


def test_the_local_engine_binds_the_runs_keys_fences_each_and_resumes_only_on_them(tmp_path):
    from executor.local import LocalEngine, approve_step

    target = pool_engine_target(tmp_path, count=2)
    checked: list[tuple[str, ...]] = []

    def fence(step: Any) -> None:
        from executor.local import step_keys

        checked.append(step_keys(step, ("u250_b", "u250_a")))

    with pytest.raises(InvalidRequest, match="bound to 1 key"):
        LocalEngine(target, fence=fence, bound=("u250_a",)).run()
    state = LocalEngine(target, fence=fence, bound=("u250_b", "u250_a")).run()
    assert state.status.value == "awaiting_gate" and "flash u250_a,u250_b?" in state.message  # the prompt is bound
    assert state.resources == ("u250_a", "u250_b")
    approve_step(target, "flash", "alice")
    with pytest.raises(InvalidRequest, match="began on u250_a, u250_b"):
        LocalEngine(target, fence=fence, bound=("u250_a", "u250_c")).run(resume=True)  # another board: refused
    state = LocalEngine(target, fence=fence, bound=("u250_a", "u250_b")).run(resume=True)
    assert state.status.value == "succeeded"
    assert json.loads((target / "artifacts" / "bound.json").read_text()) == ["u250_a,u250_b", "u250_a,u250_b"]
    assert checked and all(keys == ("u250_b", "u250_a") for keys in checked)  # the pool step needs every key


def test_the_run_lease_file_names_every_key_and_an_old_one_still_reads(tmp_path, monkeypatch):
    from executor.local import BrokerFence

    new = tmp_path / "lease.json"
    new.write_text(json.dumps({
        "lease_id": None, "fencing_token": None, "resource": None,
        "leases": {"lane_a": {"lease_id": "lane_a." + "1" * 32, "fencing_token": 4},
                   "lane_b": {"lease_id": "lane_b." + "2" * 32, "fencing_token": 9}},
    }))  # fmt: skip
    monkeypatch.setenv("MERLIN_LEASE_FILE", str(new))
    monkeypatch.delenv("MERLIN_FENCING_TOKEN", raising=False)
    fence = BrokerFence.from_env()
    assert fence is not None and fence.keys == ("lane_a", "lane_b") and fence.leases["lane_b"][1] == 9
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"lease_id": "firesim_u250." + "3" * 32, "fencing_token": 5, "resource": "firesim_u250"}))
    monkeypatch.setenv("MERLIN_LEASE_FILE", str(old))
    monkeypatch.setenv("MERLIN_FENCING_TOKEN", "5")
    fence = BrokerFence.from_env()
    assert fence is not None and fence.leases == {"firesim_u250": ("firesim_u250." + "3" * 32, 5)}


def test_a_set_bundle_waits_for_all_its_keys_and_holds_them_together(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path / "state", system)
        directory = tmp_path / "cosim"
        directory.mkdir()
        step = {"id": "cosim", "argv": [sys.executable, "-c", "pass"], "resource": POOL_RESOURCE}
        write_bundle(
            directory,
            ExecutionBundle.model_validate(
                {
                    "target": "cosim",
                    "target_class": "fpga_emulation",
                    "resource_keys": ["u250_a", "lane_a"],
                    "steps": [step],
                }
            ),  # fmt: skip
        )
        lane = await system.call(broker, "reserve", "lane_a", "alice", ttl_s=600)
        record = await system.call(broker, "submit", str(directory), holder="ci")
        assert record.resource_keys == ("u250_a", "lane_a") and record.count == 2
        assert record.where == "all of u250_a,lane_a"
        await until(lambda: book(system, "u250_a").ready_for_group is not None, "the FPGA kept for the run")
        assert book(system, "u250_a").granted is None and system.jobs.specs == {}  # nothing until both are free
        await system.call(broker, "release", lane.lease_id)
        (spec,) = await system.jobs.submitted(1)
        bound = await system.call(broker, "run", record.run_id)
        assert bound.resources == ("lane_a", "u250_a")
        assert json.loads(spec.env["MERLIN_RESOURCES"]) == bound.fencing_tokens
        assert {book(system, key).granted.holder for key in ("u250_a", "lane_a")} == {"ci"}
        system.jobs.set_status(spec.submission_id, "SUCCEEDED", 0)
        await until(status_is(system, broker, record.run_id, RunStatus.SUCCEEDED), "succeeded")
        assert book(system, "u250_a").granted is None and book(system, "lane_a").granted is None

    run(body)
