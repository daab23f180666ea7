"""`merlin` errors that need no cluster: usage, bad values, no cluster recorded, bad catalog."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def merlin(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env["MERLIN_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_no_cluster_names_the_command_to_run(tmp_path):
    out = merlin(tmp_path, "ray", "resources", "list")
    assert out.returncode == 10
    assert "merlin ray cluster start-local" in out.stderr and out.stderr.count("\n") == 1


def test_usage_errors_are_one_line_exit_2(tmp_path):
    out = merlin(tmp_path, "ray", "resources", "reserve")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--help" in out.stderr


def test_bad_duration_is_invalid_request_before_any_connection(tmp_path):
    out = merlin(tmp_path, "ray", "resources", "reserve", "firesim_u250", "--ttl", "soon")
    assert out.returncode == 3 and "soon" in out.stderr


def test_bad_catalog_fails_before_touching_a_cluster(tmp_path):
    catalog = tmp_path / "bad.yaml"
    catalog.write_text("resources:\n  firesim_u250:\n    colour: red\n")
    out = merlin(tmp_path, "broker", "up", "--catalog", str(catalog))
    assert out.returncode == 3
    assert "colour" in out.stderr and "bad.yaml" in out.stderr
    assert not (tmp_path / "state").exists()


def test_help_lists_exit_codes(tmp_path):
    out = merlin(tmp_path, "--help")
    assert out.returncode == 0 and "10 BrokerUnavailable" in out.stdout
