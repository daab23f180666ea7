"""Lease ids never reach the journal or the logs, even inside error texts and file names (issue 10, item 7)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from broker.core.book import LeaseBook
from broker.disk.journal import EventSink, redact_lease_ids
from broker.disk.store import DiskOps, ResourceLedger, StateDir
from broker.errors import LeaseNotFound, LeaseNotHeld
from broker.models import ReserveRequest, lease_ref

KEY = "firesim_u250"


class FullDisk(DiskOps):
    """A disk with no room for new files: open(O_CREAT) fails as the kernel reports it (with the name)."""

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_CREAT and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return super().open(path, flags, mode)


def _every_file_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_ledger_failures_and_corrupt_records_are_journaled_without_lease_ids(tmp_path):
    state = StateDir(tmp_path / "state").ensure()
    events = EventSink(state.events_path, f"resource:{KEY}", state.logs_dir)
    deferred: list = []
    ledger = ResourceLedger(state, KEY, defer=deferred.append, disk=FullDisk())
    book = LeaseBook(KEY)
    granted = book.reserve(ReserveRequest(resource=KEY, holder="alice", request_id="r1"), f"{KEY}.{7:032x}", 1.0)
    lease_id = granted.result.lease_id
    ledger.write(granted.changed_leases)  # durable in the log; the record file cannot be written
    for work in deferred:
        try:
            work()
        except OSError as exc:  # what resource:<key> does with it
            assert lease_id in str(exc)  # the kernel's text names the temp file
            events.emit("ledger.files_behind", level="error", resource=KEY, error=str(exc))
    other = f"{KEY}.{8:032x}"
    state.lease_path(other).write_text("{not json")
    contents = ResourceLedger(state, KEY).load()
    for moved_to, error in contents.corrupt:
        assert other in str(moved_to)
        events.emit("ledger.corrupt_record", level="error", resource=KEY, moved_to=str(moved_to), error=error)
    lost = LeaseNotHeld(lease_id, "revoked", "revoked by bob")
    events.emit("run.finished", run_id="run-1", status="failed", reason=f"refused: {lost}", extra=[lease_id])
    events.emit("lease.lookup_failed", error=str(LeaseNotFound(other)))
    logged = _every_file_text(state.logs_dir) + _every_file_text(state.root / "events.jsonl")
    assert "ledger.files_behind" in logged and "ledger.corrupt_record" in logged
    assert lease_id not in logged and other not in logged
    assert f"lease:{lease_ref(lease_id)}" in logged and lease_ref(other) in logged


def test_error_messages_name_the_lease_by_its_key_and_ref():
    lease_id = f"{KEY}.{'ab' * 16}"
    for error in (LeaseNotHeld(lease_id, "expired", "its TTL ran out"), LeaseNotFound(lease_id)):
        assert lease_id not in str(error) and lease_ref(lease_id) in str(error) and KEY in str(error)
        assert error.lease_id == lease_id  # the caller's own id stays on the error object


def test_redaction_keeps_other_text_and_nested_values():
    lease_id = f"{KEY}.{'0f' * 16}"
    assert redact_lease_ids("a sha256 of 64 hex: " + "ab" * 32) == "a sha256 of 64 hex: " + "ab" * 32
    assert redact_lease_ids({"a": [f"x {lease_id} y"], "n": 3}) == {"a": [f"x lease:{lease_ref(lease_id)} y"], "n": 3}
