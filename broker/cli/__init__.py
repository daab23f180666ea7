"""``merlin``: the command line. One line per error, distinct exit codes, ``--json`` on reads.

Exit codes: 0 ok; 1 internal error; 2 usage error; then one per error class
(``broker.errors.EXIT_CODES``): 3 invalid request, 4 unknown resource,
5 busy, 6 lease not found, 7 lease not held, 8 stale fencing token,
9 wait timed out, 10 broker or cluster unavailable (or an unusable state
dir), 11 not authorized (also: no usable API token); 130 interrupted (SIGINT), 143 terminated (SIGTERM),
129 hung up (SIGHUP) — a waiting request leaves the queue first
(``broker.errors.SIGNAL_EXIT_CODES``, :mod:`broker.cli.interrupts`). Under ``--json`` an error is also a JSON object on stdout:
``{"error": {"type", "message", "exit_code", <the error's fields>}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from broker.errors import EXIT_CODES, BrokerError, Surface, error_json

__all__ = ["main", "build_parser", "UsageError"]

_EXIT_HELP = (
    "exit codes: 0 ok, 1 internal error, 2 usage, "
    + ", ".join(f"{code} {name}" for name, code in sorted(EXIT_CODES.items(), key=lambda item: item[1]))
    + ", 130 interrupted (SIGINT), 143 terminated (SIGTERM), 129 hung up (SIGHUP): a waiting request "
    "leaves the queue first. Under --json an error is also "
    '{"error": {"type", "message", "exit_code", ...}} on stdout. '
    "When the state dir names the broker's HTTP API, `ray resources|jobs` and `broker status|token` use it "
    "with $MERLIN_TOKEN, else the 0600 file $MERLIN_TOKEN_FILE, else the state dir's operator.token; a bad, "
    "revoked or missing token (or a token file others can read) is exit 11. MERLIN_CLI_TRANSPORT=ray or "
    "--address take the Ray path instead."
)


# Each area of ``merlin`` (and each group of ``merlin ray``), in --help order: the module and function
# that register it, and its line in the listing. A command imports only the module of the area it
# names (``merlin ray resources list`` never loads the catalog, the run records or Ray); the others
# are listed by name and help alone. A unit test checks each line here is the one its module gives.
_AREAS: dict[str, tuple[str, str]] = {
    "broker": ("broker_cmds:register", "the broker actors"),
    "targetgen": ("targetgen_cmds:register", "capability specs -> plans -> bundles, and running them"),
    "mcp": ("mcp_cmd:register", "serve the broker to a coding agent over MCP (stdio)"),
    "bench": ("bench_cmds:register", "measure the broker beside Ray baselines"),
    "chaos": ("chaos_cmds:register", "random clients while actors are kill -9'd; then check every promise"),
    "ray": ("", "the Ray control plane: cluster, resources, jobs, artifacts, events"),
    "completion": ("completion:register", "shell completion: `source <(merlin completion bash)`"),
}
_RAY_GROUPS: dict[str, tuple[str, str]] = {
    "cluster": ("cluster_cmds:register", "the local Ray cluster"),
    "resources": ("resource_cmds:register", "leases on lab hardware"),
    "events": ("events_cmds:register_events", "the audit journal: every state change, in order"),
    "jobs": ("jobs_cmds:register_jobs", "bundles run on the hardware in turn"),
    "artifacts": ("jobs_cmds:register_artifacts", "files a run left"),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``merlin`` parser. Given ``argv``, only the area (and ``ray`` group) it names is registered in
    full, the rest by name and help line; without it (or for ``completion``, which walks the whole
    tree, or an unknown word), every command."""
    from broker.cli.common import common_options

    words = list(argv) if argv is not None else []
    area = words[0] if words else None
    group = words[1] if len(words) > 1 and area == "ray" else None
    full = argv is None or area == "completion" or _unknown(area, _AREAS) or _unknown(group, _RAY_GROUPS)
    common = common_options()
    parser = _Parser(
        prog="merlin",
        description="Merlin hardware broker: leases on scarce lab hardware, on Ray.",
        epilog=_EXIT_HELP,
    )
    top = parser.add_subparsers(dest="area", required=True, metavar="{broker,ray,targetgen,mcp,bench,chaos,completion}")
    for name, (where, line) in _AREAS.items():
        if name == "ray":
            ray_sub = top.add_parser("ray", help=line).add_subparsers(dest="group", required=True)
            for group_name, (group_where, group_line) in _RAY_GROUPS.items():
                if full or group_name == group:
                    _register(group_where, ray_sub, common)
                else:
                    ray_sub.add_parser(group_name, help=group_line)
        elif name == "completion" and full:
            _register(where, top, common, parser)
        elif full or name == area:
            _register(where, top, common)
        else:
            top.add_parser(name, help=line)
    return parser


def _unknown(word: str | None, known: dict[str, Any]) -> bool:
    """A command word the table does not name: build every command, so argparse says so as always."""
    return word is not None and not word.startswith("-") and word not in known


def _register(where: str, sub: argparse._SubParsersAction, *args: Any) -> None:
    import importlib

    module, _, function = where.partition(":")
    getattr(importlib.import_module(f"broker.cli.{module}"), function)(sub, *args)


class UsageError(Exception):
    """A missing or unknown argument (exit 2); raised by the parser instead of exiting."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), pointing at --help instead of dumping usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr (and a JSON object under ``--json``)."""
    from broker.cli import interrupts
    from broker.cli.common import Context, state_dir_error

    interrupts.install()
    argv = sys.argv[1:] if argv is None else list(argv)
    wants_json = "--json" in argv  # until the arguments are parsed
    ctx: Context | None = None
    try:
        args = build_parser(argv).parse_args(argv)
        wants_json = bool(getattr(args, "json", False))
        ctx = Context(args)
        code = args.run(ctx)
    except UsageError as err:
        return _fail(f"merlin: error: {err}", err, 2, wants_json)
    except BrokerError as err:  # the seam has unwrapped Ray's wrappers: this is ours
        return _fail(f"merlin: {type(err).__name__}: {err.describe(Surface.CLI)}", err, err.exit_code, wants_json)
    except KeyboardInterrupt as interrupt:
        stop = interrupts.stopped(interrupt)
        how = f"stopped by {stop.name}"
        line = f"merlin: {how}" + (f"; {stop.detail}" if stop.detail else "")
        return _fail(line, KeyboardInterrupt(how), interrupts.exit_code(stop), wants_json)
    except BrokenPipeError:  # `merlin ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if os.environ.get("MERLIN_DEBUG"):
            raise
        unusable = state_dir_error(err, ctx.state_root) if ctx is not None and isinstance(err, OSError) else None
        if unusable is not None:
            return _fail(
                f"merlin: {type(unusable).__name__}: {unusable.describe(Surface.CLI)}",
                unusable,
                unusable.exit_code,
                wants_json,
            )
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        line = f"merlin: internal error: {type(err).__name__}: {text} (MERLIN_DEBUG=1 shows the traceback)"
        return _fail(line, err, 1, wants_json)
    sys.stdout.flush()
    return int(code or 0)


def _fail(line: str, err: BaseException, code: int, wants_json: bool) -> int:
    """The one line on stderr; under ``--json`` also the error object on stdout (scripts parse stdout)."""
    if wants_json:
        import json

        body = error_json(err, Surface.CLI, exit_code=code)
        if isinstance(err, UsageError):
            body["error"]["type"] = "UsageError"
        with contextlib.suppress(BrokenPipeError):  # the reader left: the stderr line still goes out
            sys.stdout.write(json.dumps(body) + "\n")
            sys.stdout.flush()
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
