"""The `merlin` command against a real broker: JSON out, one-line errors, distinct exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import BrokerEnv
from tests.waiting import StderrWatch

pytestmark = pytest.mark.ray


@pytest.fixture
def broker_env(shared_broker: BrokerEnv) -> BrokerEnv:
    """One broker for the module: each test asserts only on the leases it takes, and releases them."""
    return shared_broker


def test_reserve_list_release_with_json(broker_env):
    reserved = broker_env.cli(
        "ray", "resources", "reserve", "firesim_u250", "--holder", "ci-nightly", "--ttl", "10m", "--json"
    )
    assert reserved.returncode == 0, reserved.stderr
    lease = json.loads(reserved.stdout)
    assert lease["holder"] == "ci-nightly" and lease["state"] == "granted"
    assert 590 < lease["expires_at"] - lease["granted_at"] <= 600

    listing = json.loads(broker_env.cli("ray", "resources", "list", "--json").stdout)
    row = next(r for r in listing if r["key"] == "firesim_u250")
    assert row["holder"] == "ci-nightly" and "lease_id" not in row

    busy = broker_env.cli("ray", "resources", "reserve", "firesim_u250", "--holder", "other")
    assert busy.returncode == 5
    assert busy.stderr.count("\n") == 1 and "ci-nightly" in busy.stderr and "Traceback" not in busy.stderr

    shown = broker_env.cli("ray", "resources", "show", lease["lease_id"], "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "granted"
    released = broker_env.cli("ray", "resources", "release", lease["lease_id"], "--json")
    assert released.returncode == 0 and json.loads(released.stdout)["state"] == "released"
    assert broker_env.cli("ray", "resources", "show", lease["lease_id"]).returncode == 7


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (["ray", "resources", "reserve", "no_such_board"], 4, "no_such_board"),
        (["ray", "resources", "reserve", "firesim_u250", "--ttl", "2x"], 3, "2x"),
        (["ray", "resources", "reserve", "firesim_u250", "--ttl=-5s"], 3, "-5s"),
        (["ray", "resources", "reserve", "firesim_u250", "--ttl", "30d"], 3, "ttl_s"),
        (["ray", "resources", "reserve", "firesim_u250", "--holder", ""], 3, "holder"),
        (
            ["ray", "resources", "release", "firesim_u250." + "0" * 32],
            6,
            "no such lease",
        ),  # named by its ref: the id is a capability
        (["ray", "resources", "release", "../../etc/passwd"], 3, "not a lease id"),
        (["ray", "resources", "revoke", "firesim_u250", "--reason", "nobody holds it"], 3, "not leased"),
    ],
)
def test_bad_input_is_one_line_a_distinct_code_and_changes_nothing(unchanging_broker, args, code, named):
    before = sorted(p.name for p in unchanging_broker.state.leases_dir.iterdir())
    out = unchanging_broker.cli(*args)
    assert out.returncode == code, out.stderr
    assert named in out.stderr and out.stderr.count("\n") == 1 and out.stdout == ""
    assert sorted(p.name for p in unchanging_broker.state.leases_dir.iterdir()) == before


def test_reserve_wait_shows_its_place_in_the_queue(broker_env):
    alice = broker_env.client.reserve("firesim_u250", "alice")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "ray", "resources", "reserve", "firesim_u250", "--holder", "bob",
         "--wait", "--timeout", "60s", "--json"],
        env=broker_env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stderr = StderrWatch(proc)
    stderr.wait_for("place 1 in the queue")
    broker_env.client.release(alice.lease_id)
    out, _ = proc.communicate(timeout=60)
    err = stderr.text()
    assert proc.returncode == 0, err
    assert "place 1 in the queue" in err and "so far; held by alice until" in err  # and who it waits for
    bob = json.loads(out)
    assert bob["holder"] == "bob"
    broker_env.client.release(bob["lease_id"])


def test_wait_timeout_exit_code(broker_env):
    alice = broker_env.client.reserve("radiance_sim_lane_a", "alice")
    out = broker_env.cli(
        "ray", "resources", "reserve", "radiance_sim_lane_a", "--holder", "ci", "--wait", "--timeout", "1s"
    )
    assert out.returncode == 9 and "timed out" in out.stderr
    broker_env.client.release(alice.lease_id)


def test_broker_status_json(broker_env):
    out = broker_env.cli("broker", "status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["healthy"] is True and status["resources"] == 3
