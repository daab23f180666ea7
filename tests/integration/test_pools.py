"""A lab sharing two U250 slots and two sim lanes between single, selector and group requests, on
the real loopback cluster: the shim, the CLI, the read API, and kill -9 of the coordinator and of a
resource actor in the middle of a group's wait."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from broker.errors import InvalidRequest, ResourceBusy
from broker.models import GroupLease, LeaseState
from tests.integration.conftest import SpareBrokers, next_test_uses
from tests.waiting import StderrWatch, until

pytestmark = pytest.mark.ray

LAB = {
    "version": 1,
    "broker": {"claim": "20s"},
    "pools": {"u250": "kind=fpga,board=u250", "sim_lanes": "kind=sim"},
    "resources": {
        "firesim_u250": {"labels": {"kind": "fpga", "board": "u250"}, "properties": {"pcie_slot": "0000:3b:00.0"}},
        "firesim_u250_b": {"labels": {"kind": "fpga", "board": "u250"}, "properties": {"pcie_slot": "0000:d8:00.0"}},
        "radiance_sim_lane_a": {"labels": {"kind": "sim"}},
        "radiance_sim_lane_b": {"labels": {"kind": "sim"}},
    },
}


@pytest.fixture
def lab(spare_brokers: SpareBrokers, request: pytest.FixtureRequest):
    """A broker with the lab's catalog for each test (the next test's starts while this one runs)."""
    from broker.actors.deploy import broker_down

    env = spare_brokers.take(LAB, again=next_test_uses(request, "lab"))
    yield env
    broker_down(env.namespace)


def _kill(env, name: str) -> None:
    old = env.actor_pid(name)
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        try:
            return env.actor_pid(name) != old
        except Exception:
            return False

    until(back, f"{name} back after kill -9", timeout_s=60)


def test_selector_set_and_single_requests_share_the_lab(lab):
    client = lab.client
    alice = client.reserve("firesim_u250", "alice", ttl_s=600)
    # "Any free U250": the other slot, with the facts the job needs to touch it.
    bob = client.reserve_group("bob", labels="kind=fpga,board=u250", ttl_s=600)
    assert bob.state is LeaseState.GRANTED and bob.keys == ("firesim_u250_b",)
    assert bob.members[0].properties == {"pcie_slot": "0000:d8:00.0"} and bob.members[0].fencing_token == 1
    with pytest.raises(ResourceBusy):
        client.reserve_group("carol", labels="board=u250")
    with pytest.raises(InvalidRequest):
        client.reserve_group("carol", labels="board=u250", count=3, wait=True)

    # A co-simulation needs a U250 and a sim lane together; it waits for the U250 while the
    # free lane waits for it (held back, not handed to a later request).
    got: dict[str, GroupLease] = {}
    cosim = threading.Thread(
        target=lambda: got.update(
            g=client.reserve_group("cosim", keys=["firesim_u250", "radiance_sim_lane_a"], wait=True, ttl_s=600)
        )
    )
    cosim.start()
    until(lambda: any(e.group for e in _status(client, "radiance_sim_lane_a").queue), "cosim queued on the lane")
    late = lab.cli("ray", "resources", "reserve", "radiance_sim_lane_a", "--holder", "dave")
    assert late.returncode == 5, late.stderr  # the lane is held for the waiting group
    started = time.monotonic()
    client.release(alice.lease_id)
    cosim.join(60)
    print(f"\nrelease -> 2-key group grant: {time.monotonic() - started:.3f} s")
    group = got["g"]
    assert set(group.keys) == {"firesim_u250", "radiance_sim_lane_a"}
    statuses = {s.key: s for s in client.resources()}
    assert statuses["firesim_u250"].holder == "cosim" and statuses["radiance_sim_lane_a"].holder == "cosim"
    assert statuses["firesim_u250"].fencing_token == alice.fencing_token + 1

    # The group is one capability: renew and release it as a whole.
    assert client.renew(group.lease_id, 900).state is LeaseState.GRANTED
    assert client.release(group.lease_id).state is LeaseState.RELEASED
    statuses = {s.key: s for s in client.resources()}
    assert statuses["firesim_u250"].holder is None and statuses["radiance_sim_lane_a"].holder is None
    client.release(bob.lease_id)


def _status(client, key: str):
    return next(s for s in client.resources() if s.key == key)


def test_cli_any_two_lanes_and_a_pair_with_pools_in_list(lab):
    two = lab.cli("ray", "resources", "reserve", "--pool", "sim_lanes", "--count", "2", "--json")
    assert two.returncode == 0, two.stderr
    granted = json.loads(two.stdout)
    assert sorted(m["key"] for m in granted["members"]) == ["radiance_sim_lane_a", "radiance_sim_lane_b"]
    listing = lab.cli("ray", "resources", "list")
    assert listing.returncode == 0, listing.stderr
    pool_lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith(("u250", "sim_"))}
    assert "0/2" in pool_lines["sim_lanes"] and "2/2" in pool_lines["u250"]
    # Filtered: the pools with a member listed, with their own figures; --pools --json: the pools' data.
    sims = lab.cli("ray", "resources", "list", "--labels", "kind=sim")
    pool_lines = [line for line in sims.stdout.splitlines() if line.startswith(("u250", "sim_"))]
    assert len(pool_lines) == 1 and "0/2" in pool_lines[0] and pool_lines[0].startswith("sim_lanes"), sims.stdout
    pools = {p["pool"]: p for p in json.loads(lab.cli("ray", "resources", "list", "--pools", "--json").stdout)}
    assert (pools["sim_lanes"]["free"], pools["sim_lanes"]["total"], pools["u250"]["free"]) == (0, 2, 2)
    pair = lab.cli("ray", "resources", "reserve", "firesim_u250,firesim_u250_b", "--ttl", "10m")
    assert pair.returncode == 0, pair.stderr
    assert "firesim_u250: fencing token 1" in pair.stdout and "firesim_u250_b: fencing token 1" in pair.stdout
    lease_id = next(line.split()[2] for line in pair.stdout.splitlines() if line.startswith("lease id:"))
    shown = lab.cli("ray", "resources", "show", lease_id)
    assert shown.returncode == 0, shown.stderr
    assert lab.cli("ray", "resources", "release", lease_id).returncode == 0
    assert lab.cli("ray", "resources", "show", lease_id).returncode == 7  # not held any more
    released = lab.cli("ray", "resources", "release", granted["lease_id"])
    assert released.returncode == 0, released.stderr
    bad = lab.cli("ray", "resources", "reserve", "--labels", "kind=sim", "--count", "3")
    assert bad.returncode == 3 and bad.stderr.count("\n") == 1
    assert lab.client.groups() == []


def test_waiting_group_survives_kill_9_of_coordinator_and_resource_actor(lab):
    client = lab.client
    lane = client.reserve("radiance_sim_lane_a", "alice", ttl_s=600)
    got: dict[str, GroupLease] = {}
    waiter = threading.Thread(
        target=lambda: got.update(
            g=client.reserve_group(
                "ci", labels="kind=sim", count=2, wait=True, ttl_s=600, request_id="nightly-42", timeout_s=300
            )
        )
    )
    waiter.start()
    until(lambda: any(e.group for e in _status(client, "radiance_sim_lane_a").queue), "ci queued")
    single = threading.Thread(
        target=lambda: got.update(s=client.reserve("radiance_sim_lane_b", "dave", wait=True, ttl_s=600))
    )
    single.start()
    until(lambda: len(_status(client, "radiance_sim_lane_b").queue) == 2, "dave queued behind ci")
    _kill(lab, "broker")
    _kill(lab, "resource:radiance_sim_lane_b")
    queue = _status(client, "radiance_sim_lane_b").queue
    assert [bool(e.group) for e in queue] == [True, False] and queue[1].holder == "dave"  # order kept
    client.release(lane.lease_id)
    waiter.join(90)
    group = got["g"]
    assert group.request_id == "nightly-42" and set(group.keys) == {"radiance_sim_lane_a", "radiance_sim_lane_b"}
    assert "s" not in got  # dave waits behind the group
    client.release(group.lease_id)
    single.join(60)
    assert got["s"].holder == "dave" and got["s"].state is LeaseState.GRANTED
    journal = [json.loads(line) for line in lab.state.events_path.read_text().splitlines()]
    grants = [e for e in journal if e["event"] == "group.granted"]
    assert len(grants) == 1 and sorted(grants[0]["keys"]) == ["radiance_sim_lane_a", "radiance_sim_lane_b"]
    assert not any(group.lease_id in line for line in lab.state.events_path.read_text().splitlines())


def test_cli_group_wait_shows_the_place_that_gates_it(lab):
    client = lab.client
    alice = client.reserve("radiance_sim_lane_a", "alice", ttl_s=600)
    got: dict[str, object] = {}
    bob = threading.Thread(
        target=lambda: got.update(bob=client.reserve("radiance_sim_lane_a", "bob", wait=True, ttl_s=600))
    )
    bob.start()
    until(lambda: len(_status(client, "radiance_sim_lane_a").queue) == 1, "bob queued on lane_a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "ray", "resources", "reserve", "--labels", "kind=sim", "--count", "2",
         "--holder", "ci", "--wait", "--timeout", "60s", "--json"],
        env=lab.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stderr = StderrWatch(proc)
    # First on lane_b but second on lane_a, behind bob: it needs both, so it is second in line.
    stderr.wait_for("place 2 in the queue")
    client.release(alice.lease_id)
    bob.join(60)
    stderr.wait_for("place 1 in the queue")  # bob holds lane_a now: the group is next on both
    client.release(got["bob"].lease_id)  # type: ignore[attr-defined]
    out, _ = proc.communicate(timeout=60)
    err = stderr.text()
    assert proc.returncode == 0, err
    assert "waiting for kind=sim: place 2 in the queue" in err
    group = json.loads(out)
    assert sorted(m["key"] for m in group["members"]) == ["radiance_sim_lane_a", "radiance_sim_lane_b"]
    client.release(group["lease_id"])


def test_shim_lease_context_holds_a_group_renews_it_and_releases_it(lab):
    client = lab.client
    # Any two sim lanes, and the two U250 slots together, held at once; TTLs of 1 s kept by heartbeats.
    with (
        client.lease(labels="kind=sim", count=2, holder="nb", ttl_s=1.0, heartbeat_s=0.2) as lanes,
        client.lease(keys=["firesim_u250", "firesim_u250_b"], holder="nb", ttl_s=1.0, heartbeat_s=0.2) as fpgas,
    ):
        assert set(lanes.keys) == {"radiance_sim_lane_a", "radiance_sim_lane_b"}
        assert set(fpgas.keys) == {"firesim_u250", "firesim_u250_b"}
        time.sleep(2.0)  # twice the TTL: only the heartbeats keep the keys
        for held in (lanes, fpgas):
            assert held.check().state is LeaseState.GRANTED
            assert client.check_fence(held.lease_id, held.fencing_tokens).lease_id == held.lease_id
        statuses = {s.key: s for s in client.resources()}
        assert {s.holder for s in statuses.values()} == {"nb"}
        assert all(s.expires_at > time.time() for s in statuses.values())
    for held in (lanes, fpgas):
        assert client.get_lease(held.lease_id).state is LeaseState.RELEASED
    assert all(s.holder is None for s in client.resources())
