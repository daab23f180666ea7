"""Leases on real detached actors: grants, handoff, other drivers, the notebook path."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import ray

from broker.errors import InvalidRequest, LeaseNotHeld, ResourceBusy, UnknownResource, WaitTimeout
from broker.models import LeaseState, ResourceState

pytestmark = pytest.mark.ray


def test_reserve_release_and_the_state_dir_records_it(broker_env):
    client = broker_env.client
    lease = client.reserve("firesim_u250", "alice", ttl_s=60)
    assert lease.state is LeaseState.GRANTED and lease.fencing_token == 1
    record = json.loads(broker_env.state.lease_path(lease.lease_id).read_text())
    assert record["state"] == "granted" and record["holder"] == "alice"
    statuses = {status.key: status for status in client.resources()}
    assert statuses["firesim_u250"].holder == "alice"
    assert statuses["firesim_u250"].labels == {"kind": "fpga"}
    assert lease.lease_id not in json.dumps([s.model_dump(mode="json") for s in statuses.values()])
    released = client.release(lease.lease_id)
    assert released.state is LeaseState.RELEASED
    assert json.loads(broker_env.state.lease_path(lease.lease_id).read_text())["state"] == "released"
    assert client.release(lease.lease_id).state is LeaseState.RELEASED  # idempotent


def test_notebook_path_through_ray_get_actor(shared_broker):
    broker = ray.get_actor("broker", namespace=shared_broker.namespace)
    lease = ray.get(broker.reserve.remote("radiance_sim_lane_a", holder="alice", ttl_s=3600))
    with pytest.raises(ResourceBusy) as info:
        ray.get(broker.reserve.remote("radiance_sim_lane_a", holder="bob"))
    assert info.value.holder == "alice"
    with pytest.raises(UnknownResource):
        ray.get(broker.reserve.remote("no_such_board", holder="bob"))
    with pytest.raises(InvalidRequest):
        ray.get(broker.reserve.remote("radiance_sim_lane_a", holder="bob", ttl_s=-1))
    assert ray.get(broker.release.remote(lease.lease_id)).state is LeaseState.RELEASED


def test_handoff_to_the_next_waiter(shared_broker):
    client = shared_broker.client
    alice = client.reserve("firesim_u250", "alice")
    got: dict[str, object] = {}

    def wait_for_it() -> None:
        got["lease"] = client.reserve("firesim_u250", "bob", wait=True, timeout_s=60)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not client.resources()[0].queue:
        time.sleep(0.05)
    assert [entry.holder for entry in client.resources()[0].queue] == ["bob"]
    client.release(alice.lease_id)
    waiter.join(30)
    bob = got["lease"]
    assert bob.state is LeaseState.GRANTED and bob.fencing_token == alice.fencing_token + 1
    client.release(bob.lease_id)


def test_a_waiter_times_out_and_leaves_the_queue(shared_broker):
    client = shared_broker.client
    alice = client.reserve("spacemit_x60_board_01", "alice")
    with pytest.raises(WaitTimeout):
        client.reserve("spacemit_x60_board_01", "bob", wait=True, timeout_s=0.5)
    board = next(s for s in client.resources() if s.key == "spacemit_x60_board_01")
    assert board.queue == ()
    client.release(alice.lease_id)


def test_expiry_grants_the_next_waiter_without_anyone_calling(broker_env):
    client = broker_env.client
    client.reserve("firesim_u250", "alice", ttl_s=1.0)
    bob = client.reserve("firesim_u250", "bob", wait=True, timeout_s=30)
    assert bob.state is LeaseState.GRANTED and bob.fencing_token == 2
    events = [json.loads(line) for line in broker_env.state.events_path.read_text().splitlines()]
    expired = [e for e in events if e["event"] == "lease.expired"]
    assert expired and expired[0]["holder"] == "alice"


SECOND_DRIVER = """
import json, sys
import broker
client = broker.connect()
leases = {s.key: s for s in client.resources()}
print(json.dumps({"holder": leases["firesim_u250"].holder}), flush=True)
print(json.dumps({"released": client.release(sys.argv[1]).state.value}), flush=True)
"""


def test_a_second_driver_sees_and_releases_a_lease(shared_broker):
    lease = shared_broker.client.reserve("firesim_u250", "alice")
    out = subprocess.run(
        [sys.executable, "-c", SECOND_DRIVER, lease.lease_id],
        env=shared_broker.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines == [{"holder": "alice"}, {"released": "released"}]
    assert shared_broker.client.get_lease(lease.lease_id).state is LeaseState.RELEASED


def test_held_lease_context_renews_and_releases(shared_broker):
    client = shared_broker.client
    with client.lease("firesim_u250", "alice", ttl_s=1.0, heartbeat_s=0.2) as held:
        time.sleep(2.5)  # well past the TTL: only heartbeats keep it
        assert held.check().state is LeaseState.GRANTED
        token = held.fencing_token
        assert client.check_fence(held.lease_id, token).lease_id == held.lease_id
    assert client.get_lease(held.lease_id).state is LeaseState.RELEASED


def test_held_lease_context_raises_when_the_lease_is_revoked(shared_broker):
    client = shared_broker.client
    lost = threading.Event()
    with pytest.raises(LeaseNotHeld):
        with client.lease("firesim_u250", "alice", ttl_s=3.0, heartbeat_s=0.2, on_lost=lambda _: lost.set()):
            client.revoke("firesim_u250", "admin needs it", by="bob")
            assert lost.wait(10)


def test_maintenance_keeps_the_holder_and_queues_newcomers(broker_env):
    client = broker_env.client
    alice = client.reserve("firesim_u250", "alice")
    status = client.set_maintenance("firesim_u250", True, "fan swap", by="bob")
    assert status.state is ResourceState.MAINTENANCE and status.holder == "alice"
    with pytest.raises(ResourceBusy, match="maintenance"):
        client.reserve("firesim_u250", "carol")
    assert client.renew(alice.lease_id).state is LeaseState.GRANTED
    client.set_maintenance("firesim_u250", False)
    client.release(alice.lease_id)
    assert client.reserve("firesim_u250", "carol").fencing_token == 2
