"""Random interleavings of single-key, selector and set requests over several keys' books, with
releases, expiries, maintenance, lost races and restarts, never break the scheduling rules.

The machine is the coordinator's protocol (broker/actors/groups.py) with the shell taken out:
one LeaseBook per key restarted from what it wrote, group entries queued one group at a time,
and the pass that takes a group's keys with :func:`choose_members` — or gives them back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.core.book import LeaseBook, Outcome
from broker.core.groups import KeyView, choose_members
from broker.errors import BrokerError, ResourceBusy
from broker.models import Lease, LeaseState, ReserveRequest

KEYS = ("a", "b", "c", "d")
PRIORITIES = st.sampled_from([0, 0, 0, 5])
TTL = 50.0


@dataclass
class Group:
    ref: str
    holder: str
    candidates: tuple[str, ...]
    count: int
    priority: int
    arrival: int
    entries: dict[str, str] = field(default_factory=dict)
    members: tuple[str, ...] = ()
    state: str = "waiting"  # waiting, granted, ended


class GroupScheduling(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.books = {key: LeaseBook(key, claim_s=30.0, retention_s=1e6) for key in KEYS}
        self.disk: dict[str, dict[str, Lease]] = {key: {} for key in KEYS}
        self.maintenance: dict[str, bool] = dict.fromkeys(KEYS, False)
        self.ids = itertools.count()
        self.arrivals = itertools.count()
        self.groups: list[Group] = []
        self.arrival_of: dict[tuple[str, str], int] = {}  # (key, lease id) -> arrival of its request
        self.singles: dict[str, tuple[str, int, int]] = {}  # lease id -> (key, priority, arrival)
        self.ever_granted: set[int] = set()  # arrivals granted at least once
        self.requests: set[int] = set()
        self.last_token: dict[str, int] = dict.fromkeys(KEYS, 0)

    # ---------------------------------------------------------------- the shell's part

    def _write(self, key: str, outcome: Outcome) -> None:
        for lease in outcome.changed_leases:
            self.disk[key][lease.lease_id] = lease
        for change in outcome.changes:
            lease = change.lease
            if change.event != "lease.granted" or lease is None:
                continue
            assert lease.fencing_token > self.last_token[key], "fencing token did not increase"
            self.last_token[key] = lease.fencing_token
            if lease.group is None:
                self._check_not_overtaking(key, lease.priority, self.singles[lease.lease_id][2])

    def _apply(self, key: str, command) -> Outcome | None:
        try:
            outcome = command(self.books[key])
        except BrokerError:
            return None
        self._write(key, outcome)
        return outcome

    def _check_not_overtaking(self, key: str, priority: int, arrival: int) -> None:
        for group in self.groups:
            if group.state == "waiting" and key in group.candidates:
                overtaken = group.priority >= priority and group.arrival < arrival
                assert not overtaken, f"request {arrival} took {key} before the waiting group {group.arrival}"

    def _new_id(self, key: str) -> str:
        return f"{key}.{next(self.ids):032x}"

    # ---------------------------------------------------------------- requests

    @rule(key=st.sampled_from(KEYS), priority=PRIORITIES)
    def single(self, key: str, priority: int) -> None:
        arrival = next(self.arrivals)
        lease_id = self._new_id(key)
        request = ReserveRequest(
            resource=key, holder=f"s{arrival}", ttl_s=TTL, wait=True, priority=priority, request_id=f"r{arrival}"
        )
        self.singles[lease_id] = (key, priority, arrival)
        self.requests.add(arrival)
        self._apply(key, lambda book: book.reserve(request, lease_id, self.now))

    @rule(
        candidates=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True),
        want=st.integers(1, 4),
        priority=PRIORITIES,
    )
    def group(self, candidates: list[str], want: int, priority: int) -> None:
        arrival = next(self.arrivals)
        ordered = tuple(key for key in KEYS if key in candidates)
        group = Group(f"{arrival:012x}", f"g{arrival}", ordered, min(want, len(ordered)), priority, arrival)
        self.groups.append(group)
        self.requests.add(arrival)
        for key in ordered:  # one group's entries, all of them, before anything else arrives
            lease_id = self._new_id(key)
            request = ReserveRequest(
                resource=key,
                holder=group.holder,
                ttl_s=TTL,
                wait=True,
                priority=priority,
                request_id=f"entry-{group.ref}",
                group=group.ref,
            )
            outcome = self._apply(key, lambda book, r=request, i=lease_id: book.reserve(r, i, self.now))
            assert outcome is not None and outcome.result.state is LeaseState.QUEUED, "a group entry was granted alone"
            group.entries[key] = lease_id

    # ---------------------------------------------------------------- the pass

    @rule(race=st.booleans())
    def schedule(self, race: bool) -> None:
        """The coordinator's pass; ``race``: a higher-priority request lands between two takes."""
        for group in sorted(self.groups, key=lambda g: (-g.priority, g.arrival)):
            if group.state != "waiting":
                continue
            views = [
                KeyView(key, self.books[key].ready_for_group, self.books[key].freed_at) for key in group.candidates
            ]
            chosen = choose_members(group.ref, group.count, views)
            if chosen is None:
                continue
            taken: dict[str, Lease] = {}
            for index, key in enumerate(chosen):
                if race and index == 1:
                    self.single(key, 9)  # arrives first on this key: ahead of the group, granted at once
                try:
                    outcome = self.books[key].take_for_group(group.entries[key], self.now)
                except ResourceBusy:
                    break
                self._write(key, outcome)
                taken[key] = outcome.result
            if len(taken) < len(chosen):
                for key, lease in taken.items():  # give back: same place in the queue
                    new_id = self._new_id(key)
                    outcome = self.books[key].requeue_group_member(lease.lease_id, new_id, self.now)
                    self._write(key, outcome)
                    group.entries[key] = new_id
                continue
            group.state, group.members = "granted", chosen
            self.ever_granted.add(group.arrival)
            for key in group.candidates:  # withdraw what it did not get
                if key not in chosen:
                    self._apply(key, lambda book, i=group.entries[key]: book.cancel(i, self.now))

    # ---------------------------------------------------------------- ends

    @rule(data=st.data())
    def release_something(self, data) -> None:
        held = [g for g in self.groups if g.state == "granted"]
        singles = [
            (key, book.granted.lease_id)
            for key, book in self.books.items()
            if book.granted is not None and book.granted.group is None
        ]
        choices = [("group", g) for g in held] + [("single", s) for s in singles]
        if not choices:
            return
        kind, item = data.draw(st.sampled_from(choices))
        if kind == "group":
            self._end_group(item)
        else:
            key, lease_id = item
            self._apply(key, lambda book: book.release(lease_id, self.now))

    def _end_group(self, group: Group) -> None:
        for key in group.members:
            self._apply(key, lambda book, i=group.entries[key]: book.release(i, self.now))
        group.state = "ended"

    @rule(seconds=st.sampled_from([1.0, 20.0, TTL + 1]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        for key in KEYS:
            self._apply(key, lambda book: book.tick(self.now))
        for group in self.groups:  # a group ends as a whole when one of its keys' leases ends
            if group.state == "granted" and any(
                self.books[key].get(group.entries[key]).state is not LeaseState.GRANTED for key in group.members
            ):
                self._end_group(group)

    @rule(key=st.sampled_from(KEYS), on=st.booleans())
    def maintenance(self, key: str, on: bool) -> None:
        self.maintenance[key] = on
        self._apply(key, lambda book: book.set_maintenance(on, "test", self.now))

    @rule(key=st.sampled_from(KEYS))
    def restart(self, key: str) -> None:
        maintenance = self.books[key].maintenance
        book, fixes = LeaseBook.restore(
            key,
            self.disk[key].values(),
            maintenance=maintenance,
            now=self.now,
            claim_s=30.0,
            retention_s=1e6,
        )
        self.books[key] = book
        self._write(key, fixes)

    # ---------------------------------------------------------------- the rules

    @invariant()
    def one_holder_per_key_and_groups_all_or_nothing(self) -> None:
        holders: dict[str, str] = {}
        for key, book in self.books.items():
            granted = [lease for lease in book.leases() if lease.state is LeaseState.GRANTED]
            assert len(granted) <= 1, f"{key} has {len(granted)} holders"
            if granted:
                holders[key] = granted[0].lease_id
        for group in self.groups:
            held = [key for key in group.candidates if holders.get(key) == group.entries.get(key)]
            if group.state == "granted":
                assert set(held) <= set(group.members)
            else:
                assert held == [] or group.state == "ended", f"group {group.ref} holds {held} while {group.state}"

    @invariant()
    def a_waiting_group_is_queued_on_every_key_it_may_use(self) -> None:
        for group in self.groups:
            if group.state != "waiting":
                continue
            for key in group.candidates:
                lease = self.books[key].get(group.entries[key])
                assert lease.state is LeaseState.QUEUED and lease.group == group.ref

    def teardown(self) -> None:
        """Liveness: with no new requests, every waiting request is granted once holders end."""
        for key in KEYS:
            if self.maintenance[key]:
                self.maintenance_off(key)
        for _ in range(4 * (len(self.requests) + 2)):
            self.schedule(False)
            for book in self.books.values():
                if book.granted is not None:
                    lease = book.granted
                    if lease.group is None:
                        self.ever_granted.add(self.singles[lease.lease_id][2])
            for group in [g for g in self.groups if g.state == "granted"]:
                self._end_group(group)
            for key, book in self.books.items():
                granted = book.granted
                if granted is not None and granted.group is None:
                    self._apply(key, lambda b, i=granted.lease_id: b.release(i, self.now))
        waiting = [g.arrival for g in self.groups if g.state == "waiting"]
        assert not waiting, f"groups {waiting} never granted"
        starved = [
            arrival
            for lease_id, (key, _, arrival) in self.singles.items()
            if self.books[key].get(lease_id).state is LeaseState.QUEUED
        ]
        assert not starved, f"single requests {starved} never granted"

    def maintenance_off(self, key: str) -> None:
        self.maintenance[key] = False
        self._apply(key, lambda book: book.set_maintenance(False, "", self.now))


GroupScheduling.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_group_scheduling_rules = GroupScheduling.TestCase
