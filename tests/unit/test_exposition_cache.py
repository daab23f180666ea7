"""The cached /metrics exposition: rebuilt when the board changes, current at every scrape."""

from __future__ import annotations

import types

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from broker.core.usage import ResourceSnapshot, UsageCounters
from broker.http import metrics
from broker.http.metrics import BrokerCollector, Exposition, MetricsBoard, RunStats

KEYS = ["firesim_u250", "spacemit_x60_board_01"]


def _snapshot(key=KEYS[0], seq=1, grants=0, granted_at=None, expires_at=None, state="free", queued_at=None):
    return ResourceSnapshot(
        key=key, pid=7, seq=seq, state=state, queue_depth=1 if queued_at else 0, granted_at=granted_at,
        expires_at=expires_at, oldest_queued_at=queued_at, maintenance_since=None,
        counters=UsageCounters(grants=grants),
    )  # fmt: skip


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def _value(exposition: Exposition, name: str, **labels: str) -> float | None:
    return _samples(exposition.render()).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(time=lambda: now[0]))
    return now


@pytest.fixture
def board() -> MetricsBoard:
    board = MetricsBoard()
    board.set_keys(KEYS, "0.1.0")
    board.set_runs(RunStats())
    board.put(_snapshot(grants=2), 5.0)
    return board


def test_the_cached_exposition_serves_what_a_fresh_registry_collects(board, clock):
    board.put(_snapshot(KEYS[1], grants=1, granted_at=990.0, expires_at=1100.0, state="leased"), 5.0)
    fresh = CollectorRegistry(auto_describe=False)
    fresh.register(BrokerCollector(board))
    exposition = Exposition(board)
    served = _samples(exposition.render())
    from prometheus_client import generate_latest

    assert served == _samples(generate_latest(fresh))
    assert served[("merlin_broker_lease_grants_total", (("resource", KEYS[0]),))] == 2.0
    assert served[("merlin_broker_resource_state", (("resource", KEYS[1]), ("state", "leased")))] == 1.0


def test_an_unchanged_board_is_not_rebuilt(board, clock):
    exposition = Exposition(board)
    first = exposition.render()
    for _ in range(5):
        assert exposition.render() == first
    assert exposition.rebuilds == 1


def test_a_periodic_pull_with_the_same_state_is_not_a_change(board, clock):
    exposition = Exposition(board)
    exposition.render()
    assert board.put(_snapshot(seq=2, grants=2), 5.0)  # newer, same content
    board.set_up(KEYS[0], True)  # already up
    exposition.render()
    assert exposition.rebuilds == 1


@pytest.mark.parametrize(
    "change, name, labels, expected",
    [
        (
            lambda b: b.put(_snapshot(seq=2, grants=3), 5.0),
            "merlin_broker_lease_grants_total",
            {"resource": KEYS[0]},
            3.0,
        ),
        (lambda b: b.set_up(KEYS[0], False), "merlin_broker_resource_up", {"resource": KEYS[0]}, 0.0),
        (lambda b: b.set_keys(KEYS[1:], "0.1.0"), "merlin_broker_resource_up", {"resource": KEYS[0]}, None),
        (
            lambda b: b.set_runs(RunStats(active=4)),
            "merlin_broker_runs_active",
            {},
            4.0,
        ),
        # a new actor life starts its seq again at 1: newer by its start time
        (
            lambda b: b.put(_snapshot(seq=1, grants=9), 6.0),
            "merlin_broker_lease_grants_total",
            {"resource": KEYS[0]},
            9.0,
        ),
    ],
)
def test_every_change_is_served_at_the_next_scrape(board, clock, change, name, labels, expected):
    exposition = Exposition(board)
    exposition.render()
    change(board)
    assert _value(exposition, name, **labels) == expected
    assert exposition.rebuilds == 2


def test_clock_driven_values_move_while_the_rest_is_cached(board, clock):
    board.put(_snapshot(seq=2, grants=3, granted_at=990.0, expires_at=2000.0, state="leased", queued_at=995.0), 5.0)
    exposition = Exposition(board)
    key = {"resource": KEYS[0]}
    assert _value(exposition, "merlin_broker_leased_seconds_total", **key) == 10.0
    assert _value(exposition, "merlin_broker_queue_oldest_wait_seconds", **key) == 5.0
    clock[0] = 1030.0
    assert _value(exposition, "merlin_broker_leased_seconds_total", **key) == 40.0
    assert _value(exposition, "merlin_broker_queue_oldest_wait_seconds", **key) == 35.0
    assert exposition.rebuilds == 1
