"""Group leases through the real coordinator and resource actors on the in-process FakeSystem:
any-of, sets together, order across keys, ending as a whole, and restarts from disk."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from broker.actors.coordinator import BrokerActor
from broker.errors import InvalidRequest, LeaseNotFound, LeaseNotHeld, ResourceBusy, UnknownResource
from broker.models import EndReason, LeaseState
from broker.seam import ActorRef, Spawn
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from tests.unit.test_shells import run, until

NS = "groups"
LAB = {
    "version": 1,
    "resources": {
        "u250_a": {"labels": {"kind": "fpga", "board": "u250"}, "host": None, "properties": {"pcie": "0000:3b:00.0"}},
        "u250_b": {"labels": {"kind": "fpga", "board": "u250"}, "properties": {"pcie": "0000:5e:00.0"}},
        "lane_a": {"labels": {"kind": "sim"}},
        "lane_b": {"labels": {"kind": "sim"}},
    },
}


async def up(state_dir: Path, system: FakeSystem) -> ActorRef:
    spawn = Spawn(BrokerActor, (str(state_dir), NS, "127.0.0.1", None))
    broker = ActorRef(system, COORDINATOR_NAME, NS, spawn)
    await system.call(broker, "apply_catalog", LAB)
    return broker


def book(system: FakeSystem, key: str):
    return system.instance(f"resource:{key}", NS)._book


def test_any_of_picks_a_free_member_and_says_which_with_its_properties(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        single = await system.call(broker, "reserve", "u250_a", "alice", ttl_s=60)
        group = await system.call(broker, "reserve_group", "bob", labels="board=u250", ttl_s=60)
        assert group.state is LeaseState.GRANTED and group.keys == ("u250_b",)
        member = group.members[0]
        assert member.properties == {"pcie": "0000:5e:00.0"} and member.fencing_token == 1
        assert book(system, "u250_b").granted.holder == "bob"
        # Nothing is left queued on the member it did not get.
        assert book(system, "u250_a").queue == [] and book(system, "u250_a").granted.lease_id == single.lease_id
        with pytest.raises(ResourceBusy):
            await system.call(broker, "reserve_group", "carol", labels="board=u250")
        assert book(system, "u250_a").queue == [] and book(system, "u250_b").queue == []
        released = await system.call(broker, "release", group.lease_id)
        assert released.state is LeaseState.RELEASED and book(system, "u250_b").granted is None

    run(body)


def test_a_set_is_granted_all_at_once_and_ends_as_a_whole(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        lane = await system.call(broker, "reserve", "lane_a", "alice", ttl_s=60)
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve_group", "cosim", keys=["u250_a", "lane_a"], ttl_s=60, wait=True)
        )
        await until(lambda: book(system, "u250_a").ready_for_group is not None, "u250_a held for the group")
        # The free FPGA is not handed out meanwhile: a later single request waits behind the group.
        late = asyncio.ensure_future(system.call(broker, "reserve", "u250_a", "dave", wait=True, request_id="d1"))
        await until(lambda: len(book(system, "u250_a").queue) == 2, "dave queued behind the group")
        assert book(system, "u250_a").granted is None and not waiting.done()
        await system.call(broker, "release", lane.lease_id)
        group = await waiting
        assert set(group.keys) == {"u250_a", "lane_a"} and group.state is LeaseState.GRANTED
        assert book(system, "u250_a").granted.holder == "cosim" and book(system, "lane_a").granted.holder == "cosim"
        assert not late.done()
        # An admin revokes one key: the group ends as a whole, the other key goes to the next waiter.
        await system.call(broker, "revoke", "lane_a", "bench needed", by="admin")
        dave = await late
        assert dave.holder == "dave"
        ended = await until(lambda: _lease(system, broker, group.lease_id), "the group ended", timeout_s=10)
        assert ended.state is LeaseState.REVOKED
        with pytest.raises(LeaseNotHeld):
            await system.call(broker, "renew", group.lease_id)

    run(body)


async def _lease(system, broker, lease_id):
    lease = await system.call(broker, "lease", lease_id)
    return lease if not lease.active else None


def test_unsatisfiable_requests_fail_at_once_and_change_nothing(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        with pytest.raises(InvalidRequest):
            await system.call(broker, "reserve_group", "bob", labels="board=u250", count=3, wait=True)
        with pytest.raises(InvalidRequest):
            await system.call(broker, "reserve_group", "bob", labels="board=vcu118", wait=True)
        with pytest.raises(UnknownResource):
            await system.call(broker, "reserve_group", "bob", keys=["u250_a", "nope"], wait=True)
        with pytest.raises(InvalidRequest):
            await system.call(broker, "reserve_group", "bob", keys=["u250_a", "u250_a"])
        with pytest.raises(InvalidRequest):
            await system.call(broker, "reserve_group", "bob", labels="board u250")
        assert await system.call(broker, "groups") == []
        assert all(book(system, key).queue == [] for key in LAB["resources"])
        assert not (tmp_path / "groups").exists() or not list((tmp_path / "groups").iterdir())

    run(body)


def test_groups_keep_one_order_on_every_key_they_share(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        a = await system.call(broker, "reserve", "u250_a", "x", ttl_s=60)
        b = await system.call(broker, "reserve", "u250_b", "y", ttl_s=60)
        first = asyncio.ensure_future(
            system.call(broker, "reserve_group", "g1", keys=["u250_a", "u250_b"], wait=True, ttl_s=60)
        )
        await until(lambda: len(book(system, "u250_b").queue) == 1, "g1 queued")
        second = asyncio.ensure_future(
            system.call(broker, "reserve_group", "g2", keys=["u250_b", "u250_a"], wait=True, ttl_s=60)
        )
        await until(lambda: len(book(system, "u250_a").queue) == 2, "g2 queued")
        await system.call(broker, "release", a.lease_id)
        await system.call(broker, "release", b.lease_id)
        g1 = await first
        assert not second.done()
        await system.call(broker, "release", g1.lease_id)
        g2 = await second
        assert set(g2.keys) == {"u250_a", "u250_b"}
        assert g2.fencing_tokens["u250_a"] > g1.fencing_tokens["u250_a"]

    run(body)


def test_coordinator_restart_keeps_waiting_groups_and_their_request_ids(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", "lane_a", "alice", ttl_s=60)
        waiting = asyncio.ensure_future(
            system.call(
                broker, "reserve_group", "ci", labels="kind=sim", count=2, wait=True, ttl_s=60, request_id="ci-7"
            )
        )
        await until(lambda: len(book(system, "lane_a").queue) == 1, "ci queued")
        system.crash(COORDINATOR_NAME, NS)
        system.restart(COORDINATOR_NAME, NS)
        await system.call(broker, "release", held.lease_id)
        group = await waiting  # the retried call finds the same group
        assert group.request_id == "ci-7" and set(group.keys) == {"lane_a", "lane_b"}
        again = await system.call(broker, "reserve_group", "ci", labels="kind=sim", count=2, request_id="ci-7")
        assert again.lease_id == group.lease_id

    run(body)


def test_a_wait_times_out_or_is_withdrawn_and_leaves_every_queue(tmp_path):
    async def body() -> None:
        from broker.errors import WaitTimeout

        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = [await system.call(broker, "reserve", key, "x", ttl_s=60) for key in ("lane_a", "lane_b")]
        with pytest.raises(WaitTimeout):
            await system.call(broker, "reserve_group", "ci", labels="kind=sim", wait=True, timeout_s=0.2, ttl_s=60)
        assert book(system, "lane_a").queue == [] and book(system, "lane_b").queue == []
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve_group", "ci", labels="kind=sim", wait=True, ttl_s=60, request_id="w1")
        )
        await until(lambda: len(book(system, "lane_b").queue) == 1, "ci queued")
        withdrawn = await system.call(broker, "withdraw_group", "ci", "w1")
        assert withdrawn.state is LeaseState.CANCELLED
        assert book(system, "lane_a").queue == [] and book(system, "lane_b").queue == []
        with pytest.raises(LeaseNotHeld):
            await waiting
        await system.call(broker, "release", held[0].lease_id)
        assert book(system, "lane_a").granted is None  # nobody was left behind to take it

    run(body)


def test_a_half_taken_group_found_on_restart_gives_its_keys_back(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        x = await system.call(broker, "reserve", "lane_b", "x", ttl_s=60)
        waiting = asyncio.ensure_future(
            system.call(
                broker, "reserve_group", "cosim", keys=["lane_a", "lane_b"], wait=True, ttl_s=60, request_id="c"
            )
        )
        await until(lambda: book(system, "lane_a").ready_for_group is not None, "lane_a held for cosim")
        # The coordinator dies between taking lane_a and lane_b (simulated: lane_a taken, nothing recorded).
        system.crash(COORDINATOR_NAME, NS)
        entry = book(system, "lane_a").queue[0]
        await system.call(ActorRef(system, "resource:lane_a", NS), "take_for_group", entry.lease_id)
        assert book(system, "lane_a").granted.holder == "cosim"
        system.restart(COORDINATOR_NAME, NS)
        await until(lambda: book(system, "lane_a").granted is None, "lane_a given back on recovery")
        assert book(system, "lane_a").queue[0].group is not None  # at its old place
        await system.call(broker, "release", x.lease_id)
        group = await waiting
        assert set(group.keys) == {"lane_a", "lane_b"}
        assert group.fencing_tokens["lane_a"] == 2  # token 1 went to the take that was given back

    run(body)


def test_a_no_wait_request_arriving_during_a_running_pass_is_granted_not_refused(tmp_path):
    """A pass that is running when a no-wait group request asks for its own (the pass a key's "ready"
    notice started as the request's entries were queued) must not make the request answer "busy"
    before a pass has looked at it."""

    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        groups = system.instance("broker", NS)._groups
        real_ensure = groups._ensure_entries
        calls = []

        async def ensure_then_a_key_says_ready(record, **kwargs) -> None:
            await real_ensure(record, **kwargs)
            calls.append(record.ref)
            if len(calls) == 2:  # the request's own re-check of its entries: a key's notice lands now
                groups._spawn(groups.schedule())
                await asyncio.sleep(0)  # the notice's pass starts (and waits for the lock the request holds)

        groups._ensure_entries = ensure_then_a_key_says_ready
        groups.key_ready = lambda key, group: None  # on Ray the keys' notices come later, over the network
        group = await system.call(broker, "reserve_group", "bob", labels="board=u250", ttl_s=60)
        assert group.state is LeaseState.GRANTED and len(group.keys) == 1

    run(body)


def test_a_no_wait_request_granted_while_it_was_being_withdrawn_is_answered_with_its_lease(tmp_path):
    """A pass may grant a no-wait request between its own pass and its withdrawal: the answer is the
    grant, never "busy" with the keys left held for nobody until the TTL."""

    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        groups = system.instance("broker", NS)._groups
        lane = await system.call(broker, "reserve", "lane_a", "alice", ttl_s=60)
        real_end_waiting = groups._end_waiting

        async def freed_just_before(ref, reason, state, **kwargs) -> None:  # the lane comes free meanwhile
            if reason is EndReason.CANCELLED and not kwargs.get("locked"):
                await system.call(broker, "release", lane.lease_id)
                await groups.schedule()
            await real_end_waiting(ref, reason, state, **kwargs)

        groups._end_waiting = freed_just_before

        async def looked_free(candidates, count) -> bool:  # the lane's holder was about to let go
            return True

        groups._could_take_now = looked_free
        group = await system.call(broker, "reserve_group", "bob", keys=["lane_a", "lane_b"], ttl_s=60)
        assert group.state is LeaseState.GRANTED and set(group.keys) == {"lane_a", "lane_b"}
        assert book(system, "lane_a").granted.holder == "bob"

    run(body)


def test_one_request_id_names_a_single_keys_lease_or_a_group_never_both_also_after_a_restart(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        single = await system.call(broker, "reserve", "lane_a", "ci", ttl_s=60, request_id="job-1")
        group = await system.call(broker, "reserve_group", "ci", labels="board=u250", ttl_s=60, request_id="job-2")
        for restarted in (False, True):
            with pytest.raises(InvalidRequest) as refused:
                await system.call(broker, "reserve_group", "ci", labels="kind=sim", request_id="job-1")
            assert refused.value.field == "request_id" and "lane_a" in str(refused.value)
            with pytest.raises(InvalidRequest) as refused:
                await system.call(broker, "reserve", "lane_b", "ci", request_id="job-2")
            assert refused.value.field == "request_id" and "group request" in str(refused.value)
            # Nothing changed: the refused asks took nothing and queued nothing.
            assert book(system, "lane_b").granted is None and book(system, "lane_b").queue == []
            assert [g["holder"] for g in await system.call(broker, "groups")] == ["ci"]
            assert book(system, "lane_a").granted.lease_id == single.lease_id
            if not restarted:
                system.crash(COORDINATOR_NAME, NS)
                system.restart(COORDINATOR_NAME, NS)
        # Each id's own retry still answers its own lease.
        assert (await system.call(broker, "reserve", "lane_a", "ci", request_id="job-1")).lease_id == single.lease_id
        again = await system.call(broker, "reserve_group", "ci", labels="board=u250", request_id="job-2")
        assert again.lease_id == group.lease_id
        # Another holder's job-1 is another request.
        other = await system.call(broker, "reserve_group", "dave", labels="kind=sim", request_id="job-1")
        assert other.state is LeaseState.GRANTED

    run(body)


def test_ended_groups_are_forgotten_after_the_retention_window_records_and_all(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        spawn = Spawn(BrokerActor, (str(tmp_path), NS, "127.0.0.1", None))
        broker = ActorRef(system, COORDINATOR_NAME, NS, spawn)
        await system.call(broker, "apply_catalog", {**LAB, "broker": {"retention": "1h"}})
        done = await system.call(broker, "reserve_group", "ci", labels="kind=sim", ttl_s=60, request_id="old")
        await system.call(broker, "release", done.lease_id)
        held = await system.call(broker, "reserve_group", "bob", labels="board=u250", count=2, ttl_s=60)
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve_group", "carol", labels="board=u250", wait=True, request_id="w")
        )
        await until(lambda: book(system, "u250_a").queue != [], "carol queued")
        records = tmp_path / "groups"
        assert len(list(records.iterdir())) == 3
        groups = system.instance(COORDINATOR_NAME, NS)._groups
        # Within the window the ended group still answers its retries.
        assert groups.sweep(time.time() + 1800) == 0
        assert (await system.call(broker, "lease", done.lease_id)).state is LeaseState.RELEASED
        # Past it, it is forgotten: its record is gone, and its request id asks anew.
        assert groups.sweep(time.time() + 3700) == 1
        assert len(list(records.iterdir())) == 2
        with pytest.raises(LeaseNotFound):
            await system.call(broker, "lease", done.lease_id)
        anew = await system.call(broker, "reserve_group", "ci", labels="kind=sim", ttl_s=60, request_id="old")
        assert anew.lease_id != done.lease_id and anew.state is LeaseState.GRANTED
        # Active groups are never forgotten, however old: the held one and the waiter go on.
        assert groups.sweep(time.time() + 10 * 86400) == 0
        await system.call(broker, "release", held.lease_id)
        assert (await waiting).holder == "carol"
        # A restart does not bring the forgotten one back.
        system.crash(COORDINATOR_NAME, NS)
        system.restart(COORDINATOR_NAME, NS)
        with pytest.raises(LeaseNotFound):
            await system.call(broker, "lease", done.lease_id)

    run(body)
