"""The lease rules of one key, on the pure book (no Ray, no disk, time passed in)."""

from __future__ import annotations

import itertools

import pytest

from broker.core.book import WAIT_TIMED_OUT, LeaseBook, Maintenance
from broker.errors import InvalidRequest, LeaseNotFound, LeaseNotHeld, ResourceBusy, StaleFencingToken
from broker.models import EndReason, LeaseEvent, LeaseState, ReserveRequest

KEY = "firesim_u250"
_ids = itertools.count()


def new_id() -> str:
    return f"{KEY}.{next(_ids):032x}"


def ask(book: LeaseBook, holder: str, now: float, request_id: str | None = None, **options):
    request = ReserveRequest(resource=KEY, holder=holder, request_id=request_id or f"r-{holder}-{now}", **options)
    return book.reserve(request, new_id(), now)


def test_free_key_is_granted_at_once_with_token_one():
    book = LeaseBook(KEY)
    outcome = ask(book, "alice", 100.0, ttl_s=60)
    lease = outcome.result
    assert lease.state is LeaseState.GRANTED
    assert lease.fencing_token == 1
    assert lease.granted_at == 100.0 and lease.expires_at == 160.0
    assert [change.event for change in outcome.changes] == ["lease.granted"]


def test_busy_key_without_wait_fails_fast_naming_the_holder():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0, ttl_s=60)
    with pytest.raises(ResourceBusy) as info:
        ask(book, "bob", 101.0)
    assert info.value.holder == "alice"
    assert info.value.expires_at == 160.0
    assert len(book.queue) == 0


def test_waiters_are_served_by_priority_then_arrival():
    book = LeaseBook(KEY)
    first = ask(book, "alice", 100.0).result
    low = ask(book, "low", 101.0, wait=True, priority=0).result
    high = ask(book, "high", 102.0, wait=True, priority=5).result
    low2 = ask(book, "low2", 103.0, wait=True, priority=0).result
    assert [lease.holder for lease in book.queue] == ["high", "low", "low2"]
    order = []
    holder = first
    for now in (110.0, 111.0, 112.0):
        outcome = book.release(holder.lease_id, now)
        granted = [c.lease for c in outcome.changes if c.event == "lease.granted"]
        assert len(granted) == 1
        holder = granted[0]
        order.append(holder.holder)
    assert order == ["high", "low", "low2"]
    assert {low.lease_id, high.lease_id, low2.lease_id} == {low.lease_id, high.lease_id, low2.lease_id}


def test_release_grants_next_waiter_in_the_same_step_with_a_higher_token():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0).result
    bob = ask(book, "bob", 101.0, wait=True).result
    outcome = book.release(alice.lease_id, 105.0)
    events = [(c.event, c.lease.holder) for c in outcome.changes]
    assert events == [("lease.released", "alice"), ("lease.granted", "bob")]
    assert book.granted.lease_id == bob.lease_id
    assert book.granted.fencing_token == 2


def test_release_is_idempotent_and_release_of_a_lost_lease_is_refused():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    first = book.release(alice.lease_id, 101.0).result
    again = book.release(alice.lease_id, 102.0)
    assert again.result == first and again.changes == []
    bob = ask(book, "bob", 103.0, ttl_s=10).result
    book.tick(200.0)
    with pytest.raises(LeaseNotHeld) as info:
        book.release(bob.lease_id, 201.0)
    assert info.value.state == "expired"


def test_ttl_expiry_grants_the_next_waiter_and_records_the_true_end():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    ask(book, "bob", 101.0, wait=True)
    assert book.next_deadline() == 110.0
    outcome = book.tick(110.5)
    expired = outcome.changes[0].lease
    assert (expired.lease_id, expired.state, expired.ended_at) == (alice.lease_id, LeaseState.EXPIRED, 110.0)
    assert book.granted.holder == "bob" and book.granted.granted_at == 110.5


def test_nothing_is_due_before_the_deadline():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0, ttl_s=10)
    assert book.tick(109.9).changes == []
    assert book.granted.holder == "alice"


def test_renew_pushes_expiry_and_only_a_granted_lease_renews():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    renewed = book.renew(alice.lease_id, None, 108.0).result
    assert renewed.expires_at == 118.0 and renewed.renewals == 1
    longer = book.renew(alice.lease_id, 60.0, 109.0).result
    assert longer.expires_at == 169.0 and longer.ttl_s == 60.0
    bob = ask(book, "bob", 110.0, wait=True).result
    with pytest.raises(LeaseNotHeld) as info:
        book.renew(bob.lease_id, None, 111.0)
    assert info.value.state == "queued"


def test_renew_after_the_deadline_is_refused_even_before_the_timer_fires():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    with pytest.raises(LeaseNotHeld) as info:
        book.renew(alice.lease_id, None, 110.0)
    assert info.value.state == "expired"
    # A refused command changes nothing; the expiry itself is the timer's to record.
    assert [c.event for c in book.tick(110.0).changes] == ["lease.expired"]


def test_max_hold_caps_renewals():
    book = LeaseBook(KEY, max_hold_s=30.0)
    alice = ask(book, "alice", 100.0, ttl_s=20).result
    assert alice.expires_at == 120.0
    renewed = book.renew(alice.lease_id, 20.0, 115.0).result
    assert renewed.expires_at == 130.0  # granted_at + max_hold, not 135
    book.tick(130.0)
    assert book.get(alice.lease_id).state is LeaseState.EXPIRED


def test_revoke_records_reason_and_who_and_grants_next():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0).result
    ask(book, "bob", 101.0, wait=True)
    revoked = book.revoke("on holiday", 102.0, by="admin@lab").result
    assert revoked.lease_id == alice.lease_id
    assert (revoked.state, revoked.end_reason, revoked.ended_by) == (LeaseState.REVOKED, "on holiday", "admin@lab")
    assert book.granted.holder == "bob"


def test_revoke_compare_and_swap_refuses_another_holder_and_changes_nothing():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0)
    with pytest.raises(LeaseNotHeld) as info:
        book.revoke("wrong", 101.0, expected_holder="bob")
    assert "alice" in str(info.value)
    assert book.granted.holder == "alice"


def test_revoke_with_the_same_request_id_revokes_once():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0).result
    ask(book, "bob", 101.0, wait=True)
    first = book.revoke("x", 102.0, request_id="rev-1").result
    again = book.revoke("x", 103.0, request_id="rev-1").result
    assert first.lease_id == again.lease_id == alice.lease_id
    assert book.granted.holder == "bob"


def test_revoke_of_a_free_key_is_an_invalid_request():
    with pytest.raises(InvalidRequest):
        LeaseBook(KEY).revoke("nothing", 100.0)


def test_cancel_removes_a_queued_request_and_is_idempotent():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0).result
    bob = ask(book, "bob", 101.0, wait=True).result
    cancelled = book.cancel(bob.lease_id, 102.0).result
    assert cancelled.state is LeaseState.CANCELLED and book.queue == []
    assert book.cancel(bob.lease_id, 103.0).result == cancelled
    with pytest.raises(LeaseNotHeld):
        book.cancel(alice.lease_id, 104.0)


def test_same_request_id_returns_the_same_lease_never_a_second():
    book = LeaseBook(KEY)
    first = ask(book, "alice", 100.0, request_id="ci-42").result
    again = ask(book, "alice", 101.0, request_id="ci-42")
    assert again.result.lease_id == first.lease_id and again.changes == []
    queued = ask(book, "bob", 102.0, request_id="ci-43", wait=True).result
    assert ask(book, "bob", 103.0, request_id="ci-43", wait=True).result.lease_id == queued.lease_id
    assert len(book.queue) == 1


def test_request_ids_are_scoped_to_their_holder():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, request_id="shared").result
    bob = ask(book, "bob", 101.0, request_id="shared", wait=True).result
    assert bob.lease_id != alice.lease_id and bob.state is LeaseState.QUEUED


def test_tokens_strictly_increase_and_are_never_reused():
    book = LeaseBook(KEY)
    tokens = []
    for step in range(20):
        lease = ask(book, f"h{step}", 100.0 + step).result
        tokens.append(lease.fencing_token)
        book.release(lease.lease_id, 100.5 + step)
    assert tokens == sorted(set(tokens)) and tokens[0] == 1


def test_maintenance_stops_grants_but_the_holder_keeps_its_lease():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0).result
    outcome = book.set_maintenance(True, "fan swap", 101.0, by="bob")
    assert outcome.maintenance_changed and book.granted.lease_id == alice.lease_id
    with pytest.raises(ResourceBusy) as info:
        ask(book, "carol", 102.0)
    assert info.value.maintenance_reason == "fan swap"
    carol = ask(book, "carol", 103.0, wait=True).result
    book.release(alice.lease_id, 104.0)
    assert book.granted is None and book.queue[0].lease_id == carol.lease_id
    book.set_maintenance(False, "", 105.0)
    assert book.granted.lease_id == carol.lease_id


def test_only_own_maintenance_changes_nothing_someone_else_set():
    """The health prober's compare-and-set: it neither relabels nor lifts an admin's maintenance."""
    book = LeaseBook(KEY)
    book.set_maintenance(True, "fan swap", 100.0, by="admin")
    outcome = book.set_maintenance(True, "health check failed: x", 101.0, by="merlin-health", only_own=True)
    assert not outcome.wrote_anything and book.maintenance == Maintenance("fan swap", 100.0, "admin")
    outcome = book.set_maintenance(False, "", 102.0, by="merlin-health", only_own=True)
    assert not outcome.wrote_anything and book.maintenance.by == "admin"
    book.set_maintenance(False, "", 103.0, by="admin")
    # No maintenance, or its own: it applies.
    assert book.set_maintenance(True, "health check failed: x", 104.0, by="merlin-health", only_own=True).wrote_anything
    assert book.maintenance == Maintenance("health check failed: x", 104.0, "merlin-health")
    book.set_maintenance(True, "fan swap", 105.0, by="admin")  # without only_own the last word wins
    assert book.maintenance == Maintenance("fan swap", 104.0, "admin")
    assert not book.set_maintenance(False, "", 106.0, by="merlin-health", only_own=True).wrote_anything
    book.set_maintenance(True, "health check failed: y", 107.0, by="admin")
    book.set_maintenance(False, "", 108.0, by="admin")
    book.set_maintenance(True, "health check failed: z", 109.0, by="merlin-health", only_own=True)
    outcome = book.set_maintenance(False, "", 110.0, by="merlin-health", only_own=True)
    assert outcome.maintenance_changed and book.maintenance is None


def test_a_waiter_times_out_at_its_deadline_and_leaves_the_queue():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0, ttl_s=100)
    bob = ask(book, "bob", 101.0, wait=True, timeout_s=5).result
    assert book.next_deadline() == 106.0
    outcome = book.tick(106.0)
    ended = outcome.changes[0].lease
    assert (ended.lease_id, ended.state, ended.end_reason) == (bob.lease_id, LeaseState.CANCELLED, WAIT_TIMED_OUT)
    assert book.queue == []


def test_a_waiter_still_waiting_when_the_key_came_free_is_served_even_if_the_timer_is_late():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0, ttl_s=10)  # expires at 110
    bob = ask(book, "bob", 101.0, wait=True, timeout_s=15).result  # deadline 116
    book.tick(120.0)  # one late tick sees both deadlines passed
    assert book.granted is not None and book.granted.lease_id == bob.lease_id


def test_a_failed_command_changes_nothing():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    with pytest.raises(LeaseNotFound):
        book.release(f"{KEY}.{'f' * 32}", 120.0)  # expiry due at 110 ran first, then rolled back
    assert book.granted.lease_id == alice.lease_id


def test_rollback_undoes_the_last_command_completely():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0).result
    bob = ask(book, "bob", 101.0, wait=True).result
    before = (book.granted, book.queue, book.fencing_counter)
    book.release(alice.lease_id, 102.0)
    assert book.granted.lease_id == bob.lease_id
    book.rollback()  # e.g. the ledger write failed
    assert (book.granted, book.queue, book.fencing_counter) == before
    again = book.release(alice.lease_id, 103.0)
    assert [c.lease.holder for c in again.changes] == ["alice", "bob"]
    assert book.granted.fencing_token == 2


def test_rollback_of_a_new_request_forgets_its_request_id():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0, request_id="r1")
    book.rollback()
    assert book.granted is None and book.find_request("alice", "r1") is None
    assert ask(book, "alice", 101.0, request_id="r1").result.fencing_token == 1


def test_fence_check_accepts_only_the_current_grant():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    assert book.check_fence(alice.lease_id, 1, 105.0).lease_id == alice.lease_id
    with pytest.raises(StaleFencingToken):
        book.check_fence(alice.lease_id, 1, 110.0)  # expired by time, timer not yet run
    book.tick(110.0)
    bob = ask(book, "bob", 111.0).result
    with pytest.raises(StaleFencingToken) as info:
        book.check_fence(alice.lease_id, 1, 112.0)
    assert info.value.current_token == bob.fencing_token == 2


def test_restore_keeps_grants_queue_order_and_tokens_and_expires_what_ran_out():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=50).result
    bob = ask(book, "bob", 101.0, wait=True).result
    carol = ask(book, "carol", 102.0, wait=True, priority=3).result
    records = [book.get(alice.lease_id), book.get(bob.lease_id), book.get(carol.lease_id)]

    again, fixes = LeaseBook.restore(KEY, records, now=120.0)
    assert fixes.changes == []
    assert again.granted.lease_id == alice.lease_id and again.granted.fencing_token == 1
    assert [lease.holder for lease in again.queue] == ["carol", "bob"]

    later, fixes = LeaseBook.restore(KEY, records, now=200.0)  # alice's TTL ran out while down
    assert [c.event for c in fixes.changes] == ["lease.expired", "lease.granted"]
    assert later.granted.holder == "carol" and later.granted.fencing_token == 2
    # carol was queued before the restart and has not come back yet: a short claim
    assert later.granted.expires_at == 200.0 + later.claim_s


def test_restore_starts_tokens_above_the_floor():
    book, _ = LeaseBook.restore(KEY, [], fencing_floor=41, now=100.0)
    assert ask(book, "alice", 100.0).result.fencing_token == 42


def test_a_returning_waiter_claims_its_restored_request():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    ask(book, "bob", 101.0, wait=True, request_id="bob-1", ttl_s=600)
    restored, _ = LeaseBook.restore(KEY, [book.get(alice.lease_id), *book.queue], now=105.0)
    ask(restored, "bob", 106.0, request_id="bob-1", wait=True)  # bob retries with his request id
    restored.tick(111.0)
    assert restored.granted.holder == "bob" and restored.granted.expires_at == 111.0 + 600


def test_two_granted_records_on_restore_keep_only_the_newest_token():
    book = LeaseBook(KEY)
    old = ask(book, "alice", 100.0).result
    forged = old.model_copy(update={"lease_id": new_id(), "holder": "mallory", "fencing_token": 7, "request_id": "m"})
    restored, fixes = LeaseBook.restore(KEY, [old, forged], now=101.0)
    assert restored.granted.holder == "mallory"
    assert [c.lease.holder for c in fixes.changes] == ["alice"]


def test_ended_leases_are_forgotten_after_retention_but_tokens_keep_rising():
    book = LeaseBook(KEY, retention_s=100.0)
    alice = ask(book, "alice", 100.0, request_id="a").result
    book.release(alice.lease_id, 101.0)
    ask(book, "bob", 500.0).result
    with pytest.raises(LeaseNotFound):
        book.get(alice.lease_id)
    assert book.find_request("alice", "a") is None
    assert book.granted.fencing_token == 2


def test_request_for_another_key_is_refused():
    book = LeaseBook(KEY)
    request = ReserveRequest(resource="other", holder="a", request_id="r")
    with pytest.raises(InvalidRequest):
        book.reserve(request, new_id(), 100.0)


def test_the_fixes_of_a_restore_can_be_rolled_back():
    book = LeaseBook(KEY)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    bob = ask(book, "bob", 101.0, wait=True).result
    records = [book.get(alice.lease_id), book.get(bob.lease_id)]
    restored, fixes = LeaseBook.restore(KEY, records, now=200.0)
    assert [c.event for c in fixes.changes] == ["lease.expired", "lease.granted"]
    restored.rollback()  # the ledger refused the fixes: serve what was loaded
    assert restored.granted.lease_id == alice.lease_id and restored.queue[0].lease_id == bob.lease_id


def test_a_holder_returning_after_its_restored_request_was_granted_gets_the_full_ttl():
    book = LeaseBook(KEY, claim_s=60.0)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    ask(book, "bob", 101.0, wait=True, request_id="bob-1", ttl_s=900)
    restored, fixes = LeaseBook.restore(KEY, [book.get(alice.lease_id), *book.queue], now=200.0, claim_s=60.0)
    granted = restored.granted  # alice ran out while the actor was down; bob is granted in his absence
    assert granted.holder == "bob" and granted.expires_at == 200.0 + 60.0 and granted.unclaimed
    back = ask(restored, "bob", 201.0, request_id="bob-1", wait=True)  # bob's retry, same request id
    assert back.result.lease_id == granted.lease_id and back.result.fencing_token == granted.fencing_token
    assert back.result.expires_at == 201.0 + 900 and not back.result.unclaimed
    assert [c.event for c in back.changes] == [LeaseEvent.CLAIMED]  # written before the answer
    again = ask(restored, "bob", 202.0, request_id="bob-1", wait=True)  # a second retry changes nothing
    assert again.changes == [] and again.result.expires_at == 201.0 + 900


def test_the_claim_cap_survives_a_second_restart_and_is_lifted_when_the_holder_returns():
    book = LeaseBook(KEY, claim_s=60.0)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    ask(book, "bob", 101.0, wait=True, request_id="bob-1", ttl_s=900)
    first, fixes = LeaseBook.restore(KEY, [book.get(alice.lease_id), *book.queue], now=200.0, claim_s=60.0)
    records = fixes.changed_leases  # what the actor wrote: alice expired, bob granted with the cap
    second, _ = LeaseBook.restore(KEY, records, now=230.0, claim_s=60.0)
    assert second.granted.expires_at == 260.0 and second.granted.unclaimed
    back = ask(second, "bob", 231.0, request_id="bob-1", wait=True).result
    assert back.expires_at == 231.0 + 900


def test_the_claim_window_still_frees_the_key_of_a_holder_who_never_returns():
    book = LeaseBook(KEY, claim_s=60.0)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    bob = ask(book, "bob", 101.0, wait=True, request_id="bob-1", ttl_s=900).result
    restored, _ = LeaseBook.restore(KEY, [book.get(alice.lease_id), book.get(bob.lease_id)], now=200.0, claim_s=60.0)
    carol = ask(restored, "carol", 201.0, wait=True).result
    outcome = restored.tick(260.0)
    assert [(c.event, c.lease.holder) for c in outcome.changes] == [
        (LeaseEvent.EXPIRED, "bob"),
        (LeaseEvent.GRANTED, "carol"),
    ]
    assert restored.granted.lease_id == carol.lease_id and not restored.granted.unclaimed
    late = ask(restored, "bob", 261.0, request_id="bob-1", wait=True).result  # too late: the lease ended
    assert late.state is LeaseState.EXPIRED and late.end_reason is EndReason.TTL_ELAPSED


def test_renewing_a_capped_grant_is_also_its_holders_claim():
    book = LeaseBook(KEY, claim_s=60.0)
    alice = ask(book, "alice", 100.0, ttl_s=10).result
    bob = ask(book, "bob", 101.0, wait=True, request_id="bob-1", ttl_s=900).result
    restored, _ = LeaseBook.restore(KEY, [book.get(alice.lease_id), book.get(bob.lease_id)], now=200.0, claim_s=60.0)
    renewed = restored.renew(bob.lease_id, None, 210.0).result
    assert renewed.expires_at == 210.0 + 900 and not renewed.unclaimed
