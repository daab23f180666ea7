"""The shipped Prometheus config, alert rules and Grafana dashboard are valid."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_tool

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
METRIC = re.compile(r"\bmerlin_broker_[a-z_]+")


def shipped_metric_names() -> set[str]:
    """Every merlin_broker_* name used by the alert rules and the dashboard."""
    names: set[str] = set()
    rules = yaml.safe_load((CONFIGS / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            names |= set(METRIC.findall(rule["expr"]))
    dashboard = json.loads((CONFIGS / "grafana" / "merlin-broker.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            names |= set(METRIC.findall(target["expr"]))
    for variable in dashboard["templating"]["list"]:
        names |= set(METRIC.findall(json.dumps(variable.get("query", ""))))
    return names


def test_promtool_accepts_the_scrape_config_and_rules():
    promtool = require_tool("promtool")
    for args in (["check", "config", str(CONFIGS / "prometheus" / "prometheus.yml")],
                 ["check", "rules", str(CONFIGS / "prometheus" / "alerts.yml")]):  # fmt: skip
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config_targets_the_loopback_default():
    config = yaml.safe_load((CONFIGS / "prometheus" / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["127.0.0.1:9477"]


def test_dashboard_covers_what_lab_owners_watch():
    names = shipped_metric_names()
    for needed in ("merlin_broker_leased_seconds_total", "merlin_broker_queue_depth",
                   "merlin_broker_lease_wait_seconds_bucket", "merlin_broker_lease_expirations_total",
                   "merlin_broker_runs_active", "merlin_broker_runs_total"):  # fmt: skip
        assert needed in names
