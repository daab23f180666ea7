"""The CLI's API token: MERLIN_TOKEN, else a private file named by MERLIN_TOKEN_FILE (refused if others can read
it), else the state dir's operator token; with none of them, a state dir that names an API is exit 11, not Ray."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli.common import Context
from broker.errors import EXIT_CODES, NotAuthenticated

ROOT = Path(__file__).resolve().parents[2]


def context(tmp_path: Path) -> Context:
    return Context(argparse.Namespace(state_dir=str(tmp_path / "state"), namespace=None, address=None))


def test_the_token_comes_from_the_environment_first_then_a_private_file(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    token_file.chmod(0o600)
    monkeypatch.delenv("MERLIN_TOKEN", raising=False)
    monkeypatch.delenv("MERLIN_TOKEN_FILE", raising=False)
    assert context(tmp_path).given_token() is None
    monkeypatch.setenv("MERLIN_TOKEN_FILE", str(token_file))
    assert context(tmp_path).given_token() == "from-the-file"
    monkeypatch.setenv("MERLIN_TOKEN", "from-the-env")
    assert context(tmp_path).given_token() == "from-the-env"


@pytest.mark.parametrize(("mode", "text", "says"), [(0o644, "t", "readable by others"), (0o600, "  \n", "is empty")])
def test_a_token_file_others_can_read_or_an_empty_one_is_refused(tmp_path, monkeypatch, mode, text, says):
    token_file = tmp_path / "token"
    token_file.write_text(text)
    token_file.chmod(mode)
    monkeypatch.delenv("MERLIN_TOKEN", raising=False)
    monkeypatch.setenv("MERLIN_TOKEN_FILE", str(token_file))
    with pytest.raises(NotAuthenticated, match=says) as refused:
        context(tmp_path).given_token()
    assert refused.value.exit_code == 11 and "MERLIN_TOKEN_FILE" in refused.value.why
    with pytest.raises(NotAuthenticated, match="cannot read"):
        monkeypatch.setenv("MERLIN_TOKEN_FILE", str(tmp_path / "missing"))
        context(tmp_path).given_token()


def _merlin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def _state_naming_an_api(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "broker.json").write_text('{"namespace": "merlin", "http_url": "http://127.0.0.1:9", "api_url": "x"}')
    return state


def test_the_cli_says_one_line_and_exits_11_for_an_open_token_file(tmp_path):
    state = _state_naming_an_api(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("t")
    token_file.chmod(0o640)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env.update(MERLIN_STATE_DIR=str(state), MERLIN_TOKEN_FILE=str(token_file))
    out = _merlin(env, "ray", "resources", "release", "lease:" + "0" * 32)
    assert out.returncode == EXIT_CODES["NotAuthorized"] == 11, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "readable by others" in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ("ray", "resources", "list"),
        ("ray", "resources", "release", "fpga." + "0" * 32),
        ("broker", "status", "--json"),
        ("ray", "jobs", "cancel", "r" + "0" * 11),
    ],
)
def test_a_state_dir_naming_an_api_without_any_token_is_exit_11_not_a_silent_switch_to_ray(tmp_path, argv):
    state = _state_naming_an_api(tmp_path)  # no operator.token readable, no MERLIN_TOKEN(_FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env.update(MERLIN_STATE_DIR=str(state))
    probe = "import runpy, sys; sys.argv = ['merlin', *sys.argv[1:]]\nfrom broker.cli import main\n" + (
        "code = main(); print('RAY' if 'ray' in sys.modules else 'NO_RAY', file=sys.stderr); sys.exit(code)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 11, out.stderr
    said, ray = out.stderr.strip().splitlines()
    assert "no API token" in said and "MERLIN_TOKEN" in said and str(state / "operator.token") in said
    assert ray == "NO_RAY"
    if "--json" in argv:
        assert json.loads(out.stdout)["error"]["type"] == "NotAuthenticated"
