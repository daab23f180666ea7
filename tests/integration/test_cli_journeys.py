"""The CLI the way a CI pipeline, a coding agent and a lab admin use it: real `merlin` processes
against a real broker. Each test is one journey; each asserts what that user relies on."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import yaml

from broker.client import default_holder
from broker.errors import ResourceBusy
from broker.models import LeaseState
from tests.integration.conftest import ROOT, TEST_CATALOG, BrokerEnv, make_broker, wait_idle

pytestmark = pytest.mark.ray

SECRET = "journeys-admin-secret"


@pytest.fixture(scope="module")
def admin_broker(ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerEnv]:
    """A broker whose catalog sets an admin secret and a 12 h max hold on firesim_u250 (its secret
    in the file :func:`secret_file` names)."""
    from broker.actors.deploy import broker_down

    catalog = json.loads(json.dumps(TEST_CATALOG))
    catalog["broker"]["admin_secret_sha256"] = hashlib.sha256(SECRET.encode()).hexdigest()
    catalog["resources"]["firesim_u250"]["max_hold"] = "12h"
    root = tmp_path_factory.mktemp("admin")
    env = make_broker(ray_cluster, root / "state", catalog)
    secret_file(env).write_text(SECRET)
    yield env
    broker_down(env.namespace)


@pytest.fixture
def admin_env(admin_broker: BrokerEnv) -> Iterator[BrokerEnv]:
    """The module's admin broker, shared as ``shared_broker`` is: every key free before and after each test."""
    wait_idle(admin_broker, "before this test")
    yield admin_broker
    wait_idle(admin_broker, "after this test")


def secret_file(env: BrokerEnv) -> Path:
    return env.state.root.parent / "secret"


def ok(out: subprocess.CompletedProcess[str]) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def refused(out: subprocess.CompletedProcess[str], code: int) -> dict:
    """A failure as a script sees it: the exit code, one line on stderr, the error object on stdout."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    error = json.loads(out.stdout)["error"]
    assert error["exit_code"] == code and error["message"] in out.stderr
    return error


def lease_files(env: BrokerEnv) -> list[str]:
    return sorted(path.name for path in env.state.leases_dir.iterdir())


def journal(env: BrokerEnv) -> list[dict]:
    return [json.loads(line) for line in env.state.events_path.read_text().splitlines() if line.strip()]


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def kill_coordinator(env: BrokerEnv) -> None:
    """kill -9 the coordinator and wait until Ray has restarted it."""
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    old_pid = env.actor_pid("broker")
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return env.actor_pid("broker") != old_pid
        except (ActorUnavailableError, RayActorError, GetTimeoutError):
            return False

    wait_for(restarted, "the coordinator's restart")


def background(env: BrokerEnv, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "broker.cli", *args],
        env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip


def reserve(env: BrokerEnv, key: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return env.cli("ray", "resources", "reserve", key, *extra, "--json")


# ---------------------------------------------------------------------- a CI pipeline


def test_a_request_id_on_another_key_is_refused_and_takes_nothing(shared_broker):
    first = ok(reserve(shared_broker, "radiance_sim_lane_a", "--holder", "ci", "--request-id", "R1"))
    before = lease_files(shared_broker)
    error = refused(reserve(shared_broker, "spacemit_x60_board_01", "--holder", "ci", "--request-id", "R1"), 3)
    assert error["type"] == "InvalidRequest" and error["field"] == "request_id"
    assert "request id R1 already names a lease on radiance_sim_lane_a" in error["message"]
    assert lease_files(shared_broker) == before
    board = next(s for s in shared_broker.client.resources() if s.key == "spacemit_x60_board_01")
    assert board.holder is None
    again = ok(reserve(shared_broker, "radiance_sim_lane_a", "--holder", "ci", "--request-id", "R1"))
    assert again["lease_id"] == first["lease_id"]  # the retry on its own key is still answered
    shared_broker.client.release(first["lease_id"])


def test_a_request_refused_as_busy_leaves_its_id_free_for_another_key(shared_broker):
    alice = shared_broker.client.reserve("firesim_u250", "alice")
    refused(reserve(shared_broker, "firesim_u250", "--holder", "ci", "--request-id", "R2"), 5)
    lease = ok(reserve(shared_broker, "spacemit_x60_board_01", "--holder", "ci", "--request-id", "R2"))
    assert lease["state"] == "granted"
    shared_broker.client.release(alice.lease_id)
    shared_broker.client.release(lease["lease_id"])


def test_the_one_key_per_request_id_rule_survives_a_coordinator_restart(broker_env):
    ok(reserve(broker_env, "radiance_sim_lane_a", "--holder", "ci", "--request-id", "R3"))
    kill_coordinator(broker_env)
    error = refused(reserve(broker_env, "spacemit_x60_board_01", "--holder", "ci", "--request-id", "R3"), 3)
    assert "already names a lease on radiance_sim_lane_a" in error["message"]


def test_a_reused_request_id_whose_lease_ended_is_exit_7_unless_asked(shared_broker):
    lease = ok(reserve(shared_broker, "radiance_sim_lane_a", "--holder", "ci", "--request-id", "R4"))
    shared_broker.client.release(lease["lease_id"])
    error = refused(reserve(shared_broker, "radiance_sim_lane_a", "--holder", "ci", "--request-id", "R4"), 7)
    assert error["type"] == "LeaseNotHeld" and error["state"] == "released" and "ended (released)" in error["message"]
    shown = ok(reserve(shared_broker, "radiance_sim_lane_a", "--holder", "ci", "--request-id", "R4", "--show-ended"))
    assert shown["lease_id"] == lease["lease_id"] and shown["state"] == "released"

    held = ok(reserve(shared_broker, "firesim_u250", "--holder", "ci", "--request-id", "R5"))
    shared_broker.client.revoke("firesim_u250", "board swap", by="bob")
    error = refused(reserve(shared_broker, "firesim_u250", "--holder", "ci", "--request-id", "R5"), 7)
    assert error["state"] == "revoked" and "board swap" in error["message"]
    assert shared_broker.client.get_lease(held["lease_id"]).state is LeaseState.REVOKED


def test_a_busy_resource_under_json_is_an_error_object_a_script_can_read(shared_broker):
    alice = shared_broker.client.reserve("firesim_u250", "alice", ttl_s=600)
    error = refused(reserve(shared_broker, "firesim_u250", "--holder", "ci"), 5)
    assert error["type"] == "ResourceBusy" and error["holder"] == "alice" and error["queue_length"] == 0
    assert error["expires_at"] > time.time() + 500
    assert "--wait" in error["message"] and "wait=True" not in error["message"]
    shared_broker.client.release(alice.lease_id)


def test_broker_up_survives_a_kill_of_the_coordinator(broker_env, tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(TEST_CATALOG))
    for _ in range(2):
        os.kill(broker_env.actor_pid("broker"), signal.SIGKILL)
        up = broker_env.cli("broker", "up", "--catalog", str(catalog), "--metrics-port", "0", "--json")
        assert ok(up)["resources"] == sorted(TEST_CATALOG["resources"])
    assert broker_env.client.status().healthy


# ---------------------------------------------------------------------- a notebook


def test_a_notebook_sees_a_one_line_busy_error_through_plain_ray(shared_broker):
    broker = ray.get_actor("broker", namespace=shared_broker.namespace)
    alice = ray.get(broker.reserve.remote("firesim_u250", holder="alice", ttl_s=600))
    with pytest.raises(ResourceBusy) as busy:
        ray.get(broker.reserve.remote("firesim_u250", holder="bob"))
    text = str(busy.value)
    assert "\n" not in text and "Traceback" not in text
    assert "held by alice" in text and "nobody waiting" in text and "wait=True" in text and "--wait" not in text
    assert busy.value.holder == "alice" and busy.value.queue_length == 0
    ray.get(broker.release.remote(alice.lease_id))


# ---------------------------------------------------------------------- a coding agent


def test_an_agent_matches_its_lease_in_listings_and_asks_who_has_a_key(shared_broker):
    lease = ok(reserve(shared_broker, "radiance_sim_lane_a", "--holder", "agent-7"))
    listing = ok(shared_broker.cli("ray", "resources", "list", "--json"))
    row = next(r for r in listing if r["key"] == "radiance_sim_lane_a")
    assert row["lease_ref"] == lease["ref"] and lease["lease_id"] not in json.dumps(listing)
    by_key = ok(shared_broker.cli("ray", "resources", "show", "radiance_sim_lane_a", "--json"))
    assert by_key["holder"] == "agent-7" and by_key["lease_ref"] == lease["ref"]
    text = shared_broker.cli("ray", "resources", "show", "radiance_sim_lane_a")
    assert text.returncode == 0 and "held by agent-7" in text.stdout and lease["ref"] in text.stdout
    assert shared_broker.cli("ray", "resources", "show", lease["lease_id"]).returncode == 0
    refused(shared_broker.cli("ray", "resources", "show", "no_such_board", "--json"), 4)
    shared_broker.client.release(lease["lease_id"])


def test_list_filters_by_state_labels_holder_and_mine(shared_broker):
    alice = shared_broker.client.reserve("firesim_u250", "alice")
    mine = ok(reserve(shared_broker, "radiance_sim_lane_a"))  # the default holder: user@host, as --mine means

    def keys(*args: str) -> list[str]:
        return [row["key"] for row in ok(shared_broker.cli("ray", "resources", "list", *args, "--json"))]

    assert keys("--state", "leased") == ["firesim_u250", "radiance_sim_lane_a"]
    assert keys("--state", "free") == ["spacemit_x60_board_01"]
    assert keys("--labels", "kind=board") == ["spacemit_x60_board_01"]
    assert keys("--labels", "kind=fpga", "--state", "free") == []
    assert keys("--holder", "alice") == ["firesim_u250"]
    assert keys("--mine") == ["radiance_sim_lane_a"]
    assert default_holder() == shared_broker.client.resources()[2].holder
    refused(shared_broker.cli("ray", "resources", "list", "--labels", "kind", "--json"), 3)
    shared_broker.client.release(alice.lease_id)
    shared_broker.client.release(mine["lease_id"])


# ---------------------------------------------------------------------- waiting, and an admin


def test_the_queue_shows_places_and_waiters_withdraw_theirs_and_an_admin_anyones(admin_env):
    env = admin_env
    alice = env.client.reserve("spacemit_x60_board_01", "alice", ttl_s=600)
    bob = background(env, "ray", "resources", "reserve", "spacemit_x60_board_01", "--holder", "bob", "--wait",
                     "--request-id", "WB", "--priority", "5", "--note", "nightly")  # fmt: skip
    wait_for(lambda: len(env.client.resources()[1].queue) == 1, "bob in the queue")
    carol = background(env, "ray", "resources", "reserve", "spacemit_x60_board_01", "--holder", "carol", "--wait",
                       "--request-id", "WC")  # fmt: skip
    wait_for(lambda: len(env.client.resources()[1].queue) == 2, "carol in the queue")

    queue = ok(env.cli("ray", "resources", "queue", "spacemit_x60_board_01", "--json"))
    assert [(e["position"], e["holder"], e["priority"], e["note"]) for e in queue] == [
        (1, "bob", 5, "nightly"),
        (2, "carol", 0, ""),
    ]
    text = env.cli("ray", "resources", "queue", "spacemit_x60_board_01")
    assert "held by alice" in text.stdout and "2 waiting" in text.stdout and queue[1]["ref"] in text.stdout

    mine = env.cli("ray", "resources", "withdraw", "spacemit_x60_board_01", "--request-id", "WB", "--holder", "bob")
    assert mine.returncode == 0, mine.stderr
    assert bob.wait(timeout=60) == 7

    carols = queue[1]["ref"]
    no_secret = env.cli("ray", "resources", "withdraw", "spacemit_x60_board_01", "--ref", carols, "--by", "mallory",
                        "--json")  # fmt: skip
    assert refused(no_secret, 11)["type"] == "NotAuthorized"
    assert [q.holder for q in env.client.resources()[1].queue] == ["carol"]
    admin = env.cli("ray", "resources", "withdraw", "spacemit_x60_board_01", "--ref", carols, "--by", "bob-admin",
                    "--reason", "on holiday", "--admin-secret-file", str(secret_file(env)), "--json")  # fmt: skip
    assert ok(admin)["state"] == "cancelled" and "lease_id" not in admin.stdout
    assert carol.wait(timeout=60) == 7
    assert env.client.resources()[1].queue == ()

    events = journal(env)
    assert any(e["event"] == "admin.refused" and e["resource"] == "spacemit_x60_board_01" for e in events)
    cancelled = [e for e in events if e["event"] == "lease.cancelled" and e["holder"] == "carol"]
    assert cancelled and cancelled[0]["by"] == "bob-admin" and "on holiday" in cancelled[0]["reason"]
    assert any(e["event"] == "admin.withdrew" and e["lease"] == carols and e["by"] == "bob-admin" for e in events)
    gone = env.cli("ray", "resources", "withdraw", "spacemit_x60_board_01", "--request-id", "nope", "--json")
    assert refused(gone, 6)["type"] == "LeaseNotFound"
    env.client.release(alice.lease_id)


def test_maintenance_confirms_in_a_line_and_journals_who_turned_it_off(admin_env):
    env = admin_env
    secret = ["--admin-secret-file", str(secret_file(env))]
    alice = env.client.reserve("spacemit_x60_board_01", "alice", ttl_s=600)
    on = env.cli("ray", "resources", "maintenance", "spacemit_x60_board_01", "on", "--reason", "flaky UART",
                 "--by", "bob", *secret)  # fmt: skip
    assert on.returncode == 0, on.stderr
    assert on.stdout.count("\n") == 1 and "RESOURCE" not in on.stdout
    assert "in maintenance (flaky UART)" in on.stdout and "alice keeps its lease" in on.stdout
    off = env.cli("ray", "resources", "maintenance", "spacemit_x60_board_01", "off", "--by", "bob", *secret)
    assert off.returncode == 0 and "out of maintenance" in off.stdout and off.stdout.count("\n") == 1
    changes = [e for e in journal(env) if e["event"] == "resource.maintenance"]
    assert [(e["on"], e.get("by")) for e in changes] == [(True, "bob"), (False, "bob")]
    env.client.release(alice.lease_id)


def test_a_revoke_for_the_wrong_holder_names_the_holder_it_found(admin_env):
    env = admin_env
    alice = env.client.reserve("firesim_u250", "alice")
    out = env.cli("ray", "resources", "revoke", "firesim_u250", "--reason", "cleanup", "--expected-holder", "bob",
                  "--admin-secret-file", str(secret_file(env)), "--json")  # fmt: skip
    error = refused(out, 7)
    assert "held by 'alice', not 'bob'" in error["message"] and "is not held" not in error["message"]
    assert error["holder"] == "alice"
    assert env.client.resources()[0].holder == "alice"
    env.client.release(alice.lease_id)


def test_a_ttl_past_the_max_hold_is_cut_and_says_so(admin_env):
    env = admin_env
    lease = ok(reserve(env, "firesim_u250", "--holder", "alice", "--ttl", "13h"))
    assert lease["ttl_capped_by_max_hold"] is True
    assert lease["expires_at"] - lease["granted_at"] == pytest.approx(12 * 3600.0)
    env.client.release(lease["lease_id"])
    text = env.cli("ray", "resources", "reserve", "firesim_u250", "--holder", "alice", "--ttl", "13h")
    assert text.returncode == 0 and "max hold" in text.stdout
    plain = ok(reserve(env, "spacemit_x60_board_01", "--holder", "alice", "--ttl", "13h"))
    assert plain["ttl_capped_by_max_hold"] is False
    too_long = refused(reserve(env, "radiance_sim_lane_a", "--ttl", "30d"), 3)
    assert "must be at most 7d" in too_long["message"]
    env.client.release(next(line.split()[2] for line in text.stdout.splitlines() if line.startswith("lease id:")))
    env.client.release(plain["lease_id"])


# ---------------------------------------------------------------------- a shell script holding a lease


def test_keep_alive_renews_until_sigterm_and_leaves_the_lease_held(shared_broker):
    client = shared_broker.client
    # The TTL is far longer than a CLI's start on a loaded machine: the test waits for renewals, not a clock.
    lease = client.reserve("radiance_sim_lane_a", "script", ttl_s=60.0)
    keeper = background(shared_broker, "ray", "resources", "keep-alive", lease.lease_id, "--every", "0.5s")

    def renewed_again_and_again() -> bool:
        now = client.get_lease(lease.lease_id)
        assert now.state is LeaseState.GRANTED, now
        return now.renewals >= 3 and now.expires_at > lease.expires_at

    wait_for(renewed_again_and_again, "three renewals that pushed the expiry")
    keeper.send_signal(signal.SIGTERM)
    _, err = keeper.communicate(timeout=60)
    assert keeper.returncode == 143 and err.count("\n") == 1 and "SIGTERM" in err and "stays held" in err
    assert client.get_lease(lease.lease_id).state is LeaseState.GRANTED

    keeper = background(shared_broker, "ray", "resources", "keep-alive", lease.lease_id, "--every", "0.5s",
                        "--release-on-exit")  # fmt: skip
    renewed = client.get_lease(lease.lease_id).renewals
    wait_for(lambda: client.get_lease(lease.lease_id).renewals > renewed + 1, "the second keeper's renewals")
    keeper.send_signal(signal.SIGINT)
    _, err = keeper.communicate(timeout=60)
    assert keeper.returncode == 130 and "SIGINT" in err and "released" in err
    assert client.get_lease(lease.lease_id).state is LeaseState.RELEASED

    ended = shared_broker.cli("ray", "resources", "keep-alive", lease.lease_id, "--every", "1s")
    assert ended.returncode == 7 and ended.stderr.count("\n") == 1


# ---------------------------------------------------------------------- accounting


def test_usage_totals_per_holder_and_per_resource_from_the_journal(broker_env):
    client = broker_env.client
    for holder, key in (("alice", "firesim_u250"), ("bob", "radiance_sim_lane_a"), ("bob", "radiance_sim_lane_a")):
        client.release(client.reserve(key, holder).lease_id)
    client.reserve("spacemit_x60_board_01", "carol")  # still held: counts up to now

    by_holder = ok(broker_env.cli("ray", "resources", "usage", "--since", "1h", "--json"))
    rows = {row["holder"]: row for row in by_holder["rows"]}
    assert {name: row["leases"] for name, row in rows.items()} == {"alice": 1, "bob": 2, "carol": 1}
    assert rows["carol"]["held_s"] > 0 and all(row["mean_wait_s"] >= 0 for row in rows.values())
    by_key = ok(broker_env.cli("ray", "resources", "usage", "--by", "resource", "--json"))
    assert {row["resource"]: row["leases"] for row in by_key["rows"]} == {
        "firesim_u250": 1,
        "radiance_sim_lane_a": 2,
        "spacemit_x60_board_01": 1,
    }
    text = broker_env.cli("ray", "resources", "usage")
    assert text.returncode == 0 and "TOTAL" in text.stdout and "HOURS HELD" in text.stdout


# ---------------------------------------------------------------------- completion


def test_completion_words_come_from_the_state_dir(shared_broker):
    lease = shared_broker.client.reserve("firesim_u250", "me@laptop")
    keys = shared_broker.cli("completion", "keys")
    assert keys.returncode == 0 and keys.stdout.split() == list(TEST_CATALOG["resources"])
    wait_for(lambda: shared_broker.state.lease_path(lease.lease_id).exists(), "the lease record")
    mine = shared_broker.cli("completion", "leases", "--holder", "me@laptop")
    assert mine.stdout.split() == [lease.lease_id]
    assert shared_broker.cli("completion", "leases", "--holder", "someone-else").stdout.split() == []
    shared_broker.client.release(lease.lease_id)
