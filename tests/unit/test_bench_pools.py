"""The bench's pool scenario: in the scenario list and the CLI, its handoffs computed per key, printed with ratios."""

from __future__ import annotations

import pytest

from broker.devtools.bench.pools import CONTENDERS, per_key_handoffs
from broker.devtools.bench.runner import SCENARIOS, _scenarios, render
from broker.devtools.bench.stats import Result, summarize


def test_the_pool_scenario_runs_beside_the_single_key_handoff():
    assert list(_scenarios()) == list(SCENARIOS)
    assert SCENARIOS.index("pools") == SCENARIOS.index("handoff") + 1
    names = [name for name, _ in CONTENDERS]
    assert names == ["single-key handoff", "any-of handoff", "2-key group handoff"]
    assert CONTENDERS[1][1]["target"] == CONTENDERS[2][1]["target"] == "group"


def test_merlin_bench_accepts_only_pools():
    from broker.cli import UsageError, build_parser

    args = build_parser().parse_args(["bench", "--quick", "--only", "pools"])
    assert args.only == ["pools"]
    with pytest.raises(UsageError, match="'pools'"):  # the choices it names include it
        build_parser().parse_args(["bench", "--only", "no-such-scenario"])


def test_handoffs_are_measured_per_key_and_a_group_from_its_last_key_back():
    grants = [
        (1.0, 2.0, ["a"]),  # first grant of a: no handoff
        (1.5, 3.0, ["b"]),  # first grant of b
        (2.25, 2.5, ["a"]),  # a released at 2.0 -> 0.25
        (3.5, 4.0, ["b"]),  # b released at 3.0 -> 0.5
        (4.75, 5.0, ["a", "b"]),  # a back at 2.5, b at 4.0: the group waited for the later -> 0.75
        (5.0, 6.0, ["a"]),  # a released at 5.0 -> 0.0
    ]
    assert per_key_handoffs(list(reversed(grants))) == [0.25, 0.5, 0.75, 0.0]


def test_the_table_prints_each_median_and_the_ratios_to_the_single_key_handoff():
    result = Result("pools")
    for (name, _), samples in zip(CONTENDERS, ([0.002, 0.004], [0.006, 0.006], [0.008, 0.012])):
        result.figures[name] = summarize(samples)
    assert result.ratio("any-of / single-key", "any-of handoff", "single-key handoff") == 2.0
    assert result.ratio("2-key group / single-key", "2-key group handoff", "single-key handoff") == pytest.approx(
        10 / 3
    )
    text = render([result])
    assert "== pools" in text
    assert "any-of handoff" in text and "6.000 ms" in text and "any-of / single-key" in text and "2.000" in text
