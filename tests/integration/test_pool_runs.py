"""Pool bundles as real Ray jobs: bundles that ask for "any U250 slot" run at once on both slots."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core.runs import RunStatus
from broker.models import ResourceState
from targetgen.bundle import POOL_RESOURCE, ExecutionBundle, write_bundle
from tests.integration.conftest import BrokerEnv, SpareBrokers, next_test_uses

pytestmark = pytest.mark.ray
PY = sys.executable
U250 = {"kind": "fpga", "board": "u250"}
LAB = {
    "version": 1,
    "resources": {
        "firesim_u250": {"labels": U250, "properties": {"pcie_slot": "0000:3b:00.0"}},
        "firesim_u250_b": {"labels": U250, "properties": {"pcie_slot": "0000:d8:00.0"}},
        "radiance_sim_lane_a": {"labels": {"kind": "sim"}},
    },
}


@pytest.fixture
def lab(spare_brokers: SpareBrokers, request: pytest.FixtureRequest) -> Iterator[BrokerEnv]:
    """A broker with the lab's catalog for each test (the next test's starts while this one runs)."""
    from broker.actors.deploy import broker_down

    env = spare_brokers.take(LAB, again=next_test_uses(request, "lab"))
    yield env
    broker_down(env.namespace)


def pool_target(root: Path, name: str, seconds: float) -> Path:
    """A target dir whose hardware step runs on any U250 slot; it writes the key it was bound to
    (from its argv, its env and MERLIN_RESOURCE) and its token to an artifact."""
    directory = root / name
    directory.mkdir(parents=True)
    code = (
        "import json, os, pathlib, sys, time; time.sleep(float(sys.argv[2])); p = pathlib.Path('artifacts/bound.json'); "
        "p.parent.mkdir(exist_ok=True); p.write_text(json.dumps({'argv': sys.argv[1], 'env': os.environ['SLOT'], "
        "'resource': os.environ.get('MERLIN_RESOURCE'), 'token': os.environ.get('MERLIN_FENCING_TOKEN'), "
        "'resources': json.loads(os.environ.get('MERLIN_RESOURCES', 'null'))}))"
    )
    step = {
        "id": "on-fpga",
        "argv": [PY, "-c", code, "{resource}", str(seconds)],
        "env": {"SLOT": "{resource}"},
        "resource": POOL_RESOURCE,
        "artifacts": ["artifacts/bound.json"],
    }
    bundle = ExecutionBundle.model_validate(
        {"target": name, "target_class": "fpga_emulation", "resource_labels": "kind=fpga,board=u250", "steps": [step]}
    )
    write_bundle(directory, bundle)
    return directory


def finished(client, run_id: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    record = client.call("run", run_id)
    while not record.finished and time.monotonic() < deadline:
        time.sleep(0.2)
        record = client.call("run", run_id)
    assert record.finished, f"{run_id} is {record.status}: {record.message}"
    return record


def test_two_fpga_pool_bundles_submitted_together_run_in_parallel_on_the_two_u250_slots(lab, tmp_path):
    client = lab.client
    first = client.call("submit", str(pool_target(tmp_path, "fpga-a", 4.0)), holder="alice")
    second = client.call("submit", str(pool_target(tmp_path, "fpga-b", 4.0)), holder="bob")
    assert first.resource is None and first.resource_labels == "board=u250,kind=fpga"
    a, b = finished(client, first.run_id), finished(client, second.run_id)
    assert {a.status, b.status} == {RunStatus.SUCCEEDED}, [
        (r.message, client.call("logs", r.run_id)[-2000:]) for r in (a, b) if r.status is not RunStatus.SUCCEEDED
    ]
    # Each run's record says which slot it got, and they got different ones.
    assert {a.resource, b.resource} == {"firesim_u250", "firesim_u250_b"}
    assert a.resources == (a.resource,) and b.resources == (b.resource,)
    # Their hardware steps ran at the same time (the executor's recorded step times).
    (sa,), (sb,) = a.steps, b.steps
    assert sa.resource == a.resource and sb.resource == b.resource
    assert sa.started_at < sb.ended_at and sb.started_at < sa.ended_at, "the two slots were not used at once"
    # The step was bound to its slot: {resource} in its argv and env, and the job's variables.
    for record in (a, b):
        bound = json.loads((Path(record.workdir) / "artifacts" / "bound.json").read_text())
        assert bound["argv"] == bound["env"] == bound["resource"] == record.resource
        assert int(bound["token"]) == record.fencing_token and bound["resources"] == {
            record.resource: record.fencing_token
        }
    statuses = {status.key: status for status in client.resources()}
    assert all(statuses[key].state is ResourceState.FREE for key in ("firesim_u250", "firesim_u250_b"))
    assert client.call("groups") == []  # both group leases ended with their runs
    events = [json.loads(line) for line in lab.state.events_path.read_text().splitlines()]
    granted = {e["run_id"]: e["resources"] for e in events if e["event"] == "run.lease_granted"}
    assert granted == {a.run_id: [a.resource], b.run_id: [b.resource]}


def test_the_local_engine_takes_a_pool_bundles_key_itself_as_a_group_lease(lab, tmp_path):
    client = lab.client
    alice = client.reserve("firesim_u250", "alice", ttl_s=600)
    target = pool_target(tmp_path, "local", 0.1)
    out = lab.cli("targetgen", "execute", "--engine", "local", "--from-dir", str(target), "--holder", "ci")
    assert out.returncode == 0, out.stderr
    assert "leased firesim_u250_b" in out.stderr  # the free slot, as a group lease of its own
    bound = json.loads((target / "artifacts" / "bound.json").read_text())
    assert bound["argv"] == bound["env"] == "firesim_u250_b"
    state = json.loads((target / "run_state.json").read_text())
    assert state["resources"] == ["firesim_u250_b"] and state["status"] == "succeeded"
    statuses = {status.key: status for status in client.resources()}
    assert statuses["firesim_u250_b"].state is ResourceState.FREE and statuses["firesim_u250"].holder == "alice"
    assert client.call("groups") == []  # released at the end
    client.release(alice.lease_id)


def test_a_cosim_bundle_holds_its_fpga_slot_and_its_sim_lane_for_its_whole_run(lab, tmp_path):
    from tests.waiting import until

    client = lab.client
    directory = tmp_path / "cosim"
    directory.mkdir()
    code = "import sys, time; time.sleep(2.0); print('co-simulated on', sys.argv[1])"
    steps = [
        {"id": "cosim", "argv": [PY, "-c", code, "{resource}"], "resource": POOL_RESOURCE},
        {"id": "compare", "argv": [PY, "-c", "print('compared')"], "resource": POOL_RESOURCE, "needs": ["cosim"]},
    ]
    keys = ["firesim_u250", "radiance_sim_lane_a"]
    write_bundle(
        directory,
        ExecutionBundle.model_validate(
            {"target": "cosim", "target_class": "fpga_emulation", "resource_keys": keys, "steps": steps}
        ),
    )
    alice = client.reserve("firesim_u250", "alice", ttl_s=600)
    run = client.call("submit", str(directory), holder="ci")
    lane = lambda: next(s for s in client.resources() if s.key == "radiance_sim_lane_a")  # noqa: E731
    until(lambda: lane().ready_for_group is not None, "the free lane kept for the co-simulation")
    assert client.call("run", run.run_id).status is RunStatus.PENDING and lane().holder is None
    client.release(alice.lease_id)
    record = finished(client, run.run_id)
    assert record.status is RunStatus.SUCCEEDED, (record.message, client.call("logs", record.run_id)[-2000:])
    assert record.resources == tuple(sorted(keys)) and set(record.fencing_tokens) == set(keys)
    # Both keys were granted to the run before its first step began and released after its last
    # ended: the journal's times against the executor's recorded step times.
    events = [json.loads(line) for line in lab.state.events_path.read_text().splitlines()]
    start, end = min(s.started_at for s in record.steps), max(s.ended_at for s in record.steps)
    for key in keys:
        granted = [e["ts"] for e in events if e["event"] == "lease.granted" and e.get("resource") == key
                   and e.get("holder") == "ci"]  # fmt: skip
        released = [e["ts"] for e in events if e["event"] == "lease.released" and e.get("resource") == key
                    and e.get("holder") == "ci"]  # fmt: skip
        assert len(granted) == 1 and len(released) == 1, (key, granted, released)
        assert granted[0] < start and end < released[0], key
    assert all(step.resource == ",".join(sorted(keys)) for step in record.steps)
