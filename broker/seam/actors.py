"""The actor seam: what the broker's shells need from an actor system, and one retrying call.

The resource actors, the coordinator, the run manager and the shim never touch
Ray directly: they hold an :class:`ActorSystem` — :class:`~broker.seam.ray_backend.RaySystem`
in production, :class:`~broker.seam.fake.FakeSystem` (plain asyncio, one process)
in unit tests — and name actors through :class:`ActorRef`. Every call goes
through :meth:`ActorSystem.call`, so there is one retry/unwrap policy
(:mod:`broker.seam.retry`) for everyone.
"""

from __future__ import annotations

import asyncio
import contextvars
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from broker.core.placement_rules import NodeInfo
from broker.errors import BrokerError, BrokerUnavailable
from broker.seam.jobs import JobRunner
from broker.seam.retry import Failure, RetryPolicy

__all__ = ["ActorSystem", "ActorRef", "Spawn", "CallFailed"]

T = TypeVar("T")
# Clean-up tasks in flight (the loop keeps only weak references to tasks).
_AFTERCARE: set[asyncio.Task[Any]] = set()


@dataclass(frozen=True)
class Spawn:
    """How to create a named actor that is missing (idempotent: an existing one is reused)."""

    cls: type
    args: Sequence[Any]
    node_id: str | None = None


class CallFailed(Exception):
    """A backend's failed call, classified; ``cause`` is what the actor raised (REMOTE_ERROR only)."""

    def __init__(self, failure: Failure, detail: str = "", cause: BaseException | None = None):
        super().__init__(failure, detail, cause)
        self.failure = failure
        self.detail = detail
        self.cause = cause


class ActorRef:
    """One named actor, resolved on first use and again after it died."""

    def __init__(self, system: ActorSystem, name: str, namespace: str, spawn: Spawn | None = None):
        self.system = system
        self.name = name
        self.namespace = namespace
        self.spawn = spawn
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            if self.spawn is not None:
                self._handle = self.system.create(self.spawn, self.name, self.namespace)
            else:
                self._handle = self.system.lookup(self.name, self.namespace)
                if self._handle is None:
                    raise BrokerUnavailable(
                        f"no {self.name} runs in namespace {self.namespace!r}", "run `merlin broker up`"
                    )
        return self._handle

    def forget(self) -> None:
        self._handle = None

    def __repr__(self) -> str:
        return f"ActorRef({self.namespace}/{self.name})"


class ActorSystem(ABC):
    """Named detached actors: create, find, kill, call (with the retry policy), tell."""

    def __init__(self, policy: RetryPolicy | None = None):
        self.policy = policy or RetryPolicy()

    # ------------------------------------------------------------------ backend

    @abstractmethod
    def create(self, spawn: Spawn, name: str, namespace: str) -> Any:
        """The actor ``name``: created from ``spawn`` if it does not exist yet."""

    def create_all(self, refs: Sequence[ActorRef]) -> None:
        """Resolve every ref's handle (creating what is missing); a backend may do them in parallel."""
        for ref in refs:
            ref.handle()

    @abstractmethod
    def lookup(self, name: str, namespace: str) -> Any | None:
        """The live actor ``name``, or None."""

    @abstractmethod
    def kill(self, ref: ActorRef) -> None:
        """Kill for good (no restart); its state stays on disk."""

    @abstractmethod
    def names(self, namespace: str) -> list[str]:
        """Names of the live named actors in ``namespace``."""

    @abstractmethod
    def current_node_id(self) -> str | None:
        """The node this process runs on (the coordinator pins the resource actors there)."""

    @abstractmethod
    def alive_nodes(self) -> list[NodeInfo]:
        """The cluster's alive nodes with their labels and total resources (a blocking call)."""

    @abstractmethod
    async def dead_sessions(self, seen: Mapping[str, float], wait_s: float) -> set[str]:
        """Which callers' sessions in ``seen`` (Ray job id -> a time it was alive) have ended.

        With none ended, first waits up to ``wait_s`` for the cluster to report a change
        (Ray: the GCS job channel), so a caller's death is seen in moments without polling;
        cancelling the wait is safe. A session the cluster does not know (from a cluster since
        restarted) or whose job started after its time (a reused id) is never reported: what
        it had stays to the claim window and its TTL.
        """

    @abstractmethod
    def job_runner(self) -> JobRunner:
        """Where runs execute as jobs."""

    @abstractmethod
    async def invoke(self, handle: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One try; raises :class:`CallFailed` for anything but a normal answer."""

    @abstractmethod
    def tell(self, ref: ActorRef, method: str, *args: Any) -> None:
        """Fire and forget: no answer, no retry, never raises (the receiver may be gone)."""

    def outside_current_call(self) -> contextvars.Context:
        """A context for calls that must not count as made by the call this code serves (see
        :meth:`aftercare`). Ray overrides it; a backend without call trees needs nothing more."""
        return contextvars.copy_context()

    async def aftercare(self, work: Awaitable[T]) -> T:
        """Run ``work`` — the clean-up after a cancelled wait — to its end, and answer with it.

        A wait's clean-up (leave the queue, give back a grant that raced the cancel) runs in a
        cancelled task: a second cancel would stop it half-way, and on Ray so would the cancel
        itself, because ``ray.cancel`` is recursive — it also cancels the calls the cancelled call
        makes (Ray Serve cancels a request so when its client disconnects). So ``work`` runs as a
        task of its own, shielded from the caller, in :meth:`outside_current_call`.
        """
        task = self.outside_current_call().run(asyncio.ensure_future, work)
        _AFTERCARE.add(task)
        task.add_done_callback(_AFTERCARE.discard)
        return await asyncio.shield(task)

    # ------------------------------------------------------------------ the one call

    async def call(
        self,
        ref: ActorRef,
        method: str,
        /,
        *args: Any,
        answer_within_s: float | None = None,
        retry: bool = True,
        **kwargs: Any,
    ) -> Any:
        """``ref.method(*args, **kwargs)``, retried with the same arguments while the actor restarts.

        Raises:
            BrokerError: the one the actor raised (it keeps its type across the boundary).
            BrokerUnavailable: the actor did not come back within the policy's window,
                did not answer within ``answer_within_s``, or failed with a non-broker error.
        """
        window = self.policy.window()
        while True:
            try:
                call = self.invoke(ref.handle(), method, args, kwargs)
                if answer_within_s is None:
                    return await call
                try:
                    return await asyncio.wait_for(call, answer_within_s)
                except asyncio.TimeoutError:
                    raise CallFailed(Failure.TIMED_OUT, f"no answer within {answer_within_s:g}s") from None
            except CallFailed as failed:
                if failed.failure is Failure.DEAD:
                    ref.forget()  # a killed actor may be a new one by now: look it up again
                delay = window.next_delay(failed.failure) if retry else None
                if delay is None:
                    raise self.unwrap(ref, method, failed) from None
                await asyncio.sleep(delay)

    def unwrap(self, ref: ActorRef, method: str, failed: CallFailed) -> BrokerError:
        """The error a caller sees for a failed call (one policy for the shim and the coordinator)."""
        if failed.failure is Failure.REMOTE_ERROR:
            cause = failed.cause
            if isinstance(cause, BrokerError):
                return cause
            return BrokerUnavailable(
                f"{ref.name}.{method} failed: {type(cause).__name__}: {cause}",
                "see the actor's log; the call changed nothing it acknowledged",
            )
        if failed.failure is Failure.TIMED_OUT:
            return BrokerUnavailable(f"{ref.name} did not answer {method}: {failed.detail}")
        return BrokerUnavailable(
            f"{ref.name} did not come back within {self.policy.window_s:g}s", "check `merlin broker status`"
        )
