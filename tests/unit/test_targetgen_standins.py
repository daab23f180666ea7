"""Stand-in programs: real artifacts, deterministic bytes, failure on demand, honest about inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from targetgen.standins import ACTIONS, EXIT_INJECTED_FAILURE, EXIT_MISSING_INPUT, EXIT_USAGE

EXECUTOR_VARS = (
    "MERLIN_STANDIN_FAIL",
    "MERLIN_TARGET_DIR",
    "MERLIN_STEP_ID",
    "MERLIN_FENCING_TOKEN",
    "MERLIN_LEASE_ID",
)


def standin(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {name: value for name, value in os.environ.items() if name not in EXECUTOR_VARS}
    full_env.update({"MERLIN_STANDIN_SECONDS": "0", **env})
    return subprocess.run(
        [sys.executable, "-m", "targetgen.standins", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("action", [name for name, action in ACTIONS.items() if action.needs_input is None])
def test_build_actions_write_deterministic_artifacts(tmp_path, action):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for target_dir, target in ((first, "t1"), (second, "t1"), (other, "t2")):
        target_dir.mkdir()
        assert standin(target_dir, action, "--target", target).returncode == 0
    output = ACTIONS[action].output
    assert (first / output).read_bytes() == (second / output).read_bytes()
    assert (first / output).read_bytes() != (other / output).read_bytes()


def test_a_fail_file_fails_its_step_until_removed(tmp_path):
    assert standin(tmp_path, "build-bitstream").returncode == 0
    (tmp_path / "FAIL_flash").touch()
    failed = standin(tmp_path, "flash-fpga", "--step", "flash")
    assert failed.returncode == EXIT_INJECTED_FAILURE
    assert "injected failure" in failed.stderr and "[flash]" in failed.stdout
    assert not (tmp_path / "artifacts" / "flash").exists()
    # Another step id is not affected by the file.
    assert standin(tmp_path, "flash-fpga", "--step", "flash-fpga").returncode == 0
    (tmp_path / "FAIL_flash").unlink()
    assert standin(tmp_path, "flash-fpga", "--step", "flash").returncode == 0


def test_the_fail_variable_names_steps(tmp_path):
    failed = standin(tmp_path, "verilate", MERLIN_STANDIN_FAIL="simulate,verilate")
    assert failed.returncode == EXIT_INJECTED_FAILURE
    assert standin(tmp_path, "verilate", MERLIN_STANDIN_FAIL="simulate").returncode == 0


def test_a_missing_input_fails_like_a_real_tool(tmp_path):
    done = standin(tmp_path, "flash-board")
    assert done.returncode == EXIT_MISSING_INPUT
    assert "artifacts/build/image.img is missing" in done.stderr


def test_board_operations_record_the_lease_they_ran_under(tmp_path):
    assert standin(tmp_path, "build-image").returncode == 0
    lease_id = "spacemit_x60_board_01." + "ab" * 16
    args = ("flash-board", "--resource", "spacemit_x60_board_01")
    done = standin(tmp_path, *args, MERLIN_FENCING_TOKEN="17", MERLIN_LEASE_ID=lease_id)
    assert done.returncode == 0
    record = json.loads((tmp_path / "artifacts" / "flash" / "flash.json").read_text())
    assert record["fencing_token"] == 17 and record["resource"] == "spacemit_x60_board_01"
    assert record["lease_ref"] and lease_id not in json.dumps(record), "the lease id is a capability: never recorded"


def test_out_redirects_the_artifact_but_stays_under_artifacts(tmp_path):
    assert standin(tmp_path, "verilate", "--out", "artifacts/alt/model.bin").returncode == 0
    assert (tmp_path / "artifacts" / "alt" / "model.bin").is_file()
    for bad in ("../escape.bin", "/tmp/x.bin", "elsewhere/x.bin"):
        done = standin(tmp_path, "verilate", "--out", bad)
        assert done.returncode == EXIT_USAGE and "under artifacts/" in done.stderr


def test_an_unknown_action_is_a_usage_error(tmp_path):
    assert standin(tmp_path, "reflash-universe").returncode == EXIT_USAGE


def test_the_executors_target_dir_and_step_id_are_honoured(tmp_path):
    target_dir, elsewhere = tmp_path / "target", tmp_path / "work"
    target_dir.mkdir()
    elsewhere.mkdir()
    env = {"MERLIN_TARGET_DIR": str(target_dir), "MERLIN_STEP_ID": "compile"}
    (target_dir / "FAIL_compile").touch()
    assert standin(elsewhere, "verilate", **env).returncode == EXIT_INJECTED_FAILURE
    (target_dir / "FAIL_compile").unlink()
    done = standin(elsewhere, "verilate", **env)
    assert done.returncode == 0 and "[compile]" in done.stdout
    assert (target_dir / ACTIONS["verilate"].output).is_file()
    assert not (elsewhere / "artifacts").exists()


@pytest.mark.parametrize("seconds", ["soon", "-1", "nan"])
def test_a_bad_duration_knob_is_a_usage_error(tmp_path, seconds):
    done = standin(tmp_path, "verilate", MERLIN_STANDIN_SECONDS=seconds)
    assert done.returncode == EXIT_USAGE and "MERLIN_STANDIN_SECONDS" in done.stderr
