"""The state dir on disk: its layout, atomic writes, and each key's lease ledger.

Layout (DESIGN.md, a contract)::

    cluster/bootstrap.json            how the local cluster was started
    resources/<key>.json              fencing floor, maintenance flag
    resources/<key>.wal               the key's write-ahead log (emptied at each checkpoint)
    resources/leases/<lease_id>.json  one record per lease, its whole history
    runs/<run_id>/...                 run records
    events.jsonl                      the audit journal

A key's changes are durable when their line in its write-ahead log is
fdatasynced, before the caller hears back; record files are replaced by
temp file + rename (whole, never torn) and synced at checkpoints. Other
files (catalog, run records, bootstrap) are temp file + fsync + rename +
fsync of the directory. Files are 0600 and directories 0700: lease records
hold capabilities.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from broker.core.book import Maintenance
from broker.models import Lease

__all__ = [
    "DEFAULT_STATE_DIR",
    "StateDir",
    "ResourceMeta",
    "LedgerContents",
    "ResourceLedger",
    "atomic_write",
    "write_files",
    "read_json",
]

DEFAULT_STATE_DIR = "build/generated/ray"
FILE_MODE = 0o600
DIR_MODE = 0o700


def _state_dir_from_env() -> Path:
    return Path(os.environ.get("MERLIN_STATE_DIR", DEFAULT_STATE_DIR)).expanduser().resolve()


@dataclass(frozen=True)
class StateDir:
    """Paths under one state dir; ``ensure()`` creates them with private modes."""

    root: Path

    @classmethod
    def from_env(cls, override: str | os.PathLike[str] | None = None) -> StateDir:
        root = Path(override).expanduser().resolve() if override else _state_dir_from_env()
        return cls(root)

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def bootstrap_path(self) -> Path:
        return self.cluster_dir / "bootstrap.json"

    @property
    def resources_dir(self) -> Path:
        return self.root / "resources"

    @property
    def leases_dir(self) -> Path:
        return self.resources_dir / "leases"

    @property
    def corrupt_dir(self) -> Path:
        return self.root / "corrupt"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def events_path(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def broker_record_path(self) -> Path:
        return self.root / "broker.json"

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.json"

    def resource_meta_path(self, key: str) -> Path:
        return self.resources_dir / f"{key}.json"

    def lease_path(self, lease_id: str) -> Path:
        return self.leases_dir / f"{lease_id}.json"

    def ensure(self) -> StateDir:
        for directory in (self.root, self.cluster_dir, self.resources_dir, self.leases_dir, self.runs_dir):
            directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        return self


def write_files(items: Iterable[tuple[Path, bytes]], *, durable: bool = True) -> None:
    """Atomically replace each file; with ``durable``, all are on disk when this returns.

    Temp files are written (and fsynced) first, then renamed, then each parent
    directory is fsynced once. On error the temp files are removed and the
    exception propagates (a rename already done stays: each file is still
    either old or new, never torn). ``durable=False`` is for files whose
    durability comes from elsewhere (the ledger's log).
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in items:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            staged.append((tmp, path))
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    if not durable:
        return
    for directory in {path.parent for _, path in staged}:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    write_files([(path, data)])


def read_json(path: Path) -> object:
    with open(path, "rb") as handle:
        return json.loads(handle.read())


class ResourceMeta(BaseModel):
    """``resources/<key>.json``: what of a key is not in its lease records."""

    model_config = ConfigDict(frozen=True)

    key: str
    # Tokens are recovered as the highest in any lease record; this floor keeps
    # them increasing if old records are ever archived away.
    fencing_counter: int = 0
    maintenance_reason: str | None = None
    maintenance_since: float | None = None
    maintenance_by: str = ""
    updated_at: float = 0.0

    @property
    def maintenance(self) -> Maintenance | None:
        if self.maintenance_reason is None:
            return None
        return Maintenance(self.maintenance_reason, self.maintenance_since or 0.0, self.maintenance_by)


@dataclass
class LedgerContents:
    meta: ResourceMeta
    leases: list[Lease]
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # (moved-to path, error)
    replayed: set[str] = field(default_factory=set)  # lease ids the log changed
    meta_replayed: bool = False


class ResourceLedger:
    """One key's records: a write-ahead log, its lease files (``<key>.<hex>.json``) and its meta file.

    A change is durable when its line in ``resources/<key>.wal`` is written
    and fdatasynced — one small append and one sync, where rewriting each
    record durably costs a file fsync, a rename and a directory fsync per
    file (0.42 ms each measured here; the log append: ~0.1 ms). The lease and
    meta files are then replaced atomically without a sync, so they are
    always whole and, after any process crash, current; after a power loss
    the log brings them back. On load the log is replayed over the files,
    the files are rewritten durably, and the log starts empty; it is also
    checkpointed (``os.sync`` + truncate) every ``CHECKPOINT_RECORDS`` lines.
    """

    CHECKPOINT_RECORDS = 4096

    def __init__(self, state: StateDir, key: str, defer: Callable[[Callable[[], None]], Any] | None = None):
        """``defer`` (the actor's ``loop.call_soon``) moves the file updates after the answer."""
        self.state = state
        self.key = key
        self._defer = defer
        self._pending: dict[Path, bytes] = {}  # file updates not yet written (the log has them)
        self._lease_name = re.compile(rf"^{re.escape(key)}\.[0-9a-f]{{32}}\.json$")
        self.wal_path = state.resources_dir / f"{key}.wal"
        self._wal_fd: int | None = None
        self._wal_records = 0

    def load(self) -> LedgerContents:
        """Read every record of this key, replay the log over them; corrupt files go to ``corrupt/``."""
        self.state.ensure()
        corrupt: list[tuple[Path, str]] = []
        meta = ResourceMeta(key=self.key)
        meta_path = self.state.resource_meta_path(self.key)
        if meta_path.exists():
            try:
                meta = ResourceMeta.model_validate(read_json(meta_path))
            except (OSError, ValueError, ValidationError) as exc:
                corrupt.append((self._move_aside(meta_path), _short_error(exc)))
        leases: dict[str, Lease] = {}
        with os.scandir(self.state.leases_dir) as entries:
            names = [entry.name for entry in entries if self._lease_name.match(entry.name)]
        for name in names:
            path = self.state.leases_dir / name
            try:
                lease = Lease.model_validate(read_json(path))
                if lease.resource != self.key or f"{lease.lease_id}.json" != name:
                    raise ValueError(f"record names lease {lease.lease_id!r} of {lease.resource!r}")
            except FileNotFoundError:
                continue
            except (OSError, ValueError, ValidationError) as exc:
                corrupt.append((self._move_aside(path), _short_error(exc)))
                continue
            leases[lease.lease_id] = lease
        replayed, replayed_meta = self._replay(leases)
        return LedgerContents(
            meta=replayed_meta or meta,
            leases=list(leases.values()),
            corrupt=corrupt,
            replayed=replayed,
            meta_replayed=replayed_meta is not None,
        )

    def checkpoint(self, contents: LedgerContents) -> None:
        """Make the files hold what the log says, durably; then empty the log."""
        replayed = [lease for lease in contents.leases if lease.lease_id in contents.replayed]
        items = [(self.state.lease_path(lease.lease_id), lease.model_dump_json().encode()) for lease in replayed]
        if contents.meta_replayed:
            items.append((self.state.resource_meta_path(self.key), contents.meta.model_dump_json(indent=2).encode()))
        if items:
            write_files(items)
        self._truncate_log()

    def read_lease(self, lease_id: str) -> Lease | None:
        """A lease record from disk (for leases the book no longer keeps in memory)."""
        path = self.state.lease_path(lease_id)
        try:
            if path in self._pending:
                return Lease.model_validate_json(self._pending[path])
            return Lease.model_validate(read_json(path))
        except (OSError, ValueError, ValidationError):
            return None

    def write(self, leases: Iterable[Lease], meta: ResourceMeta | None = None) -> None:
        """Make one command's changes durable (the log), then update the files.

        Raises:
            OSError: the log could not be written; nothing is durable, the caller rolls back.
        """
        documents = [(lease.lease_id, lease.model_dump_json()) for lease in leases]
        if not documents and meta is None:
            return
        meta_json = meta.model_dump_json() if meta is not None else None
        line = '{"leases":[' + ",".join(doc for _, doc in documents) + "]"
        line += f',"meta":{meta_json}}}\n' if meta_json is not None else "}\n"
        fd = self._log()
        data = memoryview(line.encode())
        while data:
            data = data[os.write(fd, data) :]
        os.fdatasync(fd)
        # Durable now. The files are views of the log: whole (atomic rename), synced at checkpoints.
        first = not self._pending
        for lease_id, doc in documents:
            self._pending[self.state.lease_path(lease_id)] = doc.encode()
        if meta is not None:
            self._pending[self.state.resource_meta_path(self.key)] = meta.model_dump_json(indent=2).encode()
        if self._defer is None:
            self.flush()
        elif first:
            self._defer(self.flush)
        self._wal_records += 1
        if self._wal_records >= self.CHECKPOINT_RECORDS:
            self.flush()
            os.sync()  # every file written since the last checkpoint is on disk
            self._truncate_log()

    def flush(self) -> None:
        """Write the pending file updates (not synced: the log holds them until a checkpoint)."""
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            write_files(pending.items(), durable=False)
        except OSError:
            # The log has every change; a later load replays it. Keep them for the next try.
            self._pending = {**pending, **self._pending}
            raise

    def _log(self) -> int:
        if self._wal_fd is None:
            self._wal_fd = os.open(self.wal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        return self._wal_fd

    def _truncate_log(self) -> None:
        fd = self._log()
        os.ftruncate(fd, 0)
        os.fsync(fd)
        self._wal_records = 0

    def _replay(self, leases: dict[str, Lease]) -> tuple[set[str], ResourceMeta | None]:
        """Apply the log's complete lines in order; a torn last line was never acknowledged."""
        replayed: set[str] = set()
        meta: ResourceMeta | None = None
        try:
            raw = self.wal_path.read_bytes()
        except FileNotFoundError:
            return replayed, meta
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                record = json.loads(line)
                changed = [Lease.model_validate(item) for item in record["leases"]]
                new_meta = ResourceMeta.model_validate(record["meta"]) if record.get("meta") else None
            except (ValueError, KeyError, TypeError, ValidationError):
                break  # the torn tail of a write that was never acknowledged
            for lease in changed:
                if lease.resource == self.key:
                    leases[lease.lease_id] = lease
                    replayed.add(lease.lease_id)
            meta = new_meta or meta
        return replayed, meta

    def _move_aside(self, path: Path) -> Path:
        self.state.corrupt_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        target = self.state.corrupt_dir / f"{path.name}.{int(time.time() * 1000)}"
        try:
            os.replace(path, target)
        except OSError:
            return path  # cannot move it (read-only disk): it stays, and is skipped again next load
        return target


def _short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
