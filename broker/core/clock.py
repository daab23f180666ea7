"""The time a running actor goes by: wall-clock seconds that advance with the monotonic clock.

Deadlines are wall time because they are written to disk and must mean the
same after a restart. But inside one actor life a step of the wall clock
(NTP, a suspended VM, an admin's ``date -s``) must neither expire a lease
early nor stretch it. :class:`ActorClock` fixes the wall time once, at actor
start, and from then on adds only monotonic time: a step of the system clock
moves nothing until the actor restarts and re-bases (then persisted
deadlines are read against the new wall time, as they must be).

Pure apart from its two sources, which a test passes in.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ActorClock"]


class ActorClock:
    """Wall-clock seconds for one actor life, derived from the monotonic clock.

    Args:
        wall: the wall clock, read once here (``time.time``).
        monotonic: the clock durations are measured on (``time.monotonic``; the
            asyncio loop's timers run on it too, so a timer armed for
            :meth:`delay_until` fires when :meth:`now` reaches the deadline).
    """

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def now(self) -> float:
        """Wall-clock seconds as they were at actor start plus the monotonic time since."""
        return self._offset + self._monotonic()

    def delay_until(self, deadline: float) -> float:
        """Seconds from now until ``deadline`` (this clock's time), never negative: what to arm a timer with."""
        return max(0.0, deadline - self.now())
