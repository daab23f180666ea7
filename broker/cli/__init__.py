"""``merlin``: the command line. One line per error, distinct exit codes, ``--json`` on reads.

Exit codes: 0 ok; 1 internal error; 2 usage error; then one per error class
(``broker.errors.EXIT_CODES``): 3 invalid request, 4 unknown resource,
5 busy, 6 lease not found, 7 lease not held, 8 stale fencing token,
9 wait timed out, 10 broker or cluster unavailable (or an unusable state
dir), 11 not authorized; 130 interrupted (SIGINT), 143 terminated (SIGTERM,
``keep-alive``). Under ``--json`` an error is also a JSON object on stdout:
``{"error": {"type", "message", "exit_code", <the error's fields>}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from broker.errors import EXIT_CODES, BrokerError, Surface, error_json

__all__ = ["main", "build_parser", "UsageError"]

_EXIT_HELP = (
    "exit codes: 0 ok, 1 internal error, 2 usage, "
    + ", ".join(f"{code} {name}" for name, code in sorted(EXIT_CODES.items(), key=lambda item: item[1]))
    + ", 130 interrupted, 143 terminated. Under --json an error is also "
    '{"error": {"type", "message", "exit_code", ...}} on stdout.'
)


def build_parser() -> argparse.ArgumentParser:
    from broker.cli import (
        bench_cmds,
        broker_cmds,
        chaos_cmds,
        cluster_cmds,
        completion,
        events_cmds,
        jobs_cmds,
        resource_cmds,
        targetgen_cmds,
    )
    from broker.cli.common import common_options

    common = common_options()
    parser = _Parser(
        prog="merlin",
        description="Merlin hardware broker: leases on scarce lab hardware, on Ray.",
        epilog=_EXIT_HELP,
    )
    top = parser.add_subparsers(dest="area", required=True, metavar="{broker,ray,targetgen,bench,chaos,completion}")
    broker_cmds.register(top, common)
    targetgen_cmds.register(top, common)
    bench_cmds.register(top, common)
    chaos_cmds.register(top, common)
    ray_parser = top.add_parser("ray", help="the Ray control plane: cluster, resources, jobs, artifacts, events")
    ray_sub = ray_parser.add_subparsers(dest="group", required=True)
    cluster_cmds.register(ray_sub, common)
    resource_cmds.register(ray_sub, common)
    events_cmds.register_events(ray_sub, common)
    jobs_cmds.register_jobs(ray_sub, common)
    jobs_cmds.register_artifacts(ray_sub, common)
    completion.register(top, common, parser)
    return parser


class UsageError(Exception):
    """A missing or unknown argument (exit 2); raised by the parser instead of exiting."""


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), pointing at --help instead of dumping usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure is one line on stderr (and a JSON object under ``--json``)."""
    from broker.cli.common import Context, state_dir_error

    argv = sys.argv[1:] if argv is None else list(argv)
    wants_json = "--json" in argv  # until the arguments are parsed
    ctx: Context | None = None
    try:
        args = build_parser().parse_args(argv)
        wants_json = bool(getattr(args, "json", False))
        ctx = Context(args)
        code = args.run(ctx)
    except UsageError as err:
        return _fail(f"merlin: error: {err}", err, 2, wants_json)
    except BrokerError as err:  # the seam has unwrapped Ray's wrappers: this is ours
        return _fail(f"merlin: {type(err).__name__}: {err.describe(Surface.CLI)}", err, err.exit_code, wants_json)
    except KeyboardInterrupt:
        return _fail("merlin: interrupted", KeyboardInterrupt("interrupted"), 130, wants_json)
    except BrokenPipeError:  # `merlin ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if os.environ.get("MERLIN_DEBUG"):
            raise
        unusable = state_dir_error(err, ctx.state.root) if ctx is not None and isinstance(err, OSError) else None
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
