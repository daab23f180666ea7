"""Metrics over real HTTP, the journal and the CLI that reads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tool

pytestmark = pytest.mark.ray

KEY = "firesim_u250"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(url: str, name: str, **labels: str) -> float | None:
    return scrape(url).get((name, tuple(sorted(labels.items()))))


def eventually(url: str, name: str, expected: float, timeout: float = 20.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = value(url, name, **labels)
        if seen == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} = {seen}, expected {expected}")


def test_scrape_follows_reserve_release_expiry_and_maintenance(broker_env):
    url = broker_env.metrics_url()
    client = broker_env.client
    eventually(url, "merlin_broker_resource_up", 1.0, resource=KEY)
    eventually(url, "merlin_broker_resource_state", 1.0, resource=KEY, state="free")

    alice = client.reserve(KEY, "alice", ttl_s=60)
    eventually(url, "merlin_broker_resource_leased", 1.0, resource=KEY)
    eventually(url, "merlin_broker_lease_grants_total", 1.0, resource=KEY)
    client.release(alice.lease_id)
    eventually(url, "merlin_broker_resource_leased", 0.0, resource=KEY)
    assert value(url, "merlin_broker_leased_seconds_total", resource=KEY) > 0.0
    assert value(url, "merlin_broker_lease_hold_seconds_count", resource=KEY) == 1.0

    client.reserve(KEY, "carol", ttl_s=1.0)
    eventually(url, "merlin_broker_lease_expirations_total", 1.0, resource=KEY)
    assert value(url, "merlin_broker_lease_grants_total", resource=KEY) == 2.0

    client.set_maintenance(KEY, True, "fan swap")
    eventually(url, "merlin_broker_resource_state", 1.0, resource=KEY, state="maintenance")
    assert value(url, "merlin_broker_maintenance_since_timestamp_seconds", resource=KEY) > 0


def test_queue_depth_and_oldest_wait(broker_env):
    url = broker_env.metrics_url()
    client = broker_env.client
    holder = client.reserve(KEY, "alice")
    broker = ray.get_actor("broker", namespace=broker_env.namespace)
    waiting = broker.reserve.remote(KEY, "bob", wait=True, timeout_s=60)
    eventually(url, "merlin_broker_queue_depth", 1.0, resource=KEY)
    assert value(url, "merlin_broker_queue_oldest_wait_seconds", resource=KEY) >= 0.0
    client.release(holder.lease_id)
    ray.get(waiting)
    eventually(url, "merlin_broker_queue_depth", 0.0, resource=KEY)
    assert value(url, "merlin_broker_lease_wait_seconds_count", resource=KEY) == 2.0


def test_resource_actors_push_their_snapshots(shared_broker):
    client = shared_broker.client
    broker = ray.get_actor("broker", namespace=shared_broker.namespace)
    before = ray.get(broker.__ray_call__.remote(lambda actor: actor._pushes_received))
    client.release(client.reserve(KEY, "alice").lease_id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ray.get(broker.__ray_call__.remote(lambda actor: actor._pushes_received)) > before:
            return
        time.sleep(0.05)
    raise AssertionError("no snapshot was pushed after a reserve and a release")


def test_counters_survive_a_resource_actor_kill(broker_env):
    url = broker_env.metrics_url()
    client = broker_env.client
    for _ in range(3):
        client.release(client.reserve(KEY, "alice").lease_id)
    eventually(url, "merlin_broker_lease_grants_total", 3.0, resource=KEY)
    os.kill(broker_env.actor_pid(f"resource:{KEY}"), signal.SIGKILL)
    client.release(client.reserve(KEY, "alice").lease_id)  # the shim waits for the restart
    eventually(url, "merlin_broker_lease_grants_total", 4.0, resource=KEY)


def test_a_resource_actor_that_stops_answering_is_down(broker_env):
    url = broker_env.metrics_url()
    pid = broker_env.actor_pid("resource:spacemit_x60_board_01")
    eventually(url, "merlin_broker_resource_up", 1.0, resource="spacemit_x60_board_01")
    os.kill(pid, signal.SIGSTOP)
    try:
        eventually(url, "merlin_broker_resource_up", 0.0, resource="spacemit_x60_board_01", timeout=30)
        status = broker_env.client.status()
        assert status.down == ("spacemit_x60_board_01",) and not status.healthy
    finally:
        os.kill(pid, signal.SIGCONT)
    eventually(url, "merlin_broker_resource_up", 1.0, resource="spacemit_x60_board_01", timeout=30)


def test_exposition_passes_promtool(shared_broker):
    promtool = require_tool("promtool")
    client = shared_broker.client
    client.release(client.reserve(KEY, "alice").lease_id)
    with urllib.request.urlopen(shared_broker.metrics_url(), timeout=10) as response:
        text = response.read()
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_journal_records_every_change_in_order(shared_broker):
    client = shared_broker.client
    lease = client.reserve(KEY, "journal-reader", note="bitstream test")  # a holder no other test has
    client.renew(lease.lease_id)
    client.release(lease.lease_id)
    events = [json.loads(line) for line in shared_broker.state.events_path.read_text().splitlines()]
    seqs = [event["seq"] for event in events]
    assert seqs == list(range(1, len(seqs) + 1))
    mine = [e["event"] for e in events if e.get("resource") == KEY and e.get("holder") == "journal-reader"]
    assert mine == ["lease.granted", "lease.renewed", "lease.released"]
    assert lease.lease_id not in shared_broker.state.events_path.read_text()


def test_read_api_answers_like_resources_and_never_shows_a_lease_id(shared_broker):
    import urllib.error

    from broker.disk.token_store import read_operator_token
    from tests.waiting import until

    lease = shared_broker.client.reserve(KEY, "alice")
    record = until(
        lambda: (r := json.loads(shared_broker.state.broker_record_path.read_text())).get("api_url") and r,
        "the API listens",
    )
    assert record["namespace"] == shared_broker.namespace and record["api_url"].startswith("http://127.0.0.1:")
    headers = {"Authorization": f"Bearer {read_operator_token(shared_broker.state)}"}
    request = urllib.request.Request(f"{record['api_url']}/resources", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        listed = json.loads(response.read())
    assert [item["key"] for item in listed] == [status.key for status in shared_broker.client.resources()]
    assert listed[0]["holder"] == "alice" and lease.lease_id not in json.dumps(listed)
    with pytest.raises(urllib.error.HTTPError) as refused:  # reads need a token too
        urllib.request.urlopen(f"{record['api_url']}/resources", timeout=10)
    assert refused.value.code == 401
    posted = urllib.request.Request(f"{record['api_url']}/resources", data=b"{}", method="POST", headers=headers)
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(posted, timeout=10)
    assert wrong.value.code == 405
    # The metrics listener serves only /metrics now.
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(shared_broker.metrics_url().replace("/metrics", "/api/v1/resources"), timeout=10)
    assert missing.value.code == 404
    shared_broker.client.release(lease.lease_id)


READ_WITHOUT_RAY = """
import json, sys
from broker.cli import main
code = main(["ray", "resources", "list", "--json"])
print(json.dumps({"code": code, "ray_imported": "ray" in sys.modules}), file=sys.stderr)
"""


def test_cli_reads_resources_without_importing_ray(shared_broker):
    lease = shared_broker.client.reserve(KEY, "alice")
    out = subprocess.run(
        [sys.executable, "-c", READ_WITHOUT_RAY], env=shared_broker.env(), capture_output=True, text=True, timeout=60
    )
    verdict = json.loads(out.stderr.strip().splitlines()[-1])
    assert verdict == {"code": 0, "ray_imported": False}, out.stderr
    assert json.loads(out.stdout)[0]["holder"] == "alice"
    shared_broker.client.release(lease.lease_id)
