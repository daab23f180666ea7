"""Keys that must share one host (a run's one job reaches every key it holds): the pure choice and
the refusal of a request no host could ever satisfy, then the coordinator on the FakeSystem."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.actors.coordinator import BrokerActor
from broker.core.groups import KeyView, choose_members, most_on_one_host, resolve_ask
from broker.core.placement_rules import HOST_LABEL, NodeInfo
from broker.errors import InvalidRequest
from broker.models import LeaseState
from broker.seam import ActorRef, Spawn
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from tests.unit.test_shells import run, until

GROUP = "g1"
HOSTS = st.sampled_from([None, "fpga-host-01", "fpga-host-02"])
VIEWS = st.lists(
    st.builds(
        KeyView,
        key=st.sampled_from([f"k{i}" for i in range(6)]),
        ready_for=st.sampled_from([GROUP, None, "g2"]),
        free_since=st.one_of(st.none(), st.floats(0, 100)),
        host=HOSTS,
    ),
    max_size=6,
    unique_by=lambda view: view.key,
)


@given(views=VIEWS, count=st.integers(1, 4))
def test_one_host_picks_ready_keys_of_a_single_host_or_none_when_no_host_has_enough(views, count):
    chosen = choose_members(GROUP, count, views, one_host=True)
    by_key = {view.key: view for view in views}
    ready = [view for view in views if view.ready_for == GROUP]
    enough_somewhere = most_on_one_host([v.key for v in ready], {v.key: v.host for v in ready}) >= count
    if chosen is None:
        assert not enough_somewhere
        return
    assert enough_somewhere and len(chosen) == count == len(set(chosen))
    assert all(by_key[key].ready_for == GROUP for key in chosen)
    assert len({by_key[key].host for key in chosen} - {None}) <= 1
    # Without the rule the same keys could be chosen only if they share a host anyway.
    free = choose_members(GROUP, count, views)
    assert free is not None


@given(views=VIEWS, count=st.integers(1, 4))
def test_one_host_changes_nothing_when_every_key_is_on_one_host_or_none(views, count):
    same = [KeyView(v.key, v.ready_for, v.free_since, None if v.host is None else "fpga-host-01") for v in views]
    assert choose_members(GROUP, count, same, one_host=True) == choose_members(GROUP, count, same)


def test_one_host_prefers_the_host_whose_pick_was_free_longest():
    views = [
        KeyView("a1", GROUP, 50.0, "h1"),
        KeyView("a2", GROUP, 60.0, "h1"),
        KeyView("b1", GROUP, 10.0, "h2"),  # free the longest, but its host has one ready key
        KeyView("c1", GROUP, 20.0, "h3"),
        KeyView("c2", GROUP, 30.0, "h3"),
    ]
    assert choose_members(GROUP, 2, views) == ("b1", "c1")
    assert choose_members(GROUP, 2, views, one_host=True) == ("c1", "c2")
    assert choose_members(GROUP, 3, views, one_host=True) is None


def test_a_request_no_host_could_satisfy_is_refused_and_one_that_one_host_can_is_not():
    labels = {"u1": {"board": "u250"}, "u2": {"board": "u250"}, "u3": {"board": "u250"}, "lane": {"kind": "sim"}}
    hosts = {"u1": "h1", "u2": "h2", "u3": "h2", "lane": None}
    with pytest.raises(InvalidRequest) as refused:
        resolve_ask(labels, labels="board=u250", count=3, one_host=hosts)
    assert refused.value.field == "count" and "at most 2" in str(refused.value)
    assert resolve_ask(labels, labels="board=u250", count=2, one_host=hosts).count == 2
    assert resolve_ask(labels, labels="board=u250", count=3).count == 3  # no rule: any host
    with pytest.raises(InvalidRequest) as split:
        resolve_ask(labels, keys=["u1", "u2"], one_host=hosts)
    assert split.value.field == "keys"
    assert resolve_ask(labels, keys=["u1", "lane"], one_host=hosts).count == 2  # a hostless key goes anywhere


NS = "onehost"
LAB = {
    "version": 1,
    "resources": {
        "u250_a": {"labels": {"board": "u250"}, "host": "fpga-host-01"},
        "u250_b": {"labels": {"board": "u250"}, "host": "fpga-host-02"},
        "u250_c": {"labels": {"board": "u250"}, "host": "fpga-host-02"},
    },
}


def test_the_coordinator_waits_for_two_keys_of_one_host_and_refuses_three(tmp_path: Path):
    async def body() -> None:
        system = FakeSystem()
        system.nodes += [NodeInfo(host, {HOST_LABEL: host}, {"CPU": 1.0}) for host in ("fpga-host-01", "fpga-host-02")]
        broker = ActorRef(system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(tmp_path), NS, "127.0.0.1", None)))
        await system.call(broker, "apply_catalog", LAB)
        with pytest.raises(InvalidRequest):
            await system.call(broker, "reserve_group", "bob", labels="board=u250", count=3, one_host=True)
        assert await system.call(broker, "groups") == []
        held = await system.call(broker, "reserve", "u250_c", "alice", ttl_s=60)
        # u250_a and u250_b are free, but on different hosts: the request waits for u250_c.
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve_group", "bob", labels="board=u250", count=2, one_host=True, wait=True)
        )
        await until(lambda: system.instance("resource:u250_a", NS)._book.ready_for_group is not None, "queued")
        assert not waiting.done()
        await system.call(broker, "release", held.lease_id)
        group = await waiting
        assert group.state is LeaseState.GRANTED and set(group.keys) == {"u250_b", "u250_c"}
        assert {member.host for member in group.members} == {"fpga-host-02"}
        # u250_a was only queued for: nothing of the group is left on it.
        assert system.instance("resource:u250_a", NS)._book.queue == []

    run(body)


def test_a_pool_run_of_two_is_bound_to_keys_of_one_host_and_one_no_host_can_serve_is_refused(tmp_path: Path):
    from tests.unit.test_pool_runs import pool_dir

    async def body() -> None:
        system = FakeSystem()
        system.nodes += [NodeInfo(host, {HOST_LABEL: host}, {"CPU": 1.0}) for host in ("fpga-host-01", "fpga-host-02")]
        broker = ActorRef(
            system, COORDINATOR_NAME, NS, Spawn(BrokerActor, (str(tmp_path / "state"), NS, "127.0.0.1", None))
        )
        await system.call(broker, "apply_catalog", LAB)
        with pytest.raises(InvalidRequest, match="share one host"):
            await system.call(broker, "submit", str(pool_dir(tmp_path, "three", "board=u250", 3)), holder="ci")
        assert await system.call(broker, "runs") == [] and await system.call(broker, "groups") == []
        # Every key is free; u250_a (never granted, first by name) alone would be picked first.
        record = await system.call(broker, "submit", str(pool_dir(tmp_path, "two", "board=u250", 2)), holder="ci")
        (spec,) = await system.jobs.submitted(1)
        bound = await system.call(broker, "run", record.run_id)
        assert bound.resources == ("u250_b", "u250_c")
        assert spec.label_selector == {HOST_LABEL: "fpga-host-02"}

    run(body)
