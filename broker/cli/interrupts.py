"""SIGINT, SIGTERM and SIGHUP stop any ``merlin`` command the same way: as a :class:`Stopped`.

:class:`Stopped` is a ``KeyboardInterrupt``, so every path that already leaves the
queue on Ctrl-C (the shim's ``reserve`` withdraws its request; the seam cancels the
pending Ray call) does the same on a CI runner's SIGTERM or a closed terminal's
SIGHUP. ``main`` turns it into one line and the exit code of
``broker.errors.SIGNAL_EXIT_CODES``. Ray's ``ray.init`` puts its own SIGTERM handler
in place (a ``sys.exit`` that ends in a C++ stack dump mid-call), so :func:`install`
runs again once Ray is connected. Inside ``ray.get`` Ray catches the interrupt and
raises a plain ``KeyboardInterrupt`` of its own: :func:`stopped` recovers which
signal it was from what the handler recorded.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from broker.errors import SIGNAL_EXIT_CODES

__all__ = ["Stopped", "STOP_SIGNALS", "install", "stopped", "exit_code"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_caught: list[int] = []  # the signals the handler saw, in order (a process stops once)


class Stopped(KeyboardInterrupt):
    """The command was stopped by ``signum``; ``detail`` says what that left behind, when known."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum = signum
        self.detail = detail

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _stop(signum: int, _frame: Any) -> None:
    _caught.append(signum)
    raise Stopped(signum)


def install() -> None:
    """Make the stop signals raise :class:`Stopped` in the main thread (elsewhere: nothing to do)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _stop)


def stopped(interrupt: KeyboardInterrupt, detail: str = "") -> Stopped:
    """``interrupt`` as a :class:`Stopped` naming its signal (Ray's own KeyboardInterrupt loses it)."""
    if isinstance(interrupt, Stopped):
        if detail:
            interrupt.detail = detail
        return interrupt
    return Stopped(_caught[0] if _caught else signal.SIGINT, detail)


def exit_code(stop: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP (``broker.errors.SIGNAL_EXIT_CODES``)."""
    return SIGNAL_EXIT_CODES[stopped(stop).name]
