"""`merlin bench --quick` runs every scenario end to end (CI shows it works; no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from broker.devtools.bench.runner import SCENARIOS

pytestmark = pytest.mark.ray


@pytest.mark.timeout(600)  # every scenario once at smoke sizes: about 1.5 min on 2 cores
def test_quick_bench_produces_every_figure(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env["MERLIN_STATE_DIR"] = str(tmp_path / "unused")  # the bench makes its own cluster and state dir
    bench = subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "bench", "--quick", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = bench.communicate(timeout=570)
    finally:
        if bench.poll() is None:  # timed out, or this test was stopped: the bench stops its own cluster
            os.killpg(bench.pid, signal.SIGTERM)
            try:
                bench.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == 0, stderr[-2000:]
    results = {result["name"]: result for result in json.loads(stdout)}
    assert len(results) == len(SCENARIOS)
    for result in results.values():
        assert result["figures"], result["name"]
        for name, figure in result["figures"].items():
            value = figure["median"] if isinstance(figure, dict) else figure
            assert not math.isnan(value), f"{result['name']}: {name} is not a number"
    targets = [target for result in results.values() for target in result["targets"]]
    assert len(targets) >= 9 and all(isinstance(target["met"], bool) for target in targets)
    assert "[1] cycle" in stderr  # a progress line per scenario
