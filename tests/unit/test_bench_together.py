"""The bench's start handshake: workers say they are ready, then all get one start time (no Ray: plain processes)."""

from __future__ import annotations

import io
import json
import os
import sys
import time

import pytest

from broker.devtools.bench.together import ANSWER, READY, WorkerError, Workers, await_start, serve

# A stand-in worker: serves runs as a bench worker does. A spec's ``delay`` is how long it takes to get
# ready (Ray's import and connect); a negative one fails before ready, ``die_after_ready`` after it.
# It answers with the spec and start line it got, when it began, and its pid.
WORKER = """
import json, os, sys, time
from broker.devtools.bench.together import serve

def run(spec, start):
    if spec["delay"] < 0:
        sys.exit("could not connect to Ray")
    time.sleep(spec["delay"])
    start()
    if spec.get("die_after_ready"):
        sys.exit("lost the broker")
    return {**spec, "began": time.time(), "pid": os.getpid()}

serve(run)
"""
ARGV = [sys.executable, "-c", WORKER]


def test_every_worker_starts_at_one_time_after_the_slowest_is_ready():
    launched = time.time()
    with Workers(ARGV) as workers:
        answers = workers.run([{"delay": 0.0, "duration_s": 2.5}, {"delay": 0.8}, {"delay": 0.3, "duration_s": 1.0}])
    start_at = answers[0]["start_at"]
    assert [answer["delay"] for answer in answers] == [0.0, 0.8, 0.3]  # in the order of the specs
    assert all(answer["start_at"] == start_at for answer in answers)
    assert start_at >= launched + 0.8  # the slowest one was ready before the start: none misses it
    assert all(answer["began"] >= start_at for answer in answers)
    assert answers[0]["until"] == start_at + 2.5 and answers[2]["until"] == start_at + 1.0
    assert "until" not in answers[1]  # no duration: it runs until its own end (rounds)


def test_kept_workers_serve_run_after_run_and_fresh_ones_end_with_their_run():
    with Workers(ARGV, keep=True) as kept:
        first = {answer["pid"] for answer in kept.run([{"delay": 0.0}, {"delay": 0.0}])}
        second = [answer["pid"] for answer in kept.run([{"delay": 0.0}, {"delay": 0.0}, {"delay": 0.0}])]
        assert set(second[:2]) == first and second[2] not in first  # a third started for the bigger run
        assert kept.run([{"delay": 0.0}])[0]["pid"] == second[0]
        pids = kept.pids
    for pid in pids:  # closing ended them
        _assert_gone(pid)
    with Workers(ARGV) as fresh:
        once = fresh.run([{"delay": 0.0}])[0]["pid"]
        assert fresh.pids == []
        _assert_gone(once)
        assert fresh.run([{"delay": 0.0}])[0]["pid"] != once


def test_a_worker_that_dies_before_it_is_ready_fails_the_run_at_once_and_stops_the_others():
    with Workers(ARGV, keep=True, ready_timeout_s=120) as workers:
        workers.run([{"delay": 0.0}, {"delay": 0.0}])
        pids = workers.pids
        began = time.monotonic()
        with pytest.raises(WorkerError, match="ended before ready") as failed:
            workers.run([{"delay": 60.0}, {"delay": -1}])
        assert time.monotonic() - began < 30  # did not wait for the slow one, nor for the timeout
        assert workers.pids == []
    assert "could not connect to Ray" in str(failed.value) and "code 1" in str(failed.value)
    for pid in pids:
        _assert_gone(pid)


def test_a_worker_that_dies_after_the_start_fails_the_run_with_its_stderr():
    with Workers(ARGV, keep=True) as workers, pytest.raises(WorkerError, match="ended before its answer") as failed:
        workers.run([{"delay": 0.0}, {"delay": 0.0, "die_after_ready": True}])
    assert "lost the broker" in str(failed.value)


def test_workers_not_ready_in_time_fail_the_run_with_a_clear_error_and_are_stopped():
    with Workers(ARGV, keep=True, ready_timeout_s=5) as workers:
        workers.run([{"delay": 0.0}, {"delay": 0.0}])
        pids = workers.pids
        with pytest.raises(WorkerError, match=r"1 of 2 bench workers not ready after 5s") as failed:
            workers.run([{"delay": 0.0}, {"delay": 60.0}])
        assert workers.pids == []
    assert f"worker 1 (pid {pids[1]}, still running)" in str(failed.value)
    for pid in pids:
        _assert_gone(pid)


def test_a_worker_says_ready_takes_its_start_line_and_answers_each_spec():
    start_at = time.time() + 0.05
    specs = [{"mode": "cycles", "duration_s": 3}, {"mode": "handoff"}]
    starts = [{"start_at": start_at, "until": start_at + 3}, {"start_at": start_at}]
    lines = [json.dumps(line) for pair in zip(specs, starts) for line in pair]
    out = io.StringIO()

    def run(spec, start):
        start()
        return {"got": spec, "at": time.time()}

    serve(run, io.StringIO("\n".join(lines)), out)
    printed = out.getvalue().splitlines()
    assert printed[0::2] == [READY, READY]
    answers = [json.loads(line.removeprefix(ANSWER)) for line in printed[1::2]]
    assert answers[0]["got"] == {"mode": "cycles", "duration_s": 3, "start_at": start_at, "until": start_at + 3}
    assert answers[1]["got"] == {"mode": "handoff", "start_at": start_at}
    assert all(answer["at"] >= start_at for answer in answers)
    with pytest.raises(SystemExit, match="no start time"):  # the bench went away before the start
        await_start({}, stdin=io.StringIO(""), stdout=io.StringIO())


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
