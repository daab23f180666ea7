"""Pool metrics (members, free, queue depth) and the group-wait histogram: the collector, the cache,
and the real coordinator and resource actors feeding them on the in-process FakeSystem."""

from __future__ import annotations

import asyncio
import json
import subprocess

import yaml
from prometheus_client import CollectorRegistry, generate_latest

from broker.actors.coordinator import BrokerActor
from broker.core.usage import ResourceSnapshot, UsageCounters
from broker.http.metrics import BrokerCollector, Exposition, MetricsBoard, pool_queue_depth
from broker.seam import ActorRef, Spawn
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from tests.conftest import require_tool
from tests.unit.test_prometheus_configs import CONFIGS, shipped_metric_names
from tests.unit.test_shells import run, until

POOLS = {"u250": ("u250_a", "u250_b"), "sims": ("lane_a",), "empty": ()}


def _snapshot(key, state="free", queue=0, groups=(), seq=1):
    return ResourceSnapshot(
        key=key, pid=1, seq=seq, state=state, queue_depth=queue, granted_at=None, expires_at=None,
        oldest_queued_at=None, maintenance_since=None, counters=UsageCounters(), queued_groups=tuple(groups),
    )  # fmt: skip


def _board() -> MetricsBoard:
    board = MetricsBoard()
    board.set_keys(["u250_a", "u250_b", "lane_a", "lane_b"], "0.1.0", POOLS)
    # u250_a: held, bob's group and one single-key request queued; u250_b: free, kept for bob's group.
    board.put(_snapshot("u250_a", "leased", queue=2, groups=["g_bob"]), 5.0)
    board.put(_snapshot("u250_b", "free", queue=1, groups=["g_bob"]), 5.0)
    board.put(_snapshot("lane_a", "maintenance", queue=1), 5.0)
    return board


def _value(board: MetricsBoard):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(board))
    return registry.get_sample_value


def test_pools_count_members_free_members_and_each_waiting_request_once():
    value = _value(_board())
    assert value("merlin_broker_pool_members", {"pool": "u250"}) == 2.0
    # u250_b is free but kept for bob's group: no new request could take it, so the pool has none free
    # (else "waiters and no free member" never holds while a member idles for a group).
    assert value("merlin_broker_pool_free", {"pool": "u250"}) == 0.0
    # bob's group is queued on both members but is one request; plus the single-key waiter.
    assert value("merlin_broker_pool_queue_depth", {"pool": "u250"}) == 2.0
    assert value("merlin_broker_pool_free", {"pool": "sims"}) == 0.0  # in maintenance
    assert value("merlin_broker_pool_queue_depth", {"pool": "sims"}) == 1.0
    assert value("merlin_broker_pool_members", {"pool": "empty"}) == 0.0
    assert value("merlin_broker_pool_members", {"pool": "lane_b"}) is None  # only named pools are shown


def test_a_member_not_answering_or_never_heard_from_is_not_free():
    board = _board()
    board.put(_snapshot("lane_a", "free"), 6.0)
    assert _value(board)("merlin_broker_pool_free", {"pool": "sims"}) == 1.0
    board.set_up("lane_a", False)
    assert _value(board)("merlin_broker_pool_free", {"pool": "sims"}) == 0.0
    fresh = MetricsBoard()
    fresh.set_keys(["lane_a"], "0.1.0", {"sims": ("lane_a",)})
    assert _value(fresh)("merlin_broker_pool_free", {"pool": "sims"}) == 0.0


def test_pool_queue_depth_counts_a_group_on_several_members_once():
    snapshots = {
        "a": _snapshot("a", queue=3, groups=["g1", "g2"]),
        "b": _snapshot("b", queue=2, groups=["g1", "g3"]),
        "c": _snapshot("c", queue=4),
    }
    assert pool_queue_depth(snapshots, ["a", "b"]) == 1 + 3  # one single on a; groups g1, g2, g3
    assert pool_queue_depth(snapshots, ["a", "b", "c", "unknown"]) == 1 + 4 + 3


def test_group_waits_are_a_histogram_without_labels():
    board = _board()
    assert _value(board)("merlin_broker_group_wait_seconds_count", {}) == 0.0  # there before any grant
    board.observe_group_wait(0.5)
    board.observe_group_wait(30.0)
    value = _value(board)
    assert value("merlin_broker_group_wait_seconds_count", {}) == 2.0
    assert value("merlin_broker_group_wait_seconds_sum", {}) == 30.5
    assert value("merlin_broker_group_wait_seconds_bucket", {"le": "1.0"}) == 1.0
    assert value("merlin_broker_group_wait_seconds_bucket", {"le": "+Inf"}) == 2.0
    text = generate_latest(_registry(board)).decode()
    assert "g_bob" not in text  # a group's ref is never a label


def _registry(board: MetricsBoard) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(board))
    return registry


def test_the_cached_exposition_serves_pool_and_group_changes_at_the_next_scrape():
    board = _board()
    exposition = Exposition(board)
    exposition.render()
    board.observe_group_wait(2.0)
    assert b"merlin_broker_group_wait_seconds_count 1.0" in exposition.render()
    board.put(_snapshot("u250_a", "free", seq=2), 5.0)  # its waiters were granted or left
    assert b'merlin_broker_pool_free{pool="u250"} 1.0' in exposition.render()  # u250_b: kept for bob
    assert b'merlin_broker_pool_queue_depth{pool="u250"} 1.0' in exposition.render()
    board.set_keys(["u250_a", "u250_b", "lane_a", "lane_b"], "0.1.0", {"u250": ("u250_a", "u250_b")})
    assert b'pool="sims"' not in exposition.render()
    assert exposition.rebuilds == 4


NS = "poolmetrics"
LAB = {
    "version": 1,
    "pools": {"u250": "board=u250", "sims": "kind=sim"},
    "resources": {
        "u250_a": {"labels": {"kind": "fpga", "board": "u250"}},
        "u250_b": {"labels": {"kind": "fpga", "board": "u250"}},
        "lane_a": {"labels": {"kind": "sim"}},
    },
}


def test_the_coordinator_feeds_pools_and_group_waits_and_a_restart_keeps_the_waits(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = ActorRef(system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(tmp_path), NS, "127.0.0.1", None)))
        await system.call(broker, "apply_catalog", LAB)

        def value(name: str, **labels: str) -> float | None:
            return _value(system.instance(COORDINATOR_NAME, NS)._board)(name, labels)

        held = await system.call(broker, "reserve", "u250_a", "alice", ttl_s=60)
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve_group", "bob", labels="board=u250", count=2, wait=True, ttl_s=60)
        )
        member = system.instance("resource:u250_b", NS)._book
        await until(lambda: member.ready_for_group is not None, "u250_b kept for bob's group")
        queued = asyncio.ensure_future(system.call(broker, "reserve", "u250_b", "carol", wait=True, ttl_s=60))
        await until(lambda: value("merlin_broker_pool_queue_depth", pool="u250") == 2.0, "bob's group and carol")
        assert value("merlin_broker_pool_members", pool="u250") == 2.0
        await until(lambda: value("merlin_broker_pool_queue_depth", pool="u250") == 2.0, "bob and carol wait")
        # u250_b is free but kept for bob's group: not free for a new request, in the metric and in pools().
        assert value("merlin_broker_pool_free", pool="u250") == 0.0
        (u250,) = [pool for pool in await system.call(broker, "pools") if pool["pool"] == "u250"]
        assert (u250["free"], u250["total"], u250["waiting_groups"], u250["waiting_single"]) == (0, 2, 1, 1)
        assert value("merlin_broker_pool_queue_depth", pool="sims") == 0.0
        assert value("merlin_broker_group_wait_seconds_count") == 0.0

        await system.call(broker, "release", held.lease_id)
        group = await waiting
        assert set(group.keys) == {"u250_a", "u250_b"}
        await until(lambda: value("merlin_broker_pool_free", pool="u250") == 0.0, "both held by bob")
        await until(lambda: value("merlin_broker_pool_queue_depth", pool="u250") == 1.0, "carol still waits")
        assert value("merlin_broker_group_wait_seconds_count") == 1.0
        waited = value("merlin_broker_group_wait_seconds_sum")
        assert waited is not None and 0.0 < waited <= group.granted_at - group.queued_at + 1e-6

        await system.call(broker, "release", group.lease_id)
        lease = await queued
        await system.call(broker, "release", lease.lease_id)
        await until(lambda: value("merlin_broker_pool_queue_depth", pool="u250") == 0.0, "nobody waits")

        system.restart(COORDINATOR_NAME, NS)
        await system.call(broker, "ping")
        assert value("merlin_broker_group_wait_seconds_count") == 1.0  # rebuilt from the group records
        assert value("merlin_broker_group_wait_seconds_sum") == waited

    run(body)


def test_the_exposition_with_pools_passes_promtool():
    promtool = require_tool("promtool")
    board = _board()
    board.observe_group_wait(3.0)
    check = subprocess.run(
        [promtool, "check", "metrics"], input=Exposition(board).render(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


ALERT_TEST = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # u250: waiters and no free member for 40 minutes; sims: waiters, but a member is free.
      - series: 'merlin_broker_pool_queue_depth{{pool="u250"}}'
        values: '2x40'
      - series: 'merlin_broker_pool_free{{pool="u250"}}'
        values: '0x40'
      - series: 'merlin_broker_pool_queue_depth{{pool="sims"}}'
        values: '3x40'
      - series: 'merlin_broker_pool_free{{pool="sims"}}'
        values: '1x40'
      # lanes: no free member but nobody waits.
      - series: 'merlin_broker_pool_queue_depth{{pool="lanes"}}'
        values: '0x40'
      - series: 'merlin_broker_pool_free{{pool="lanes"}}'
        values: '0x40'
    alert_rule_test:
      - eval_time: 29m
        alertname: MerlinPoolExhausted
        exp_alerts: []
      - eval_time: 31m
        alertname: MerlinPoolExhausted
        exp_alerts:
          - exp_labels: {{severity: warn, pool: u250}}
            exp_annotations:
              summary: "Pool u250 has had waiting requests and no free member for 30 minutes"
              description: "{description}"
"""


def test_the_pool_alert_fires_after_30_minutes_of_waiters_and_no_free_member(tmp_path):
    promtool = require_tool("promtool")
    rules_path = CONFIGS / "prometheus" / "alerts.yml"
    rules = yaml.safe_load(rules_path.read_text())
    (rule,) = [r for group in rules["groups"] for r in group["rules"] if r["alert"] == "MerlinPoolExhausted"]
    description = rule["annotations"]["description"].replace("{{ $value }}", "2")
    test_file = tmp_path / "pool_alert_test.yml"
    test_file.write_text(ALERT_TEST.format(rules=json.dumps(str(rules_path)), description=description))
    out = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_dashboard_and_rules_use_the_pool_families():
    names = shipped_metric_names()
    for needed in ("merlin_broker_pool_free", "merlin_broker_pool_members", "merlin_broker_pool_queue_depth",
                   "merlin_broker_group_wait_seconds_bucket"):  # fmt: skip
        assert needed in names
