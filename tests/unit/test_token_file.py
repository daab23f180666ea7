"""The CLI's API token: MERLIN_TOKEN, else a private file named by MERLIN_TOKEN_FILE (refused if others can read it)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from broker.cli.common import Context
from broker.errors import EXIT_CODES, InvalidRequest

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
    with pytest.raises(InvalidRequest, match=says) as refused:
        context(tmp_path).given_token()
    assert refused.value.field == "MERLIN_TOKEN_FILE"
    with pytest.raises(InvalidRequest, match="cannot read"):
        monkeypatch.setenv("MERLIN_TOKEN_FILE", str(tmp_path / "missing"))
        context(tmp_path).given_token()


def test_the_cli_says_one_line_and_exits_with_invalid_requests_code_for_an_open_token_file(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "broker.json").write_text('{"namespace": "merlin", "http_url": "http://127.0.0.1:9", "api_url": "x"}')
    token_file = tmp_path / "token"
    token_file.write_text("t")
    token_file.chmod(0o640)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env.update(MERLIN_STATE_DIR=str(state), MERLIN_TOKEN_FILE=str(token_file))
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "ray", "resources", "release", "lease:" + "0" * 32],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == EXIT_CODES["InvalidRequest"], out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "readable by others" in lines[0]
