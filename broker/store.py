"""The state dir on disk: its layout, atomic writes, and each key's lease ledger.

Layout (DESIGN.md, a contract)::

    cluster/bootstrap.json            how the local cluster was started
    resources/<key>.json              fencing floor, maintenance flag
    resources/leases/<lease_id>.json  one record per lease, its whole history
    runs/<run_id>/...                 run records
    events.jsonl                      the audit journal

Every write is temp file + fsync + rename + fsync of the directory, so a
record is either the old one or the new one, and it is on disk before the
caller hears back. Files are 0600 and directories 0700: lease records hold
capabilities.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from broker.book import Maintenance
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


def write_files(items: Iterable[tuple[Path, bytes]]) -> None:
    """Atomically replace each file; all are durable when this returns.

    Temp files are written and fsynced first, then renamed, then each parent
    directory is fsynced once. On error the temp files are removed and the
    exception propagates (a rename already done stays: each file is still
    either old or new, never torn).
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
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
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


class ResourceLedger:
    """One key's records: its meta file and its lease files (``<key>.<hex>.json``)."""

    def __init__(self, state: StateDir, key: str):
        self.state = state
        self.key = key
        self._lease_name = re.compile(rf"^{re.escape(key)}\.[0-9a-f]{{32}}\.json$")

    def load(self) -> LedgerContents:
        """Read every record of this key; corrupt ones are moved to ``corrupt/`` and reported."""
        self.state.ensure()
        corrupt: list[tuple[Path, str]] = []
        meta = ResourceMeta(key=self.key)
        meta_path = self.state.resource_meta_path(self.key)
        if meta_path.exists():
            try:
                meta = ResourceMeta.model_validate(read_json(meta_path))
            except (OSError, ValueError, ValidationError) as exc:
                corrupt.append((self._move_aside(meta_path), _short_error(exc)))
        leases: list[Lease] = []
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
            leases.append(lease)
        return LedgerContents(meta=meta, leases=leases, corrupt=corrupt)

    def read_lease(self, lease_id: str) -> Lease | None:
        """A lease record from disk (for leases the book no longer keeps in memory)."""
        try:
            return Lease.model_validate(read_json(self.state.lease_path(lease_id)))
        except (OSError, ValueError, ValidationError):
            return None

    def write(self, leases: Iterable[Lease], meta: ResourceMeta | None = None) -> None:
        items = [(self.state.lease_path(lease.lease_id), lease.model_dump_json().encode()) for lease in leases]
        if meta is not None:
            items.append((self.state.resource_meta_path(self.key), meta.model_dump_json(indent=2).encode()))
        if items:
            write_files(items)

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
