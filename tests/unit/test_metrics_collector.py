"""Usage counters from lease records, and the collector read back from a fresh registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from broker.core.book import LeaseBook
from broker.core.usage import ResourceSnapshot, UsageCounters
from broker.http.metrics import BrokerCollector, MetricsBoard, RunStats
from broker.models import ReserveRequest

KEY = "firesim_u250"


def _book_with_history():
    book = LeaseBook(KEY)
    seen = UsageCounters()
    ids = iter(f"{KEY}.{i:032x}" for i in range(100))

    def run(outcome):
        for change in outcome.changes:
            seen.observe(change.event, change.lease)
        return outcome.result

    alice = run(
        book.reserve(ReserveRequest(resource=KEY, holder="alice", request_id="a", ttl_s=100), next(ids), 1000.0)
    )
    run(
        book.reserve(ReserveRequest(resource=KEY, holder="bob", request_id="b", wait=True, ttl_s=30), next(ids), 1010.0)
    )
    run(book.release(alice.lease_id, 1050.0))  # alice held 50 s; bob waited 40 s
    run(book.tick(1080.0))  # bob's 30 s ran out
    carol = run(book.reserve(ReserveRequest(resource=KEY, holder="carol", request_id="c"), next(ids), 1100.0))
    return book, seen, carol


def test_counters_from_records_equal_counters_from_changes():
    book, seen, _ = _book_with_history()
    leases = book.leases()
    rebuilt = UsageCounters.from_leases(leases)
    assert rebuilt == seen
    assert (seen.grants, seen.releases, seen.expirations) == (3, 1, 1)
    assert seen.leased_seconds == 50.0 + 30.0
    assert seen.wait.count == 3 and seen.wait.total == 40.0


def _snapshot(counters, granted_at=None, expires_at=None, state="free", seq=1, queue=0):
    return ResourceSnapshot(
        key=KEY, pid=1, seq=seq, state=state, queue_depth=queue, granted_at=granted_at, expires_at=expires_at,
        oldest_queued_at=None, maintenance_since=None, counters=counters,
    )  # fmt: skip


def test_leased_seconds_include_the_live_hold_but_never_step_back():
    counters = UsageCounters(leased_seconds=80.0)
    live = _snapshot(counters, granted_at=1100.0, expires_at=1160.0, state="leased")
    assert live.leased_seconds_total(1130.0) == 110.0
    assert live.leased_seconds_total(1200.0) == 140.0  # capped at expiry: the timer may be late
    ended = UsageCounters(leased_seconds=80.0 + 60.0)
    assert _snapshot(ended).leased_seconds_total(1200.0) == 140.0


def _scrape(board):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(board))
    return registry


def test_collector_serves_the_board_with_bounded_labels():
    _, seen, carol = _book_with_history()
    board = MetricsBoard()
    board.set_keys([KEY, "spacemit_x60_board_01"], "0.1.0")
    board.put(_snapshot(seen, granted_at=1100.0, expires_at=carol.expires_at, state="leased", queue=2), 5.0)
    registry = _scrape(board)
    value = registry.get_sample_value
    assert value("merlin_broker_resource_up", {"resource": KEY}) == 1.0
    assert value("merlin_broker_resource_leased", {"resource": KEY}) == 1.0
    assert value("merlin_broker_resource_state", {"resource": KEY, "state": "leased"}) == 1.0
    assert value("merlin_broker_resource_state", {"resource": KEY, "state": "free"}) == 0.0
    assert value("merlin_broker_queue_depth", {"resource": KEY}) == 2.0
    assert value("merlin_broker_lease_grants_total", {"resource": KEY}) == 3.0
    assert value("merlin_broker_lease_expirations_total", {"resource": KEY}) == 1.0
    assert value("merlin_broker_lease_wait_seconds_count", {"resource": KEY}) == 3.0
    assert value("merlin_broker_lease_hold_seconds_bucket", {"resource": KEY, "le": "60.0"}) == 2.0
    # never heard from the board: down, and no false zero counters
    assert value("merlin_broker_resource_up", {"resource": "spacemit_x60_board_01"}) == 0.0
    assert value("merlin_broker_resource_state", {"resource": "spacemit_x60_board_01", "state": "down"}) == 1.0
    assert value("merlin_broker_lease_grants_total", {"resource": "spacemit_x60_board_01"}) is None
    text = generate_latest(registry).decode()
    assert "alice" not in text and carol.lease_id not in text and "holder=" not in text


def test_a_down_actor_keeps_its_last_counters_and_shows_down():
    board = MetricsBoard()
    board.set_keys([KEY])
    board.put(_snapshot(UsageCounters(grants=7), state="free"), 5.0)
    board.set_up(KEY, False)
    value = _scrape(board).get_sample_value
    assert value("merlin_broker_resource_up", {"resource": KEY}) == 0.0
    assert value("merlin_broker_resource_state", {"resource": KEY, "state": "down"}) == 1.0
    assert value("merlin_broker_lease_grants_total", {"resource": KEY}) == 7.0


def test_older_snapshots_never_replace_newer_ones():
    board = MetricsBoard()
    board.set_keys([KEY])
    assert board.put(_snapshot(UsageCounters(grants=2), seq=2), 5.0)
    assert not board.put(_snapshot(UsageCounters(grants=1), seq=1), 5.0)
    assert board.put(_snapshot(UsageCounters(grants=2), seq=1), 9.0)  # a new actor life starts at seq 1
    assert board.snapshot(KEY).seq == 1


def test_run_families_exist_before_any_run():
    board = MetricsBoard()
    board.set_runs(RunStats())
    value = _scrape(board).get_sample_value
    assert value("merlin_broker_runs_total", {"status": "succeeded"}) == 0.0
    assert value("merlin_broker_runs_active") == 0.0
    assert value("merlin_broker_run_duration_seconds_count") == 0.0
