"""Random interleavings of every book command, with restarts from the "disk", never break the rules.

The machine keeps what the resource actor would have written (the latest
version of every changed lease) and restarts the book from exactly that.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.core.book import LeaseBook, Maintenance, Outcome
from broker.errors import BrokerError
from broker.models import Lease, LeaseState, ReserveRequest

KEY = "lane"
HOLDERS = st.sampled_from(["alice", "bob", "carol", "dave"])
REQUEST_IDS = st.sampled_from([f"r{i}" for i in range(8)])


class LeaseBookMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.book = LeaseBook(KEY, claim_s=30.0, retention_s=10_000.0)
        self.disk: dict[str, Lease] = {}
        self.maintenance: Maintenance | None = None
        self.ids = itertools.count()
        self.max_token = 0
        self.tokens_seen: set[int] = set()
        self.leases_of_request: dict[tuple[str, str], set[str]] = {}

    # ---------------------------------------------------------------- helpers

    def _record(self, outcome: Outcome) -> None:
        """What the actor does after a command: write, then check each grant."""
        for lease in outcome.changed_leases:
            self.disk[lease.lease_id] = lease
            self.leases_of_request.setdefault((lease.holder, lease.request_id), set()).add(lease.lease_id)
        if outcome.maintenance_changed:
            self.maintenance = self.book.maintenance
        for change in outcome.changes:
            if change.event != "lease.granted":
                continue
            token = change.lease.fencing_token
            assert token is not None and token > self.max_token, "fencing token did not increase"
            assert token not in self.tokens_seen, "fencing token reused"
            self.max_token = token
            self.tokens_seen.add(token)
            granted = change.lease
            for waiting in self.book.queue:
                ahead = (waiting.priority, -waiting.seq) > (granted.priority, -granted.seq)
                assert not ahead, f"{waiting.holder} (p{waiting.priority}) was passed over by {granted.holder}"

    def _run(self, command) -> None:
        try:
            outcome = command()
        except BrokerError:
            return
        self._record(outcome)

    def _known(self, data) -> str | None:
        if not self.disk:
            return None
        return data.draw(st.sampled_from(sorted(self.disk)))

    # ---------------------------------------------------------------- rules

    @rule(
        holder=HOLDERS,
        request_id=REQUEST_IDS,
        wait=st.booleans(),
        priority=st.integers(0, 2),
        ttl=st.sampled_from([5.0, 20.0, 60.0]),
        timeout=st.sampled_from([None, 3.0, 30.0]),
    )
    def reserve(self, holder, request_id, wait, priority, ttl, timeout):
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
        self._run(lambda: self.book.reserve(request, lease_id, self.now))

    @rule(data=st.data())
    def release(self, data):
        lease_id = self._known(data)
        if lease_id:
            self._run(lambda: self.book.release(lease_id, self.now))

    @rule(data=st.data(), ttl=st.sampled_from([None, 10.0]))
    def renew(self, data, ttl):
        lease_id = self._known(data)
        if lease_id:
            self._run(lambda: self.book.renew(lease_id, ttl, self.now))

    @rule(data=st.data())
    def cancel(self, data):
        lease_id = self._known(data)
        if lease_id:
            self._run(lambda: self.book.cancel(lease_id, self.now))

    @rule(expected=st.one_of(st.none(), HOLDERS))
    def revoke(self, expected):
        self._run(lambda: self.book.revoke("test", self.now, expected_holder=expected, by="admin"))

    @rule(on=st.booleans())
    def maintenance_mode(self, on):
        self._run(lambda: self.book.set_maintenance(on, "test", self.now))

    @rule(on=st.booleans(), by=st.sampled_from(["admin", "prober"]), only_own=st.booleans())
    def maintenance_by(self, on, by, only_own):
        """Compare-and-set: ``only_own`` never touches maintenance someone else set."""
        before = self.book.maintenance
        self._run(lambda: self.book.set_maintenance(on, f"by {by}", self.now, by=by, only_own=only_own))
        after = self.book.maintenance
        if only_own and before is not None and before.by != by:
            assert after == before, f"{by} changed {before} with only_own"
        else:
            assert (after is not None) == on and (after is None or (after.by, after.reason) == (by, f"by {by}"))

    @rule(dt=st.sampled_from([0.5, 2.0, 7.0, 25.0, 70.0]))
    def advance_clock(self, dt):
        self.now += dt
        self._run(lambda: self.book.tick(self.now))

    @rule(data=st.data())
    def ledger_write_fails(self, data):
        """A command whose write fails is rolled back: the book must equal the disk again."""
        holder = data.draw(HOLDERS)
        request = ReserveRequest(resource=KEY, holder=holder, request_id="doomed", wait=True)
        try:
            self.book.reserve(request, f"{KEY}.{next(self.ids):032x}", self.now)
        except BrokerError:
            return
        self.book.rollback()

    @rule()
    def restart(self):
        """The actor dies; a new one rebuilds from what was written."""
        self.book, fixes = LeaseBook.restore(
            KEY,
            list(self.disk.values()),
            fencing_floor=0,
            maintenance=self.maintenance,
            now=self.now,
            claim_s=30.0,
            retention_s=10_000.0,
        )
        self._record(fixes)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def at_most_one_holder(self):
        granted_on_disk = [lease for lease in self.disk.values() if lease.state is LeaseState.GRANTED]
        assert len(granted_on_disk) <= 1, granted_on_disk
        book_holder = self.book.granted
        assert (book_holder.lease_id if book_holder else None) == (
            granted_on_disk[0].lease_id if granted_on_disk else None
        )

    @invariant()
    def book_matches_disk(self):
        for lease in self.book.queue:
            assert self.disk[lease.lease_id] == lease
        queued_on_disk = {lease.lease_id for lease in self.disk.values() if lease.state is LeaseState.QUEUED}
        assert queued_on_disk == {lease.lease_id for lease in self.book.queue}

    @invariant()
    def one_lease_per_request_id(self):
        for request, lease_ids in self.leases_of_request.items():
            assert len(lease_ids) == 1, f"{request} produced {lease_ids}"

    @invariant()
    def no_grant_while_free_with_waiters(self):
        if self.book.granted is None and self.book.maintenance is None:
            assert self.book.queue == [], "a free key left a waiter waiting"

    @invariant()
    def queue_is_ordered(self):
        keys = [(-lease.priority, lease.seq) for lease in self.book.queue]
        assert keys == sorted(keys)


LeaseBookMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_lease_book_interleavings = LeaseBookMachine.TestCase
