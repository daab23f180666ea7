"""``merlin bench``: speed, footprint and recovery beside Ray baselines, in one run."""

from __future__ import annotations

import argparse

from broker.cli.common import Context, emit_json

__all__ = ["register"]


def register(top: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from broker.devtools.bench.runner import SCENARIOS

    bench = top.add_parser(
        "bench",
        parents=[common],
        help="measure the broker beside Ray baselines",
        description="Starts its own loopback Ray cluster unless --address is given; prints a progress line "
        "per scenario, then a table of medians, p99s, ratios against the baselines, and targets.",
    )
    bench.add_argument("--quick", action="store_true", help="few samples: shows it works (CI), not for figures")
    bench.add_argument("--only", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(run=_bench)


def _bench(ctx: Context) -> int:
    from broker.devtools.bench.runner import as_json, render, run

    results = run(quick=ctx.args.quick, address=ctx.address, only=ctx.args.only)
    if ctx.args.json:
        emit_json(as_json(results))
    else:
        print(render(results))
    return 0
