"""The ledger on disk and the journal: atomic, private, recoverable, ordered across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
import sys

import pytest

from broker.core.book import LeaseBook
from broker.disk.journal import Journal, read_journal
from broker.disk.store import ResourceLedger, ResourceMeta, StateDir, write_files
from broker.models import Lease, ReserveRequest

KEY = "spacemit_x60_board_01"


def _granted_lease(book: LeaseBook, holder: str, now: float):
    request = ReserveRequest(resource=KEY, holder=holder, request_id=f"r-{holder}")
    return book.reserve(request, f"{KEY}.{abs(hash(holder)) % 16**32:032x}", now)


def test_ledger_round_trip_restores_the_book(tmp_path):
    state = StateDir(tmp_path).ensure()
    ledger = ResourceLedger(state, KEY)
    book = LeaseBook(KEY)
    outcome = _granted_lease(book, "alice", 100.0)
    ledger.write(outcome.changed_leases, ResourceMeta(key=KEY, fencing_counter=1))
    contents = ledger.load()
    assert contents.corrupt == [] and contents.meta.fencing_counter == 1
    restored, _ = LeaseBook.restore(KEY, contents.leases, now=101.0)
    assert restored.granted == outcome.result


def test_files_are_private(tmp_path):
    state = StateDir(tmp_path / "state").ensure()
    ledger = ResourceLedger(state, KEY)
    ledger.write(_granted_lease(LeaseBook(KEY), "alice", 1.0).changed_leases)
    for directory in (state.root, state.resources_dir, state.leases_dir):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in state.leases_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.json"
    write_files([(target, b"old")])
    missing_dir = tmp_path / "nope" / "b.json"
    with pytest.raises(OSError):
        write_files([(target, b"new"), (missing_dir, b"x")])
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_corrupt_and_truncated_records_are_moved_aside_and_reported(tmp_path):
    state = StateDir(tmp_path).ensure()
    ledger = ResourceLedger(state, KEY)
    good = _granted_lease(LeaseBook(KEY), "alice", 1.0).result
    ledger.write([good])
    (state.leases_dir / f"{KEY}.{'e' * 32}.json").write_text('{"lease_id": "trunc')
    (state.resource_meta_path(KEY)).write_text("not json")
    contents = ledger.load()
    assert [lease.lease_id for lease in contents.leases] == [good.lease_id]
    assert len(contents.corrupt) == 2
    assert all(path.parent == state.corrupt_dir for path, _ in contents.corrupt)
    assert ledger.load().corrupt == []  # moved, so the next start is clean


def test_a_key_only_reads_its_own_records(tmp_path):
    state = StateDir(tmp_path).ensure()
    (state.leases_dir / f"{KEY}.extra.{'0' * 32}.json").write_text("{}")  # key "<KEY>.extra"
    assert ResourceLedger(state, KEY).load().leases == []


def _append_many(path, count):
    journal = Journal(path)
    for index in range(count):
        journal.append("test.event", {"pid": os.getpid(), "index": index})


def test_journal_sequence_is_gap_free_across_processes(tmp_path):
    path = tmp_path / "events.jsonl"
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_append_many, args=(path, 200)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    seqs = [record["seq"] for record in read_journal(path)]
    assert sorted(seqs) == list(range(1, 801))
    assert seqs == sorted(seqs)  # file order is seq order


def test_journal_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    Journal(path).append("a", {})
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 2, "event": "torn')  # a writer killed mid-line
    record = Journal(path).append("b", {})
    assert record["seq"] == 2
    assert [r["event"] for r in read_journal(path)] == ["a", "b"]


def test_pure_core_imports_no_ray():
    code = (
        "import sys, broker, broker.core.book, broker.models, broker.disk.store, broker.core.catalog, broker.disk.journal, "
        "broker.core.durations, broker.seam.cluster; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_event_sink_logs_json_lines_to_its_own_file_and_journals_the_same_event(tmp_path):
    from broker.disk.journal import EventSink

    sink = EventSink(tmp_path / "events.jsonl", "resource:firesim_u250", tmp_path / "logs")
    sink.emit("lease.granted", resource="firesim_u250", holder="alice", lease="abc123", run_id=None)
    log_path = tmp_path / "logs" / "resource-firesim_u250.log"
    logged = json.loads(log_path.read_text().splitlines()[-1])
    assert logged["event"] == "lease.granted" and logged["holder"] == "alice" and logged["level"] == "info"
    assert "run_id" not in logged  # None fields are left out
    (journaled,) = list(read_journal(tmp_path / "events.jsonl"))
    assert journaled["event"] == "lease.granted" and journaled["source"] == "resource:firesim_u250"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600


def test_event_sink_without_a_log_dir_uses_structlog(tmp_path):
    from structlog.testing import capture_logs

    from broker.disk.journal import EventSink

    sink = EventSink(tmp_path / "events.jsonl", "broker")
    with capture_logs() as logs:
        sink.emit("run.started", run_id="run-1", resource="k")
    assert logs[0]["event"] == "run.started" and logs[0]["run_id"] == "run-1"


def test_the_log_is_the_authority_until_a_checkpoint(tmp_path):
    state = StateDir(tmp_path).ensure()
    ledger = ResourceLedger(state, KEY)
    book = LeaseBook(KEY)
    granted = _granted_lease(book, "alice", 100.0)
    ledger.write(granted.changed_leases)
    released = book.release(granted.result.lease_id, 101.0)
    ledger.write(released.changed_leases)
    state.lease_path(granted.result.lease_id).write_text("{}")  # the view is damaged
    with open(ledger.wal_path, "ab") as handle:
        handle.write(b'{"leases":[{"lease_id": "torn')  # a write that was never acknowledged
    contents = ResourceLedger(state, KEY).load()
    (lease,) = contents.leases
    assert lease.state.value == "released" and lease.lease_id in contents.replayed
    assert len(contents.corrupt) == 1  # the damaged view, moved aside
    fresh = ResourceLedger(state, KEY)
    fresh.checkpoint(contents)
    assert ledger.wal_path.read_bytes() == b""
    assert json.loads(state.lease_path(lease.lease_id).read_text())["state"] == "released"
    assert [record.state.value for record in ResourceLedger(state, KEY).load().leases] == ["released"]


def test_deferred_file_updates_are_readable_before_they_are_written(tmp_path):
    state = StateDir(tmp_path).ensure()
    deferred: list = []
    ledger = ResourceLedger(state, KEY, defer=deferred.append)
    outcome = _granted_lease(LeaseBook(KEY), "alice", 100.0)
    ledger.write(outcome.changed_leases)
    assert not state.lease_path(outcome.result.lease_id).exists()
    assert ledger.read_lease(outcome.result.lease_id) == outcome.result
    (flush,) = deferred
    flush()
    assert Lease.model_validate_json(state.lease_path(outcome.result.lease_id).read_text()) == outcome.result
