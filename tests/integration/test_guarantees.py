"""The promises under faults: holder death, max hold, disk faults, corrupt records, races, security."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray

from broker.errors import BrokerUnavailable, LeaseNotHeld, NotAuthorized, ResourceBusy
from broker.models import LeaseState, ResourceState
from tests.conftest import unavailable
from tests.integration.conftest import TEST_CATALOG, make_broker

pytestmark = pytest.mark.ray
KEY = "firesim_u250"


def journal(env) -> list[dict]:
    return [json.loads(line) for line in env.state.events_path.read_text().splitlines()]


HOLDER = """
import sys, time, broker
client = broker.connect()
with client.lease(sys.argv[1], "doomed-holder", ttl_s=2.0, heartbeat_s=0.3, bind_session=False) as held:
    print("held", held.lease_id, flush=True)
    time.sleep(600)
"""


def test_a_killed_holder_loses_its_lease_at_its_ttl_and_the_next_waiter_gets_it(shared_broker):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, KEY], env=shared_broker.env(), stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    assert line.startswith("held"), line
    lease_id = line.split()[1]
    time.sleep(3.0)  # past the TTL: only the heartbeats keep it
    assert shared_broker.client.get_lease(lease_id).state is LeaseState.GRANTED
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.time()
    nxt = shared_broker.client.reserve(KEY, "next-in-line", wait=True, timeout_s=30)
    assert nxt.state is LeaseState.GRANTED and nxt.granted_at - killed_at < 2.0 + 5.0
    expired = [e for e in journal(shared_broker) if e["event"] == "lease.expired"]
    assert expired and expired[-1]["holder"] == "doomed-holder"
    assert shared_broker.client.get_lease(lease_id).state is LeaseState.EXPIRED
    shared_broker.client.release(nxt.lease_id)


def test_max_hold_warns_then_reclaims(ray_cluster, tmp_path):
    from broker.actors.deploy import broker_down

    catalog = json.loads(json.dumps(TEST_CATALOG))
    catalog["resources"][KEY].update({"max_hold": "3s", "warn_before": "2s"})
    env = make_broker(ray_cluster, tmp_path / "state", catalog)
    try:
        warned, lost = threading.Event(), threading.Event()
        with (
            pytest.raises(LeaseNotHeld),
            env.client.lease(
                KEY,
                "greedy",
                ttl_s=1.0,
                heartbeat_s=0.2,
                on_expiring=lambda _: warned.set(),
                on_lost=lambda _: lost.set(),
            ) as held,
        ):
            assert held.lease.must_end_by - held.lease.granted_at == pytest.approx(3.0)
            assert lost.wait(60), "still held long past must_end_by"  # renewals cannot pass it
        assert warned.is_set()
        names = [e["event"] for e in journal(env) if e.get("holder") == "greedy"]
        assert names.index("lease.expiring") < names.index("lease.expired")
    finally:
        broker_down(env.namespace)


@contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """Make ``directory`` and everything in it refuse writes, for root too (chattr -R +i), else by mode."""
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "-R", "+i", str(directory)], capture_output=True)
        if made.returncode != 0:
            unavailable(f"cannot make {directory} immutable here: {made.stderr.decode().strip()}")
        undo = ["chattr", "-R", "-i", str(directory)]
    else:
        for path in [directory, *directory.rglob("*")]:
            path.chmod(0o500 if path.is_dir() else 0o400)
        undo = None
    try:
        probe = directory / ".probe"
        with contextlib.suppress(OSError):  # the write must fail: that is the fault under test
            probe.write_text("x")
            probe.unlink()
            unavailable("could not make the state dir unwritable on this machine")
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            for path in [directory, *directory.rglob("*")]:
                path.chmod(0o700 if path.is_dir() else 0o600)


def test_an_unwritable_state_dir_fails_writes_cleanly_and_keeps_serving_reads(broker_env):
    client = broker_env.client
    held = client.reserve("spacemit_x60_board_01", "alice")
    with unwritable(broker_env.state.resources_dir):  # the ledger: logs, meta and lease files
        with pytest.raises(BrokerUnavailable, match="cannot write the state dir"):
            client.reserve(KEY, "bob")
        with pytest.raises(BrokerUnavailable, match="nothing was changed"):
            client.release(held.lease_id)
        statuses = {status.key: status for status in client.resources()}  # reads still served
        assert statuses[KEY].state is ResourceState.FREE
        assert statuses["spacemit_x60_board_01"].holder == "alice"
        assert client.get_lease(held.lease_id).state is LeaseState.GRANTED
    assert client.release(held.lease_id).state is LeaseState.RELEASED
    assert client.reserve(KEY, "bob").fencing_token == 1  # the refused grant used no token


def test_corrupt_records_are_moved_aside_without_a_crash_loop(broker_env):
    client = broker_env.client
    first = client.reserve(KEY, "alice")
    client.release(first.lease_id)
    os.kill(broker_env.actor_pid(f"resource:{KEY}"), signal.SIGKILL)  # restart: a checkpoint empties the log
    second = client.reserve(KEY, "bob", wait=True, timeout_s=30)
    broker_env.state.lease_path(first.lease_id).write_text('{"lease_id": "trunc')  # a torn, checkpointed record
    (broker_env.state.leases_dir / f"{KEY}.{'ab' * 16}.json").write_bytes(b"\x00\xffgarbage")
    broker_env.state.lease_path(second.lease_id).write_text("{}")  # still in the log: healed from it
    os.kill(broker_env.actor_pid(f"resource:{KEY}"), signal.SIGKILL)
    assert client.get_lease(second.lease_id).holder == "bob"  # answers again (the shim waits): no crash loop
    status = client.resources()[0]
    assert (status.holder, status.fencing_token) == ("bob", second.fencing_token)
    events = [e for e in journal(broker_env) if e["event"] == "ledger.corrupt_record"]
    assert len(events) == 3 and all(Path(e["moved_to"]).parent == broker_env.state.corrupt_dir for e in events)
    assert json.loads(broker_env.state.lease_path(second.lease_id).read_text())["holder"] == "bob"
    client.release(second.lease_id)
    again = client.reserve(KEY, "dave")
    assert again.fencing_token > second.fencing_token  # a lost record's token is never reused


def test_many_clients_racing_for_a_free_key_exactly_one_wins(shared_broker):
    client = shared_broker.client
    barrier = threading.Barrier(12)
    results: list[object] = []

    def racer(index: int) -> None:
        barrier.wait()
        try:
            results.append(client.reserve(KEY, f"racer-{index}"))
        except ResourceBusy as busy:
            results.append(busy)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [r for r in results if not isinstance(r, ResourceBusy)]
    assert len(results) == 12 and len(winners) == 1
    assert all(r.holder == winners[0].holder for r in results if isinstance(r, ResourceBusy))
    client.release(winners[0].lease_id)


def test_release_racing_expiry_and_renew_racing_revoke_never_give_two_holders(shared_broker):
    client = shared_broker.client
    outcomes = set()
    for attempt in range(8):
        lease = client.reserve(KEY, f"racer-{attempt}", ttl_s=1.0)  # the shortest TTL there is
        time.sleep(0.98 + 0.01 * (attempt % 4))
        try:
            outcomes.add(client.release(lease.lease_id).state)
        except LeaseNotHeld as lost:
            assert lost.state == "expired"
            outcomes.add(LeaseState.EXPIRED)
    assert outcomes <= {LeaseState.RELEASED, LeaseState.EXPIRED}

    holder = client.reserve(KEY, "renewer", ttl_s=5.0)
    stop = threading.Event()
    renew_errors: list[BaseException] = []

    def renew_loop() -> None:
        while not stop.is_set():
            try:
                client.renew(holder.lease_id)
            except LeaseNotHeld as exc:
                renew_errors.append(exc)
                return

    renewer = threading.Thread(target=renew_loop)
    renewer.start()
    time.sleep(0.3)
    revoked = client.revoke(KEY, "race test", by="admin")
    renewer.join(10)
    stop.set()
    assert revoked.state is LeaseState.REVOKED and renew_errors and renew_errors[0].state == "revoked"
    # Every lease the key ever had (earlier tests' too): none granted now, no token given twice.
    records = [json.loads(p.read_text()) for p in shared_broker.state.leases_dir.glob(f"{KEY}.*.json")]
    assert sum(1 for r in records if r["state"] == "granted") == 0
    tokens = sorted(r["fencing_token"] for r in records if r["fencing_token"] is not None)
    assert tokens == sorted(set(tokens))


def test_admin_acts_need_the_secret_and_are_journaled(ray_cluster, tmp_path):
    from broker.actors.deploy import broker_down

    secret = "s3cret-for-tests"
    catalog = json.loads(json.dumps(TEST_CATALOG))
    catalog["broker"]["admin_secret_sha256"] = hashlib.sha256(secret.encode()).hexdigest()
    env = make_broker(ray_cluster, tmp_path / "state", catalog)
    try:
        client = env.client
        client.reserve(KEY, "alice")
        with pytest.raises(NotAuthorized):
            client.revoke(KEY, "no secret", by="mallory", admin_secret="wrong")
        with pytest.raises(NotAuthorized):
            client.set_maintenance(KEY, True, "no secret", by="mallory", admin_secret="")
        assert client.resources()[0].holder == "alice"
        revoked = client.revoke(KEY, "holiday", by="bob", admin_secret=secret)
        assert revoked.ended_by == "bob"
        events = journal(env)
        assert [e["by"] for e in events if e["event"] == "admin.refused"] == ["mallory", "mallory"]
        assert any(e["event"] == "lease.revoked" and e["by"] == "bob" for e in events)
        down = env.cli("broker", "down", "--by", "mallory")
        assert down.returncode == 11 and "admin secret" in down.stderr
        assert ray.get(ray.get_actor("broker", namespace=env.namespace).ping.remote())  # still up
    finally:
        broker_down(env.namespace)


NO_TOKEN = """
import ray, sys
try:
    ray.init(address=sys.argv[1], namespace=sys.argv[2], logging_level="ERROR")
    ray.get(ray.get_actor("broker").status.remote())
    print("REACHED THE BROKER")
except Exception as exc:
    print("refused:", type(exc).__name__, repr(exc.__cause__))
"""


def test_a_process_without_the_token_cannot_reach_the_broker(shared_broker, ray_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", HOME=str(tmp_path))
    # One connection attempt, not Ray's default 20 a second apart: the cluster refuses the token on
    # the first (the refusal names it); retrying it 20 times only cost the test 20 s.
    env["RAY_gcs_server_port_wait_time_s"] = "1"
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    env["RAY_AUTH_TOKEN_PATH"] = str(wrong)
    out = subprocess.run(
        [sys.executable, "-c", NO_TOKEN, ray_cluster.bootstrap.gcs_address, shared_broker.namespace],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "REACHED" not in out.stdout and "refused" in out.stdout, out.stdout + out.stderr[-500:]
    assert "InvalidAuthToken" in out.stdout, out.stdout + out.stderr[-500:]  # refused for its token


def _listening_sockets() -> dict[str, list[str]]:
    """inode -> local address for every TCP socket in LISTEN state."""
    found: dict[str, list[str]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address = fields[1].split(":")[0]
                found.setdefault(fields[9], []).append(address[-8:] if width == 32 else address)
    return found


def test_every_listener_of_the_cluster_and_broker_is_on_loopback(shared_broker, ray_cluster):
    from broker.seam.cluster import _group_pids

    pids = set(_group_pids(ray_cluster.bootstrap.pgid)) | {shared_broker.actor_pid("broker")}
    sockets = _listening_sockets()
    checked = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                for hex_ip in sockets.get(inode, []):
                    checked += 1
                    assert hex_ip == "0100007F", f"pid {pid} listens on {hex_ip} (not 127.0.0.1)"
    assert checked >= 5  # GCS, raylet, dashboard, client server, metrics at least


def test_state_files_are_private(shared_broker):
    client = shared_broker.client
    client.release(client.reserve(KEY, "alice").lease_id)
    for path in shared_broker.state.root.rglob("*"):
        mode = path.stat().st_mode & 0o777
        if path.is_dir():
            assert mode == 0o700, path
        elif path.parent.name in ("leases", "resources", "runs", "logs") or path.name in (
            "events.jsonl",
            "catalog.json",
        ):
            assert mode == 0o600, path
