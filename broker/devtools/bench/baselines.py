"""What the broker is judged against, measured in the same run: Ray with nothing of ours on top."""

from __future__ import annotations

import asyncio
import os
from collections import deque

import ray

__all__ = ["BareActor", "LockActor", "ProxyActor"]


@ray.remote(num_cpus=0)
class BareActor:
    """An async actor that answers at once: Ray's own round-trip floor."""

    async def ping(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0, max_concurrency=10_000)
class LockActor:
    """A minimal in-memory async lock: acquire awaits a future, release grants the next.

    No durability, no validation, no fencing: the least a lock actor can do.
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[asyncio.Future[bool]] = deque()

    async def acquire(self, wait: bool = True) -> bool:
        if not self._held:
            self._held = True
            return True
        if not wait:
            return False
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return await future

    async def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set_result(True)
        else:
            self._held = False

    async def ping(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class ProxyActor:
    """An async actor that forwards each call to another actor: Ray's cost of one forwarding hop."""

    def __init__(self, target: ray.actor.ActorHandle) -> None:
        self._target = target

    async def ping(self) -> int:
        return await self._target.ping.remote()
