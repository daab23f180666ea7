"""All Ray API calls of the broker are made here (Ray Serve's ``ActorReplicaWrapper`` idea).

:class:`RaySystem` implements :class:`~broker.seam.actors.ActorSystem` on Ray:
detached named actors with the options of :func:`broker.seam.placement.actor_options`,
Ray's exceptions classified once (:func:`classify`), the shim's synchronous
call with the same retry policy, and :class:`RayJobRunner` for Ray Jobs. The
private Ray APIs the broker cannot avoid live in :mod:`broker.seam.ray_private`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

from broker.core.placement_rules import NodeInfo
from broker.errors import BrokerUnavailable
from broker.seam.actors import ActorRef, ActorSystem, CallFailed, Spawn
from broker.seam.jobs import JobInfo, JobSpec
from broker.seam.placement import actor_options
from broker.seam.retry import Failure, RetryPolicy

T = TypeVar("T")

__all__ = ["RaySystem", "RayJobRunner", "classify", "remote_class", "head_node_id", "alive_nodes"]


def classify(err: BaseException) -> CallFailed | None:
    """Ray's exception for a failed actor call -> the seam's :class:`CallFailed`; None if not Ray's."""
    if isinstance(err, RayTaskError):
        return CallFailed(Failure.REMOTE_ERROR, cause=err.cause)
    if isinstance(err, ActorUnavailableError):  # a subclass of RayActorError: check it first
        return CallFailed(Failure.RESTARTING, str(err)[:200])
    if isinstance(err, RayActorError):
        return CallFailed(Failure.DEAD, str(err)[:200])
    if isinstance(err, GetTimeoutError):
        return CallFailed(Failure.TIMED_OUT, str(err)[:200])
    return None


@functools.cache
def remote_class(cls: type) -> Any:
    """``ray.remote(cls)``, once per class (the plain class stays importable and testable)."""
    return ray.remote(cls)


def head_node_id() -> str | None:
    """The id of the cluster's head node (needs a connected Ray driver or worker)."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return str(node["NodeID"])
    return None


def alive_nodes() -> list[NodeInfo]:
    """The alive nodes of the connected cluster: id, labels, total resources (one GCS call)."""
    return [
        NodeInfo(
            node_id=str(node["NodeID"]),
            labels={str(k): str(v) for k, v in (node.get("Labels") or {}).items()},
            resources={str(k): float(v) for k, v in (node.get("Resources") or {}).items()},
            is_head="node:__internal_head__" in (node.get("Resources") or {}),
        )
        for node in ray.nodes()
        if node.get("Alive")
    ]


class RaySystem(ActorSystem):
    """Named detached actors on the Ray cluster this process is connected to."""

    def __init__(self, policy: RetryPolicy | None = None):
        super().__init__(policy)
        self._job_changes: Any = None  # ray_private.JobChanges, made in the loop that first waits

    def create(self, spawn: Spawn, name: str, namespace: str) -> Any:
        options = actor_options(name, namespace, spawn.node_id)
        return remote_class(spawn.cls).options(**options).remote(*spawn.args)

    def create_all(self, refs: Sequence[ActorRef]) -> None:
        # Each create is one or two blocking round trips to Ray's control store: overlap them.
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(refs))), thread_name_prefix="merlin-create") as pool:
            list(pool.map(ActorRef.handle, refs))  # re-raises the first failure

    def lookup(self, name: str, namespace: str) -> Any | None:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            return None

    def kill(self, ref: ActorRef) -> None:
        handle = self.lookup(ref.name, ref.namespace)
        ref.forget()
        if handle is not None:
            with contextlib.suppress(ValueError):
                ray.kill(handle, no_restart=True)

    def names(self, namespace: str) -> list[str]:
        return [
            actor["name"]
            for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == namespace
        ]

    def current_node_id(self) -> str | None:
        return str(ray.get_runtime_context().get_node_id())

    def alive_nodes(self) -> list[NodeInfo]:
        return alive_nodes()

    async def dead_sessions(self, seen: Mapping[str, float], wait_s: float) -> set[str]:
        from broker.seam.ray_private import JobChanges, ended_jobs

        dead = await asyncio.to_thread(ended_jobs, seen)
        if dead or wait_s <= 0:
            return dead
        if self._job_changes is None:
            self._job_changes = JobChanges(ray.get_runtime_context().gcs_address)
        await self._job_changes.wait(wait_s)
        return await asyncio.to_thread(ended_jobs, seen)

    def session_id(self) -> str:
        """This driver's session: its Ray job id (what a waiting request is tied to)."""
        return str(ray.get_runtime_context().get_job_id())

    def job_runner(self) -> RayJobRunner:
        return RayJobRunner()

    async def invoke(self, handle: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return await getattr(handle, method).remote(*args, **kwargs)
        except (RayTaskError, RayActorError, GetTimeoutError) as err:
            raise _classified(err) from None

    def outside_current_call(self) -> contextvars.Context:
        from broker.seam.ray_private import context_outside_ray_task

        return context_outside_ray_task()

    def tell(self, ref: ActorRef, method: str, *args: Any) -> None:
        try:
            getattr(ref.handle(), method).remote(*args)
        except Exception:  # noqa: BLE001 - fire and forget: the receiver may be gone, that is fine
            ref.forget()

    # ------------------------------------------------------------------ the shim's synchronous call

    def retrying(self, operation: Callable[[], T]) -> T:
        """Run a whole idempotent operation (``broker up``) again while an actor it uses restarts.

        For operations that create actors as well as call them: a Ray error from either
        is classified like a call's, and retried within the same policy window.
        """
        window = self.policy.window()
        while True:
            try:
                return operation()
            except (RayTaskError, RayActorError, GetTimeoutError) as err:
                failed = _classified(err)
                delay = window.next_delay(failed.failure)
                if delay is None:
                    raise BrokerUnavailable(
                        f"kept failing while its actors restarted ({failed.failure.value}) for "
                        f"{self.policy.window_s:g}s",
                        "see logs/broker.log in the state dir, then try again",
                    ) from None
                time.sleep(delay)

    def call_sync(
        self,
        ref: ActorRef,
        method: str,
        /,
        *args: Any,
        answer_within_s: float | None = None,
        progress: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """:meth:`ActorSystem.call` for a driver outside any event loop (the shim, the CLI).

        ``progress`` is called about twice a second while the call is pending;
        Ctrl-C cancels the pending call and propagates.
        """
        window = self.policy.window()
        while True:
            object_ref = getattr(ref.handle(), method).remote(*args, **kwargs)
            try:
                if progress is not None:
                    while not ray.wait([object_ref], timeout=0.5)[0]:
                        progress()
                return ray.get(object_ref, timeout=answer_within_s)
            except (RayTaskError, RayActorError, GetTimeoutError) as err:
                failed = _classified(err)
                if failed.failure is Failure.TIMED_OUT:
                    ray.cancel(object_ref)
                if failed.failure is Failure.DEAD or failed.failure is Failure.RESTARTING:
                    ref.forget()
                delay = window.next_delay(failed.failure)
                if delay is None:
                    raise self.unwrap(ref, method, failed) from None
                time.sleep(delay)
            except KeyboardInterrupt:
                ray.cancel(object_ref)
                raise


def _classified(err: BaseException) -> CallFailed:
    failed = classify(err)
    if failed is None:  # not reachable for the exception types the callers catch
        return CallFailed(Failure.REMOTE_ERROR, cause=err)
    return failed


class RayJobRunner:
    """:class:`~broker.seam.jobs.JobRunner` on Ray's job API (the dashboard's HTTP endpoint)."""

    def __init__(self, dashboard_url: str | None = None):
        self._url = dashboard_url
        self._client: Any = None

    def _jobs(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            from broker.seam.ray_private import dashboard_url

            self._client = JobSubmissionClient(self._url or dashboard_url())
        return self._client

    async def submit(self, spec: JobSpec) -> bool:
        if await self.info(spec.submission_id) is not None:
            return False  # idempotent by submission id: a restarted coordinator finds its job
        kwargs: dict[str, Any] = {
            "entrypoint": spec.entrypoint,
            "submission_id": spec.submission_id,
            "runtime_env": {"env_vars": dict(spec.env)},
            "entrypoint_num_cpus": spec.num_cpus,
            "metadata": dict(spec.metadata),
        }
        if spec.memory_bytes:
            kwargs["entrypoint_memory"] = spec.memory_bytes
        if spec.resources:
            kwargs["entrypoint_resources"] = dict(spec.resources)
        if spec.label_selector:
            kwargs["entrypoint_label_selector"] = dict(spec.label_selector)
        try:
            await asyncio.to_thread(self._jobs().submit_job, **kwargs)
        except RuntimeError:
            if await self.info(spec.submission_id) is None:
                raise
            return False  # submitted by a call that raced this one
        return True

    async def info(self, submission_id: str) -> JobInfo | None:
        from broker.seam.ray_private import job_info_or_none

        raw = await asyncio.to_thread(job_info_or_none, self._jobs(), submission_id)
        if raw is None:
            return None
        status = str(getattr(raw.status, "value", raw.status))
        return JobInfo(
            submission_id=submission_id,
            status=status,
            exit_code=raw.driver_exit_code,
            message=str(raw.message or "")[:300],
            node_id=getattr(raw, "driver_node_id", None) or None,
        )

    async def stop(self, submission_id: str) -> None:
        await asyncio.to_thread(self._jobs().stop_job, submission_id)

    async def logs(self, submission_id: str) -> str:
        return str(await asyncio.to_thread(self._jobs().get_job_logs, submission_id))
