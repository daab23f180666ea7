"""A wall-clock step neither expires leases early nor stretches them while an actor runs.

The clock's sources are injected: ``wall`` jumps by an hour either way while
``monotonic`` moves only as far as the test says time has passed.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.actors import resource as resource_module
from broker.actors.resource import ResourceActor
from broker.core.book import LeaseBook
from broker.core.clock import ActorClock
from broker.errors import StaleFencingToken
from broker.models import EndReason, LeaseState, ReserveRequest
from broker.seam.fake import FakeSystem

KEY = "spacemit_x60_board_01"
HOUR = 3600.0


class Sources:
    """A wall clock that can be stepped and a monotonic clock that only advances."""

    def __init__(self) -> None:
        self.wall_s = 1_800_000_000.0
        self.monotonic_s = 5_000.0

    def wall(self) -> float:
        return self.wall_s

    def monotonic(self) -> float:
        return self.monotonic_s

    def elapse(self, seconds: float) -> None:
        self.wall_s += seconds
        self.monotonic_s += seconds


def _granted(book: LeaseBook, now: float, ttl_s: float = 60.0):
    request = ReserveRequest(resource=KEY, holder="ci", request_id="ci-1", ttl_s=ttl_s)
    return book.reserve(request, f"{KEY}.{'a' * 32}", now).result


@pytest.mark.parametrize("step_s", [HOUR, -HOUR])
def test_a_wall_clock_step_moves_no_deadline_inside_one_actor_life(step_s):
    sources = Sources()
    clock = ActorClock(wall=sources.wall, monotonic=sources.monotonic)
    book = LeaseBook(KEY)
    lease = _granted(book, clock.now())
    assert lease.expires_at == sources.wall_s + 60.0  # persisted as wall time, as before

    sources.wall_s += step_s  # NTP, a resumed VM, date -s
    sources.elapse(59.0)
    assert book.tick(clock.now()).changes == []
    assert book.check_fence(lease.lease_id, 1, clock.now()).lease_id == lease.lease_id
    assert clock.delay_until(lease.expires_at) == pytest.approx(1.0)  # the timer still fires on time

    sources.elapse(1.0)  # 60 s of real time since the grant, whatever the wall clock says
    outcome = book.tick(clock.now())
    ended = outcome.changes[0].lease
    assert (ended.state, ended.end_reason) == (LeaseState.EXPIRED, EndReason.TTL_ELAPSED)
    assert ended.ended_at - ended.granted_at == pytest.approx(60.0)
    with pytest.raises(StaleFencingToken):
        book.check_fence(lease.lease_id, 1, clock.now())


def test_a_restart_rebases_on_the_wall_clock_and_reads_deadlines_against_it():
    sources = Sources()
    book = LeaseBook(KEY)
    short = _granted(book, ActorClock(sources.wall, sources.monotonic).now(), ttl_s=30 * 60.0)
    sources.wall_s += HOUR  # the step happened; then the actor restarts
    sources.elapse(10.0)
    restarted = ActorClock(wall=sources.wall, monotonic=sources.monotonic)
    assert restarted.now() == sources.wall_s
    again, fixes = LeaseBook.restore(KEY, [book.get(short.lease_id)], now=restarted.now())
    # Only a restart reads the persisted wall-time deadline against the stepped clock (README: not promised).
    assert [change.lease.state for change in fixes.changes] == [LeaseState.EXPIRED]
    assert again.granted is None


@pytest.mark.parametrize("step_s", [HOUR, -HOUR])
def test_the_resource_actor_reads_time_only_from_its_clock(tmp_path, monkeypatch, step_s):
    """The shell: ``_apply``, ``check_fence``, the expiry timer all run on the actor's clock."""
    sources = Sources()

    async def scenario() -> None:
        actor = ResourceActor(KEY, str(tmp_path), "unit", system=FakeSystem())  # no Ray, no coordinator
        actor._clock = ActorClock(wall=sources.wall, monotonic=sources.monotonic)
        loop = asyncio.get_running_loop()
        lease = await actor.reserve("ci", ttl_s=60.0, request_id="ci-1")
        assert lease.expires_at == sources.wall_s + 60.0

        # The system clock steps an hour: time.time() is not what the actor goes by.
        real_time = resource_module.time.time
        monkeypatch.setattr(resource_module.time, "time", lambda: real_time() + step_s)
        sources.wall_s += step_s
        sources.elapse(30.0)
        assert (await actor.check_fence(lease.lease_id, 1)).lease_id == lease.lease_id
        actor._on_timer()  # as if the timer fired now: nothing is due
        assert (await actor.lease(lease.lease_id)).state is LeaseState.GRANTED
        assert actor._timer.when() - loop.time() == pytest.approx(30.0, abs=1.0)

        renewed = await actor.renew(lease.lease_id)  # a renewal is measured from the grant's clock too
        assert renewed.expires_at == pytest.approx(lease.expires_at + 30.0)

        sources.elapse(60.0)
        actor._on_timer()
        ended = await actor.lease(lease.lease_id)
        assert ended.state is LeaseState.EXPIRED and ended.ended_at == renewed.expires_at
        actor.close()

    asyncio.run(scenario())
