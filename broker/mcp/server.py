"""The MCP tools on the official SDK, the background renewer, and the session's end.

Every tool answers JSON (``structuredContent``, and the same text as its
content): a lease as its holder sees it, with ``held``, or an error
``{"error": {"type": "ResourceBusy", "message", <fields>}}`` with the types
of :mod:`broker.errors` (``isError`` set). A successful ``reserve`` means the
lease is held; leases the session took are renewed in the background (a
third of their TTL) and released when the session ends — stdin closes, or
SIGTERM/SIGINT — unless taken with ``keep``.

Blocking broker calls run in worker threads: a waiting ``reserve`` never
stops the renewer or the other tools. A wait the client cancels leaves the
queue.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.from_thread
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from broker.errors import BrokerError, BrokerUnavailable, InvalidRequest, LeaseNotHeld
from broker.mcp.backend import Backend
from broker.mcp.session import Pending, SessionLeases, error_view, is_gone, lease_view, resource_filter
from broker.models import GroupLease, Lease, LeaseState

__all__ = ["MerlinSession", "build_server", "serve"]

INSTRUCTIONS = (
    "Leases on scarce lab hardware (FPGA slots, dev boards, simulator lanes) from the Merlin broker. "
    "list_resources shows what exists and who holds it; reserve takes a lease (one key, a label selector "
    "such as kind=sim for any free one, or several keys together) and returns its lease_id, the capability "
    "to renew or release it; keep it. This session renews every lease it took and releases them when it "
    "ends, unless reserved with keep=true. After losing context, call held with no argument: it lists the "
    "leases this session holds, with their ids. Pass your own request_id to reserve to retry safely: the same "
    "id never takes a second lease. Before touching hardware, check held(lease_id) says held=true."
)
LOG_TAIL_CHARS = 20_000  # a log answer's default size: enough to see a failure, small enough for a context


class MerlinSession:
    """One MCP session: its holder, its leases (``SessionLeases``), and the tools' bodies.

    The clocks are arguments so the renewer can be driven in tests; the
    backend is the seam to the broker (``broker.mcp.backend``).
    """

    def __init__(
        self,
        backend: Backend,
        holder: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.backend = backend
        self.holder = holder
        self.leases = SessionLeases()
        self._clock = clock
        self._wall = wall
        self._closed = threading.Lock()  # held for the whole of close(): a second close waits for the first

    # ------------------------------------------------------------------ plumbing

    async def _call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        # abandon_on_cancel: a client that cancels a long wait gets its answer at once; the thread's
        # call ends by itself (its request is withdrawn, see reserve).
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)

    def _view(self, lease: Lease | GroupLease) -> dict[str, Any]:
        return lease_view(lease, self.leases.get(lease.lease_id), self._wall())

    # ------------------------------------------------------------------ tools

    async def list_resources(
        self, state: list[str] | None, labels: str | None, holder: str | None, mine: bool
    ) -> dict[str, Any]:
        chosen = resource_filter(state, labels, holder, mine, self.holder)
        statuses = await self._call(self.backend.resources)
        pools = await self._call(self.backend.pools) if not (state or labels or holder or mine) else []
        return {
            "holder": self.holder,
            "resources": [status.model_dump(mode="json") for status in chosen.apply(statuses)],
            "pools": pools,
        }

    async def reserve(
        self,
        *,
        resource: str | None,
        labels: str | None,
        keys: list[str] | None,
        count: int | None,
        ttl_s: float,
        wait: bool,
        timeout_s: float | None,
        priority: int,
        request_id: str | None,
        note: str,
        keep: bool,
        on_position: Callable[[int | None], None] | None = None,
    ) -> dict[str, Any]:
        forms = [name for name, value in (("resource", resource), ("labels", labels), ("keys", keys)) if value]
        if len(forms) != 1:
            raise InvalidRequest("reserve takes exactly one of: resource, labels, keys", "resource")
        if count is not None and resource is not None:
            raise InvalidRequest("count goes with labels or keys, not with one resource", "count")
        # Random, so nobody can guess it: a request id answers with the whole lease.
        request_id = request_id or f"mcp-{uuid.uuid4().hex}"
        common: dict[str, Any] = dict(
            ttl_s=float(ttl_s),
            wait=wait,
            timeout_s=float(timeout_s) if timeout_s is not None else None,
            priority=priority,
            request_id=request_id,
            note=note,
            on_position=on_position if wait else None,
            # Tied to this server's process (the shim's session): if it dies, even by SIGKILL, its
            # waits and leases end within seconds. A lease to keep must outlive it: TTL-bound.
            bind_session=not keep,
        )
        pending = Pending(self.holder, request_id, resource)
        if wait:
            self.leases.waiting(pending)
        try:
            if resource is not None:
                lease: Lease | GroupLease = await self._call(self.backend.reserve, resource, self.holder, **common)
            else:
                lease = await self._call(
                    self.backend.reserve_group, self.holder, labels=labels, keys=keys, count=count, **common
                )
        except anyio.get_cancelled_exc_class():
            if wait:  # the client gave up waiting: leave the queue, give back a grant that raced the cancel
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._withdraw, pending)
            raise
        finally:
            self.leases.answered(request_id)
        if lease.state is not LeaseState.GRANTED:
            # An ok answer means "you hold it": an old answer to a reused request id is not that.
            why = "still queued" if lease.state is LeaseState.QUEUED else f"ended ({lease.end_reason or lease.state})"
            raise LeaseNotHeld(
                lease.lease_id, lease.state.value, f"request id {request_id} names a lease that is {why}"
            )
        if not self.leases.track(lease.lease_id, ttl_s=lease.ttl_s, keep=keep, now=self._clock()):
            await self._call(self.backend.release, lease.lease_id)  # granted while the session ends
            raise BrokerUnavailable("the MCP session is ending; the lease was released", "start a new session")
        return {**self._view(lease), "request_id": request_id}

    async def held(self, lease_id: str | None) -> dict[str, Any]:
        if lease_id is not None:
            lease = await self._call(self.backend.lease, lease_id)
            self._note_state(lease)
            return self._view(lease)
        answers = []
        for known in self.leases.lease_ids():
            try:
                lease = await self._call(self.backend.lease, known)
            except BrokerError as err:
                answers.append({"lease_id": known, "held": None, **error_view(err)})
                continue
            self._note_state(lease)
            answers.append(self._view(lease))
        waiting = [{"request_id": p.request_id, "resource": p.resource} for p in self.leases.waiting_requests()]
        return {"holder": self.holder, "leases": answers, "waiting": waiting}

    def _note_state(self, lease: Lease | GroupLease) -> None:
        tracked = self.leases.get(lease.lease_id)
        if tracked is not None and tracked.renewing and lease.state is not LeaseState.GRANTED:
            self.leases.lost(lease.lease_id, error_view(LeaseNotHeld(lease.lease_id, lease.state.value)))

    async def renew(self, lease_id: str, ttl_s: float | None) -> dict[str, Any]:
        lease = await self._call(self.backend.renew, lease_id, float(ttl_s) if ttl_s is not None else None)
        self.leases.renewed(lease_id, lease.ttl_s, self._clock())
        return self._view(lease)

    async def release(self, lease_id: str) -> dict[str, Any]:
        lease = await self._call(self.backend.release, lease_id)
        self.leases.forget(lease_id)
        return self._view(lease)

    async def queue_position(self, request_id: str, resource: str | None) -> dict[str, Any]:
        if resource is not None:
            position = await self._call(self.backend.queue_position, resource, self.holder, request_id)
        else:
            position = await self._call(self.backend.group_position, self.holder, request_id)
        return {"request_id": request_id, "resource": resource, "position": position, "waiting": position is not None}

    async def submit(self, target_dir: str, priority: int, request_id: str | None, restart: bool) -> dict[str, Any]:
        record = await self._call(
            self.backend.submit,
            Path(target_dir).expanduser().resolve(),
            holder=self.holder,
            priority=priority,
            request_id=request_id or f"mcp-{uuid.uuid4().hex}",
            source=f"merlin mcp ({self.holder})"[:128],
            restart=restart,
        )
        return record.model_dump(mode="json")

    async def run_status(self, run_id: str) -> dict[str, Any]:
        return (await self._call(self.backend.run, run_id)).model_dump(mode="json")

    async def run_logs(self, run_id: str, max_chars: int) -> dict[str, Any]:
        if max_chars < 1:
            raise InvalidRequest(f"invalid max_chars={max_chars}: must be at least 1", "max_chars")
        record = await self._call(self.backend.run, run_id)
        text = await self._call(self.backend.logs, run_id)
        return {
            "run_id": run_id,
            "status": record.status.value,
            "finished": record.finished,
            "total_chars": len(text),
            "truncated": len(text) > max_chars,
            "text": text[-max_chars:],
        }

    # ------------------------------------------------------------------ the session's life

    async def renewer(self) -> None:
        """Renew every lease the session took, a third of its TTL apart, until cancelled."""
        while True:
            due_in = self.leases.next_due_in(self._clock())
            await anyio.sleep(1.0 if due_in is None else min(due_in, 1.0))
            for lease_id in self.leases.due(self._clock()):
                await self.renew_one(lease_id)

    async def renew_one(self, lease_id: str) -> None:
        try:
            lease = await self._call(self.backend.renew, lease_id, None)
        except BrokerError as err:
            if is_gone(err):
                self.leases.lost(lease_id, error_view(err))
            # Otherwise the broker is away for a moment: the lease stays due and is tried next pass.
            return
        self.leases.renewed(lease_id, lease.ttl_s, self._clock())

    def close(self) -> dict[str, int]:
        """The session ends: withdraw what waits, release what it holds (not ``keep``). Blocks; idempotent."""
        with self._closed:
            pending, release, kept = self.leases.close()
            released = withdrawn = 0
            for request in pending:
                withdrawn += self._withdraw(request)
            for lease_id in release:
                try:
                    self.backend.release(lease_id)
                    released += 1
                except BrokerError as err:
                    _log(f"could not release a lease at the session's end: {err}")
            return {"withdrawn": withdrawn, "released": released, "kept": len(kept)}

    def _withdraw(self, request: Pending) -> int:
        """Take a waiting request out of its queue; a grant that raced it is released. 1 if it was found."""
        try:
            if request.resource is None:
                lease: Lease | GroupLease | None = self.backend.withdraw_group(request.holder, request.request_id)
            else:
                lease = self.backend.withdraw(request.resource, request.holder, request.request_id)
            if lease is not None and lease.state is LeaseState.GRANTED:
                self.backend.release(lease.lease_id)
        except BrokerError as err:
            _log(f"could not withdraw a waiting request at the session's end: {err}")
            return 0
        return int(lease is not None)


def _log(line: str) -> None:
    """The server's own lines go to stderr: stdout is the protocol."""
    sys.stderr.write(f"merlin mcp: {line}\n")
    sys.stderr.flush()


def _answer(data: dict[str, Any], *, error: bool = False) -> CallToolResult:
    text = json.dumps(data, default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data, is_error=error)


async def _answering(body: Any) -> CallToolResult:
    """Run a tool's body: its JSON, or the error's JSON (the same types as ``broker.errors``)."""
    try:
        return _answer(await body)
    except BrokerError as err:
        return _answer(error_view(err), error=True)
    except Exception as err:  # an agent gets JSON for anything, never a dropped session
        if os.environ.get("MERLIN_DEBUG"):
            raise
        return _answer(error_view(err), error=True)


def _progress_reporter(ctx: Context) -> Callable[[int | None], None]:
    """Tell the client the request's place in the queue while it waits (MCP progress notifications)."""

    def report(position: int | None) -> None:
        if position is None:
            return
        try:
            anyio.from_thread.run(ctx.report_progress, 0.0, None, f"place {position} in the queue")
        except Exception:  # noqa: BLE001 - progress is a courtesy; the wait goes on without it
            return

    return report


def build_server(session: MerlinSession) -> MCPServer:
    """The MCP server with the broker's tools, bound to ``session``."""
    server: MCPServer = MCPServer("merlin", instructions=INSTRUCTIONS, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=read_only)
    async def list_resources(
        state: Annotated[
            list[str] | None, Field(description="only these states: free, leased, maintenance, down")
        ] = None,
        labels: Annotated[str | None, Field(description="only keys with these labels, e.g. kind=sim,site=a")] = None,
        holder: Annotated[str | None, Field(description="only keys this holder holds or waits for")] = None,
        mine: Annotated[bool, Field(description="only keys this session's holder holds or waits for")] = False,
    ) -> CallToolResult:
        """Every resource key: state, holder, fencing token, expiry, queue, labels; and the catalog's pools."""
        return await _answering(session.list_resources(state, labels, holder, mine))

    @server.tool()
    async def reserve(
        ctx: Context,
        resource: Annotated[str | None, Field(description="one resource key, e.g. firesim_u250")] = None,
        labels: Annotated[str | None, Field(description="any key matching this selector, e.g. kind=sim")] = None,
        keys: Annotated[list[str] | None, Field(description="these keys together (or any `count` of them)")] = None,
        count: Annotated[int | None, Field(description="with labels/keys: how many keys (default 1 / all)")] = None,
        ttl_s: Annotated[float, Field(description="lease time in seconds; this session renews it")] = 3600.0,
        wait: Annotated[bool, Field(description="queue if busy and wait for the grant")] = False,
        timeout_s: Annotated[float | None, Field(description="with wait: give up after this many seconds")] = None,
        priority: Annotated[int, Field(description="higher is served first")] = 0,
        request_id: Annotated[
            str | None, Field(description="idempotency key: retrying with the same id never takes a second lease")
        ] = None,
        note: Annotated[str, Field(description="why you need it (shown to others)")] = "",
        keep: Annotated[
            bool, Field(description="keep the lease when this session ends (it then runs to its TTL)")
        ] = False,
    ) -> CallToolResult:
        """Take a lease: one key, any key of a label selector, or several keys together (one lease id).

        Success means you hold it: the answer has lease_id (keep it: it renews and releases), the
        fencing token(s), expiry, and for a group the keys you got (members). Busy without wait is
        ResourceBusy; a wait that runs out is WaitTimeout (the request left the queue).
        """
        return await _answering(
            session.reserve(
                resource=resource,
                labels=labels,
                keys=keys,
                count=count,
                ttl_s=ttl_s,
                wait=wait,
                timeout_s=timeout_s,
                priority=priority,
                request_id=request_id,
                note=note,
                keep=keep,
                on_position=_progress_reporter(ctx),
            )
        )

    @server.tool(annotations=read_only)
    async def held(
        lease_id: Annotated[
            str | None, Field(description="a lease id; omit for every lease this session holds")
        ] = None,
    ) -> CallToolResult:
        """Do I still hold it? With a lease id: its state and held=true/false. Without: every lease this
        session took, with ids, and its reserves still waiting (safe after a context compaction)."""
        return await _answering(session.held(lease_id))

    @server.tool()
    async def renew(
        lease_id: str,
        ttl_s: Annotated[
            float | None, Field(description="new time from now in seconds (default: the lease's TTL)")
        ] = None,
    ) -> CallToolResult:
        """Extend a lease now (this session also renews its leases by itself)."""
        return await _answering(session.renew(lease_id, ttl_s))

    @server.tool(annotations=ToolAnnotations(idempotent_hint=True, destructive_hint=False, open_world_hint=False))
    async def release(lease_id: str) -> CallToolResult:
        """Give a lease back (all keys of a group lease). Idempotent."""
        return await _answering(session.release(lease_id))

    @server.tool(annotations=read_only)
    async def queue_position(
        request_id: Annotated[str, Field(description="the request id of a waiting reserve")],
        resource: Annotated[str | None, Field(description="its resource key; omit for a labels/keys request")] = None,
    ) -> CallToolResult:
        """Where a waiting reserve stands in the queue (1 = next), or null if it waits no more."""
        return await _answering(session.queue_position(request_id, resource))

    @server.tool()
    async def submit(
        target_dir: Annotated[str, Field(description="a target dir with bundle.json (merlin targetgen bundle)")],
        priority: int = 0,
        request_id: Annotated[
            str | None, Field(description="idempotency key: the same id returns the same run")
        ] = None,
        restart: Annotated[bool, Field(description="run a target dir that already succeeded again")] = False,
    ) -> CallToolResult:
        """Queue a bundle: it runs as a Ray job once its resource is leased (the broker holds that lease)."""
        return await _answering(session.submit(target_dir, priority, request_id, restart))

    @server.tool(annotations=read_only)
    async def run_status(run_id: str) -> CallToolResult:
        """A run's record: status, how it ended, steps, artifact dir."""
        return await _answering(session.run_status(run_id))

    @server.tool(annotations=read_only)
    async def run_logs(
        run_id: str,
        max_chars: Annotated[int, Field(description="at most this many characters, from the end")] = LOG_TAIL_CHARS,
    ) -> CallToolResult:
        """A run's job output (the last max_chars characters), with its status."""
        return await _answering(session.run_logs(run_id, max_chars))

    return server


def serve(session: MerlinSession) -> int:
    """Serve MCP on stdin/stdout until stdin closes (0) or SIGTERM/SIGINT (143/130); then end the session."""
    server = build_server(session)

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(session.renewer)
            group.start_soon(_on_signal, session)
            await server.run_stdio_async()
            group.cancel_scope.cancel()

    anyio.run(main)
    # Stdin closed: the client waits a moment, then sends SIGTERM. The session is ending already;
    # a TERM now must not cut its releases short (the leases would stay held until their TTL).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _report_close(session.close())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # closed: nothing left that a TERM could cut short
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return 0


async def _on_signal(session: MerlinSession) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            _report_close(await anyio.to_thread.run_sync(session.close))
            # A worker thread blocked reading stdin cannot be cancelled, and the process would wait for
            # it forever: the session is closed, so leave now.
            sys.stderr.flush()
            os._exit(128 + signum)


def _report_close(summary: dict[str, int]) -> None:
    if any(summary.values()):
        _log(
            f"session ended: released {summary['released']}, withdrew {summary['withdrawn']} waiting, "
            f"kept {summary['kept']}"
        )
