"""A command that is rolled back (its ledger write failed) leaves the book exactly as it was.

Random command sequences build up a book; at every step one more command runs
and is then either kept or rolled back. After a rollback the book's whole
state (every field of it, compared as plain values) equals the state before
the command, and the book goes on to behave as if the command never ran.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.core.book import LeaseBook, _State
from broker.errors import BrokerError
from broker.models import LeaseState, ReserveRequest

KEY = "lane"
HOLDERS = st.sampled_from(["alice", "bob", "carol"])
REQUEST_IDS = st.sampled_from([f"r{i}" for i in range(6)])


class RollbackMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        # A short retention, so the eviction sweep runs inside rolled-back commands too.
        self.book = LeaseBook(KEY, claim_s=30.0, retention_s=40.0, max_hold_s=90.0, warn_before_s=10.0)
        self.ids = itertools.count()
        self.rollbacks = 0

    def _run(self, command, undo: bool) -> None:
        before = self.book.contents()
        try:
            command()
        except BrokerError:
            assert self.book.contents() == before, "a refused command changed the book"
            return
        if undo:
            self.book.rollback()
            assert self.book.contents() == before, "rollback left the book different from before the command"
            self.book.rollback()  # a second rollback has nothing left to undo
            assert self.book.contents() == before
            self.rollbacks += 1

    def _known(self, data) -> str | None:
        leases = sorted(lease.lease_id for lease in self.book.leases())
        return data.draw(st.sampled_from(leases)) if leases else None

    @rule(
        holder=HOLDERS,
        request_id=REQUEST_IDS,
        wait=st.booleans(),
        priority=st.integers(0, 2),
        ttl=st.sampled_from([5.0, 20.0, 60.0]),
        timeout=st.sampled_from([None, 3.0, 30.0]),
        undo=st.booleans(),
    )
    def reserve(self, holder, request_id, wait, priority, ttl, timeout, undo):
        request = ReserveRequest(
            resource=KEY,
            holder=holder,
            request_id=request_id,
            wait=wait,
            priority=priority,
            ttl_s=ttl,
            timeout_s=timeout,
        )
        lease_id = f"{KEY}.{next(self.ids):032x}"
        self._run(lambda: self.book.reserve(request, lease_id, self.now), undo)

    @rule(data=st.data(), undo=st.booleans())
    def release(self, data, undo):
        lease_id = self._known(data)
        if lease_id:
            self._run(lambda: self.book.release(lease_id, self.now), undo)

    @rule(data=st.data(), ttl=st.sampled_from([None, 10.0]), undo=st.booleans())
    def renew(self, data, ttl, undo):
        lease_id = self._known(data)
        if lease_id:
            self._run(lambda: self.book.renew(lease_id, ttl, self.now), undo)

    @rule(data=st.data(), undo=st.booleans())
    def cancel(self, data, undo):
        lease_id = self._known(data)
        if lease_id:
            self._run(lambda: self.book.cancel(lease_id, self.now), undo)

    @rule(request_id=st.sampled_from([None, "rv1", "rv2"]), undo=st.booleans())
    def revoke(self, request_id, undo):
        self._run(lambda: self.book.revoke("test", self.now, by="admin", request_id=request_id), undo)

    @rule(on=st.booleans(), undo=st.booleans())
    def maintenance_mode(self, on, undo):
        self._run(lambda: self.book.set_maintenance(on, "test", self.now), undo)

    @rule(dt=st.sampled_from([0.5, 2.0, 7.0, 25.0, 70.0]), undo=st.booleans())
    def advance_clock(self, dt, undo):
        self.now += dt
        self._run(lambda: self.book.tick(self.now), undo)

    @rule(undo=st.booleans())
    def restart(self, undo):
        """A restart's fixes can be rolled back too (the disk refused them): the loaded state stays."""
        records = self.book.leases()
        self.book, _ = LeaseBook.restore(
            KEY, records, fencing_floor=self.book.fencing_counter, now=self.now, claim_s=30.0, retention_s=40.0
        )
        if undo:
            self.book.rollback()
            granted = sorted((r for r in records if r.state is LeaseState.GRANTED), key=lambda r: r.fencing_token)
            assert (self.book.granted.lease_id if self.book.granted else None) == (
                granted[-1].lease_id if granted else None
            )
            queued = {lease.lease_id for lease in records if lease.state is LeaseState.QUEUED}
            assert {lease.lease_id for lease in self.book.queue} == queued

    @invariant()
    def rolled_back_book_is_consistent(self):
        granted = self.book.granted
        queued = {lease.lease_id for lease in self.book.queue}
        assert granted is None or granted.lease_id not in queued
        for lease in self.book.leases():
            if self.book.find_request(lease.holder, lease.request_id) is None:
                raise AssertionError(f"{lease.ref} lost its request index")


RollbackMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)
test_a_rolled_back_command_leaves_the_book_exactly_as_before = RollbackMachine.TestCase


def test_rollback_restores_a_sweep_of_old_leases():
    book = LeaseBook(KEY, retention_s=100.0)
    alice = book.reserve(ReserveRequest(resource=KEY, holder="alice", request_id="a"), f"{KEY}.{0:032x}", 100.0)
    book.release(alice.result.lease_id, 101.0)
    before = book.contents()
    book.tick(500.0)  # the sweep forgets alice's lease ...
    assert book.find_request("alice", "a") is None
    book.rollback()  # ... unless the command is undone
    assert book.contents() == before and book.find_request("alice", "a") is not None


def test_a_state_field_that_could_change_in_place_is_refused():
    """A new field must be immutable or a versioned table, or rollback could not restore it."""
    state = _State()
    state.queue = [(0, 1, "x")]  # type: ignore[assignment]
    with pytest.raises(TypeError, match="queue"):
        state.fork()
