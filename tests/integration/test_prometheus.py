"""A real Prometheus server scrapes a test broker with the shipped config; shipped names all exist."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_tool
from tests.unit.test_prometheus_configs import CONFIGS, shipped_metric_names

pytestmark = pytest.mark.ray


def exposition_names(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def test_every_name_in_the_dashboard_and_rules_is_served(shared_broker):
    client = shared_broker.client
    client.release(client.reserve("firesim_u250", "alice").lease_id)
    url = shared_broker.metrics_url()
    deadline = time.monotonic() + 20
    missing = shipped_metric_names()
    while missing and time.monotonic() < deadline:
        missing = shipped_metric_names() - exposition_names(url)
        time.sleep(0.2)
    assert not missing, f"used in configs/ but not served: {sorted(missing)}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_real_prometheus_scrapes_the_broker(shared_broker, tmp_path: Path):
    prometheus = require_tool("prometheus")
    target = urllib.parse.urlparse(shared_broker.metrics_url()).netloc
    config = yaml.safe_load((CONFIGS / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [target]
    config["rule_files"] = [str(CONFIGS / "prometheus" / "alerts.yml")]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = _free_port()
    server = subprocess.Popen(
        [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )  # fmt: skip
    try:
        lease = shared_broker.client.reserve("firesim_u250", "alice")
        query = urllib.parse.urlencode({"query": 'merlin_broker_resource_leased{resource="firesim_u250"}'})
        result: list = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not result:
            with contextlib.suppress(OSError):  # not listening yet
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as response:
                    result = json.loads(response.read())["data"]["result"]
            time.sleep(0.5)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result[0]["value"][1] == "1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as response:
            groups = json.loads(response.read())["data"]["groups"]
        assert {rule["name"] for rule in groups[0]["rules"]} >= {"MerlinResourceDown", "MerlinLeasesExpiring"}
        shared_broker.client.release(lease.lease_id)
    finally:
        server.terminate()
        server.wait(timeout=30)
