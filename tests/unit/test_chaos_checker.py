"""The chaos checker catches each kind of broken promise (and passes a clean history)."""

from __future__ import annotations

from broker.devtools.chaos.checker import ClientOp, check


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
