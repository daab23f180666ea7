"""An in-process actor system: the broker's actors as plain objects on one asyncio loop.

For unit tests of the shells (resource actor, coordinator, run manager) without
a cluster. It keeps the parts of Ray's behaviour the shells depend on:
arguments and answers are copied by pickling (so an unpicklable value or a
shared mutable object fails here as it would on Ray), an actor's exception
reaches the caller with its type, a cancelled call cancels the calls it makes
(also those it makes afterwards, while it cleans up: Ray's ``ray.cancel`` is
recursive), and :meth:`FakeSystem.crash` kills an actor
the way kill -9 does — calls in flight fail, its timers stop — after which
:meth:`FakeSystem.restart` runs its constructor again on the same state dir,
as Ray's ``max_restarts=-1`` does. What only Ray can show (real processes,
restarts under load, jobs, auth) stays in the integration tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import pickle
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

from broker.core.placement_rules import NodeInfo
from broker.seam.actors import ActorRef, ActorSystem, CallFailed, Spawn
from broker.seam.jobs import FakeJobRunner
from broker.seam.retry import Failure, RetryPolicy

__all__ = ["FakeSystem"]


@dataclass
class _Hosted:
    spawn: Spawn
    instance: Any = None
    alive: bool = False
    died: asyncio.Future[None] | None = None  # set when the instance is killed
    life: int = 0  # how many instances have been started: a dead one's calls never come back


@dataclass(frozen=True)
class _Handle:
    namespace: str
    name: str


def _copied(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value))


class _Call:
    """One call in flight, as the calls it makes see it (Ray's task tree)."""

    cancelled = False


_CURRENT_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("merlin_fake_call", default=None)


class FakeSystem(ActorSystem):
    """Hosts actors in this process; ``jobs`` is the shared :class:`FakeJobRunner`."""

    def __init__(self, policy: RetryPolicy | None = None):
        super().__init__(policy or RetryPolicy(window_s=2.0, first_delay_s=0.01, max_delay_s=0.05))
        self.jobs = FakeJobRunner()
        self._hosted: dict[tuple[str, str], _Hosted] = {}
        self.node_id = "fake-head-node"
        # The cluster's nodes as alive_nodes() reports them; a test adds, labels or removes nodes.
        self.nodes: list[NodeInfo] = [NodeInfo(self.node_id, {}, {"CPU": 2.0, "memory": 4.0 * 1024**3}, is_head=True)]
        self.ended_sessions: set[str] = set()  # callers' sessions (job ids) a test ended: end_session()
        self._session_ended: asyncio.Event | None = None

    # ------------------------------------------------------------------ ActorSystem

    def create(self, spawn: Spawn, name: str, namespace: str) -> Any:
        key = (namespace, name)
        if key not in self._hosted:
            self._hosted[key] = _Hosted(spawn)
            self._start(key)
        return _Handle(namespace, name)

    def lookup(self, name: str, namespace: str) -> Any | None:
        hosted = self._hosted.get((namespace, name))
        return _Handle(namespace, name) if hosted is not None and hosted.alive else None

    def kill(self, ref: ActorRef) -> None:
        ref.forget()
        self.crash(ref.name, ref.namespace)
        self._hosted.pop((ref.namespace, ref.name), None)

    def names(self, namespace: str) -> list[str]:
        return [name for (ns, name), hosted in self._hosted.items() if ns == namespace and hosted.alive]

    def current_node_id(self) -> str | None:
        return self.node_id

    def alive_nodes(self) -> list[NodeInfo]:
        return list(self.nodes)

    async def dead_sessions(self, seen: Mapping[str, float], wait_s: float) -> set[str]:
        dead = {session for session in seen if session in self.ended_sessions}
        if dead or wait_s <= 0:
            return dead
        ended = self._ended_event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ended.wait(), wait_s)
        ended.clear()
        return {session for session in seen if session in self.ended_sessions}

    def end_session(self, session: str) -> None:
        """A caller's driver died: the cluster reports its session ended from now on."""
        self.ended_sessions.add(session)
        self._ended_event().set()

    def _ended_event(self) -> asyncio.Event:
        if self._session_ended is None:
            self._session_ended = asyncio.Event()
        return self._session_ended

    def job_runner(self) -> FakeJobRunner:
        return self.jobs

    def outside_current_call(self) -> contextvars.Context:
        context = contextvars.copy_context()
        context.run(_CURRENT_CALL.set, None)
        return context

    async def invoke(self, handle: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        caller = _CURRENT_CALL.get()
        if caller is not None and caller.cancelled:
            # Ray's ray.cancel is recursive: a cancelled call's calls are cancelled, also the ones it
            # makes while it cleans up (see ActorSystem.aftercare).
            raise asyncio.CancelledError
        hosted = self._hosted.get((handle.namespace, handle.name))
        if hosted is None or not hosted.alive:
            raise CallFailed(Failure.DEAD, f"{handle.name} is not running")
        args, kwargs = _copied((args, kwargs))
        died = hosted.died
        assert died is not None
        call = _Call()
        context = contextvars.copy_context()
        context.run(_CURRENT_CALL.set, call)
        task = context.run(asyncio.ensure_future, self._run(hosted.instance, method, args, kwargs))
        try:
            await asyncio.wait({task, died}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancelled = True
            task.cancel()  # the caller gave up (ray.cancel): the actor's task is cancelled, as on Ray
            raise
        if not task.done():
            # Killed under the call: like kill -9, none of the actor's code runs after this
            # (its task is abandoned, not cancelled, so no cleanup handler writes anything).
            raise CallFailed(Failure.DEAD, f"{handle.name} died during {method}")
        return _copied(task.result())

    def tell(self, ref: ActorRef, method: str, *args: Any) -> None:
        hosted = self._hosted.get((ref.namespace, ref.name))
        if hosted is None or not hosted.alive:
            return
        task = asyncio.ensure_future(self._run(hosted.instance, method, _copied(args), {}))
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # never "never retrieved"

    # ------------------------------------------------------------------ faults

    def instance(self, name: str, namespace: str) -> Any:
        """The live object behind ``name`` (for a test to read its state)."""
        return self._hosted[(namespace, name)].instance

    def crash(self, name: str, namespace: str) -> None:
        """kill -9: calls in flight fail with a dead actor, timers stop, nothing more is written."""
        hosted = self._hosted.get((namespace, name))
        if hosted is None or not hosted.alive:
            return
        hosted.alive = False
        if hosted.died is not None and not hosted.died.done():
            hosted.died.set_result(None)
        close = getattr(hosted.instance, "close", None)
        if close is not None:
            close()
        hosted.instance = None

    def restart(self, name: str, namespace: str) -> Any:
        """Ray's restart: the constructor runs again (state comes back from the disk)."""
        self.crash(name, namespace)
        return self._start((namespace, name))

    def _start(self, key: tuple[str, str]) -> Any:
        hosted = self._hosted[key]
        hosted.died = asyncio.get_running_loop().create_future()
        hosted.life += 1
        system = _OneLife(self, hosted, hosted.life)
        hosted.instance = hosted.spawn.cls(*_copied(tuple(hosted.spawn.args)), system=system)
        hosted.alive = True
        return hosted.instance

    @staticmethod
    async def _run(instance: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            result = getattr(instance, method)(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - what the actor raised reaches the caller, as on Ray
            with contextlib.suppress(Exception):
                exc = _copied(exc)
            raise CallFailed(Failure.REMOTE_ERROR, cause=exc) from None


class _OneLife:
    """The system as one instance of an actor sees it: after that instance is killed, its calls
    never return and its tells go nowhere — code of a killed process runs no further, as on Ray
    (its coroutines are frozen, not cancelled, so no cleanup handler writes anything)."""

    def __init__(self, system: FakeSystem, hosted: _Hosted, life: int):
        self._system = system
        self._hosted = hosted
        self._life = life

    def __getattr__(self, name: str) -> Any:
        return getattr(self._system, name)

    @property
    def _dead(self) -> bool:
        return self._hosted.life != self._life or not self._hosted.alive

    async def _freeze_if_dead(self) -> None:
        if self._dead:
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 0)():  # Python 3.11+
                # Cancelled (the test's loop shuts down, or a caller gives up): a killed process's
                # cleanup handlers must not freeze again, or the loop waits for them forever.
                raise asyncio.CancelledError
            await asyncio.get_running_loop().create_future()  # never set

    async def call(self, ref: ActorRef, method: str, /, *args: Any, **kwargs: Any) -> Any:
        await self._freeze_if_dead()
        try:
            result = await self._system.call(ref, method, *args, **kwargs)
        finally:
            await self._freeze_if_dead()
        return result

    async def aftercare(self, work: Awaitable[Any]) -> Any:
        if self._dead:  # a killed process starts no clean-up either
            if asyncio.iscoroutine(work):
                work.close()
            await self._freeze_if_dead()
        return await self._system.aftercare(work)

    def tell(self, ref: ActorRef, method: str, *args: Any) -> None:
        if not self._dead:
            self._system.tell(ref, method, *args)
