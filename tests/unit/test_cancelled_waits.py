"""A waiting request whose caller goes away leaves every queue, wherever the cancel lands.

Ray Serve cancels a disconnected HTTP client's request with a recursive ``ray.cancel``: the
coordinator's ``reserve_group`` is cancelled at whichever step it is in — also while its request
is being written and queued on its keys — and so are the calls it makes afterwards, its clean-up
included (the FakeSystem cancels them as Ray does). A group once stayed queued for nobody.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.models import LeaseState
from broker.seam.fake import FakeSystem
from broker.seam.placement import COORDINATOR_NAME
from tests.unit.test_group_shells import NS, book, up
from tests.unit.test_shells import run, until


@pytest.mark.parametrize("step", ["queueing its entries", "waiting"])
def test_a_cancelled_group_wait_leaves_every_queue(tmp_path, step):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", "lane_a", "x", ttl_s=60)
        lane_b = system.instance("resource:lane_b", NS)
        gate = asyncio.Event()
        if step == "queueing its entries":  # lane_b's entry is slow to queue: the cancel lands meanwhile
            original = lane_b.reserve

            async def slow(*args: Any, **kwargs: Any) -> Any:
                await gate.wait()
                return await original(*args, **kwargs)

            lane_b.reserve = slow
        manager = system.instance(COORDINATOR_NAME, NS)._groups
        waiting = asyncio.ensure_future(
            system.call(broker, "reserve_group", "ci", keys=["lane_a", "lane_b"], wait=True, ttl_s=60)
        )
        if step == "waiting":
            await until(lambda: any(manager._waiters.values()), "the caller waits for the group")
        else:
            await until(lambda: book(system, "lane_a").queue, "the group's entry queued on lane_a")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        gate.set()
        await until(
            lambda: [r.lease.state for r in manager._groups.values()] == [LeaseState.CANCELLED], "the group ended"
        )
        (record,) = manager._groups.values()
        assert record.lease.end_reason == "waiter went away"
        assert book(system, "lane_a").queue == [] and book(system, "lane_b").queue == []
        await system.call(broker, "release", held.lease_id)
        assert book(system, "lane_a").granted is None and book(system, "lane_b").granted is None

    run(body)


def test_a_cancelled_wait_for_one_key_leaves_its_queue(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", "lane_a", "x", ttl_s=60)
        waiting = asyncio.ensure_future(system.call(broker, "reserve", "lane_a", "ci", wait=True, request_id="r"))
        await until(lambda: book(system, "lane_a").queue, "ci queued")
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await until(lambda: book(system, "lane_a").queue == [], "ci left the queue")
        await system.call(broker, "release", held.lease_id)
        assert book(system, "lane_a").granted is None

    run(body)
