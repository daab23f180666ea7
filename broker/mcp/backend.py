"""The MCP server's one seam to the broker: what its tools call, and the shim (Ray) behind it.

The backend is the Python shim (``broker.connect()``: a Ray driver in this
process, with the shim's retries and fast path), not the HTTP API, because a
Ray driver's leases are session-bound: if the server is SIGKILLed, Ray marks
its job dead and the broker ends its waits and leases at once, where an HTTP
client's granted lease would live to its TTL (README "Coding agents"). An
HTTP backend would be a second class with these methods and nothing else in
``broker.mcp`` would change. Calls block; the server runs them in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from broker.core.runs import RunRecord
from broker.models import GroupLease, Lease, ResourceStatus

__all__ = ["Backend", "ShimBackend"]


class Backend(Protocol):
    """The broker calls the MCP tools need; errors are ``broker.errors`` classes."""

    def resources(self) -> list[ResourceStatus]: ...

    def pools(self) -> list[dict[str, Any]]: ...

    def reserve(
        self,
        resource: str,
        holder: str,
        *,
        ttl_s: float,
        wait: bool,
        timeout_s: float | None,
        priority: int,
        request_id: str,
        note: str,
        on_position: Callable[[int | None], None] | None,
        bind_session: bool,
    ) -> Lease: ...

    def reserve_group(
        self,
        holder: str,
        *,
        labels: str | None,
        keys: list[str] | None,
        count: int | None,
        ttl_s: float,
        wait: bool,
        timeout_s: float | None,
        priority: int,
        request_id: str,
        note: str,
        on_position: Callable[[int | None], None] | None,
        bind_session: bool,
    ) -> GroupLease: ...

    def lease(self, lease_id: str) -> Lease | GroupLease: ...

    def renew(self, lease_id: str, ttl_s: float | None) -> Lease | GroupLease: ...

    def release(self, lease_id: str) -> Lease | GroupLease: ...

    def withdraw(self, resource: str, holder: str, request_id: str) -> Lease | None: ...

    def withdraw_group(self, holder: str, request_id: str) -> GroupLease | None: ...

    def queue_position(self, resource: str, holder: str, request_id: str) -> int | None: ...

    def group_position(self, holder: str, request_id: str) -> int | None: ...

    def submit(
        self, target_dir: Path, *, holder: str, priority: int, request_id: str, source: str, restart: bool
    ) -> RunRecord: ...

    def run(self, run_id: str) -> RunRecord: ...

    def logs(self, run_id: str) -> str: ...


class ShimBackend:
    """The broker through ``broker.connect()``, connected on first use (a failed connect is retried next call).

    Connecting lazily keeps ``merlin mcp`` answering when the broker is down:
    each tool then says ``BrokerUnavailable`` with what to run, instead of the
    server failing to start and the agent seeing no tools at all.
    """

    def __init__(self, *, address: str | None = None, namespace: str | None = None, state_dir: str | None = None):
        self._where = dict(address=address, namespace=namespace, state_dir=state_dir)
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from broker.client import connect

                self._client = connect(
                    self._where["address"], namespace=self._where["namespace"], state_dir=self._where["state_dir"]
                )
            return self._client

    def resources(self) -> list[ResourceStatus]:
        return list(self.client().resources())

    def pools(self) -> list[dict[str, Any]]:
        return self.client().call("pools")

    def reserve(self, resource: str, holder: str, **kwargs: Any) -> Lease:
        return self.client().reserve(resource, holder, **kwargs)

    def reserve_group(self, holder: str, **kwargs: Any) -> GroupLease:
        return self.client().reserve_group(holder, **kwargs)

    def lease(self, lease_id: str) -> Lease | GroupLease:
        return self.client().get_lease(lease_id)

    def renew(self, lease_id: str, ttl_s: float | None) -> Lease | GroupLease:
        return self.client().renew(lease_id, ttl_s)

    def release(self, lease_id: str) -> Lease | GroupLease:
        return self.client().release(lease_id)

    def withdraw(self, resource: str, holder: str, request_id: str) -> Lease | None:
        return self.client().call("withdraw", resource, holder, request_id)

    def withdraw_group(self, holder: str, request_id: str) -> GroupLease | None:
        return self.client().call("withdraw_group", holder, request_id)

    def queue_position(self, resource: str, holder: str, request_id: str) -> int | None:
        return self.client().queue_position(resource, holder, request_id)

    def group_position(self, holder: str, request_id: str) -> int | None:
        return self.client().call("group_position", holder, request_id)

    def submit(
        self, target_dir: Path, *, holder: str, priority: int, request_id: str, source: str, restart: bool
    ) -> RunRecord:
        return self.client().call(
            "submit",
            str(target_dir),
            holder=holder,
            priority=priority,
            request_id=request_id,
            source=source,
            restart=restart,
        )

    def run(self, run_id: str) -> RunRecord:
        return self.client().call("run", run_id)

    def logs(self, run_id: str) -> str:
        return self.client().call("logs", run_id)
