"""The one retry policy for calls on broker actors, and how a failed call is classified.

Pure: no Ray import. :mod:`broker.seam.ray_backend` maps Ray's exceptions onto
:class:`Failure`; the shim (sync) and the coordinator (async) both loop on a
:class:`RetryWindow`, so they retry the same way: a call that died with its
actor is sent again with the same arguments (hence the same ``request_id``),
with doubling delays, for at most ``window_s`` counted from the *first*
failure (a long wait may have been pending for an hour before its actor died).
An attempt that was served for ``served_s`` or longer before it failed (a
waiter granted nothing yet, whose actor then died again) shows the actor was
back: the next failure opens a new window, so a long wait survives any number
of restarts that each end within the window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.core.compat import StrEnum

__all__ = ["Failure", "RetryPolicy", "RetryWindow"]


class Failure(StrEnum):
    """What a failed actor call means for the caller."""

    RESTARTING = "restarting"  # the actor is coming back: retry on the same handle
    DEAD = "dead"  # the handle is dead: look the actor up again, then retry
    TIMED_OUT = "timed_out"  # no answer within the caller's own bound: give up, the call may have run
    REMOTE_ERROR = "remote_error"  # the method raised: re-raise a BrokerError, wrap anything else


RETRIED = frozenset({Failure.RESTARTING, Failure.DEAD})


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a call is retried while its actor restarts."""

    window_s: float = 30.0
    first_delay_s: float = 0.05
    max_delay_s: float = 1.0
    served_s: float = 5.0  # an attempt this long reached a live actor: the window starts again

    def window(self, clock: Callable[[], float] = time.monotonic) -> RetryWindow:
        return RetryWindow(self, clock)


@dataclass
class RetryWindow:
    """One call's retries: opens at the first failure, closes ``window_s`` later."""

    policy: RetryPolicy
    clock: Callable[[], float] = time.monotonic
    _deadline: float | None = field(default=None, init=False)
    _delay: float = field(default=0.0, init=False)
    _resumed_at: float | None = field(default=None, init=False)  # when the last retry was sent

    def next_delay(self, failure: Failure) -> float | None:
        """Seconds to wait before the next try, or None: give up (not retried, or the window closed)."""
        if failure not in RETRIED:
            return None
        now = self.clock()
        if self._resumed_at is not None and now - self._resumed_at >= self.policy.served_s:
            self._deadline = None  # the retry was served a while: its actor was back, this is a new outage
        if self._deadline is None:
            self._deadline = now + self.policy.window_s
            self._delay = self.policy.first_delay_s
        elif now >= self._deadline:
            return None
        else:
            self._delay = min(self._delay * 2, self.policy.max_delay_s)
        delay = max(0.0, min(self._delay, self._deadline - now))
        self._resumed_at = now + delay
        return delay
