"""Waiting for conditions in tests — never a bare sleep as synchronisation."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any


def until(condition: Callable[[], Any], what: str, timeout_s: float = 60.0, every_s: float = 0.05) -> Any:
    """The condition's first truthy value; AssertionError naming ``what`` after ``timeout_s``.

    Exceptions count as "not yet" (an actor restarting, a file half written).
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g}s waiting for {what}" + (f" (last: {last!r})" if last else "")
            )
        time.sleep(every_s)


class StderrWatch:
    """Reads a child's stderr in a thread, so a test can wait for a line without blocking on the pipe."""

    def __init__(self, proc: subprocess.Popen[str]):
        assert proc.stderr is not None
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._lines.append("")  # EOF marker
            self._changed.notify_all()

    def wait_for(self, text: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self._lines:
                    if text in line:
                        return line
                if self._lines and self._lines[-1] == "":
                    raise AssertionError(f"the process ended without printing {text!r}: {''.join(self._lines)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} within {timeout_s:g}s: {''.join(self._lines)}")
                self._changed.wait(left)

    def text(self) -> str:
        self._thread.join(timeout=60)
        with self._changed:
            return "".join(self._lines)
