"""What every ``merlin`` command shares: common options, output, time formatting.

Light on purpose: a command on the HTTP API imports this, argparse, urllib and
:mod:`broker.errors`, never pydantic, the state dir's store or Ray (a write
then costs a Python start-up and one request). What only some commands need
is imported where they need it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from broker.core.durations import format_duration, parse_duration

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
    from broker.errors import InvalidRequest
    from broker.holders import admin_secret_from_env

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


# = broker.disk.store.DEFAULT_STATE_DIR and broker.seam.placement.DEFAULT_NAMESPACE, spelled here so
# resolving them costs no import of the store (pydantic) or the seam (asyncio); a unit test keeps them equal.
DEFAULT_STATE_DIR = "build/generated/ray"
DEFAULT_NAMESPACE = "merlin"
OPERATOR_TOKEN_FILE = "operator.token"  # = broker.disk.token_store.operator_token_path's name


def state_root(override: str | None) -> Path:
    """The state dir's path as ``broker.disk.store.StateDir.from_env`` resolves it."""
    if override:
        return Path(override).expanduser().resolve()
    return Path(os.environ.get("MERLIN_STATE_DIR", DEFAULT_STATE_DIR)).expanduser().resolve()


class Context:
    """The resolved common options, and a lazily connected broker client."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.state_root = state_root(args.state_dir)
        self.namespace = args.namespace or os.environ.get("MERLIN_RAY_NAMESPACE") or DEFAULT_NAMESPACE
        self.address = args.address
        self._state: Any = None
        self._client: Any = None
        self._http: Any = None  # the HTTP client; False: the state dir names no API
        self._ray_client: Any = None

    @property
    def state(self) -> Any:
        """The state dir (``broker.disk.store.StateDir``), for the commands that read or write it."""
        if self._state is None:
            from broker.disk.store import StateDir

            self._state = StateDir(self.state_root)
        return self._state

    def _broker_record(self) -> Any:
        try:
            return json.loads((self.state_root / "broker.json").read_text())
        except (OSError, ValueError):
            return None

    def _operator_token(self) -> str | None:
        try:
            return (self.state_root / OPERATOR_TOKEN_FILE).read_text().strip() or None
        except OSError:
            return None

    def given_token(self) -> str | None:
        """The caller's own API token: ``MERLIN_TOKEN``, else the file ``MERLIN_TOKEN_FILE`` names.

        The file must be private (no group or other access), as an ssh key must: a token others
        can read is someone else's too.

        Raises:
            NotAuthenticated: (exit 11) the file is missing, unreadable, empty or readable by others.
        """
        token = os.environ.get("MERLIN_TOKEN", "").strip()
        path = os.environ.get("MERLIN_TOKEN_FILE", "")
        if token or not path:
            return token or None
        try:
            mode = os.stat(path).st_mode & 0o777
            if mode & 0o077:
                raise _no_token(f"MERLIN_TOKEN_FILE {path} is readable by others (mode {mode:04o}): chmod 600 it")
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise _no_token(f"cannot read MERLIN_TOKEN_FILE {path}: {exc.strerror or exc}") from None
        if not token:
            raise _no_token(f"MERLIN_TOKEN_FILE {path} is empty")
        return token

    def client(self) -> Any:
        """The broker: over its HTTP API when the state dir names one (no Ray import: a write costs a
        Python start-up and one request), else through Ray."""
        if self._client is None:
            self._client = self.http_client() or self.ray_client()
        return self._client

    def http_client(self) -> Any | None:
        """The broker's HTTP API client, or None when the state dir names no API (of this namespace).

        Raises:
            NotAuthenticated: (exit 11) it names one, but no token is at hand (see :meth:`_http_client`).
        """
        if self._http is None:
            self._http = self._http_client() or False
        return self._http or None

    def ray_client(self) -> Any:
        if self._ray_client is None:
            from broker.client import connect

            self._check_state_dir()
            self._ray_client = connect(self.address, namespace=self.namespace, state_dir=str(self.state_root))
            _signals_after_ray()
        return self._ray_client

    def _http_client(self) -> Any | None:
        """A client of the API the state dir names, with the caller's token (``MERLIN_TOKEN``, a private
        ``MERLIN_TOKEN_FILE``) or else the state dir's operator token; None on the Ray path (``--address``,
        ``MERLIN_CLI_TRANSPORT=ray``, no API of this namespace recorded).

        Raises:
            NotAuthenticated: (exit 11) the state dir names an API but no token is at hand: one line that
                says where tokens come from, never a silent switch to the Ray path's other rules.
        """
        if self.address or os.environ.get("MERLIN_CLI_TRANSPORT", "").lower() == "ray":
            return None
        record = self._broker_record()
        if not isinstance(record, dict) or record.get("namespace") != self.namespace or not record.get("http_url"):
            return None
        from broker.http.client import HttpClient

        operator = self._operator_token()
        token = self.given_token() or operator
        if not token:
            raise _no_token(
                f"no API token for the broker at {record['http_url']}: set MERLIN_TOKEN or MERLIN_TOKEN_FILE "
                f"(`merlin broker token create NAME`); the operator's token {self.state_root / OPERATOR_TOKEN_FILE} "
                "is not readable here; MERLIN_CLI_TRANSPORT=ray uses Ray instead"
            )
        return HttpClient(
            record["http_url"],
            token,
            acts_for_anyone=token == operator,
            fallback=self.ray_client,
            find_url=self._recorded_http_url,
        )

    def _recorded_http_url(self) -> str | None:
        record = self._broker_record()
        return record.get("http_url") if isinstance(record, dict) else None

    def read_api(self, what: str) -> Any | None:
        """A read on the coordinator's HTTP API (with the token), without importing Ray; None if it cannot answer.

        Used by reads (``resources list``, ``broker status``): importing Ray alone
        costs ~0.4 s, connecting another ~0.5 s. Falls back to Ray when the
        state dir names no live coordinator of this namespace.
        """
        if self.address or os.environ.get("MERLIN_CLI_TRANSPORT", "").lower() == "ray":
            return None
        import urllib.error
        import urllib.request

        record = self._broker_record()
        if not isinstance(record, dict) or record.get("namespace") != self.namespace or not record.get("api_url"):
            return None
        token = self.given_token() or self._operator_token()
        if not token:
            return None  # the client says why (exit 11)
        request = urllib.request.Request(f"{record['api_url']}/{what}", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=3) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as refused:
            if refused.code in (401, 403):  # a bad or revoked token: said once, as the server journaled it
                from broker.errors import error_from_json

                with contextlib.suppress(ValueError):
                    raise error_from_json(json.loads(refused.read())) from None
            return None
        except (OSError, ValueError):
            return None

    def _check_state_dir(self) -> None:
        """A state dir under a file cannot hold a cluster record: say so, not "no cluster recorded"."""
        path = self.state_root
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir():
            unusable = state_dir_error(NotADirectoryError(20, "Not a directory", str(path)), self.state_root)
            if unusable is not None:
                raise unusable

    def connect_ray(self) -> Any:
        from broker.seam.cluster import connect_ray

        self._check_state_dir()
        connected = connect_ray(self.state, address=self.address, namespace=self.namespace)
        _signals_after_ray()
        return connected


def _no_token(why: str) -> Exception:
    """NotAuthenticated (exit 11): the CLI has no usable token of its own, so it asks nothing."""
    from broker.errors import NotAuthenticated

    return NotAuthenticated("the broker's HTTP API", why=why)


def _signals_after_ray() -> None:
    """``ray.init`` replaced our SIGTERM handler with its own: put ours back."""
    from broker.cli.interrupts import install

    install()


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
    if hasattr(value, "model_dump"):  # a pydantic model (the Ray path), without importing pydantic here
        return value.model_dump(mode="json")
    if hasattr(value, "json_data"):  # an HTTP answer (broker.http.answers.Answer)
        return value.json_data()
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
