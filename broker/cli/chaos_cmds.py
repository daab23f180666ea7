"""``merlin chaos``: clients, a killer, and a checker; prints operations, kills and violations."""

from __future__ import annotations

import argparse

from broker.cli.common import Context, emit_json

__all__ = ["register"]


def register(top: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    chaos = top.add_parser(
        "chaos",
        parents=[common],
        help="random clients while actors are kill -9'd; then check every promise",
        description="Starts its own loopback cluster unless --address is given. Exit 0 only with 0 violations.",
    )
    mode = chaos.add_mutually_exclusive_group()
    mode.add_argument("--short", action="store_true", help="25 s, 4 clients, 2 keys (CI; the default)")
    mode.add_argument("--long", action="store_true", help="10 minutes, 8 clients, 3 keys (the README's figures)")
    chaos.add_argument("--duration", type=float, default=None, help="override the duration in seconds")
    chaos.add_argument("--seed", type=int, default=1, help="random seed of the clients and the killer (default 1)")
    chaos.add_argument("--json", action="store_true", help="print the result as JSON")
    chaos.set_defaults(run=_chaos)


def _chaos(ctx: Context) -> int:
    from dataclasses import replace

    from broker.devtools.chaos.runner import LONG, SHORT, let_go_line, run_chaos

    settings = LONG if ctx.args.long else SHORT
    settings = replace(settings, seed=ctx.args.seed)
    if ctx.args.duration is not None:
        settings = replace(settings, duration_s=ctx.args.duration)
    result = run_chaos(settings, address=ctx.address)
    summary = result.as_dict()
    if ctx.args.json:
        emit_json(summary)
    else:
        print(
            f"chaos: {summary['operations']} operations by {summary['clients']} clients on {summary['keys']} keys in "
            f"{summary['duration_s']:g}s; {summary['kills']} kills survived ({summary['kills_by_target']['coordinator']} "
            f"coordinator, {summary['kills_by_target']['resource']} resource actors); {summary['grants']} grants, "
            f"{summary['leases']} lease records, {summary['events']} journal events; "
            f"violations: {len(summary['violations'])}"
        )
        print(f"chaos: {let_go_line(result.report, result.settings.client_bound_s)}")
        for violation in summary["violations"][:50]:
            print(f"  VIOLATION {violation}")
    return 0 if not summary["violations"] else 1
