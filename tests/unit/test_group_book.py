"""One key's book and group entries: a barrier, a take, a give-back, and a restore in any order."""

from __future__ import annotations

import itertools

import pytest

from broker.core.book import LeaseBook
from broker.errors import LeaseNotHeld, ResourceBusy
from broker.models import EndReason, LeaseState, ReserveRequest

GROUP = "0123456789ab"


def _request(holder: str, request_id: str, *, group: str | None = None, priority: int = 0) -> ReserveRequest:
    return ReserveRequest(
        resource="k", holder=holder, ttl_s=60.0, wait=True, request_id=request_id, group=group, priority=priority
    )


def test_a_group_entry_holds_back_the_queue_until_taken_and_gives_back_its_place():
    book = LeaseBook("k")
    entry = book.reserve(_request("g", "e1", group=GROUP), "k." + "1" * 32, 100.0).result
    later = book.reserve(_request("s", "s1"), "k." + "2" * 32, 101.0).result
    assert entry.state is LeaseState.QUEUED and later.state is LeaseState.QUEUED  # the free key waits
    assert book.ready_for_group == GROUP
    urgent = book.reserve(_request("u", "u1", priority=5), "k." + "3" * 32, 102.0).result
    assert urgent.state is LeaseState.GRANTED  # a higher priority is ahead of the group
    with pytest.raises(ResourceBusy):
        book.take_for_group(entry.lease_id, 103.0)
    book.release(urgent.lease_id, 104.0)
    taken = book.take_for_group(entry.lease_id, 105.0).result
    assert taken.state is LeaseState.GRANTED and taken.fencing_token == 2
    back = book.requeue_group_member(taken.lease_id, "k." + "4" * 32, 106.0).result
    assert back.state is LeaseState.QUEUED and book.position(back.lease_id) == 1  # its old place
    assert book.get(taken.lease_id).end_reason is EndReason.GROUP_GRANT_ABORTED
    assert book.find_request("g", "e1").lease_id == back.lease_id
    with pytest.raises(LeaseNotHeld):
        book.requeue_group_member(taken.lease_id, "k." + "5" * 32, 107.0)  # given back once only
    again = book.take_for_group(back.lease_id, 108.0).result
    assert again.fencing_token == 3  # the given-back token is never reused


def test_restore_finds_the_given_back_entry_whatever_order_the_records_come_in():
    book = LeaseBook("k")
    entry = book.reserve(_request("g", "e1", group=GROUP), "k." + "1" * 32, 100.0).result
    taken = book.take_for_group(entry.lease_id, 101.0).result
    back = book.requeue_group_member(taken.lease_id, "k." + "4" * 32, 102.0).result
    records = [book.get(taken.lease_id), book.get(back.lease_id)]
    for order in itertools.permutations(records):
        restored, _ = LeaseBook.restore("k", order, now=103.0)
        assert restored.find_request("g", "e1").lease_id == back.lease_id
        assert restored.ready_for_group == GROUP and restored.granted is None
        assert restored.fencing_counter == 1


def test_withdrawing_a_group_entry_lets_the_next_waiter_in():
    book = LeaseBook("k")
    entry = book.reserve(_request("g", "e1", group=GROUP), "k." + "1" * 32, 100.0).result
    single = book.reserve(_request("s", "s1"), "k." + "2" * 32, 101.0).result
    book.cancel(entry.lease_id, 102.0, EndReason.WITHDRAWN)
    assert book.get(single.lease_id).state is LeaseState.GRANTED
