"""A retried group request after its group ended without a grant: an error, never the ended lease as an answer.

Found by the chaos suite: a no-wait request cancelled while the coordinator was killed mid-way was
answered, on the shim's retry, with the cancelled group lease as if it had been granted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest

from broker.core.groups import GroupRecord, past_retention
from broker.errors import BrokerError, InvalidRequest, LeaseNotHeld, WaitTimeout
from broker.models import LeaseState
from broker.seam import ActorRef
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from tests.unit.test_group_shells import NS, book, up
from tests.unit.test_shells import run, until


def test_a_retried_request_of_a_group_that_lost_its_entry_raises_lease_not_held(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", "lane_a", "alice", ttl_s=60)
        ask = dict(keys=["lane_a", "lane_b"], ttl_s=60, request_id="ci-1")
        waiting = asyncio.ensure_future(system.call(broker, "reserve_group", "ci", wait=True, **ask))
        await until(lambda: len(book(system, "lane_a").queue) == 1, "the group's entry queued on lane_a")
        # Its entry on lane_a is taken back from under it: the group can no longer wait there.
        manager = system.instance(COORDINATOR_NAME, NS)._groups
        (record,) = manager._groups.values()
        await system.call(broker, "withdraw", "lane_a", "ci", record.entry_id("lane_a"))
        await until(
            lambda: all(r.lease.state is LeaseState.CANCELLED for r in manager._groups.values()), "group cancelled"
        )
        with pytest.raises((BrokerError, asyncio.CancelledError)):
            await waiting
        with pytest.raises(LeaseNotHeld):
            await system.call(broker, "reserve_group", "ci", wait=True, **ask)
        with pytest.raises(LeaseNotHeld):
            await system.call(broker, "reserve_group", "ci", wait=False, **ask)
        assert book(system, "lane_b").queue == [] and book(system, "lane_b").granted is None
        await system.call(broker, "release", held.lease_id)

    run(body)


def test_a_group_whose_wait_ran_out_while_the_coordinator_was_down_is_not_granted_on_restart(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", "lane_a", "alice", ttl_s=60)
        ask = dict(keys=["lane_a", "lane_b"], ttl_s=60, request_id="ci-2")
        waiting = asyncio.ensure_future(system.call(broker, "reserve_group", "ci", wait=True, timeout_s=30, **ask))

        def entries_on_disk() -> int:
            paths = list((tmp_path / "groups").glob("*.json"))
            return len(json.loads(paths[0].read_text())["entries"]) if paths else 0

        await until(lambda: entries_on_disk() == 2, "the group's entries queued and recorded")
        # Crash it only once it is idle in the wait: a coroutine resumed after the fake's kill would
        # still write (a real kill -9 stops the process mid-step; the fake stops calls only).
        manager = system.instance(COORDINATOR_NAME, NS)._groups
        await until(lambda: any(manager._waiters.values()), "the caller waiting for the group")
        system.crash(COORDINATOR_NAME, NS)
        # While no coordinator runs, the group's wait runs out (its record says so: the wall clock
        # moved past its deadline) and its keys come free.
        (path,) = (tmp_path / "groups").glob("*.json")
        record = json.loads(path.read_text())
        record["lease"]["wait_deadline"] = time.time() - 1.0
        path.write_text(json.dumps(record))
        await system.call(ActorRef(system, "resource:lane_a", NS), "release", held.lease_id)
        system.restart(COORDINATOR_NAME, NS)
        with pytest.raises(WaitTimeout):  # the caller's retried call
            await system.call(broker, "reserve_group", "ci", wait=True, timeout_s=30, **ask)
        assert book(system, "lane_a").granted is None and book(system, "lane_b").granted is None
        await until(lambda: book(system, "lane_a").queue == [] == book(system, "lane_b").queue, "entries withdrawn")
        waiting.cancel()

    run(body)


def test_a_request_id_reused_for_another_group_ask_is_refused_and_a_true_retry_is_the_same_group(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        first = await system.call(broker, "reserve_group", "ci", labels="kind=sim", ttl_s=60, request_id="r1")
        assert first.state is LeaseState.GRANTED
        other_asks = [
            ("labels", dict(labels="board=u250")),
            ("count", dict(labels="kind=sim", count=2)),
            ("keys", dict(keys=["lane_a", "lane_b"])),
        ]
        for field, ask in other_asks:
            with pytest.raises(InvalidRequest) as refused:
                await system.call(broker, "reserve_group", "ci", ttl_s=60, request_id="r1", wait=True, **ask)
            assert refused.value.field == field and "r1" in str(refused.value)
        # The same ask again (the selector spelled another way reads the same) is a retry: the same group.
        again = await system.call(broker, "reserve_group", "ci", labels=" kind = sim ", ttl_s=60, request_id="r1")
        assert again.lease_id == first.lease_id
        # Nothing of the refused asks was queued or taken.
        assert all(book(system, key).queue == [] for key in ("u250_a", "u250_b", "lane_a", "lane_b"))
        assert [book(system, key).granted is not None for key in ("u250_a", "u250_b")] == [False, False]
        # A set of keys: the same keys in another order, with their count spelled out, is the same ask.
        pair = await system.call(broker, "reserve_group", "cosim", keys=["u250_a", "u250_b"], request_id="p1")
        retry = await system.call(broker, "reserve_group", "cosim", keys=["u250_b", "u250_a"], count=2, request_id="p1")
        assert retry.lease_id == pair.lease_id
        for field, ask in [
            ("keys", dict(keys=["u250_a", "lane_b"])),
            ("count", dict(keys=["u250_a", "u250_b"], count=1)),
        ]:
            with pytest.raises(InvalidRequest) as refused:
                await system.call(broker, "reserve_group", "cosim", request_id="p1", **ask)
            assert refused.value.field == field

    run(body)


def _group_record(**lease: object) -> GroupRecord:
    fields = dict(
        lease_id="group:" + "ab" * 16,
        holder="ci",
        request_id="nightly-7",
        state=LeaseState.RELEASED,
        count=1,
        candidates=("lane_a", "lane_b"),
        ttl_s=60.0,
        queued_at=1_000.0,
    )
    return GroupRecord.model_validate({"lease": {**fields, **lease}})


def test_a_record_from_before_entry_salts_keeps_the_entry_ids_its_keys_know():
    """A group waiting across an upgrade asks its keys for the entries it queued before it: same ids."""
    old = _group_record(state=LeaseState.QUEUED)
    assert old.entry_salt == ""
    digest = hashlib.sha256(b"nightly-7\0lane_a").hexdigest()[:24]
    assert old.entry_id("lane_a") == f"group.{digest}"
    # A new group's entries are its own: the same request id later never names the old entries.
    new = old.model_copy(update={"entry_salt": old.ref})
    assert new.entry_id("lane_a") not in (old.entry_id("lane_a"), new.entry_id("lane_b"))


def test_only_groups_ended_past_the_retention_window_are_forgotten():
    day = 86_400.0
    assert past_retention(_group_record(ended_at=1_000.0).lease, now=1_000.0 + day + 1, retention_s=day)
    assert not past_retention(_group_record(ended_at=1_000.0).lease, now=1_000.0 + day - 1, retention_s=day)
    for active in (LeaseState.QUEUED, LeaseState.GRANTED):  # however old
        assert not past_retention(_group_record(state=active).lease, now=1e12, retention_s=day)
