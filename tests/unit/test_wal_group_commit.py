"""Group commit of a key's log: fewer fdatasyncs than changes, each answered only once its sync returned.

The committer runs on real files in ``tmp_path``; ``GatedDisk`` is the OS with a
counter on fdatasync, a gate that holds a sync in flight until the test opens it,
and an optional failure — so "while a sync is in flight" is a state the test
waits for, never a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.actors.resource import ResourceActor
from broker.disk.group_commit import CommitQueue, GroupCommitter
from broker.disk.store import DiskOps, ResourceLedger, StateDir, read_log
from broker.errors import BrokerUnavailable
from broker.models import Lease, LeaseState
from broker.seam.fake import FakeSystem

KEY = "radiance_sim_lane_a"


class GatedDisk(DiskOps):
    """The OS, with fdatasync counted, held at a gate while ``gate`` is clear, and failed on demand."""

    def __init__(self) -> None:
        self.fdatasyncs = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a sync reached the gate
        self.fail = False

    def fdatasync(self, fd: int) -> None:
        self.entered.set()
        if not self.gate.wait(timeout=60):
            raise AssertionError("the test never opened the gate")
        self.fdatasyncs += 1
        if self.fail:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fdatasync(fd)


async def _until_in_flight(disk: GatedDisk) -> None:
    """Wait (off the loop) until a sync is held at the gate."""
    assert await asyncio.get_running_loop().run_in_executor(None, disk.entered.wait, 60)


def _lease(n: int) -> Lease:
    return Lease(
        lease_id=f"{KEY}.{n:032x}",
        resource=KEY,
        holder=f"h{n}",
        state=LeaseState.QUEUED,
        seq=n,
        ttl_s=60.0,
        queued_at=float(n),
        request_id=f"r{n}",
    )


# ---------------------------------------------------------------------- the pure decision


@given(st.lists(st.sampled_from(["append", "start", "succeed", "fail"]), max_size=80))
def test_every_record_is_reported_once_in_order_and_a_sync_covers_only_what_came_before_it(ops):
    queue = CommitQueue()
    durable = 0
    waiting: list[int] = []  # appended, not yet reported, in order
    flight: int | None = None  # the last record the sync in flight covers
    for op in ops:
        if op == "append":
            waiting.append(queue.append())
            assert waiting[-1] == durable + len(waiting)  # numbers follow the durable one, no gaps
        elif op == "start":
            expected = waiting[-1] if flight is None and waiting else None
            assert queue.start() == expected  # one sync at a time, never an empty one
            flight = expected if expected is not None else flight
        elif flight is None:
            with pytest.raises(RuntimeError):
                queue.succeeded() if op == "succeed" else queue.failed()
        elif op == "succeed":
            assert list(queue.succeeded()) == [n for n in waiting if n <= flight]  # not those appended since
            waiting = [n for n in waiting if n > flight]
            durable, flight = flight, None
        else:
            assert list(queue.failed()) == waiting  # it and everything behind it (the cut takes them all)
            waiting, flight = [], None
        assert queue.durable == durable and queue.appended == durable + len(waiting)


def test_a_failed_sync_takes_every_record_behind_it_and_numbers_go_on_from_the_durable_one():
    queue = CommitQueue()
    queue.append()
    assert queue.start() == 1
    assert list(queue.succeeded()) == [1]
    queue.append()
    assert queue.start() == 2
    queue.append()  # arrives while 2 is in flight
    assert list(queue.failed()) == [2, 3]
    assert queue.append() == 2 and queue.durable == 1


# ---------------------------------------------------------------------- the committer on a real file


def test_changes_arriving_during_a_sync_share_the_next_one_in_their_order(tmp_path):
    async def scenario() -> None:
        disk = GatedDisk()
        ledger = ResourceLedger(StateDir(tmp_path).ensure(), KEY, disk=disk)
        ledger.load()
        failures: list[BaseException] = []
        committer = GroupCommitter(ledger, asyncio.get_running_loop(), failures.append)
        delivered: list[int] = []
        disk.gate.clear()
        first = committer.durable(committer.append([_lease(1)], None, lambda: delivered.append(1)))
        await _until_in_flight(disk)  # the sync of record 1 is in flight now
        later = [
            committer.durable(committer.append([_lease(n)], None, lambda n=n: delivered.append(n)))
            for n in range(2, 12)
        ]
        records, _ = read_log(ledger.wal_path.read_bytes())
        assert [r.leases[0].holder for r in records] == [f"h{n}" for n in range(1, 12)]  # appended in order, at once
        assert not first.done() and not any(f.done() for f in later) and delivered == []
        disk.gate.set()
        await asyncio.gather(first, *later)
        assert delivered == list(range(1, 12))  # told in the log's order, each after its sync
        assert (disk.fdatasyncs, committer.syncs, committer.records) == (2, 2, 11)
        assert failures == []
        committer.close()

    asyncio.run(scenario())


def test_a_change_with_nothing_to_write_is_told_at_once_or_right_after_the_record_before_it(tmp_path):
    """A key whose host left changes the book but writes nothing: its journal line and push must still come."""

    async def scenario() -> None:
        disk = GatedDisk()
        ledger = ResourceLedger(StateDir(tmp_path).ensure(), KEY, disk=disk)
        ledger.load()
        committer = GroupCommitter(ledger, asyncio.get_running_loop(), lambda error: None)
        delivered: list[str] = []
        assert committer.append([], None, lambda: delivered.append("down")) is None
        assert delivered == ["down"]  # nothing waits for a sync: told at once
        disk.gate.clear()
        first = committer.durable(committer.append([_lease(1)], None, lambda: delivered.append("grant")))
        await _until_in_flight(disk)
        assert committer.append([], None, lambda: delivered.append("up")) is None
        assert delivered == ["down"]  # behind the grant still in flight
        disk.gate.set()
        await first
        assert delivered == ["down", "grant", "up"]
        committer.close()

    asyncio.run(scenario())


def test_a_failed_sync_fails_every_change_it_covered_and_cuts_them_from_the_log(tmp_path):
    async def scenario() -> None:
        disk = GatedDisk()
        ledger = ResourceLedger(StateDir(tmp_path).ensure(), KEY, disk=disk)
        ledger.load()
        failures: list[BaseException] = []
        committer = GroupCommitter(ledger, asyncio.get_running_loop(), failures.append)
        await committer.durable(committer.append([_lease(1)], None))
        delivered: list[int] = []
        disk.gate.clear()
        disk.fail = True
        doomed = [committer.durable(committer.append([_lease(2)], None, lambda: delivered.append(2)))]
        await _until_in_flight(disk)
        doomed += [committer.durable(committer.append([_lease(3)], None, lambda: delivered.append(3)))]
        disk.gate.set()
        results = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results)
        assert delivered == [] and len(failures) == 1  # nobody told; the actor told once, before them
        records, good = read_log(ledger.wal_path.read_bytes())
        assert [r.leases[0].holder for r in records] == ["h1"] and good == ledger.wal_path.stat().st_size
        disk.fail = False
        await committer.durable(committer.append([_lease(4)], None))  # the disk is back: appends go on
        records, _ = read_log(ledger.wal_path.read_bytes())
        assert [r.leases[0].holder for r in records] == ["h1", "h4"]
        committer.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------------- resource:<key> on it


def _actor(tmp_path, disk: GatedDisk) -> ResourceActor:
    actor = ResourceActor(KEY, str(tmp_path), "unit", system=FakeSystem())
    actor._ledger._disk = disk  # the disk seam: every later append and sync goes through it
    return actor


def test_concurrent_changes_on_one_key_use_fewer_syncs_than_changes_and_survive_a_restart(tmp_path):
    holders = [f"h{n}" for n in range(8)]
    answered: list[Lease] = []

    async def cycles(actor: ResourceActor, holder: str) -> None:
        for n in range(5):
            lease = await actor.reserve(holder, ttl_s=600.0, wait=True, timeout_s=60.0, request_id=f"{holder}-{n}")
            answered.append(lease)
            answered.append(await actor.release(lease.lease_id))

    async def scenario() -> None:
        disk = GatedDisk()
        actor = _actor(tmp_path, disk)
        await asyncio.gather(*(cycles(actor, holder) for holder in holders))
        changes, syncs = actor._committer.records, actor._committer.syncs
        assert changes >= 2 * 5 * len(holders) - 5 and syncs < changes, (changes, syncs)  # some grants ride a release
        assert disk.fdatasyncs == syncs
        actor.close()
        again = ResourceActor(KEY, str(tmp_path), "unit", system=FakeSystem())  # a restart reads the disk
        tokens = [lease.fencing_token for lease in answered if lease.state is LeaseState.GRANTED]
        assert sorted(tokens) == list(range(1, len(tokens) + 1))  # every grant told, each token once
        for lease in answered:
            on_disk = await again.lease(lease.lease_id)
            assert on_disk.state is LeaseState.RELEASED and on_disk.fencing_token == lease.fencing_token
        again.close()

    asyncio.run(scenario())


def test_an_answer_waits_for_the_sync_that_covers_it(tmp_path):
    async def scenario() -> None:
        disk = GatedDisk()
        actor = _actor(tmp_path, disk)
        lease = await actor.reserve("alice", ttl_s=600.0)
        disk.gate.clear()
        disk.entered.clear()
        first = asyncio.ensure_future(actor.renew(lease.lease_id, 500.0))
        await _until_in_flight(disk)
        rest = [asyncio.ensure_future(actor.renew(lease.lease_id, 400.0 + n)) for n in range(5)]
        status = asyncio.ensure_future(actor.status())  # a read waits for what it saw, too
        while actor._committer.last < 7:  # each renew's record appended (the reserve was 1)
            await asyncio.sleep(0)
        assert not first.done() and not any(task.done() for task in rest) and not status.done()
        disk.gate.set()
        renewed = await asyncio.gather(first, *rest)
        assert [r.renewals for r in renewed] == [1, 2, 3, 4, 5, 6]  # the book's order is the log's
        assert (await status).holder == "alice"
        assert disk.fdatasyncs == 3  # the reserve, the first renew, then the other five together
        actor.close()

    asyncio.run(scenario())


def test_a_failed_sync_fails_each_caller_it_covered_and_the_book_is_what_the_disk_holds(tmp_path):
    async def scenario() -> None:
        disk = GatedDisk()
        actor = _actor(tmp_path, disk)
        lease = await actor.reserve("alice", ttl_s=600.0)
        disk.gate.clear()
        disk.entered.clear()
        disk.fail = True
        calls = [asyncio.ensure_future(actor.renew(lease.lease_id, 500.0))]
        await _until_in_flight(disk)
        calls += [asyncio.ensure_future(actor.release(lease.lease_id))]
        calls += [asyncio.ensure_future(actor.reserve("bob", ttl_s=60.0, wait=True, timeout_s=30.0))]
        while actor._committer.last < 4:
            await asyncio.sleep(0)
        disk.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, BrokerUnavailable) and "nothing was changed" in str(r) for r in results), results
        disk.fail = False
        now = await actor.lease(lease.lease_id)
        assert (now.state, now.renewals, now.expires_at) == (LeaseState.GRANTED, 0, lease.expires_at)
        assert (await actor.status()).queue == ()  # bob's queue entry was in the failed sync
        assert actor._waiters == {}
        assert (await actor.release(lease.lease_id)).state is LeaseState.RELEASED  # the disk is back
        actor.close()
        again = ResourceActor(KEY, str(tmp_path), "unit", system=FakeSystem())
        assert (await again.lease(lease.lease_id)).renewals == 0
        assert (await again.status()).queue == ()
        again.close()

    asyncio.run(scenario())
