"""Health probes on the real loopback cluster: the stand-in probe runs as a Ray job, a broken unit is
quarantined after two failures in a row, repaired it comes back — through the CLI."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import make_broker

pytestmark = pytest.mark.ray

LAB = {
    "version": 1,
    "resources": {
        "spacemit_x60_board_01": {
            "health_check": {
                "run": ["{python}", "-m", "targetgen.standins.probe", "spacemit_x60_board_01"],
                "every": "1h",
                "timeout": "2m",
                "quarantine_after": 2,
            }
        },
        "radiance_sim_lane_a": {},
    },
}


@pytest.fixture
def lab(ray_cluster, tmp_path):
    from broker.actors.deploy import broker_down

    env = make_broker(ray_cluster, tmp_path / "state", LAB)
    yield env
    broker_down(env.namespace)


def _health(lab) -> dict:
    out = lab.cli("ray", "resources", "health", "spacemit_x60_board_01", "--now", "--json", timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _state(lab) -> str:
    out = lab.cli("ray", "resources", "show", "spacemit_x60_board_01", "--json")
    return json.loads(out.stdout)["state"]


def test_a_broken_unit_is_quarantined_and_comes_back_when_repaired(lab):
    healthy = _health(lab)
    assert healthy["ok"] is True and healthy["results"][-1]["duration_s"] > 0
    print(f"\nstand-in probe as a Ray job: {healthy['results'][-1]['duration_s']:.2f} s")
    broken = lab.state.root / "probe-fail" / "spacemit_x60_board_01"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text("no console\n")
    once = _health(lab)
    assert once["ok"] is False and once["failures_in_a_row"] == 1 and _state(lab) == "free"
    twice = _health(lab)
    assert twice["quarantined"] and _state(lab) == "maintenance"
    refused = lab.cli("ray", "resources", "reserve", "spacemit_x60_board_01")
    assert refused.returncode == 5 and "health check failed" in refused.stderr
    broken.unlink()  # the repair
    back = _health(lab)
    assert back["ok"] is True and not back["quarantined"] and _state(lab) == "free"
    shown = lab.cli("ray", "resources", "health", "spacemit_x60_board_01")
    assert shown.returncode == 0 and "healthy" in shown.stdout and "FAILED" in shown.stdout
    journal = lab.state.events_path.read_text()
    assert '"health.quarantined"' in journal and '"health.restored"' in journal
