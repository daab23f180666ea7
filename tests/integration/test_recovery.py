"""Crashes lose nothing: a killed resource actor, a killed coordinator, a whole-cluster restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from broker.models import LeaseState
from tests.waiting import StderrWatch, until

pytestmark = pytest.mark.ray


def _kill_and_wait_for_new_pid(env, name: str) -> tuple[int, int]:
    old = env.actor_pid(name)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            new = env.actor_pid(name)
        except Exception:
            time.sleep(0.1)
            continue
        if new != old:
            return old, new
        time.sleep(0.1)
    raise AssertionError(f"{name} did not come back")


def test_kill_9_of_a_resource_actor_keeps_its_lease_and_queue(broker_env):
    client = broker_env.client
    alice = client.reserve("firesim_u250", "alice", ttl_s=600)
    results: dict[str, object] = {}

    def waiter(holder: str, priority: int) -> None:
        results[holder] = client.reserve("firesim_u250", holder, wait=True, timeout_s=120, priority=priority)

    threads = [threading.Thread(target=waiter, args=(h, p)) for h, p in (("bob", 0), ("carol", 0))]
    for count, thread in enumerate(threads, start=1):
        thread.start()
        until(lambda count=count: len(client.resources()[0].queue) == count, "the waiter queued")  # in order
    assert [e.holder for e in client.resources()[0].queue] == ["bob", "carol"]

    _kill_and_wait_for_new_pid(broker_env, "resource:firesim_u250")

    status = client.resources()[0]
    assert (status.holder, status.fencing_token) == ("alice", alice.fencing_token)
    assert [e.holder for e in status.queue] == ["bob", "carol"]
    assert client.get_lease(alice.lease_id) == alice
    client.release(alice.lease_id)
    threads[0].join(60)
    bob = results["bob"]
    assert bob.state is LeaseState.GRANTED and bob.fencing_token == alice.fencing_token + 1
    client.release(bob.lease_id)
    threads[1].join(60)
    assert results["carol"].fencing_token == bob.fencing_token + 1


def test_kill_9_of_the_coordinator_loses_nothing(broker_env):
    client = broker_env.client
    alice = client.reserve("spacemit_x60_board_01", "alice")
    _kill_and_wait_for_new_pid(broker_env, "broker")
    assert client.get_lease(alice.lease_id).state is LeaseState.GRANTED
    assert client.release(alice.lease_id).state is LeaseState.RELEASED


def test_detached_actors_outlive_the_driver_that_made_them(ray_cluster, tmp_path):
    from broker.actors.deploy import broker_down
    from tests.integration.conftest import TEST_CATALOG, broker_place

    env = broker_place(ray_cluster, tmp_path / "state")  # a namespace and a state dir: the CLI starts the broker
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(TEST_CATALOG))
    up = env.cli("broker", "up", "--catalog", str(catalog), "--metrics-port", "0")
    assert up.returncode == 0, up.stderr
    reserve = env.cli("ray", "resources", "reserve", "firesim_u250", "--holder", "ci", "--json")
    assert reserve.returncode == 0, reserve.stderr
    lease = json.loads(reserve.stdout)
    # Both CLI drivers have exited; the actors and the lease are still there.
    assert env.client.get_lease(lease["lease_id"]).state is LeaseState.GRANTED
    broker_down(env.namespace)


QUEUE_AND_LEAVE = """
import json, sys, time, ray, broker
client = broker.connect()
handle = ray.get_actor("broker")  # the notebook way: plain Ray, the namespace from connect()
handle.reserve.remote("firesim_u250", "bob", wait=True, request_id="bob-req-1", ttl_s=600)

def queue(key):
    return next(s for s in client.resources() if s.key == key).queue

deadline = time.time() + 60
while time.time() < deadline and not queue("firesim_u250"):
    time.sleep(0.1)
# Then a group that needs the FPGA (behind bob) and lane_b (free: kept for the group meanwhile).
handle.reserve_group.remote(
    "cosim", keys=["firesim_u250", "radiance_sim_lane_b"], wait=True, request_id="cosim-1", ttl_s=600
)
while time.time() < deadline and not (len(queue("firesim_u250")) == 2 and queue("radiance_sim_lane_b")):
    time.sleep(0.1)
print("queued", json.dumps([g["ref"] for g in client.groups() if g["state"] == "queued"]), flush=True)
"""


def test_cluster_stop_and_start_restores_leases_and_queue(tmp_path):
    """Its own cluster: stop it with a lease granted and a request queued, a group lease granted and
    a group request waiting (behind the single one on a key they share), start it, `broker up`."""
    state_dir = tmp_path / "state"
    catalog = tmp_path / "catalog.yaml"
    from tests.integration.conftest import ROOT, TEST_CATALOG

    lab = {
        **TEST_CATALOG,
        "resources": {**TEST_CATALOG["resources"], "radiance_sim_lane_b": {"labels": {"kind": "sim"}}},
    }
    catalog.write_text(yaml.safe_dump(lab))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env.update(MERLIN_STATE_DIR=str(state_dir), MERLIN_RAY_NAMESPACE="restart-test")

    def merlin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker.cli", *args], env=env, capture_output=True, text=True, timeout=180, cwd=ROOT
        )

    try:
        assert merlin("ray", "cluster", "start-local").returncode == 0
        assert merlin("broker", "up", "--catalog", str(catalog), "--metrics-port", "0").returncode == 0
        alice = json.loads(merlin("ray", "resources", "reserve", "firesim_u250", "--holder", "alice", "--json").stdout)
        pair = ("ray", "resources", "reserve", "spacemit_x60_board_01,radiance_sim_lane_a", "--holder", "ci",
                "--request-id", "ci-1", "--ttl", "10m", "--json")  # fmt: skip
        ci = json.loads(merlin(*pair).stdout)
        assert ci["state"] == "granted"
        queued = subprocess.run(
            [sys.executable, "-c", QUEUE_AND_LEAVE], env=env, capture_output=True, text=True, timeout=120
        )
        assert "queued" in queued.stdout, queued.stderr
        (cosim_ref,) = json.loads(queued.stdout.split("queued", 1)[1])

        stop = merlin("ray", "cluster", "stop")
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stderr
        assert merlin("ray", "cluster", "status").returncode == 10
        assert merlin("ray", "cluster", "start-local").returncode == 0
        assert merlin("broker", "up", "--catalog", str(catalog), "--metrics-port", "0").returncode == 0

        shown = json.loads(merlin("ray", "resources", "show", alice["lease_id"], "--json").stdout)
        assert (shown["state"], shown["lease_id"], shown["fencing_token"]) == (
            "granted",
            alice["lease_id"],
            alice["fencing_token"],
        )
        listing = {r["key"]: r for r in json.loads(merlin("ray", "resources", "list", "--json").stdout)}
        # Order kept on the key they share: bob, then the group; lane_b still kept for the group.
        assert [q["holder"] for q in listing["firesim_u250"]["queue"]] == ["bob", "cosim"]
        lane_b = listing["radiance_sim_lane_b"]
        assert (lane_b["state"], [q["holder"] for q in lane_b["queue"]]) == ("free", ["cosim"])
        # The granted group is still granted, with its keys and tokens; its request id answers the same lease.
        shown = json.loads(merlin("ray", "resources", "show", ci["lease_id"], "--json").stdout)
        assert (shown["state"], shown["members"]) == ("granted", ci["members"])
        assert json.loads(merlin(*pair).stdout)["lease_id"] == ci["lease_id"]

        # bob comes back with his request id; alice releases; bob holds the same request's lease
        waiting = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "ray", "resources", "reserve", "firesim_u250", "--holder", "bob",
             "--request-id", "bob-req-1", "--wait", "--timeout", "60s", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        stderr = StderrWatch(waiting)
        stderr.wait_for("place 1 in the queue")  # bob's new call has joined his recovered request
        assert merlin("ray", "resources", "release", alice["lease_id"]).returncode == 0
        out, _ = waiting.communicate(timeout=120)
        err = stderr.text()
        bob = json.loads(out)
        assert bob["state"] == "granted" and bob["fencing_token"] == alice["fencing_token"] + 1, err
        assert bob["expires_at"] - bob["granted_at"] > 500  # he came back: his full TTL, not the claim window

        # cosim comes back with its request id: the same group, next in line for both keys.
        waiting = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "ray", "resources", "reserve", "firesim_u250,radiance_sim_lane_b",
             "--holder", "cosim", "--request-id", "cosim-1", "--wait", "--timeout", "60s", "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        stderr = StderrWatch(waiting)
        stderr.wait_for("place 1 in the queue")
        assert merlin("ray", "resources", "release", bob["lease_id"]).returncode == 0
        out, _ = waiting.communicate(timeout=120)
        cosim = json.loads(out)
        assert cosim["state"] == "granted" and cosim["ref"] == cosim_ref, stderr.text()
        tokens = {m["key"]: m["fencing_token"] for m in cosim["members"]}
        assert tokens == {"firesim_u250": bob["fencing_token"] + 1, "radiance_sim_lane_b": 1}
        assert cosim["expires_at"] - cosim["granted_at"] > 500  # claimed by its caller: the full TTL
    finally:
        merlin("ray", "cluster", "stop")


def test_a_long_waiter_survives_a_restart_after_the_retry_window(broker_env):
    """The coordinator's retry window (8 s in tests) opens when the actor dies, not when the wait began."""
    client = broker_env.client
    alice = client.reserve("firesim_u250", "alice")
    got: dict[str, object] = {}
    waiter = threading.Thread(
        target=lambda: got.update(lease=client.reserve("firesim_u250", "bob", wait=True, timeout_s=120))
    )
    waiter.start()
    time.sleep(10.0)  # not a synchronisation: the wait must outlast the retry window before the kill
    _kill_and_wait_for_new_pid(broker_env, "resource:firesim_u250")
    client.release(alice.lease_id)
    waiter.join(60)
    assert got["lease"].state is LeaseState.GRANTED and got["lease"].holder == "bob"
