"""``merlin mcp`` driven by the MCP SDK's own client over stdio (a real subprocess), against a real broker."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from mcp import Client, StdioServerParameters

from broker.models import LeaseState, ResourceState
from targetgen.bundle import ExecutionBundle, write_bundle
from tests.integration.conftest import ROOT, BrokerEnv
from tests.waiting import until

pytestmark = pytest.mark.ray


@pytest.fixture
def broker_env(shared_broker: BrokerEnv) -> BrokerEnv:
    """One broker for the module: each test's agent is a holder of its own, and what its session
    holds ends with the session (or the test releases it)."""
    return shared_broker


@asynccontextmanager
async def mcp_session(broker_env: BrokerEnv, holder: str) -> AsyncIterator[Client]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "broker.cli", "mcp", "--holder", holder],
        env=broker_env.env(),
        cwd=str(ROOT),
    )
    async with Client(params, read_timeout_seconds=120.0) as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """The tool's JSON answer; an error answer is returned too (``{"error": ...}``), flagged by the SDK."""
    result = await client.call_tool(tool, arguments)
    data = result.structured_content
    assert isinstance(data, dict), result
    assert result.is_error == ("error" in data), data
    return data


async def until_async(condition: Callable[[], Any], what: str) -> Any:
    """``tests.waiting.until`` in a worker thread, so the session's streams keep flowing meanwhile."""
    return await anyio.to_thread.run_sync(lambda: until(condition, what, timeout_s=60.0))


def status_of(broker_env: BrokerEnv, key: str):
    return next(status for status in broker_env.client.resources() if status.key == key)


def server_pid(holder: str) -> int:
    """The ``merlin mcp`` process serving ``holder`` (the SDK's client does not name its child)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mcp" in argv and holder.encode() in argv:
            return int(entry.name)
    raise AssertionError(f"no merlin mcp process for {holder}")


def test_an_agent_lists_reserves_checks_renews_and_releases(broker_env):
    holder = f"mcp:agent-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with mcp_session(broker_env, holder) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            assert {"list_resources", "reserve", "held", "renew", "release", "queue_position"} <= names
            assert {"submit", "run_status", "run_logs"} <= names

            listing = await call(client, "list_resources")
            assert listing["holder"] == holder
            assert {r["key"] for r in listing["resources"]} == {
                "firesim_u250",
                "spacemit_x60_board_01",
                "radiance_sim_lane_a",
            }
            fpgas = await call(client, "list_resources", state=["free"], labels="kind=fpga")
            assert [r["key"] for r in fpgas["resources"]] == ["firesim_u250"]

            lease = await call(client, "reserve", resource="firesim_u250", ttl_s=60, note="mcp test")
            assert lease["held"] is True and lease["state"] == "granted" and lease["holder"] == holder
            assert lease["fencing_token"] >= 1 and lease["session"]["released_when_session_ends"] is True
            lease_id = lease["lease_id"]
            assert status_of(broker_env, "firesim_u250").holder == holder

            mine = await call(client, "list_resources", mine=True)
            assert [r["key"] for r in mine["resources"]] == ["firesim_u250"]
            assert all("lease_id" not in r for r in listing["resources"] + mine["resources"])

            busy = await call(client, "reserve", resource="firesim_u250")
            assert busy["error"]["type"] == "ResourceBusy"
            assert busy["error"]["holder"] == holder and busy["error"]["resource"] == "firesim_u250"
            assert '"wait": true' in busy["error"]["message"]
            unknown = await call(client, "reserve", resource="no_such_board")
            assert unknown["error"]["type"] == "UnknownResource"

            # Do I still hold it? By id, and with no argument (after a context compaction).
            check = await call(client, "held", lease_id=lease_id)
            assert check["held"] is True and check["resource"] == "firesim_u250"
            everything = await call(client, "held")
            assert [item["lease_id"] for item in everything["leases"]] == [lease_id]

            renewed = await call(client, "renew", lease_id=lease_id, ttl_s=600)
            assert renewed["held"] is True and renewed["expires_at"] > lease["expires_at"] + 300

            # A retried reserve with the same request id never takes a second lease.
            first = await call(client, "reserve", labels="kind=sim", request_id="agent-retry-1", ttl_s=60)
            again = await call(client, "reserve", labels="kind=sim", request_id="agent-retry-1", ttl_s=60)
            assert first.get("lease_id") == again.get("lease_id"), (first, again)
            assert first["lease_id"].startswith("group:")
            assert [m["key"] for m in first["members"]] == ["radiance_sim_lane_a"]
            assert len((await call(client, "held"))["leases"]) == 2

            released = await call(client, "release", lease_id=lease_id)
            assert released["held"] is False and released["state"] == "released"
            gone = await call(client, "held", lease_id=lease_id)
            assert gone["held"] is False and gone["session"] is None
            assert status_of(broker_env, "firesim_u250").state is ResourceState.FREE
            assert (await call(client, "release", lease_id=first["lease_id"]))["state"] == "released"

            position = await call(client, "queue_position", request_id="nothing-waits", resource="firesim_u250")
            assert position["position"] is None and position["waiting"] is False

    anyio.run(scenario)


def test_closing_the_session_releases_its_leases_withdraws_its_waits_and_keeps_keep(broker_env):
    holder = f"mcp:agent-{uuid.uuid4().hex[:8]}"
    other = broker_env.client.reserve("radiance_sim_lane_a", "someone-else", ttl_s=600)
    taken: dict[str, Any] = {}

    async def wait_for_lane(client: Client) -> None:
        try:
            taken["wait"] = await call(
                client, "reserve", resource="radiance_sim_lane_a", wait=True, timeout_s=600, request_id="waiting-1"
            )
        except Exception as exc:  # the session ends under the pending call
            taken["wait"] = exc

    async def scenario() -> None:
        async with anyio.create_task_group() as group:
            async with mcp_session(broker_env, holder) as client:
                taken["plain"] = await call(client, "reserve", resource="firesim_u250", ttl_s=600)
                taken["kept"] = await call(client, "reserve", resource="spacemit_x60_board_01", ttl_s=600, keep=True)
                assert taken["kept"]["session"]["released_when_session_ends"] is False
                group.start_soon(wait_for_lane, client)
                await until_async(
                    lambda: [e.holder for e in status_of(broker_env, "radiance_sim_lane_a").queue] == [holder],
                    "the session's request in the lane's queue",
                )
                position = await call(client, "queue_position", request_id="waiting-1", resource="radiance_sim_lane_a")
                assert position["position"] == 1
                mine = await call(client, "held")
                assert mine["waiting"] == [{"request_id": "waiting-1", "resource": "radiance_sim_lane_a"}]
                assert {item["lease_id"] for item in mine["leases"]} == {
                    taken["plain"]["lease_id"],
                    taken["kept"]["lease_id"],
                }
            # The client closed the server's stdin and waited for it to exit.
            group.cancel_scope.cancel()

    anyio.run(scenario)
    assert status_of(broker_env, "firesim_u250").state is ResourceState.FREE
    assert broker_env.client.get_lease(taken["plain"]["lease_id"]).state is LeaseState.RELEASED
    kept = status_of(broker_env, "spacemit_x60_board_01")
    assert kept.state is ResourceState.LEASED and kept.holder == holder
    assert status_of(broker_env, "radiance_sim_lane_a").queue == ()  # the wait left the queue
    assert status_of(broker_env, "radiance_sim_lane_a").holder == "someone-else"
    # The kept lease is the agent's to renew and release later, with the id it was given.
    assert broker_env.client.renew(taken["kept"]["lease_id"]).state is LeaseState.GRANTED
    assert broker_env.client.release(taken["kept"]["lease_id"]).state is LeaseState.RELEASED
    broker_env.client.release(other.lease_id)


def test_sigterm_ends_the_session_and_releases_its_leases(broker_env):
    holder = f"mcp:agent-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with mcp_session(broker_env, holder) as client:
            lease = await call(client, "reserve", resource="firesim_u250", ttl_s=600)
            os.kill(server_pid(holder), signal.SIGTERM)
            await until_async(
                lambda: status_of(broker_env, "firesim_u250").state is ResourceState.FREE,
                "the lease released after SIGTERM",
            )
            assert broker_env.client.get_lease(lease["lease_id"]).state is LeaseState.RELEASED
            await until_async(lambda: not _alive(holder), "the server process gone")

    anyio.run(scenario)


def _alive(holder: str) -> bool:
    try:
        server_pid(holder)
    except AssertionError:
        return False
    return True


def test_the_session_renews_its_leases_while_it_lives(broker_env):
    holder = f"mcp:agent-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with mcp_session(broker_env, holder) as client:
            lease = await call(client, "reserve", resource="firesim_u250", ttl_s=3)

            async def renewed_twice() -> dict[str, Any]:
                while True:
                    check = await call(client, "held", lease_id=lease["lease_id"])
                    if not check["held"] or check["session"]["renewals"] >= 2:
                        return check
                    await anyio.sleep(0.2)

            with anyio.fail_after(60):
                check = await renewed_twice()
            # Past its first TTL only because the session renewed it.
            assert check["held"] is True, check
            assert check["expires_at"] > lease["expires_at"]
            assert broker_env.client.get_lease(lease["lease_id"]).renewals >= 2

    anyio.run(scenario)


def test_an_agent_submits_a_bundle_and_reads_its_status_and_logs(broker_env, tmp_path):
    holder = f"mcp:agent-{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "target"
    directory.mkdir()
    step = {"id": "hold", "argv": [sys.executable, "-c", "print('on the board')"], "resource": "firesim_u250"}
    write_bundle(
        directory,
        ExecutionBundle.model_validate(
            {"target": "mcp", "target_class": "silicon_board", "resource": "firesim_u250", "steps": [step]}
        ),
    )

    async def scenario() -> None:
        async with mcp_session(broker_env, holder) as client:
            record = await call(client, "submit", target_dir=str(directory))
            assert record["holder"] == holder and record["resource"] == "firesim_u250"
            run_id = record["run_id"]

            async def finished() -> dict[str, Any]:
                while True:
                    status = await call(client, "run_status", run_id=run_id)
                    if status["status"] in ("succeeded", "failed", "stopped"):
                        return status
                    await anyio.sleep(0.5)

            with anyio.fail_after(180):
                status = await finished()
            assert status["status"] == "succeeded", status
            logs = await call(client, "run_logs", run_id=run_id)
            assert logs["finished"] is True and logs["total_chars"] > 0 and logs["text"]
            assert len((await call(client, "run_logs", run_id=run_id, max_chars=5))["text"]) == 5
            missing = await call(client, "run_status", run_id="run-20260101-000000-00000000")
            assert missing["error"]["type"] == "InvalidRequest" and missing["error"]["field"] == "run_id"

    anyio.run(scenario)


def test_a_wait_the_client_cancels_leaves_the_queue(broker_env):
    holder = f"mcp:agent-{uuid.uuid4().hex[:8]}"
    other = broker_env.client.reserve("firesim_u250", "someone-else", ttl_s=600)

    async def scenario() -> None:
        async with mcp_session(broker_env, holder) as client:
            async with anyio.create_task_group() as group:
                group.start_soon(partial(call, client, "reserve", resource="firesim_u250", wait=True, timeout_s=600))
                await until_async(
                    lambda: [e.holder for e in status_of(broker_env, "firesim_u250").queue] == [holder],
                    "the wait in the queue",
                )
                group.cancel_scope.cancel()  # the SDK's client tells the server the request is cancelled
            await until_async(lambda: status_of(broker_env, "firesim_u250").queue == (), "the wait withdrawn")
            assert (await call(client, "held"))["waiting"] == []
            # The session still serves.
            assert (await call(client, "reserve", resource="radiance_sim_lane_a"))["held"] is True

    anyio.run(scenario)
    assert status_of(broker_env, "firesim_u250").holder == "someone-else"
    broker_env.client.release(other.lease_id)
