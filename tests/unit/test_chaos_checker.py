"""The chaos checker catches each kind of broken promise (and passes a clean history)."""

from __future__ import annotations

from broker.devtools.chaos.checker import ClientOp, check
from broker.models import EndReason, lease_ref


def lease(lease_id, token, granted_at, ended_at, *, state="released", holder="a", request_id=None, resource="k"):
    return {
        "lease_id": lease_id, "resource": resource, "holder": holder, "request_id": request_id or lease_id,
        "state": state, "fencing_token": token, "granted_at": granted_at, "ended_at": ended_at,
    }  # fmt: skip


CLEAN = [
    lease("l1", 1, 10.0, 20.0),
    lease("l2", 2, 20.0, 25.0, state="expired"),
    lease("l3", 3, 26.0, None, state="granted"),
]
JOURNAL = [{"seq": 1}, {"seq": 2}, {"seq": 3}]


def told(lease_id, token, started, finished, outcome="granted", request_id=None):
    return ClientOp("a", "reserve", "k", request_id or lease_id, started, finished, outcome, lease_id, token)


def test_a_clean_history_passes():
    report = check(CLEAN, JOURNAL, [told("l1", 1, 9.9, 10.1), told("l3", 3, 25.5, 26.1)])
    assert report.violations == [] and report.grants == 3


def test_two_holders_at_once_are_caught():
    overlapping = [lease("l1", 1, 10.0, 20.0), lease("l2", 2, 19.0, 25.0)]
    assert any("two holders" in v for v in check(overlapping, JOURNAL, []).violations)


def test_reused_or_falling_tokens_are_caught():
    reused = [lease("l1", 2, 10.0, 20.0), lease("l2", 2, 21.0, 25.0)]
    falling = [lease("l1", 3, 10.0, 20.0), lease("l2", 2, 21.0, 25.0)]
    assert any("reused" in v for v in check(reused, JOURNAL, []).violations)
    assert any("went from 3 to 2" in v for v in check(falling, JOURNAL, []).violations)


def test_a_request_id_with_two_leases_is_caught():
    doubled = [lease("l1", 1, 10.0, 20.0, request_id="r"), lease("l2", 2, 21.0, 25.0, request_id="r")]
    assert any("produced 2 leases" in v for v in check(doubled, JOURNAL, []).violations)


def test_a_client_told_a_lie_is_caught():
    assert any("no record" in v for v in check(CLEAN, JOURNAL, [told("ghost", 9, 1.0, 2.0)]).violations)
    late = check(CLEAN, JOURNAL, [told("l1", 1, 30.0, 31.0)])  # record ended at 20
    assert any("told it holds" in v for v in late.violations)
    wrong_token = check(CLEAN, JOURNAL, [told("l1", 5, 9.0, 11.0)])
    assert any("got token 5" in v for v in wrong_token.violations)


def test_a_lost_or_stuck_request_is_caught():
    stuck = CLEAN + [lease("q1", None, None, None, state="queued")]
    assert any("left queued" in v for v in check(stuck, JOURNAL, []).violations)
    lost = check(CLEAN, JOURNAL, [told(None, None, 1.0, 2.0, outcome="timeout", request_id="never-recorded")])
    assert any("(lost)" in v for v in lost.violations)


def test_journal_order_is_checked():
    assert any("twice" in v for v in check(CLEAN, [{"seq": 1}, {"seq": 1}], []).violations)
    assert any("after" in v for v in check(CLEAN, [{"seq": 2}, {"seq": 1}], []).violations)


def tied(lease_id, token, queued_at, granted_at, ended_at, *, holder="c1", state="expired", tie="lease"):
    record = lease(lease_id, token, granted_at, ended_at, state=state, holder=holder)
    record.update(queued_at=queued_at, session="0000000a", session_tie=tie)
    return record


def test_a_dead_client_whose_lease_and_request_went_within_the_bound_passes():
    from broker.devtools.chaos.checker import ClientDeath

    records = [
        tied("l1", 1, 10.0, 10.0, 21.5),
        tied("l2", None, 12.0, None, 21.4, state="cancelled"),
        tied("l3", 2, 22.0, 22.0, None, holder="c2", state="granted"),  # someone else's, still held
    ]
    report = check(records, JOURNAL, [], deaths=[ClientDeath("c1", 20.0)], bound_s=5.0)
    assert report.violations == [] and report.client_deaths == 1 and report.slowest_let_go_s == 1.5
    assert report.let_go_measured == 2  # the lease and the request; not c2's


def test_a_key_blocked_by_a_dead_client_past_the_bound_is_caught():
    from broker.devtools.chaos.checker import ClientDeath

    held_on = [tied("l1", 1, 10.0, 10.0, 40.0)]
    never_left = [tied("l2", None, 12.0, None, None, state="queued")]
    untied = [tied("l3", 1, 10.0, 10.0, 40.0, tie="none")]  # a TTL-bound lease may outlive its client
    death = [ClientDeath("c1", 20.0)]
    assert any("ended 20.00s after it" in v for v in check(held_on, JOURNAL, [], deaths=death).violations)
    assert any("still active" in v for v in check(never_left, JOURNAL, [], deaths=death).violations)
    assert check(untied, JOURNAL, [], deaths=death).violations == []


# ---------------------------------------------------------------- group leases

GROUP_ID = "group:" + "ab" * 16
REF = lease_ref(GROUP_ID)
ABORTED = EndReason.GROUP_GRANT_ABORTED.value


def member(resource, lease_id, token, granted_at, ended_at, *, group=REF, request_id=None, **extra):
    record = lease(lease_id, token, granted_at, ended_at, holder="g", resource=resource, request_id=request_id)
    return {**record, "group": group, **extra}


def group_record(*, state="released", members=(("k1", 1), ("k2", 1)), granted_at=30.0, ended_at=40.0, count=2):
    return {
        "lease": {
            "lease_id": GROUP_ID, "holder": "g", "request_id": "gr", "state": state, "count": count,
            "candidates": ["k1", "k2"], "granted_at": granted_at, "ended_at": ended_at, "queued_at": 29.0,
            "members": [{"key": key, "fencing_token": token} for key, token in members],
        },
        "entries": {},
    }  # fmt: skip


GROUP_LEASES = [member("k1", "m1", 1, 30.0, 40.0, request_id="e1"), member("k2", "m2", 1, 30.0, 40.0, request_id="e2")]
GROUP_JOURNAL = [
    {"seq": 1, "event": "lease.granted", "resource": "k1", "fencing_token": 1, "group": REF},
    {"seq": 2, "event": "lease.granted", "resource": "k2", "fencing_token": 1, "group": REF},
    {"seq": 3, "event": "group.granted", "group": REF, "keys": ["k1", "k2"], "fencing_tokens": [1, 1]},
]


def told_group(members, started=29.0, finished=30.1, outcome="granted", request_id="gr"):
    return ClientOp("g", "reserve_group", "k1,k2", request_id, started, finished, outcome, GROUP_ID, None, members)


def test_a_clean_group_history_passes_beside_single_key_leases():
    single = lease("s1", 2, 41.0, 50.0, resource="k1")
    report = check([*GROUP_LEASES, single], GROUP_JOURNAL, [told_group({"k1": 1, "k2": 1})], [group_record()])
    assert report.violations == [] and report.group_grants == 1 and report.groups == 1


def test_a_take_given_back_and_requeued_under_its_request_id_is_no_violation():
    aborted = member("k1", "m0", 1, 20.0, 20.5, request_id="e1", end_reason=ABORTED)
    leases = [aborted, member("k1", "m1", 2, 30.0, 40.0, request_id="e1"), GROUP_LEASES[1]]
    report = check(leases, [{"seq": 1}], [], [group_record(members=(("k1", 2), ("k2", 1)))])
    assert report.violations == []


def test_a_single_key_lease_overlapping_a_group_member_is_two_holders():
    single = lease("s1", 2, 35.0, 50.0, resource="k2")
    assert any(
        "two holders" in v for v in check([*GROUP_LEASES, single], [{"seq": 1}], [], [group_record()]).violations
    )


def test_a_group_whose_keys_were_never_all_held_at_once_is_caught():
    apart = [member("k1", "m1", 1, 30.0, 35.0), member("k2", "m2", 1, 36.0, 40.0)]
    violations = check(apart, [{"seq": 1}], [], [group_record(granted_at=36.0)]).violations
    assert any("never all held at once" in v for v in violations)
    late = check(GROUP_LEASES, [{"seq": 1}], [], [group_record(granted_at=29.0)]).violations
    assert any("after the group" in v for v in late)


def test_a_group_left_half_held_past_the_bound_is_caught():
    half = [member("k1", "m1", 1, 30.0, 40.0), member("k2", "m2", 1, 30.0, 100.0)]
    assert any("100.0" in v or "60.0s later" in v for v in check(half, [{"seq": 1}], [], [group_record()]).violations)
    still = [member("k1", "m1", 1, 30.0, 40.0), member("k2", "m2", 1, 30.0, None, state="granted"),
             lease("x", 1, 90.0, 95.0, resource="other")]  # fmt: skip
    assert any("still held" in v for v in check(still, [{"seq": 1}], [], [group_record()]).violations)
    within = [member("k1", "m1", 1, 30.0, 40.0), member("k2", "m2", 1, 30.0, 45.0)]
    assert check(within, [{"seq": 1}], [], [group_record()]).violations == []


def test_a_key_held_for_a_group_that_never_got_it_is_caught():
    cancelled = group_record(state="cancelled", members=(), granted_at=None)
    violations = check(GROUP_LEASES, [{"seq": 1}], [], [cancelled]).violations
    assert any("which never got it" in v for v in violations)
    assert any("no record of that group" in v for v in check(GROUP_LEASES, [{"seq": 1}], [], []).violations)


def test_a_group_granted_the_wrong_keys_or_left_queued_is_caught():
    wrong = group_record(members=(("k1", 1), ("k1", 1)))
    assert any("granted keys" in v for v in check(GROUP_LEASES, [{"seq": 1}], [], [wrong]).violations)
    missing = group_record(members=(("k1", 1), ("k2", 7)))
    assert any("no lease on k2 with token 7" in v for v in check(GROUP_LEASES, [{"seq": 1}], [], [missing]).violations)
    queued = group_record(state="queued", members=(), granted_at=None, ended_at=None)
    assert any("left queued" in v for v in check([], [{"seq": 1}], [], [queued]).violations)


def test_the_journal_must_name_the_group_the_records_name():
    other = [dict(GROUP_JOURNAL[0], group="ffffffffffff"), *GROUP_JOURNAL[1:]]
    assert any("names group ffffffffffff" in v for v in check(GROUP_LEASES, other, [], [group_record()]).violations)
    untagged = [{k: v for k, v in GROUP_JOURNAL[0].items() if k != "group"}, *GROUP_JOURNAL[1:]]
    assert any("names group None" in v for v in check(GROUP_LEASES, untagged, [], [group_record()]).violations)
    tokens = [*GROUP_JOURNAL[:2], dict(GROUP_JOURNAL[2], fencing_tokens=[1, 2])]
    assert any("its record says" in v for v in check(GROUP_LEASES, tokens, [], [group_record()]).violations)
    never = check([], [GROUP_JOURNAL[2]], [], [group_record(state="cancelled", members=(), granted_at=None)])
    assert any("never granted" in v for v in never.violations)


def test_a_client_told_the_wrong_group_or_losing_its_request_is_caught():
    keys = check(GROUP_LEASES, GROUP_JOURNAL, [told_group({"k1": 1})], [group_record()])
    assert any("told keys" in v for v in keys.violations)
    late = check(GROUP_LEASES, GROUP_JOURNAL, [told_group({"k1": 1, "k2": 1}, 50.0, 51.0)], [group_record()])
    assert any("told it holds group" in v for v in late.violations)
    lost = check([], [{"seq": 1}], [told_group(None, outcome="timeout", request_id="never")], [])
    assert any("group request never has no record (lost)" in v for v in lost.violations)


def test_the_chaos_run_bounds_a_dead_clients_hold_at_the_promised_5_s_and_prints_the_worst_figure():
    from broker.devtools.chaos.checker import ClientDeath
    from broker.devtools.chaos.runner import LONG, SHORT, let_go_line

    assert SHORT.client_bound_s == LONG.client_bound_s == 5.0
    death = [ClientDeath("c1", 20.0)]
    late = check([tied("l1", 1, 10.0, 10.0, 25.5)], JOURNAL, [], deaths=death, bound_s=SHORT.client_bound_s)
    assert any("ended 5.50s after it (bound 5s)" in v for v in late.violations)
    line = let_go_line(late, 5.0)
    assert "worst dead client → its key moved on: 5.50s (1 held or queued at a death; bound 5s)" in line
    assert "none holding or waiting" in let_go_line(check([], JOURNAL, [], deaths=death), 5.0)
