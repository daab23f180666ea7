"""The seam's pure parts (retry policy, classification) and the private Ray APIs it pins."""

from __future__ import annotations

import importlib
import inspect
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from broker.errors import BrokerUnavailable, ResourceBusy
from broker.seam import ActorRef, CallFailed, Failure, RetryPolicy
from broker.seam.fake import FakeSystem

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_retry_window_opens_at_the_first_failure_and_doubles_up_to_the_cap():
    clock = Clock()
    window = RetryPolicy(window_s=10.0, first_delay_s=0.1, max_delay_s=0.5).window(clock)
    clock.now += 3600  # a long wait before the first failure does not use up the window
    delays = [window.next_delay(Failure.RESTARTING) for _ in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]
    clock.now += 1.7  # the five delays above were slept
    opened = 100.0 + 3600
    while clock.now < opened + 9.8 - 0.5:  # retries that each fail at once: one outage
        clock.now += window.next_delay(Failure.DEAD)
    clock.now = opened + 9.8
    assert window.next_delay(Failure.DEAD) == pytest.approx(0.2)  # never past the window's end
    clock.now += 0.2
    assert window.next_delay(Failure.DEAD) is None


def test_a_retry_that_was_served_a_while_starts_a_new_window():
    clock = Clock()
    window = RetryPolicy(window_s=10.0, first_delay_s=0.1, max_delay_s=0.5, served_s=5.0).window(clock)
    for _ in range(3):  # three outages of 8 s, each followed by a minute of waiting on a live actor
        for _ in range(16):
            delay = window.next_delay(Failure.RESTARTING)
            assert delay is not None
            clock.now += delay
        clock.now += 60.0
    assert window.next_delay(Failure.DEAD) == pytest.approx(0.1)  # a new outage, a new window


@pytest.mark.parametrize("failure", [Failure.TIMED_OUT, Failure.REMOTE_ERROR])
def test_failures_that_are_not_restarts_are_never_retried(failure):
    assert RetryPolicy().window(Clock()).next_delay(failure) is None


def test_unwrap_keeps_broker_errors_and_wraps_anything_else():
    system = FakeSystem()
    ref = ActorRef(system, "resource:x", "ns")
    busy = ResourceBusy("x", "bob", None, 0)
    assert system.unwrap(ref, "reserve", CallFailed(Failure.REMOTE_ERROR, cause=busy)) is busy
    wrapped = system.unwrap(ref, "reserve", CallFailed(Failure.REMOTE_ERROR, cause=KeyError("k")))
    assert isinstance(wrapped, BrokerUnavailable) and "KeyError" in str(wrapped)
    assert isinstance(system.unwrap(ref, "reserve", CallFailed(Failure.DEAD)), BrokerUnavailable)
    assert pickle.loads(pickle.dumps(CallFailed(Failure.DEAD, "gone"))).failure is Failure.DEAD


def test_ray_exceptions_are_classified_by_type():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayTaskError

    from broker.seam.ray_backend import classify

    assert classify(ActorUnavailableError("restarting", None)).failure is Failure.RESTARTING
    assert classify(ActorDiedError()).failure is Failure.DEAD
    assert classify(GetTimeoutError("slow")).failure is Failure.TIMED_OUT
    busy = ResourceBusy("x", "bob", None, 0)
    task_error = RayTaskError("reserve", "traceback", busy)
    failed = classify(task_error)
    assert failed.failure is Failure.REMOTE_ERROR and isinstance(failed.cause, ResourceBusy)
    assert classify(ValueError("not Ray's")) is None


# The private Ray APIs broker.seam.ray_private relies on (Ray 2.60). A Ray upgrade that moves
# one of these fails here, naming it, instead of in a user's notebook.
PINNED = [
    ("ray._private.ray_constants", "ENABLE_RAY_CLUSTER"),
    ("ray._raylet", "Config"),
    ("ray._raylet", "AuthenticationTokenLoader"),
    ("ray._private.worker", "print_to_stdstream"),
    ("ray._private.services", "get_webui_url_from_internal_kv"),
    ("ray.dashboard.modules.job.pydantic_models", "JobDetails"),
    ("ray._private.state", "state"),
    ("ray._private.gcs_pubsub", "GcsAioJobSubscriber"),
    ("ray._raylet", "async_task_id"),
]


@pytest.mark.parametrize(("module", "name"), PINNED)
def test_private_ray_apis_the_seam_pins_exist(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} moved: fix broker/seam/ray_private.py"


def test_private_api_signatures_the_seam_calls():
    from ray._private import worker
    from ray._raylet import AuthenticationTokenLoader
    from ray.job_submission import JobSubmissionClient

    assert list(inspect.signature(worker.print_to_stdstream).parameters)[:2] == ["data", "ignore_prefix"]
    assert callable(AuthenticationTokenLoader.instance().reset_cache)
    assert callable(JobSubmissionClient._do_request) and callable(JobSubmissionClient._raise_error)
    from ray._private.gcs_pubsub import GcsAioJobSubscriber
    from ray._private.state import GlobalState

    assert list(inspect.signature(GcsAioJobSubscriber.poll).parameters)[1:] == ["batch_size", "timeout"]
    assert callable(GcsAioJobSubscriber.subscribe) and callable(GlobalState.job_table)


def test_no_ray_import_outside_the_seam_and_the_tools():
    """Production code reaches Ray only through broker/seam (devtools measure Ray itself)."""
    offenders = []
    for path in sorted(p for package in ("broker", "targetgen", "executor") for p in (ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(("broker/seam/", "broker/devtools/", "tests/", ".venv/", "build/")):
            continue
        text = path.read_text()
        if "import ray" in text or "from ray" in text:
            offenders.append(relative)
    assert offenders == []


def test_the_actor_shells_import_without_ray():
    code = (
        "import sys, broker.actors.coordinator, broker.actors.resource, broker.actors.run_manager, broker.client; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_a_remote_method_may_take_keyword_arguments_named_like_the_seams_own():
    """`withdraw(..., ref=...)` reaches the actor: the seam's own parameters are positional-only."""
    import asyncio

    class Echo:
        def __init__(self, *, system):
            self.system = system

        async def withdraw(self, **kwargs):
            return kwargs

    async def body() -> dict:
        system = FakeSystem()
        from broker.seam import Spawn

        ref = ActorRef(system, "echo", "ns", Spawn(Echo, ()))
        return await system.call(ref, "withdraw", ref="abc", method="m")

    assert asyncio.run(body()) == {"ref": "abc", "method": "m"}
