"""The state dir on disk: its layout, atomic writes, and each key's lease ledger.

Layout (a contract: README "State on disk")::

    cluster/bootstrap.json            how the local cluster was started
    resources/<key>.json              fencing floor, maintenance flag
    resources/<key>.wal               the key's write-ahead log (emptied at each checkpoint)
    resources/leases/<lease_id>.json  one record per lease, its whole history
    runs/<run_id>/...                 run records
    events.jsonl                      the audit journal

A key's changes are durable when their record in its write-ahead log
(framed: length + CRC32) is fdatasynced, before the caller hears back; record
files are replaced by temp file + rename (whole, never torn) and synced at
checkpoints. Other
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
import zlib
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
    "DiskOps",
    "OS_DISK",
    "frame_record",
    "read_log",
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


class DiskOps:
    """The file operations the ledger and :func:`write_files` make: the OS, one call each.

    The seam exists for one second implementation: the fault-injecting disk of
    ``tests/unit/test_wal_faults.py`` (short writes, failed syncs, power loss).
    """

    def open(self, path: Path, flags: int, mode: int = FILE_MODE) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, source: Path, target: Path) -> None:
        os.replace(source, target)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_bytes(self, path: Path) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()


OS_DISK = DiskOps()


def write_files(items: Iterable[tuple[Path, bytes]], *, durable: bool = True, disk: DiskOps = OS_DISK) -> None:
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
            fd = disk.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            staged.append((tmp, path))
            try:
                view = memoryview(data)
                while view:
                    view = view[disk.write(fd, view) :]
                if durable:
                    disk.fsync(fd)
            finally:
                disk.close(fd)
        for tmp, path in staged:
            disk.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                disk.unlink(tmp)
        raise
    if not durable:
        return
    for directory in {path.parent for _, path in staged}:
        disk.fsync_dir(directory)


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
    meta: ResourceMeta  # its fencing_counter: the highest token any source on disk knows of
    leases: list[Lease]
    corrupt: list[tuple[Path, str]] = field(default_factory=list)  # (moved-to path, error)
    replayed: set[str] = field(default_factory=set)  # lease ids the log changed
    meta_replayed: bool = False
    meta_behind: bool = False  # resources/<key>.json holds a lower fencing floor than the other sources
    torn_bytes: int = 0  # bytes after the log's last good record (an append that never returned)


# One log record: b"W1 <payload length> <crc32 of the payload, 8 hex> <payload>\n"; the payload is
# JSON {"leases": [...], "meta": {...} (optional), "fence": <highest fencing token so far>}. The
# header makes a record self-delimiting and checked; the newline keeps the log readable with cat.
_FRAME_MAGIC = b"W1 "
_FRAME_HEADER = re.compile(rb"W1 ([0-9]{1,10}) ([0-9a-f]{8}) ")
_OLD_RECORD_START = b'{"leases":['


def frame_record(payload: bytes) -> bytes:
    """One log record around ``payload`` (the JSON of one command's changes)."""
    return b"%s%d %08x %s\n" % (_FRAME_MAGIC, len(payload), zlib.crc32(payload), payload)


@dataclass(frozen=True)
class _Staged:
    """An appended record waiting for its sync, and the file updates it brings once durable."""

    end: int  # the log's size with this record in it
    leases: list[Lease]
    meta: ResourceMeta | None
    fence: int


@dataclass(frozen=True)
class _Record:
    leases: list[Lease]
    meta: ResourceMeta | None
    fence: int


def _decode(payload: bytes) -> _Record:
    record = json.loads(payload)
    leases = [Lease.model_validate(item) for item in record["leases"]]
    meta = ResourceMeta.model_validate(record["meta"]) if record.get("meta") else None
    fence = record.get("fence", 0)
    if isinstance(fence, bool) or not isinstance(fence, int):
        raise ValueError("fence must be an integer")
    return _Record(leases, meta, fence)


def _decode_old_line(line: bytes) -> _Record | None:
    """An old-format line, or the whole record a later append glued to a torn one."""
    for start in dict.fromkeys((0, line.rfind(_OLD_RECORD_START))):
        if start < 0:
            continue
        try:
            return _decode(line[start:])
        except (ValueError, KeyError, TypeError, ValidationError):
            continue
    return None


def read_log(raw: bytes) -> tuple[list[_Record], int]:
    """The log's records in order, and the offset just after the last good one.

    A framed record that is cut short or fails its checksum ends the log: an
    append that fails is cut back to the last good record before its error
    is returned, so nothing acknowledged ever lies behind a bad record.
    Old-format lines (bare JSON, written before the framing) could hold
    acknowledged lines behind a torn one, so a bad old line is skipped and
    any whole record a later append glued to its end is kept.
    """
    records: list[_Record] = []
    offset = good = 0
    while offset < len(raw):
        if raw.startswith(_FRAME_MAGIC, offset):
            match = _FRAME_HEADER.match(raw, offset)
            if match is None:
                break
            start = match.end()
            end = start + int(match.group(1))
            payload = raw[start:end]
            if raw[end : end + 1] != b"\n" or zlib.crc32(payload) != int(match.group(2), 16):
                break
            try:
                records.append(_decode(payload))
            except (ValueError, KeyError, TypeError, ValidationError):
                break
            offset = good = end + 1
        elif raw.startswith(b"{", offset) or raw.startswith(b"\n", offset):
            newline = raw.find(b"\n", offset)
            if newline < 0:
                break  # a torn last line: never acknowledged
            old = _decode_old_line(raw[offset:newline]) if newline > offset else None
            if old is not None:
                records.append(old)
            offset = good = newline + 1
        else:
            break
    return records, good


class ResourceLedger:
    """One key's records: a write-ahead log, its lease files (``<key>.<hex>.json``) and its meta file.

    A change is durable when its record in ``resources/<key>.wal`` is written
    and fdatasynced — one small append and one sync, where rewriting each
    record durably costs a file fsync, a rename and a directory fsync per
    file (0.42 ms each measured here; the log append: ~0.1 ms). The lease and
    meta files are then replaced atomically without a sync, so they are
    always whole and, after any process crash, current; after a power loss
    the log brings them back. On load the log is replayed over the files,
    the files are rewritten durably, and the log starts empty; it is also
    checkpointed (each file written since is fsynced, then the log is
    emptied) every ``CHECKPOINT_RECORDS`` records.

    Each record is framed (length + CRC32, see :func:`frame_record`). An
    append that fails (short write, full disk, failed sync) is cut back to
    the last good record before the error reaches the caller, and no append
    is made while that cut is not on disk; so replay, which stops at the
    first bad record, never drops an acknowledged one. Every record carries
    the key's highest fencing token, and each checkpoint writes it to the
    meta file durably: a lost lease record cannot lower the fencing floor.
    """

    CHECKPOINT_RECORDS = 4096

    def __init__(
        self,
        state: StateDir,
        key: str,
        defer: Callable[[Callable[[], None]], Any] | None = None,
        disk: DiskOps = OS_DISK,
    ):
        """``defer`` (the actor's ``loop.call_soon``) moves the file updates after the answer."""
        self.state = state
        self.key = key
        self._defer = defer
        self._disk = disk
        self._pending: dict[Path, bytes] = {}  # file updates not yet written (the log has them)
        self._flush_scheduled = False
        self._unsynced: set[Path] = set()  # files whose content only the log holds durably
        self._lease_name = re.compile(rf"^{re.escape(key)}\.[0-9a-f]{{32}}\.json$")
        self.wal_path = state.resources_dir / f"{key}.wal"
        self._wal_fd: int | None = None
        self._wal_size: int | None = None  # end of the last good record appended; None: read it from the file
        self._durable_size: int | None = None  # end of the last record known synced (<= _wal_size)
        self._staged: list[_Staged] = []  # records appended, in order, not yet synced
        self._syncing = False  # a sync of the log is in flight (its fd must stay open)
        self._durable_fence = 0
        self._wal_cut_pending = False  # a failed append's cut-back is not yet on disk
        self._wal_name_synced = False  # its directory entry: synced once per life (it may be new)
        self._wal_records = 0
        self._fence = 0  # the highest fencing token on disk (the floor the records carry)
        self._meta: ResourceMeta | None = None  # the latest meta (for the periodic checkpoint)
        self._replay_synced = True

    @property
    def staged(self) -> int:
        """How many appended records wait for a sync (:meth:`sync_begin`)."""
        return len(self._staged)

    @property
    def cut_pending(self) -> bool:
        """A failed append is still in the log (cutting it back failed too); no append is made until it is cut."""
        return self._wal_cut_pending

    def load(self) -> LedgerContents:
        """Read every record of this key, replay the log over them; corrupt files go to ``corrupt/``."""
        return self._load(durable_only=False)

    def reload(self) -> LedgerContents:
        """What is on disk now, after a failed sync: the log up to its last synced record only.

        The failed records were cut from the log, or are still in it if that cut failed
        too; either way they are not read back (nobody was told of them).
        """
        return self._load(durable_only=True)

    def _load(self, *, durable_only: bool) -> LedgerContents:
        if self._staged or self._syncing:
            raise RuntimeError("load with records not yet synced")
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
        try:
            raw = self.wal_path.read_bytes()
        except FileNotFoundError:
            raw = b""
        if durable_only and self._durable_size is not None:
            raw = raw[: self._durable_size]
        records, good = read_log(raw)
        # What is replayed must be on disk before anyone is told of it: a record in the page
        # cache only (its sync failed, and so did cutting it back) would be served, then lost.
        self._replay_synced = durable_only or not records or self._sync_log()
        replayed: set[str] = set()
        replayed_meta: ResourceMeta | None = None
        fence = meta.fencing_counter
        for record in records:
            for lease in record.leases:
                if lease.resource == self.key:
                    leases[lease.lease_id] = lease
                    replayed.add(lease.lease_id)
            replayed_meta = record.meta or replayed_meta
            fence = max(fence, record.fence, record.meta.fencing_counter if record.meta else 0)
        fence = max([fence] + [lease.fencing_token or 0 for lease in leases.values()])
        current = (replayed_meta or meta).model_copy(update={"fencing_counter": fence})
        self._wal_size, self._fence, self._meta = good, fence, current
        self._durable_size, self._durable_fence = good, fence
        return LedgerContents(
            meta=current,
            leases=list(leases.values()),
            corrupt=corrupt,
            replayed=replayed,
            meta_replayed=replayed_meta is not None,
            meta_behind=fence > meta.fencing_counter,
            torn_bytes=len(raw) - good,
        )

    @property
    def replay_synced(self) -> bool:
        """Whether the log replayed at the last load is known to be on disk (its fsync succeeded)."""
        return self._replay_synced

    def _sync_log(self) -> bool:
        try:
            fd = self._disk.open(self.wal_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            self._disk.fsync(fd)
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                self._disk.close(fd)

    def checkpoint(self, contents: LedgerContents) -> None:
        """Make the files hold what the log says, durably; then empty the log."""
        replayed = [lease for lease in contents.leases if lease.lease_id in contents.replayed]
        items = [(self.state.lease_path(lease.lease_id), lease.model_dump_json().encode()) for lease in replayed]
        if contents.meta_replayed or contents.meta_behind:
            items.append((self.state.resource_meta_path(self.key), contents.meta.model_dump_json(indent=2).encode()))
        # Until the log is emptied, these files are the log's to make durable: if this fails, a
        # later checkpoint writes and syncs them before it empties the log.
        self._unsynced.update(path for path, _ in items)
        try:
            if items:
                write_files(items, disk=self._disk)
            self._truncate_log()
        except OSError:
            self._pending = {**dict(items), **self._pending}
            raise

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
        """Make one command's changes durable (append, then sync at once), then update the files.

        For callers with nothing else in flight (a start, a test); the resource actor's calls
        go through :class:`~broker.disk.group_commit.GroupCommitter`, which syncs in groups.

        Raises:
            OSError: the log could not be written; nothing is durable (the log
                was cut back to its last good record), the caller rolls back.
        """
        if self._staged or self._syncing:
            raise RuntimeError("write() while records wait for a group sync")
        if not self.append(leases, meta):
            return
        try:
            self.sync_begin()()
        except BaseException:
            self.sync_failed()
            raise
        self.synced(1)

    def append(self, leases: Iterable[Lease], meta: ResourceMeta | None = None) -> bool:
        """Append one command's record to the log, not synced yet; False if it changed nothing.

        The record is durable once a sync begun after this returns (:meth:`sync_begin`);
        until then the file updates it implies wait too.

        Raises:
            OSError: the record could not be appended; the log was cut back to the
                records appended before it (they stay), the caller rolls back.
        """
        leases = list(leases)
        if not leases and meta is None:
            return False
        fence = max(
            [self._fence, meta.fencing_counter if meta is not None else 0]
            + [lease.fencing_token or 0 for lease in leases]
        )
        payload = '{"leases":[' + ",".join(lease.model_dump_json() for lease in leases) + "]"
        if meta is not None:
            payload += f',"meta":{meta.model_dump_json()}'
        payload += f',"fence":{fence}}}'
        self._append(frame_record(payload.encode()))
        self._fence = fence
        self._staged.append(_Staged(self._wal_size or 0, leases, meta, fence))
        return True

    def sync_begin(self) -> Callable[[], None]:
        """The sync of every record staged now, to run anywhere (a worker thread); then :meth:`synced`.

        Until :meth:`synced` or :meth:`sync_failed`, the log's fd stays open and appends
        may go on (they are not covered by this sync).

        Raises:
            OSError: the log cannot be opened; call :meth:`sync_failed`.
        """
        fd = self._log()
        self._syncing = True
        disk = self._disk
        return lambda: disk.fdatasync(fd)

    def synced(self, count: int) -> None:
        """The sync returned: the first ``count`` staged records are durable; update the files."""
        self._syncing = False
        done, self._staged = self._staged[:count], self._staged[count:]
        if not done:
            return
        # Durable now: nothing below may fail the callers. The files are views of the log.
        self._durable_size, self._durable_fence = done[-1].end, done[-1].fence
        for record in done:
            for lease in record.leases:
                self._pending[self.state.lease_path(lease.lease_id)] = lease.model_dump_json().encode()
            if record.meta is not None:
                self._meta = record.meta
                self._pending[self.state.resource_meta_path(self.key)] = record.meta.model_dump_json(indent=2).encode()
        self._unsynced.update(self._pending)
        if self._defer is None:
            with contextlib.suppress(OSError):  # kept pending: the next flush or load writes them
                self.flush()
        elif not self._flush_scheduled:  # also after a failed flush: it is tried again
            self._flush_scheduled = True
            self._defer(self.flush)
        self._wal_records += len(done)
        # A checkpoint empties the log: only when no record waits in it for a sync.
        if self._wal_records >= self.CHECKPOINT_RECORDS and not self._staged:
            with contextlib.suppress(OSError):  # the log keeps everything; the next record tries again
                self._checkpoint_files()

    def sync_failed(self) -> int:
        """The sync failed (or never began): every staged record is dropped and cut from the log.

        Returns how many were dropped. Their callers must be told they failed.
        """
        self._syncing = False
        dropped, self._staged = len(self._staged), []
        self._wal_size, self._fence = self._durable_size, self._durable_fence
        if self._wal_fd is None:
            self._wal_cut_pending = True  # cut when the log is next opened
        self._cut_back()
        return dropped

    def flush(self) -> None:
        """Write the pending file updates (not synced: the log holds them until a checkpoint)."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            write_files(pending.items(), durable=False, disk=self._disk)
        except OSError:
            # The log has every change; a later load replays it. Keep them for the next try.
            self._pending = {**pending, **self._pending}
            raise

    def _checkpoint_files(self) -> None:
        """Every file written since the last checkpoint onto the disk, then an empty log."""
        self.flush()
        if self._meta is not None:  # the floor goes into the meta file, so it outlives the log
            meta = self._meta.model_copy(update={"fencing_counter": self._fence, "updated_at": time.time()})
            path = self.state.resource_meta_path(self.key)
            write_files([(path, meta.model_dump_json(indent=2).encode())], disk=self._disk)
            self._unsynced.discard(path)
        for path in sorted(self._unsynced):
            fd = self._disk.open(path, os.O_RDONLY)
            try:
                self._disk.fsync(fd)
            finally:
                self._disk.close(fd)
        for directory in {path.parent for path in self._unsynced}:
            self._disk.fsync_dir(directory)
        self._truncate_log()

    def _append(self, data: bytes) -> None:
        """Append one record (no sync); on any failure cut the log back first, then raise."""
        fd = self._log()
        try:
            view = memoryview(data)
            while view:
                view = view[self._disk.write(fd, view) :]
        except BaseException:
            self._cut_back()
            raise
        self._wal_size = (self._wal_size or 0) + len(data)

    def _cut_back(self) -> None:
        """Truncate the log to its last good record, durably; if that fails, the next append retries it."""
        fd = self._wal_fd
        if fd is None:
            return
        # Reopened next time (after a failed sync the fd is suspect), unless a sync in a
        # worker thread still uses it: then it stays, and the next append retries a failed cut.
        close = not self._syncing
        if close:
            self._wal_fd = None
        self._wal_cut_pending = True
        try:
            self._disk.ftruncate(fd, self._wal_size or 0)
            self._disk.fsync(fd)
            self._wal_cut_pending = False
        except OSError:
            self._wal_cut_pending = True  # still pending: no append until a later cut succeeds
        finally:
            if close:
                with contextlib.suppress(OSError):
                    self._disk.close(fd)

    def _log(self) -> int:
        """The log's fd, opened with anything after its last good record cut off (durably)."""
        if self._wal_fd is not None:
            if self._wal_cut_pending:  # a failed append's cut, retried (the fd stayed open for a sync)
                self._disk.ftruncate(self._wal_fd, self._wal_size or 0)
                self._disk.fsync(self._wal_fd)
                self._wal_cut_pending = False
            return self._wal_fd
        if self._wal_size is None:  # not loaded: the good part is what a replay would read
            try:
                self._wal_size = read_log(self._disk.read_bytes(self.wal_path))[1]
            except FileNotFoundError:
                self._wal_size = 0
            self._durable_size = self._wal_size
        fd = self._disk.open(self.wal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            if not self._wal_name_synced:  # the log's name must survive a power loss, not only its bytes
                self._disk.fsync_dir(self.wal_path.parent)
                self._wal_name_synced = True
            if self._wal_cut_pending or os.fstat(fd).st_size != self._wal_size:
                self._disk.ftruncate(fd, self._wal_size)
                self._disk.fsync(fd)
                self._wal_cut_pending = False
        except BaseException:
            with contextlib.suppress(OSError):
                self._disk.close(fd)
            raise
        self._wal_fd = fd
        return fd

    def _truncate_log(self) -> None:
        fd = self._log()
        try:
            self._disk.ftruncate(fd, 0)
            self._disk.fsync(fd)
        except BaseException:
            # Where the file ends now is unknown: read it again before the next append.
            self._wal_fd, self._wal_size, self._durable_size = None, None, None
            with contextlib.suppress(OSError):
                self._disk.close(fd)
            raise
        self._wal_size = self._durable_size = 0
        self._wal_records = 0
        self._unsynced.clear()

    def _move_aside(self, path: Path) -> Path:
        self.state.corrupt_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        target = self.state.corrupt_dir / f"{path.name}.{int(time.time() * 1000)}"
        try:
            self._disk.replace(path, target)
        except OSError:
            return path  # cannot move it (read-only disk): it stays, and is skipped again next load
        return target


def _short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
