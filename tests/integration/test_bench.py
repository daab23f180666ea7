"""`merlin bench --quick` runs every scenario end to end (CI shows it works; no timing is asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from broker.devtools.bench.runner import SCENARIOS

pytestmark = pytest.mark.ray


def test_quick_bench_produces_every_figure(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env["MERLIN_STATE_DIR"] = str(tmp_path / "unused")  # the bench makes its own cluster and state dir
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "bench", "--quick", "--json"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    results = {result["name"]: result for result in json.loads(out.stdout)}
    assert len(results) == len(SCENARIOS)
    for result in results.values():
        assert result["figures"], result["name"]
        for name, figure in result["figures"].items():
            value = figure["median"] if isinstance(figure, dict) else figure
            assert not math.isnan(value), f"{result['name']}: {name} is not a number"
    targets = [target for result in results.values() for target in result["targets"]]
    assert len(targets) >= 9 and all(isinstance(target["met"], bool) for target in targets)
    assert "[1] cycle" in out.stderr  # a progress line per scenario
