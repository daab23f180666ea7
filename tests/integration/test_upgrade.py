"""An upgrade is `merlin broker down && merlin broker up` with the new code: nothing held or queued is lost.

Ray re-imports a detached actor's class by its module path when it restarts it, so actors made
by an older version keep running the old code until `broker down`; the state on disk is what
carries over. This test brings a broker down with a lease granted and a request queued, brings a
new one up on the same state dir, and checks both are there and work.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from broker.models import LeaseState
from tests.integration.conftest import ROOT, TEST_CATALOG
from tests.waiting import until

pytestmark = pytest.mark.ray

QUEUE = """
import ray, broker
client = broker.connect()
ray.get_actor("broker").reserve.remote("firesim_u250", "bob", wait=True, request_id="bob-1", ttl_s=600)
import time
deadline = time.time() + 60
while time.time() < deadline and not client.resources()[0].queue:
    time.sleep(0.05)
print("queued", flush=True)
"""


def test_broker_down_and_up_keeps_leases_queue_and_tokens(broker_env, tmp_path):
    client = broker_env.client
    alice = client.reserve("firesim_u250", "alice", ttl_s=600)
    queued = subprocess.run(
        [sys.executable, "-c", QUEUE], env=broker_env.env(), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert "queued" in queued.stdout, queued.stderr
    down = broker_env.cli("broker", "down")
    assert down.returncode == 0, down.stderr
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(TEST_CATALOG))
    up = broker_env.cli("broker", "up", "--catalog", str(catalog), "--metrics-port", "0")
    assert up.returncode == 0, up.stderr

    status = until(lambda: client.resources()[0], "the new broker to answer")
    assert (status.holder, status.fencing_token) == ("alice", alice.fencing_token)
    assert [entry.holder for entry in status.queue] == ["bob"]
    assert client.renew(alice.lease_id, 600).state is LeaseState.GRANTED  # the old capability works
    client.release(alice.lease_id)
    listing = json.loads(broker_env.cli("ray", "resources", "list", "--json").stdout)
    granted = {item["key"]: item for item in listing}["firesim_u250"]
    assert granted["holder"] == "bob" and granted["fencing_token"] == alice.fencing_token + 1
