"""The MCP session's own rules, without Ray or the SDK's transport: renewal schedule, the end, the JSON."""

from __future__ import annotations

import pickle

import pytest

from broker.errors import InvalidRequest, LeaseNotHeld, ResourceBusy
from broker.mcp.session import (
    MIN_RENEW_S,
    Pending,
    SessionLeases,
    error_view,
    is_gone,
    lease_view,
    renew_every,
    resource_filter,
)
from broker.models import GroupLease, GroupMember, Lease, LeaseState, ResourceState, ResourceStatus

LEASE_ID = "firesim_u250." + "a" * 32


def lease(state: LeaseState = LeaseState.GRANTED, *, expires_at: float | None = 1100.0) -> Lease:
    return Lease(
        lease_id=LEASE_ID,
        resource="firesim_u250",
        holder="mcp:agent@box",
        state=state,
        fencing_token=7,
        ttl_s=60.0,
        queued_at=1000.0,
        granted_at=1000.0,
        expires_at=expires_at,
        request_id="mcp-1",
    )


def test_renewals_come_three_times_per_ttl_but_never_faster_than_the_floor():
    assert renew_every(60.0) == 20.0
    assert renew_every(1.0) == MIN_RENEW_S
    leases = SessionLeases()
    assert leases.track("a", ttl_s=30.0, keep=False, now=0.0)
    assert leases.track("b", ttl_s=3.0, keep=True, now=0.0)
    assert leases.next_due_in(0.0) == 1.0
    assert leases.due(0.5) == []
    assert leases.due(1.0) == ["b"]
    assert leases.due(10.0) == ["b", "a"]  # earliest first
    leases.renewed("b", 3.0, now=10.0)
    assert leases.due(10.0) == ["a"]
    assert leases.next_due_in(10.5) == 0.0  # a is late: at once
    assert leases.get("b").renewals == 1


def test_a_lost_lease_is_no_longer_renewed_nor_released_at_the_end():
    leases = SessionLeases()
    leases.track("a", ttl_s=3.0, keep=False, now=0.0)
    leases.track("b", ttl_s=3.0, keep=False, now=0.0)
    leases.lost("a", error_view(LeaseNotHeld("a", "revoked")))
    assert leases.due(100.0) == ["b"]
    assert leases.get("a").lost["error"]["type"] == "LeaseNotHeld"
    leases.renewed("a", 3.0, now=100.0)  # a late answer cannot bring it back
    assert not leases.get("a").renewing
    _, release, _ = leases.close()
    assert release == ["b"]


def test_the_end_withdraws_waits_releases_leases_and_spares_keep_once():
    leases = SessionLeases()
    leases.track("plain", ttl_s=60.0, keep=False, now=0.0)
    leases.track("kept", ttl_s=60.0, keep=True, now=0.0)
    leases.track("released-by-agent", ttl_s=60.0, keep=False, now=0.0)
    leases.forget("released-by-agent")
    wait = Pending("mcp:a@b", "req-1", "radiance_sim_lane_a")
    group_wait = Pending("mcp:a@b", "req-2", None)
    leases.waiting(wait)
    leases.waiting(group_wait)
    leases.waiting(Pending("mcp:a@b", "req-3", "firesim_u250"))
    leases.answered("req-3")
    assert leases.waiting_requests() == [wait, group_wait]
    assert leases.close() == ([wait, group_wait], ["plain"], ["kept"])
    assert leases.close() == ([], [], [])  # idempotent: SIGTERM during the stdin-close cleanup does nothing twice
    # A grant that arrives while the session ends is not tracked: the caller releases it.
    assert leases.track("late", ttl_s=60.0, keep=False, now=1.0) is False
    assert leases.lease_ids() == []


def test_tracking_the_same_lease_again_keeps_its_schedule_and_takes_the_latest_keep():
    leases = SessionLeases()
    leases.track("a", ttl_s=30.0, keep=False, now=0.0)
    leases.track("a", ttl_s=30.0, keep=True, now=5.0)  # a retried reserve, same request id
    assert leases.due(10.0) == ["a"]
    assert leases.close()[2] == ["a"]


def test_the_lease_view_says_held_and_what_the_session_does_with_it():
    leases = SessionLeases()
    leases.track(LEASE_ID, ttl_s=60.0, keep=False, now=0.0)
    view = lease_view(lease(), leases.get(LEASE_ID), now=1040.0)
    assert view["held"] is True and view["expires_in_s"] == 60.0 and view["lease_id"] == LEASE_ID
    assert view["session"] == {"renewing": True, "released_when_session_ends": True, "renewals": 0}
    ended = lease_view(lease(LeaseState.EXPIRED), leases.get(LEASE_ID), now=1200.0)
    assert ended["held"] is False and ended["expires_in_s"] is None
    assert ended["session"]["renewing"] is False and ended["session"]["released_when_session_ends"] is False
    assert lease_view(lease(), None, now=1040.0)["session"] is None  # not this session's: it does nothing with it


def test_a_group_lease_view_names_its_keys():
    group = GroupLease(
        lease_id="group:" + "b" * 32,
        holder="mcp:agent@box",
        request_id="mcp-2",
        state=LeaseState.GRANTED,
        count=1,
        candidates=("radiance_sim_lane_a", "radiance_sim_lane_b"),
        selector="kind=sim",
        ttl_s=60.0,
        queued_at=1000.0,
        granted_at=1000.0,
        expires_at=1060.0,
        members=(GroupMember(key="radiance_sim_lane_b", fencing_token=3),),
    )
    view = lease_view(group, None, now=1000.0)
    assert view["group"] is True and view["held"] is True
    assert [(m["key"], m["fencing_token"]) for m in view["members"]] == [("radiance_sim_lane_b", 3)]


def test_errors_are_the_broker_error_json_with_hints_for_json_arguments():
    busy = error_view(ResourceBusy("firesim_u250", holder="alice", queue_length=2))
    assert busy["error"]["type"] == "ResourceBusy"
    assert busy["error"]["holder"] == "alice" and busy["error"]["queue_length"] == 2
    assert '"wait": true' in busy["error"]["message"] and "--wait" not in busy["error"]["message"]
    odd = error_view(RuntimeError("boom\nsecond line"))
    assert odd == {"error": {"type": "RuntimeError", "message": "boom", "exit_code": 1}}
    assert is_gone(LeaseNotHeld("x", "expired")) and not is_gone(ResourceBusy("k"))
    pickle.loads(pickle.dumps(Pending("h", "r", None)))


def test_the_listing_filter_checks_its_arguments():
    free = ResourceStatus(key="a", state=ResourceState.FREE, labels={"kind": "sim"})
    held = ResourceStatus(key="b", state=ResourceState.LEASED, holder="mcp:me@box", labels={"kind": "fpga"})
    assert resource_filter(["free"], None, None, False, "mcp:me@box").apply([free, held]) == [free]
    assert resource_filter(None, "kind=fpga", None, False, "x").apply([free, held]) == [held]
    assert resource_filter(None, None, None, True, "mcp:me@box").apply([free, held]) == [held]
    assert resource_filter(None, None, None, False, "x").apply([free, held]) == [free, held]
    with pytest.raises(InvalidRequest) as bad:
        resource_filter(["busy"], None, None, False, "x")
    assert bad.value.field == "state"
    with pytest.raises(InvalidRequest):
        resource_filter(None, "kind", None, False, "x")


class RecordingBackend:
    """The broker behind the MCP seam (where Ray would be): grants, renews and releases in memory."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gone: set[str] = set()
        self.before_answer = lambda: None

    def reserve(self, resource: str, holder: str, **kwargs):
        self.before_answer()
        return lease().model_copy(update={"resource": resource, "holder": holder})

    def renew(self, lease_id: str, ttl_s):
        self.calls.append(("renew", lease_id))
        if lease_id in self.gone:
            raise LeaseNotHeld(lease_id, "revoked")
        return lease()

    def release(self, lease_id: str):
        self.calls.append(("release", lease_id))
        return lease(LeaseState.RELEASED)

    def withdraw(self, resource: str, holder: str, request_id: str):
        self.calls.append(("withdraw", request_id))
        return lease(LeaseState.GRANTED)  # the wait was granted just before: it must be released too


def _session(backend: RecordingBackend, clock: list[float]):
    from broker.mcp.server import MerlinSession

    return MerlinSession(backend, "mcp:agent@box", clock=lambda: clock[0], wall=lambda: 1000.0)


def reserve_args(**overrides):
    args = dict(
        resource="firesim_u250",
        labels=None,
        keys=None,
        count=None,
        ttl_s=60,
        wait=False,
        timeout_s=None,
        priority=0,
        request_id=None,
        note="",
        keep=False,
    )
    return {**args, **overrides}


def test_the_session_renews_what_is_due_and_stops_at_a_lost_lease():
    import anyio

    backend, clock = RecordingBackend(), [0.0]
    session = _session(backend, clock)

    async def scenario():
        answer = await session.reserve(**reserve_args())
        assert answer["held"] is True and answer["request_id"].startswith("mcp-")
        clock[0] = 25.0
        for lease_id in session.leases.due(clock[0]):
            await session.renew_one(lease_id)
        assert backend.calls == [("renew", LEASE_ID)]
        backend.gone.add(LEASE_ID)
        clock[0] = 50.0
        for lease_id in session.leases.due(clock[0]):
            await session.renew_one(lease_id)
        assert session.leases.get(LEASE_ID).lost["error"]["type"] == "LeaseNotHeld"
        assert session.leases.due(1e9) == []

    anyio.run(scenario)
    assert session.close() == {"withdrawn": 0, "released": 0, "kept": 0}  # a lost lease is not released


def test_a_grant_that_arrives_while_the_session_ends_is_released_and_reported():
    import anyio

    from broker.errors import BrokerUnavailable

    backend, clock = RecordingBackend(), [0.0]
    session = _session(backend, clock)
    backend.before_answer = session.leases.close  # the session ends while the broker answers

    async def scenario():
        with pytest.raises(BrokerUnavailable):
            await session.reserve(**reserve_args(wait=True))

    anyio.run(scenario)
    assert backend.calls == [("release", LEASE_ID)]


def test_the_end_of_a_session_withdraws_and_releases_a_raced_grant():
    backend, clock = RecordingBackend(), [0.0]
    session = _session(backend, clock)
    session.leases.waiting(Pending("mcp:agent@box", "req-9", "radiance_sim_lane_a"))
    assert session.close() == {"withdrawn": 1, "released": 0, "kept": 0}
    assert backend.calls == [("withdraw", "req-9"), ("release", LEASE_ID)]


def test_reserve_takes_exactly_one_form():
    import anyio

    session = _session(RecordingBackend(), [0.0])
    for wrong in (dict(resource=None), dict(labels="kind=sim"), dict(count=2)):
        with pytest.raises(InvalidRequest):
            anyio.run(lambda wrong=wrong: session.reserve(**reserve_args(**wrong)))
