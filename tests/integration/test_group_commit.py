"""Group commit keeps "on disk before the answer": kill -9 of resource:<key> right after an answer, under
many concurrent reserve/release calls on that key, and every answered change is in the recovered state."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import ray

from broker.models import Lease, LeaseState
from tests.waiting import until

pytestmark = pytest.mark.ray

KEY = "firesim_u250"
WORKERS = 8


def _commit_counts(actor) -> tuple[int, int]:
    """(syncs, records made durable by them) of the actor's committer."""
    return ray.get(actor.__ray_call__.remote(lambda self: (self._committer.syncs, self._committer.records)), timeout=60)


def _grouped(counts: tuple[int, int]) -> bool:
    syncs, records = counts
    return records > syncs and records >= 40


def test_kill_9_right_after_an_answer_under_concurrent_changes_loses_no_answered_change(broker_env):
    actor = broker_env.actor(KEY)
    pid = broker_env.actor_pid(f"resource:{KEY}")
    answered: list[Lease] = []  # every answer a worker got, in the order it got them
    lock = threading.Lock()
    kill = threading.Event()  # the test says: kill at worker 0's next answer
    stop = threading.Event()
    last_before_kill: list[Lease] = []

    def worker(index: int) -> None:
        holder = f"h{index}"
        n = 0
        while not stop.is_set():
            try:
                call = actor.reserve.remote(holder, ttl_s=600.0, wait=True, timeout_s=120.0, request_id=f"{holder}-{n}")
                lease = ray.get(call, timeout=120)
                with lock:
                    answered.append(lease)
                released = ray.get(actor.release.remote(lease.lease_id), timeout=120)
                with lock:
                    answered.append(released)
            except Exception:  # the actor was killed under this call: it never answered
                return
            if index == 0 and kill.is_set():
                stop.set()
                os.kill(pid, signal.SIGKILL)  # right after the answer: nothing else ran in between here
                last_before_kill.append(released)
                return
            n += 1

    threads = [threading.Thread(target=worker, args=(index,), daemon=True) for index in range(WORKERS)]
    for thread in threads:
        thread.start()
    # Group commit at work before the kill: some sync covered more than one change.
    until(lambda: _grouped(_commit_counts(actor)), "a sync that covered more than one change")
    kill.set()
    for thread in threads:
        thread.join(180)
    assert not any(thread.is_alive() for thread in threads)
    assert last_before_kill, "worker 0 did not get to kill the actor"

    until(lambda: broker_env.actor_pid(f"resource:{KEY}") != pid, "resource actor restarted", timeout_s=90)
    recovered = {lease.lease_id: ray.get(actor.lease.remote(lease.lease_id), timeout=60) for lease in answered}
    # The answer right before the kill is there.
    assert recovered[last_before_kill[0].lease_id].state is LeaseState.RELEASED
    for lease in answered:
        now = recovered[lease.lease_id]
        assert now.fencing_token == lease.fencing_token and now.granted_at == lease.granted_at
        if lease.state is LeaseState.RELEASED:
            assert now.state is LeaseState.RELEASED, f"an answered release of {lease.holder} was lost"
        else:
            assert lease.state is LeaseState.GRANTED and now.state in (LeaseState.GRANTED, LeaseState.RELEASED)
    tokens = [lease.fencing_token for lease in answered if lease.state is LeaseState.GRANTED]
    assert len(set(tokens)) == len(tokens)  # never the same token to two answers
