"""``merlin``: the command line. One line per error, distinct exit codes, ``--json`` on reads.

Exit codes: 0 ok; 1 internal error; 2 usage error; then one per error class
(``broker.errors.EXIT_CODES``): 3 invalid request, 4 unknown resource,
5 busy, 6 lease not found, 7 lease not held, 8 stale fencing token,
9 wait timed out, 10 broker or cluster unavailable; 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys

from broker.errors import EXIT_CODES, BrokerError

__all__ = ["main", "build_parser"]

_EXIT_HELP = "exit codes: 0 ok, 1 internal error, 2 usage, " + ", ".join(
    f"{code} {name}" for name, code in sorted(EXIT_CODES.items(), key=lambda item: item[1])
)


def build_parser() -> argparse.ArgumentParser:
    from broker.cli import (
        bench_cmds,
        broker_cmds,
        chaos_cmds,
        cluster_cmds,
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
    top = parser.add_subparsers(dest="area", required=True, metavar="{broker,ray,targetgen,bench,chaos}")
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
    return parser


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), pointing at --help instead of dumping usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    from broker.cli.common import Context

    try:
        args = build_parser().parse_args(argv)
        code = args.run(Context(args))
    except BrokerError as err:  # the seam has unwrapped Ray's wrappers: this is ours
        print(f"merlin: {type(err).__name__}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("merlin: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `merlin ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        if os.environ.get("MERLIN_DEBUG"):
            raise
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        print(
            f"merlin: internal error: {type(err).__name__}: {text} (MERLIN_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    sys.stdout.flush()
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
