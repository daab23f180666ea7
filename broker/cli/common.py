"""What every ``merlin`` command shares: common options, output, time formatting."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from broker.core.durations import format_duration, parse_duration
from broker.disk.store import StateDir
from broker.seam.placement import namespace_from_env

__all__ = [
    "admin_secret",
    "admin_secret_option",
    "common_options",
    "json_option",
    "Context",
    "emit_json",
    "duration_arg",
    "when",
    "table",
    "note",
    "state_dir_error",
]


def common_options() -> argparse.ArgumentParser:
    """Options every leaf command takes (so they may follow the subcommand)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("where")
    group.add_argument(
        "--state-dir",
        default=None,
        help="broker state dir (default: $MERLIN_STATE_DIR or build/generated/ray)",
    )
    group.add_argument(
        "--namespace",
        default=None,
        help="Ray namespace of the broker actors (default: $MERLIN_RAY_NAMESPACE or merlin)",
    )
    group.add_argument(
        "--address",
        default=None,
        help="Ray address (default: $RAY_ADDRESS, then the state dir's cluster/bootstrap.json)",
    )
    return parent


def admin_secret_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-secret-file",
        default=None,
        help="file holding the admin secret, when the catalog requires one (or $MERLIN_ADMIN_SECRET)",
    )


def admin_secret(args: argparse.Namespace) -> str | None:
    """From --admin-secret-file, else the environment; never from the command line (ps shows it)."""
    from broker.client import admin_secret_from_env
    from broker.errors import InvalidRequest

    if args.admin_secret_file:
        try:
            with open(args.admin_secret_file, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as exc:
            raise InvalidRequest(
                f"cannot read --admin-secret-file {args.admin_secret_file}: {exc.strerror}", "admin_secret"
            ) from None
    return admin_secret_from_env()


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


class Context:
    """The resolved common options, and a lazily connected broker client."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.state = StateDir.from_env(args.state_dir)
        self.namespace = args.namespace or namespace_from_env()
        self.address = args.address
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            from broker.client import connect

            self._check_state_dir()
            self._client = connect(self.address, namespace=self.namespace, state_dir=str(self.state.root))
        return self._client

    def read_api(self, what: str) -> Any | None:
        """The coordinator's read-only HTTP API, without importing Ray; None if it cannot answer.

        Used by reads (``resources list``, ``broker status``): importing Ray alone
        costs ~0.4 s, connecting another ~0.5 s. Falls back to Ray when the
        state dir names no live coordinator of this namespace.
        """
        if self.address:
            return None
        import urllib.request

        try:
            record = json.loads(self.state.broker_record_path.read_text())
            if record.get("namespace") != self.namespace or not record.get("api_url"):
                return None
            with urllib.request.urlopen(f"{record['api_url']}/{what}", timeout=3) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def _check_state_dir(self) -> None:
        """A state dir under a file cannot hold a cluster record: say so, not "no cluster recorded"."""
        path = self.state.root
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir():
            unusable = state_dir_error(NotADirectoryError(20, "Not a directory", str(path)), self.state.root)
            if unusable is not None:
                raise unusable

    def connect_ray(self) -> Any:
        from broker.seam.cluster import connect_ray

        self._check_state_dir()
        return connect_ray(self.state, address=self.address, namespace=self.namespace)


def state_dir_error(err: OSError, root: Path) -> Any | None:
    """``BrokerUnavailable`` (exit 10) when ``err`` is about the state dir itself, else None.

    A state dir whose parent is a file, or under ``/proc``, fails deep inside
    whatever touched it first; the user needs to hear which dir and why.
    """
    from broker.errors import BrokerUnavailable

    for name in (err.filename, err.filename2):
        if name is None:
            continue
        path = Path(os.fsdecode(name)) if isinstance(name, (str, bytes, os.PathLike)) else None
        # the dir, something in it, or an ancestor that is not a directory (a file where a dir should be)
        if path is not None and (path == root or root in path.parents or path in root.parents):
            why = err.strerror or type(err).__name__
            where = "" if path == root else f" ({path})"
            return BrokerUnavailable(
                f"state dir {root} cannot be used: {why}{where}",
                "point --state-dir or MERLIN_STATE_DIR at a directory you can write",
            )
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def emit_json(value: Any) -> None:
    json.dump(_plain(value), sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def duration_arg(field: str) -> Any:
    """An argparse ``type`` for ``90s``/``10m``/``2h``; a bad value is ``InvalidRequest`` (exit 3)."""

    def parse(text: str) -> float:
        return parse_duration(text, field=field)

    parse.__name__ = "duration"
    return parse


def when(ts: float | None, *, relative: bool = True) -> str:
    """``2026-11-21 23:10:00Z (in 59m)``; ``-`` for no time."""
    if ts is None:
        return "-"
    stamp = datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    if not relative:
        return stamp
    delta = ts - time.time()
    rel = f"in {format_duration(delta, units=2)}" if delta >= 0 else f"{format_duration(-delta, units=2)} ago"
    return f"{stamp} ({rel})"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    lines = ["  ".join(header.upper().ljust(width) for header, width in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def note(message: str) -> None:
    """Progress and hints go to stderr, so ``--json`` output stays clean on stdout."""
    print(message, file=sys.stderr, flush=True)
