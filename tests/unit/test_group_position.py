"""A waiting group's place in line is the place that gates its grant: the count-th best over its keys."""

from __future__ import annotations

import asyncio

from broker.core.groups import gating_place
from broker.seam.fake import FakeSystem
from tests.unit.test_group_shells import book, up
from tests.unit.test_shells import run, until


def test_the_gating_place_is_the_count_th_best():
    assert gating_place([3, 1], 2) == 3  # a set needs both keys: its worst place gates it
    assert gating_place([3, 1], 1) == 1  # any one of a pool: its best place
    assert gating_place([4, 2, 1, 5], 2) == 2  # any two of four
    assert gating_place([], 1) is None
    assert gating_place([2], 2) == 2  # an entry being queued again: the worst it has


def test_group_position_of_a_set_waits_for_its_worst_queue_and_any_of_for_its_best(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        # lane_a: held, two single-key requests waiting; lane_b: held, nobody waiting.
        await system.call(broker, "reserve", "lane_a", "x", ttl_s=60)
        await system.call(broker, "reserve", "lane_b", "w", ttl_s=60)
        singles = [
            asyncio.ensure_future(system.call(broker, "reserve", "lane_a", who, wait=True, ttl_s=60))
            for who in ("y", "z")
        ]
        await until(lambda: len(book(system, "lane_a").queue) == 2, "y and z queued on lane_a")
        both = asyncio.ensure_future(
            system.call(broker, "reserve_group", "cosim", keys=["lane_a", "lane_b"], wait=True, request_id="s")
        )
        anyone = asyncio.ensure_future(
            system.call(broker, "reserve_group", "ci", labels="kind=sim", wait=True, request_id="a")
        )
        await until(lambda: len(book(system, "lane_b").queue) == 2, "both groups queued on lane_b")
        # The set is 3rd on lane_a and 1st on lane_b: it needs both, so lane_a's place gates it.
        assert await system.call(broker, "group_position", "cosim", "s") == 3
        # Any one lane: 2nd on lane_b (behind the set) is its best place.
        assert await system.call(broker, "group_position", "ci", "a") == 2
        for waiting in (*singles, both, anyone):
            waiting.cancel()

    run(body)
