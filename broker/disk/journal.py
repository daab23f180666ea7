"""Events: one per state change, to the structured log and to the audit journal.

The journal (``events.jsonl`` in the state dir) is appended to by every actor
process. Each line is one JSON object with ``seq`` (global, gap-free order of
appends), ``ts`` (epoch seconds), ``time`` (ISO 8601 UTC), ``event`` and its
fields. Appends take an exclusive ``flock`` so sequence numbers never repeat
across processes; a line is one ``write`` call, so a killed writer leaves at
worst one partial last line, which readers skip and the next writer
terminates. Lease ids never appear here: events name a lease by its public
``ref`` (see :func:`broker.models.lease_ref`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from broker.models import lease_ref

__all__ = ["configure_logging", "Journal", "EventSink", "read_journal", "iso", "redact_lease_ids"]

# A lease id anywhere in a text (a temp file's name, a path under corrupt/, an error message).
_LEASE_ID_IN_TEXT = re.compile(
    r"(?<![a-z0-9_-])(?:[a-z0-9][a-z0-9_.-]{0,63}\.|group:)[0-9a-f]{32}(?![0-9a-f])"  # a key's, or a group's
)


def redact_lease_ids(value: Any) -> Any:
    """``value`` with every lease id in its strings replaced by ``lease:<ref>`` (nested lists and dicts too)."""
    if isinstance(value, str):
        return _LEASE_ID_IN_TEXT.sub(lambda match: f"lease:{lease_ref(match.group())}", value)
    if isinstance(value, dict):
        return {key: redact_lease_ids(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_lease_ids(item) for item in value]
    return value


_configured = False


def configure_logging(force: bool = False) -> None:
    """structlog: JSON lines off a terminal, colour on one; level from ``MERLIN_LOG_LEVEL``."""
    global _configured
    if _configured and not force:
        return
    level_name = os.environ.get("MERLIN_LOG_LEVEL", "INFO").upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        level = logging.INFO
    renderer: Any
    if sys.stderr.isatty():
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _configured = True


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Journal:
    """Appender for ``events.jsonl``, safe across processes."""

    _TAIL_BYTES = 8192

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._known_end = -1  # file size right after our last append
        self._seq = 0

    def append(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Append one event; returns the record as written (with ``seq`` and ``ts``)."""
        fd = self._open()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            end = os.fstat(fd).st_size
            prefix = b""
            if end != self._known_end:  # someone else appended: learn their last seq
                self._seq, terminated = self._last_seq(fd, end)
                prefix = b"" if terminated else b"\n"
            self._seq += 1
            now = time.time()
            record = {"seq": self._seq, "ts": round(now, 6), "time": iso(now), "event": event, **fields}
            line = prefix + json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
            os.write(fd, line)
            self._known_end = end + len(line)
            return record
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._known_end = -1
        return self._fd

    def _last_seq(self, fd: int, end: int) -> tuple[int, bool]:
        """The highest seq in the file's tail, and whether the file ends with a newline."""
        if end == 0:
            return 0, True
        start = max(0, end - self._TAIL_BYTES)
        with open(self.path, "rb") as reader:
            reader.seek(start)
            tail = reader.read(end - start)
        lines = tail.split(b"\n")
        for raw in reversed(lines):
            try:
                return int(json.loads(raw)["seq"]), tail.endswith(b"\n")
            except (ValueError, KeyError, TypeError):
                continue
        if start > 0:  # a huge garbage tail: fall back to a full scan
            last = 0
            for record in read_journal(self.path):
                last = max(last, int(record.get("seq", 0)))
            return last, tail.endswith(b"\n")
        return 0, tail.endswith(b"\n")


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every well-formed event in the journal, in file order; partial lines skipped."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


class _RotatingFile:
    """Line writes to a file that starts over (keeping one ``.1``) past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int = 50 * 1024 * 1024):
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._handle = self._open()

    def write(self, text: str) -> int:
        written = self._handle.write(text)
        if self._handle.tell() > self.max_bytes:
            self._handle.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._handle = self._open()
        return written

    def _open(self) -> Any:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def flush(self) -> None:
        self._handle.flush()


def _echo_warnings(_logger: Any, method: str, rendered: Any) -> Any:
    """Warnings and errors also go to stderr, where Ray's dashboard shows an actor's log."""
    if method in ("warning", "error", "critical"):
        print(rendered, file=sys.stderr, flush=True)
    return rendered


def _file_logger(path: Path, source: str) -> Any:
    level = logging.getLevelName(os.environ.get("MERLIN_LOG_LEVEL", "INFO").upper())
    return structlog.wrap_logger(
        structlog.PrintLogger(file=_RotatingFile(path)),  # type: ignore[arg-type]
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
            _echo_warnings,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level if isinstance(level, int) else logging.INFO),
        cache_logger_on_first_use=True,
    ).bind(source=source)


class EventSink:
    """Where an actor sends its events: the structured log and the journal.

    With ``log_dir`` (the actors), the log is a JSON-lines file of its own,
    ``<log_dir>/<source>.log``: an actor's stderr goes through Ray's log
    pipeline, which cost about half a millisecond per line on the grant path
    (measured), so only warnings and errors are echoed there. Without it,
    the process-wide structlog configuration is used (stderr).

    A journal that cannot be written (full or read-only disk) does not fail the
    call that caused the event: the lease records are the authority, and the
    failure itself is logged.
    """

    def __init__(self, journal_path: Path, source: str, log_dir: Path | None = None):
        self._journal = Journal(journal_path)
        self._source = source
        if log_dir is None:
            configure_logging()
            self._log = structlog.get_logger("merlin").bind(source=source)
        else:
            self._log = _file_logger(log_dir / f"{source.replace(':', '-')}.log", source)

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        # Events name leases by ref; this also catches ids inside texts (file names, error messages).
        fields = {name: redact_lease_ids(value) for name, value in fields.items() if value is not None}
        getattr(self._log, level)(event, **fields)
        try:
            self._journal.append(event, {"source": self._source, **fields})
        except OSError as exc:
            self._log.error("journal.write_failed", error=str(exc), lost_event=event)

    def close(self) -> None:
        self._journal.close()
