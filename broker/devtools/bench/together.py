"""Benchmark client processes that start each run together: each says it is ready, then all get one start time.

A worker process imports Ray and connects once, then serves runs: it reads a
run's spec (one JSON line on stdin), sets up and warms up, prints
:data:`READY` on a line of its own, and reads its start line:
``{"start_at": t}``, plus ``"until": t + duration_s`` when the spec has a
``duration_s``. The parent sends the start lines once every worker of the run
is ready, so none misses the start and none waits longer than the slowest one
needs. The worker then prints :data:`ANSWER` and its answer as JSON, and
waits for the next spec (or the end of stdin). Every wait is bounded and fails
with the worker's stderr in the message.

:class:`Workers` keeps its processes across runs when asked (``keep``: what
``--quick`` does, so Ray is imported and connected once) or starts fresh ones
for every run. Imports nothing heavy: the unit tests drive it with plain
Python processes.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

__all__ = ["READY", "ANSWER", "Workers", "WorkerError", "serve", "await_start"]

READY = "merlin-bench-worker ready"
ANSWER = "merlin-bench-worker answer "

Phase = Callable[[dict[str, Any], Callable[[], None]], dict[str, Any]]


class WorkerError(RuntimeError):
    """A bench worker ended, or was not ready or did not answer in time; the run's workers are stopped."""


# ------------------------------------------------------------------------------------------ worker side


def await_start(spec: dict[str, Any], stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """In a worker: say it is ready, take the start line into ``spec``, sleep until ``spec["start_at"]``."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    print(READY, file=stdout, flush=True)
    line = stdin.readline()
    if not line.strip():
        raise SystemExit("merlin bench worker: no start time on stdin (the bench stopped before the start)")
    spec.update(json.loads(line))
    time.sleep(max(0.0, spec["start_at"] - time.time()))


def serve(phase: Phase, stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> None:
    """In a worker: run ``phase(spec, start)`` for each spec line on stdin until it ends, printing each answer.

    ``phase`` sets up, calls ``start()`` (ready, then the common start time), runs, and returns its answer.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    while line := stdin.readline():
        spec = json.loads(line)
        answer = phase(spec, lambda: await_start(spec, stdin, stdout))
        print(ANSWER + json.dumps(answer), file=stdout, flush=True)


# ------------------------------------------------------------------------------------------ parent side


class _Worker:
    def __init__(self, index: int, argv: Sequence[str], env: dict[str, str] | None, events: queue.Queue[Any]):
        self.index = index
        self.ended = False
        self.stderr = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env
        )
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._reader.start()

    def _read(self, events: queue.Queue[Any]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line == READY:
                events.put((self.index, "ready", None))
            elif line.startswith(ANSWER):
                events.put((self.index, "answer", json.loads(line[len(ANSWER) :])))
        self.ended = True
        events.put((self.index, "ended", None))

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it is gone: its "ended" event tells the run
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()

    def stop(self, grace_s: float) -> None:
        """End of stdin: the worker exits; killed if it has not after ``grace_s``."""
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # its unsent bytes, if it is gone already
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()

    def describe(self) -> str:
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace")[-1500:].strip()
        code = self.proc.poll()
        state = "still running" if code is None else f"exited with code {code}"
        return f"worker {self.index} (pid {self.proc.pid}, {state}); its stderr ends:\n{tail or '(nothing)'}"


class Workers:
    """Worker processes (each ``argv``) that run specs together; see the module's docstring.

    ``keep``: keep the processes across runs (started as a run needs more); otherwise every run starts
    fresh ones and ends them before it returns.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        keep: bool = False,
        ready_timeout_s: float = 180.0,
        finish_timeout_s: float = 600.0,
    ):
        self.argv = list(argv)
        self.env = env
        self.keep = keep
        self.ready_timeout_s = ready_timeout_s
        self.finish_timeout_s = finish_timeout_s
        self._events: queue.Queue[Any] = queue.Queue()
        self._workers: list[_Worker] = []

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._workers]

    def run(self, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """One worker per spec, started together once all are ready; returns their answers, in order.

        Raises:
            WorkerError: a worker ended before its answer, or was not ready within ``ready_timeout_s``
                or did not answer within ``finish_timeout_s`` of the start; every worker is stopped first.
        """
        try:
            while len(self._workers) < len(specs):
                self._workers.append(_Worker(len(self._workers), self.argv, self.env, self._events))
            workers = self._workers[: len(specs)]
            for worker, spec in zip(workers, specs):
                worker.send(spec)
            self._await(workers, "ready", self.ready_timeout_s)
            # Enough for the writes and every worker's wake-up, so none starts late; no more.
            start_at = time.time() + 0.1 + 0.02 * len(workers)
            for worker, spec in zip(workers, specs):
                message: dict[str, float] = {"start_at": start_at}
                if spec.get("duration_s") is not None:
                    message["until"] = start_at + spec["duration_s"]
                worker.send(message)
            answers = self._await(workers, "answer", self.finish_timeout_s)
        except BaseException:
            self.close(grace_s=0.0)
            raise
        if not self.keep:
            self.close()
        return [answers[worker.index] for worker in workers]

    def close(self, grace_s: float = 10.0) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop(grace_s)
        self._events = queue.Queue()

    def _await(self, workers: list[_Worker], kind: str, timeout_s: float) -> dict[int, Any]:
        """Wait for the ``kind`` event of every one of ``workers``; returns index -> payload."""
        deadline = time.monotonic() + timeout_s
        pending = {worker.index for worker in workers}
        got: dict[int, Any] = {}
        gone = [worker for worker in workers if worker.ended]
        while pending and not gone:
            try:
                index, event, payload = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                late = [worker for worker in workers if worker.index in pending]
                what = "ready" if kind == "ready" else "done (no answer)"
                raise WorkerError(
                    f"{len(late)} of {len(workers)} bench workers not {what} after {timeout_s:g}s "
                    f"(is the machine overloaded?): {late[0].describe()}"
                ) from None
            if event == kind and index in pending:
                pending.discard(index)
                got[index] = payload
            elif event == "ended" and index in pending:
                gone = [self._workers[index]]
        if gone:
            gone[0].proc.wait(timeout=10)  # its stdout closed: it is exiting
            stage = "ready" if kind == "ready" else "its answer"
            raise WorkerError(f"a bench worker ended before {stage}: {gone[0].describe()}")
        return got
