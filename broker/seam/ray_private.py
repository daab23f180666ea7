"""The private Ray APIs the broker relies on, one function each (Ray 2.60; pinned by tests).

Nothing outside this module touches ``ray._private`` or ``ray._raylet``. Each
function says why no public API does the job; ``tests/unit/test_ray_seam.py``
pins the attributes they use, so a Ray upgrade that moves one fails a test
with the function's name instead of breaking a user's notebook.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
from collections.abc import Mapping
from typing import Any

from broker.errors import BrokerUnavailable

__all__ = [
    "refresh_imported_ray",
    "route_ray_messages_to_stderr",
    "dashboard_url",
    "job_info_or_none",
    "ended_jobs",
    "JobChanges",
    "context_outside_ray_task",
]

# A job's start time (GCS clock) and a request's arrival (the actor's clock) are both wall time on
# the head node; this much disagreement still counts the job as the one that made the request.
_CLOCK_SLACK_S = 2.0
# Without the job channel (its subscription failed), look at the job table this often.
_FALLBACK_POLL_S = 1.0


def refresh_imported_ray(env: dict[str, str]) -> None:
    """Make an already imported Ray (a notebook imported it first) see the environment we set.

    Ray reads the loopback switch and the auth mode at import; there is no public way to re-read them.
    """
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # compiled, no stubs

    if env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False  # read per call, not only at import
    Config.initialize("")  # re-reads RAY_AUTH_MODE, as Ray's own token setup does
    AuthenticationTokenLoader.instance().reset_cache()


def route_ray_messages_to_stderr() -> None:
    """Send Ray's cluster messages ("(raylet) A worker died ...") to stderr on this driver.

    Ray prints them on stdout even with ``log_to_driver=False``; a CLI's stdout
    is data (``--json``). Ray has no setting for the stream.
    """
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_merlin_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._merlin_stderr = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_stderr


def context_outside_ray_task() -> contextvars.Context:
    """A copy of the current context in which Ray sees no current (async actor) task.

    A call made from an async actor's method is that method's child, and ``ray.cancel`` (recursive
    by default; Ray Serve uses it when a client disconnects) cancels children too — also those the
    cancelled method makes while it cleans up. Calls made in this context are nobody's children.
    Ray has no public way to say so; its own Serve tests clear the same variable.
    """
    from ray._raylet import async_task_id  # type: ignore[attr-defined]  # compiled, no stubs

    context = contextvars.copy_context()
    context.run(async_task_id.set, None)
    return context


def dashboard_url() -> str:
    """Where the job API is, from Ray's own record of its dashboard on the cluster we run in.

    Inside an actor there is no public accessor for the dashboard address.
    """
    override = os.environ.get("MERLIN_DASHBOARD_URL")
    if override:
        return override
    from ray._private.services import get_webui_url_from_internal_kv

    url = get_webui_url_from_internal_kv()
    if not url:
        raise BrokerUnavailable("the Ray dashboard (job API) is not running", "start the cluster with its dashboard")
    return url if url.startswith("http") else f"http://{url}"


def job_info_or_none(client: Any, submission_id: str) -> Any | None:
    """``client.get_job_info(id)``, or None when the job server answers 404 (no such job).

    The public method raises the same RuntimeError for "no such job" and for
    "the server failed"; only the status code tells them apart.
    """
    from ray.dashboard.modules.job.pydantic_models import JobDetails

    response = client._do_request("GET", f"/api/jobs/{submission_id}")
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        client._raise_error(response)
    return JobDetails(**response.json())


def ended_jobs(seen: Mapping[str, float]) -> set[str]:
    """The jobs (hex ids) in ``seen`` that the GCS job table marks dead, one GCS call.

    ``seen`` maps a job id to a time its job was alive: a row for that id whose job started
    later is another job (ids restart at 1 with a new cluster), not this one. Public
    alternatives: ``ray.util.state.list_jobs`` goes through the dashboard's HTTP server (an
    extra process and hop) and ``JobSubmissionClient`` lists only submitted jobs, not drivers.
    """
    from ray._private.state import state

    dead: set[str] = set()
    for row in state.job_table():
        job_id = row["JobID"]
        since = seen.get(job_id)
        if since is None or not row["IsDead"]:
            continue
        if row["StartTime"] / 1000.0 <= since + _CLOCK_SLACK_S:
            dead.add(job_id)
    return dead


class JobChanges:
    """Wakes whoever waits when the cluster's job table changes: the GCS job channel.

    The GCS publishes a job's record when it starts and when its driver ends (exit, crash,
    kill -9: its raylet sees the socket close). Ray has no public subscriber; the
    dashboard uses this one (``ray._private.gcs_pubsub.GcsAioJobSubscriber``, token auth
    included). If the subscription fails, :meth:`wait` falls back to a short sleep, so the
    caller's table reads still see every end, only later.
    """

    def __init__(self, gcs_address: str):
        self._address = gcs_address
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def wait(self, timeout_s: float) -> None:
        """Until the job table changes or ``timeout_s`` passes (safe to cancel)."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        if self._reader.done():  # no channel: poll the table instead
            await asyncio.sleep(min(timeout_s, _FALLBACK_POLL_S))
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
        self._changed.clear()

    async def _read(self) -> None:
        from ray._private.gcs_pubsub import GcsAioJobSubscriber

        subscriber = GcsAioJobSubscriber(address=self._address)
        await subscriber.subscribe()
        self._changed.set()  # a job may have ended before the subscription: read the table again
        while True:
            if await subscriber.poll(batch_size=1000, timeout=30):
                self._changed.set()
