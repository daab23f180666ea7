"""`merlin` errors that need no cluster: usage, bad values, no cluster recorded, bad catalog."""

from __future__ import annotations

import json
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


SPEC = ROOT / "configs" / "targets" / "radiance_sim.yaml"


def test_targetgen_local_engine_end_to_end_through_the_cli(tmp_path):
    target = tmp_path / "sim"
    assert merlin(tmp_path, "targetgen", "bundle", "--spec", str(SPEC), "--dir", str(target)).returncode == 0
    written = json.loads((target / "bundle.json").read_text())
    assert written["resource"] is None and written["resource_labels"] == "kind=sim,simulator=verilator"  # a pool
    refused = merlin(tmp_path, "targetgen", "execute", "--engine", "local", "--from-dir", str(target))
    assert refused.returncode == 10, refused.stderr  # hardware steps never run without their lease
    assert "--no-broker" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (target / "run_state.json").exists()
    run = merlin(tmp_path, "targetgen", "execute", "--engine", "local", "--no-broker", "--from-dir", str(target))
    assert run.returncode == 0, run.stderr
    assert "bundle radiance-sim: succeeded" in run.stdout
    assert "radiance_sim_lane_a" in run.stderr  # --no-broker binds the pool's first member, and says so
    status = json.loads(merlin(tmp_path, "targetgen", "status", str(target), "--json").stdout)
    assert {step["status"] for step in status["steps"]} == {"succeeded"}


def test_ray_engine_without_a_cluster_writes_a_blocked_record(tmp_path):
    target = tmp_path / "sim"
    merlin(tmp_path, "targetgen", "bundle", "--spec", str(SPEC), "--dir", str(target))
    out = merlin(tmp_path, "ray", "jobs", "submit", str(target), "--json")
    assert out.returncode == 10 and "merlin ray cluster start-local" in out.stderr
    record = json.loads(out.stdout)
    assert record["status"] == "blocked" and "start-local" in record["message"]
    (run_dir,) = (tmp_path / "state" / "runs").iterdir()
    on_disk = json.loads((run_dir / "run_record.json").read_text())
    assert on_disk["status"] == "blocked" and on_disk["command"].endswith("--resume")
    assert (run_dir / "run_request.json").exists()
    listed = merlin(tmp_path, "ray", "jobs", "status", record["run_id"], "--json")
    assert json.loads(listed.stdout)["status"] == "blocked"


def test_targetgen_bad_input_names_the_problem_and_writes_nothing(tmp_path):
    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(SPEC.read_text() + "colour: red\n")
    out = merlin(tmp_path, "targetgen", "plan", "--spec", str(bad_spec), "--dir", str(tmp_path / "t"))
    assert out.returncode == 3 and "colour" in out.stderr and not (tmp_path / "t").exists()
    out = merlin(tmp_path, "targetgen", "execute", "--from-dir", str(tmp_path / "missing"))
    assert out.returncode == 3 and "does not exist" in out.stderr
    out = merlin(tmp_path, "ray", "jobs", "submit", str(tmp_path / "missing"))
    assert out.returncode == 3 and not (tmp_path / "state" / "runs").exists()
    out = merlin(tmp_path, "ray", "jobs", "status", "run-20990101-000000-deadbeef")
    assert out.returncode == 3 and "unknown run id" in out.stderr
    out = merlin(tmp_path, "ray", "jobs", "status", "../../etc/passwd")
    assert out.returncode == 3 and "not a run id" in out.stderr


def test_artifacts_fetch_never_leaves_its_dirs(tmp_path):
    target = tmp_path / "sim"
    merlin(tmp_path, "targetgen", "bundle", "--spec", str(SPEC), "--dir", str(target))
    run_id = json.loads(merlin(tmp_path, "ray", "jobs", "submit", str(target), "--json").stdout)["run_id"]
    artifacts = target / "artifacts"
    artifacts.mkdir()
    (artifacts / "ok.txt").write_text("fine")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy")
    (artifacts / "escape.txt").symlink_to(secret)
    dest = tmp_path / "out"
    for bad in ("../secret.txt", "/etc/passwd", "escape.txt"):
        out = merlin(tmp_path, "ray", "artifacts", "fetch", run_id, bad, "--to", str(dest))
        assert out.returncode == 3, (bad, out.stderr)
    assert not dest.exists()
    listing = json.loads(merlin(tmp_path, "ray", "artifacts", "list", run_id, "--json").stdout)
    assert [a["path"] for a in listing["artifacts"]] == ["ok.txt"]  # the symlink is not an artifact
    out = merlin(tmp_path, "ray", "artifacts", "fetch", run_id, "--to", str(dest))
    assert out.returncode == 0 and (dest / "ok.txt").read_text() == "fine" and not (dest / "escape.txt").exists()
