"""Per-board history from journal records: pairing, clipping to the window, per holder."""

from __future__ import annotations

from broker.core.history import select_events, summarize_usage

KEY = "spacemit_x60_board_01"


def ev(ts, event, ref=None, holder=None, **fields):
    return {"ts": ts, "event": event, "resource": KEY, "lease": ref, "holder": holder, **fields}


JOURNAL = [
    ev(50.0, "lease.granted", "a1", "alice", wait_s=0.0),  # before the window, ends inside it
    ev(150.0, "lease.released", "a1", "alice"),
    ev(200.0, "lease.granted", "b1", "bob", wait_s=30.0),
    ev(260.0, "lease.expired", "b1", "bob"),
    ev(300.0, "lease.cancelled", "c1", "carol", reason="wait timed out"),
    ev(400.0, "lease.granted", "a2", "alice", wait_s=10.0),
    ev(450.0, "lease.revoked", "a2", "alice", by="admin"),
    ev(460.0, "resource.maintenance", on=True),
    ev(500.0, "lease.granted", "b2", "bob", wait_s=0.0),  # still held at the end
    {"ts": 210.0, "event": "lease.granted", "resource": "other", "lease": "x", "holder": "zed"},
]


def test_usage_is_paired_clipped_and_split_by_holder():
    history = summarize_usage(JOURNAL, KEY, since=100.0, until=600.0)
    assert (history.grants, history.released, history.expired, history.revoked) == (3, 1, 1, 1)
    assert history.wait_timeouts == 1 and history.maintenance_periods == 1
    # alice 50 (clipped from 100) + 50; bob 60 + 100 (still held until 600)
    assert history.held_s == 50.0 + 60.0 + 50.0 + 100.0
    assert history.utilization == history.held_s / 500.0
    assert history.current_holder == "bob"
    alice, bob = history.holders["alice"], history.holders["bob"]
    assert (alice.leases, alice.held_s, alice.revoked) == (1, 100.0, 1)
    assert (bob.leases, bob.held_s, bob.expired, bob.mean_wait_s) == (2, 160.0, 1, 15.0)
    assert "zed" not in history.holders


def test_select_events_filters():
    assert len(list(select_events(JOURNAL, resource=KEY, since=300.0))) == 5
    assert [e["ts"] for e in select_events(JOURNAL, prefix="lease.expired")] == [260.0]


# A group's take on the key given back (its group could not take its other key at once), then the
# group's real grant; as the resource actor journals them.
ABORTED = "its group's grant could not take every key"
GROUP_JOURNAL = [
    ev(100.0, "lease.granted", "t1", "cosim", wait_s=40.0, group="g1", fencing_token=1),
    ev(100.01, "lease.released", "t1", "cosim", reason=ABORTED, hold_s=0.01, group="g1"),
    ev(100.01, "lease.queued", "t2", "cosim", group="g1"),
    ev(200.0, "lease.granted", "t2", "cosim", wait_s=140.0, group="g1", fencing_token=2),
    ev(260.0, "lease.released", "t2", "cosim", reason="released", group="g1"),
    ev(300.0, "lease.granted", "t3", "alice", wait_s=0.0, fencing_token=3),
    ev(300.02, "lease.released", "t3", "alice", reason=ABORTED),  # (a take given back, by its reason only)
]


def test_a_take_given_back_to_the_queue_is_no_grant_in_history_nor_usage():
    from broker.core.accounting import UsageBy, account

    history = summarize_usage(GROUP_JOURNAL, KEY, since=0.0, until=400.0)
    assert (history.grants, history.released) == (1, 1)
    assert history.held_s == 60.0 and history.current_holder is None
    cosim = history.holders["cosim"]
    assert (cosim.leases, cosim.held_s, cosim.mean_wait_s, cosim.last_granted_at) == (1, 60.0, 140.0, 200.0)
    assert "alice" not in history.holders
    (row,) = account(GROUP_JOURNAL, since=0.0, until=400.0, by=UsageBy.HOLDER)
    assert (row.name, row.leases, row.held_s, row.released, row.mean_wait_s) == ("cosim", 1, 60.0, 1, 140.0)
