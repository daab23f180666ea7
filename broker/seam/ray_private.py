"""The private Ray APIs the broker relies on, one function each (Ray 2.60; pinned by tests).

Nothing outside this module touches ``ray._private`` or ``ray._raylet``. Each
function says why no public API does the job; ``tests/unit/test_ray_seam.py``
pins the attributes they use, so a Ray upgrade that moves one fails a test
with the function's name instead of breaking a user's notebook.
"""

from __future__ import annotations

import os
from typing import Any

from broker.errors import BrokerUnavailable

__all__ = ["refresh_imported_ray", "route_ray_messages_to_stderr", "dashboard_url", "job_info_or_none"]


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
