"""End reasons and event names are enums everywhere, and records written before them still load and count."""

from __future__ import annotations

import json

import pytest

from broker.core.book import WAIT_TIMED_OUT, LeaseBook
from broker.core.history import summarize_usage
from broker.core.usage import UsageCounters
from broker.disk.journal import EventSink, read_journal
from broker.models import EndReason, Lease, ReserveRequest

KEY = "radiance_sim_lane_a"

# Lease records exactly as the broker wrote them before the enums (no "unclaimed" field either).
OLD_RECORDS = [
    {
        "lease_id": f"{KEY}.{'1' * 32}", "resource": KEY, "holder": "ci", "state": "cancelled",
        "fencing_token": None, "priority": 0, "seq": 2, "ttl_s": 600.0, "queued_at": 100.0,
        "granted_at": None, "expires_at": None, "wait_deadline": None, "note": "", "request_id": "ci-1",
        "ended_at": 130.0, "end_reason": "wait timed out", "ended_by": "", "end_request_id": None,
        "renewals": 0, "must_end_by": None, "warn_at": None,
        "history": [
            {"state": "queued", "at": 100.0, "reason": "", "by": ""},
            {"state": "cancelled", "at": 130.0, "reason": "wait timed out", "by": ""},
        ],
    },
    {
        "lease_id": f"{KEY}.{'2' * 32}", "resource": KEY, "holder": "alice", "state": "expired",
        "fencing_token": 1, "priority": 0, "seq": 1, "ttl_s": 60.0, "queued_at": 90.0,
        "granted_at": 90.0, "expires_at": 150.0, "wait_deadline": None, "note": "", "request_id": "a-1",
        "ended_at": 150.0, "end_reason": "ttl elapsed", "ended_by": "", "end_request_id": None,
        "renewals": 0, "must_end_by": None, "warn_at": None, "history": [],
    },
    {
        "lease_id": f"{KEY}.{'3' * 32}", "resource": KEY, "holder": "bob", "state": "revoked",
        "fencing_token": 2, "priority": 0, "seq": 3, "ttl_s": 60.0, "queued_at": 150.0,
        "granted_at": 150.0, "expires_at": 210.0, "wait_deadline": None, "note": "", "request_id": "b-1",
        "ended_at": 160.0, "end_reason": "board on fire", "ended_by": "admin", "end_request_id": None,
        "renewals": 0, "must_end_by": None, "warn_at": None, "history": [],
    },
]  # fmt: skip


def test_old_lease_records_load_as_members_and_count():
    leases = [Lease.model_validate_json(json.dumps(record)) for record in OLD_RECORDS]
    timed_out, expired, revoked = leases
    assert timed_out.end_reason is EndReason.WAIT_TIMED_OUT and timed_out.history[1].reason is WAIT_TIMED_OUT
    assert expired.end_reason is EndReason.TTL_ELAPSED and not expired.unclaimed
    assert revoked.end_reason == "board on fire" and EndReason.of(revoked.end_reason) is None  # an admin's text
    counters = UsageCounters.from_leases(leases)
    assert (counters.wait_timeouts, counters.cancellations, counters.expirations, counters.revocations) == (1, 1, 1, 1)
    restored, _ = LeaseBook.restore(KEY, leases, now=170.0)
    assert restored.fencing_counter == 2 and restored.get(timed_out.lease_id).end_reason is EndReason.WAIT_TIMED_OUT


def test_the_persisted_form_is_the_old_text():
    lease = Lease.model_validate(OLD_RECORDS[0])
    written = json.loads(lease.model_dump_json())
    assert written["end_reason"] == "wait timed out" and written["history"][1]["reason"] == "wait timed out"
    assert {key: written[key] for key in OLD_RECORDS[0]} == OLD_RECORDS[0]


def test_every_end_reason_the_book_writes_reads_back_as_itself():
    for reason in EndReason:
        record = {**OLD_RECORDS[0], "end_reason": reason.value}
        assert Lease.model_validate_json(json.dumps(record)).end_reason is reason


def test_old_journal_lines_still_count_in_the_history(tmp_path):
    lines = [
        {"seq": 1, "ts": 100.0, "event": "lease.granted", "resource": KEY, "lease": "a", "holder": "alice", "wait_s": 0},
        {"seq": 2, "ts": 130.0, "event": "lease.cancelled", "resource": KEY, "lease": "c", "holder": "ci",
         "reason": "wait timed out"},
        {"seq": 3, "ts": 150.0, "event": "lease.expired", "resource": KEY, "lease": "a", "holder": "alice",
         "reason": "ttl elapsed"},
        {"seq": 4, "ts": 155.0, "event": "run.started", "resource": KEY, "run_id": "r1"},
    ]  # fmt: skip
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    history = summarize_usage(read_journal(path), KEY, since=0.0, until=200.0)
    assert (history.grants, history.expired, history.wait_timeouts, history.held_s) == (1, 1, 1, 50.0)


def test_events_the_shell_emits_are_journaled_as_their_names(tmp_path):
    book = LeaseBook(KEY)
    request = ReserveRequest(resource=KEY, holder="alice", request_id="a", ttl_s=10)
    outcome = book.reserve(request, f"{KEY}.{'4' * 32}", 100.0)
    tick = book.tick(111.0)
    sink = EventSink(tmp_path / "events.jsonl", f"resource:{KEY}", tmp_path / "logs")
    for change in outcome.changes + tick.changes:
        sink.emit(change.event, resource=KEY, lease=change.lease.ref, holder="alice", reason=change.lease.end_reason)
    sink.close()
    written = list(read_journal(tmp_path / "events.jsonl"))
    assert [record["event"] for record in written] == ["lease.granted", "lease.expired"]
    assert written[1]["reason"] == "ttl elapsed"
    history = summarize_usage(written, KEY, since=0.0, until=200.0)
    assert (history.grants, history.expired) == (1, 1)


def test_counting_an_event_name_that_does_not_exist_fails_loudly():
    lease = Lease.model_validate(OLD_RECORDS[1])
    counters = UsageCounters()
    counters.observe("lease.granted", lease)  # a journal's text is the same event
    assert counters.grants == 1
    with pytest.raises(ValueError):
        counters.observe("lease.grantd", lease)  # type: ignore[arg-type]
