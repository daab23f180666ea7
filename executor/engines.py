"""The two engines behind ``merlin targetgen execute --engine local|ray``.

``local`` runs the bundle in this process (a thread, so the caller holds a
handle). ``ray`` queues it on the broker, which waits for the lease and runs
the local executor as a Ray Job. When Ray is missing or no cluster answers,
the ray engine still writes the run record — status ``blocked``, with the
command to run — and returns a blocked handle instead of raising.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.core.runs import RunRecord, end_run, new_run
from broker.disk.run_records import RunRecords
from broker.disk.store import StateDir
from broker.errors import BrokerUnavailable, RunEnd
from executor.handles import BlockedJobHandle, LocalJobHandle, RayJobHandle
from executor.local import BrokerFence
from targetgen.bundle import load_bundle

__all__ = ["submit_local", "submit_ray", "write_blocked_record"]


def submit_local(target_dir: Path, *, resume: bool = False) -> LocalJobHandle:
    load_bundle(Path(target_dir))  # a bad dir or bundle fails here, before a thread starts
    return LocalJobHandle(Path(target_dir), resume=resume, fence=BrokerFence.from_env())


def submit_ray(
    target_dir: Path,
    *,
    holder: str,
    priority: int = 0,
    request_id: str | None = None,
    source: str = "api",
    state_dir: str | None = None,
    namespace: str | None = None,
    address: str | None = None,
    restart: bool = False,
    client: Any | None = None,
) -> RayJobHandle | BlockedJobHandle:
    """Queue ``target_dir`` on the broker; blocked (record written) if no cluster answers.

    A target dir that already ran to success is refused unless ``restart`` (run it again from its start).
    ``client``: the broker already at hand (the CLI's HTTP client: no Ray import); else the shim connects.
    """
    import sys
    import uuid

    target_dir = Path(target_dir).resolve()
    load_bundle(target_dir)  # bad input: nothing queued, nothing written
    request_id = request_id or uuid.uuid4().hex
    if client is None:
        from broker.client import connect

        try:
            client = connect(address, namespace=namespace, state_dir=state_dir)
        except BrokerUnavailable as exc:
            state = StateDir.from_env(state_dir).ensure()
            record = write_blocked_record(
                state, target_dir, holder, request_id, source, str(exc), python=sys.executable
            )
            return BlockedJobHandle(record)
    record = client.call(
        "submit",
        str(target_dir),
        holder=holder,
        priority=priority,
        request_id=request_id,
        source=source,
        restart=restart,
    )
    return RayJobHandle(client, record)


def write_blocked_record(
    state: StateDir, target_dir: Path, holder: str, request_id: str, source: str, why: str, *, python: str
) -> RunRecord:
    """The run record of a submission that could not reach Ray: status blocked, what to run."""
    bundle = load_bundle(target_dir)
    request, record = new_run(
        target_dir, bundle, holder=holder, priority=0, request_id=request_id, source=source, python=python
    )
    record = end_run(record, RunEnd.NOT_SUBMITTED, f"not submitted: {why}", record.created_at)
    RunRecords(state).create(request, record)
    return record
