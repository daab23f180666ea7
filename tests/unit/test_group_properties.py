"""Random interleavings of single-key, selector and set requests over several keys' books, with
releases, expiries, maintenance, lost races and restarts, never break the scheduling rules.

The machine is the coordinator's protocol (broker/actors/groups.py) with the shell taken out:
one LeaseBook per key restarted from what it wrote, group entries queued one group at a time,
and the pass that takes a group's keys with :func:`choose_members` — or gives them back.

Checked at every grant: fencing tokens increase; a key in maintenance is never granted (also
when it went into maintenance while kept for a waiting group, between two takes of a pass); no
waiting request — single or group — is overtaken on a key it could use by a later request of the
same or lower priority. Checked at the end (liveness): with no new requests, every request ends
granted or timed out (requests may carry wait timeouts; a group past its deadline is never granted).
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
from broker.models import EndReason, Lease, LeaseState, ReserveRequest

KEYS = ("a", "b", "c", "d")
PRIORITIES = st.sampled_from([0, 0, 0, 5])
TIMEOUTS = st.sampled_from([None, None, 10.0, 30.0])  # a waiting request's timeout_s
TTL = 50.0


@dataclass
class Group:
    ref: str
    holder: str
    candidates: tuple[str, ...]
    count: int
    priority: int
    arrival: int
    deadline: float | None = None  # its wait's end (the coordinator ends it then, never grants it after)
    entries: dict[str, str] = field(default_factory=dict)
    members: tuple[str, ...] = ()
    state: str = "waiting"  # waiting, granted, ended, timed out


class GroupScheduling(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.books = {key: LeaseBook(key, claim_s=30.0, retention_s=1e6) for key in KEYS}
        self.disk: dict[str, dict[str, Lease]] = {key: {} for key in KEYS}
        self.maintenance_flags: dict[str, bool] = dict.fromkeys(KEYS, False)
        self.ids = itertools.count()
        self.arrivals = itertools.count()
        self.groups: list[Group] = []
        self.arrival_of: dict[tuple[str, str], int] = {}  # (key, lease id) -> arrival of its request
        self.singles: dict[str, tuple[str, int, int]] = {}  # lease id -> (key, priority, arrival)
        self.with_timeout: set[int] = set()  # arrivals of single requests that asked with a timeout
        self.requests: set[int] = set()
        self.last_token: dict[str, int] = dict.fromkeys(KEYS, 0)
        self.group_of: dict[str, Group] = {}  # ref -> group

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
            assert not self.maintenance_flags[key], f"{key} granted to {lease.holder} while in maintenance"
            if lease.group is None:
                self._check_not_overtaking(key, lease.priority, self.singles[lease.lease_id][2])
            else:
                group = self.group_of[lease.group]
                self._check_not_overtaking(key, group.priority, group.arrival, taker=group.ref)

    def _apply(self, key: str, command) -> Outcome | None:
        try:
            outcome = command(self.books[key])
        except BrokerError:
            return None
        self._write(key, outcome)
        return outcome

    def _check_not_overtaking(self, key: str, priority: int, arrival: int, taker: str | None = None) -> None:
        """A grant of ``key`` to request ``arrival``: no earlier request of the same or a higher
        priority that could use the key still waits (a group that could use it, or a single on it)."""
        for group in self.groups:
            if group.state == "waiting" and key in group.candidates and group.ref != taker:
                overtaken = group.priority >= priority and group.arrival < arrival
                assert not overtaken, f"request {arrival} took {key} before the waiting group {group.arrival}"
        book = self.books[key]
        for lease in book.queue:
            if lease.group is None:
                _, waiting_priority, waiting_arrival = self.singles[lease.lease_id]
                overtaken = waiting_priority >= priority and waiting_arrival < arrival
                assert not overtaken, f"request {arrival} took {key} before the waiting single {waiting_arrival}"

    def _new_id(self, key: str) -> str:
        return f"{key}.{next(self.ids):032x}"

    # ---------------------------------------------------------------- requests

    @rule(key=st.sampled_from(KEYS), priority=PRIORITIES, timeout_s=TIMEOUTS)
    def single(self, key: str, priority: int, timeout_s: float | None = None) -> None:
        arrival = next(self.arrivals)
        lease_id = self._new_id(key)
        request = ReserveRequest(
            resource=key,
            holder=f"s{arrival}",
            ttl_s=TTL,
            wait=True,
            timeout_s=timeout_s,
            priority=priority,
            request_id=f"r{arrival}",
        )
        self.singles[lease_id] = (key, priority, arrival)
        if timeout_s is not None:
            self.with_timeout.add(arrival)
        self.requests.add(arrival)
        self._apply(key, lambda book: book.reserve(request, lease_id, self.now))

    @rule(
        candidates=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True),
        want=st.integers(1, 4),
        priority=PRIORITIES,
        timeout_s=TIMEOUTS,
    )
    def group(self, candidates: list[str], want: int, priority: int, timeout_s: float | None) -> None:
        arrival = next(self.arrivals)
        ordered = tuple(key for key in KEYS if key in candidates)
        deadline = None if timeout_s is None else self.now + timeout_s
        group = Group(f"{arrival:012x}", f"g{arrival}", ordered, min(want, len(ordered)), priority, arrival, deadline)
        self.groups.append(group)
        self.group_of[group.ref] = group
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

    @rule(race=st.sampled_from(["none", "single", "maintenance"]))
    def schedule(self, race: str = "none") -> None:
        """The coordinator's pass. ``race``, between two takes of a group's keys (before the take,
        for one key): a higher-priority request lands on the key, or the key goes into maintenance."""
        for group in sorted(self.groups, key=lambda g: (-g.priority, g.arrival)):
            if group.state != "waiting":
                continue
            if group.deadline is not None and group.deadline <= self.now:
                self._time_out(group)  # never granted after its wait ran out
                continue
            views = [
                KeyView(key, self.books[key].ready_for_group, self.books[key].freed_at) for key in group.candidates
            ]
            chosen = choose_members(group.ref, group.count, views)
            if chosen is None:
                continue
            taken: dict[str, Lease] = {}
            for index, key in enumerate(chosen):
                if index == min(1, len(chosen) - 1):
                    if race == "single":
                        self.single(key, 9)  # arrives first on this key: ahead of the group, granted at once
                    elif race == "maintenance":
                        self.maintenance(key, True)  # kept for the group until now: not handed out
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

    def _time_out(self, group: Group) -> None:
        """A waiting group whose deadline passed: its entries leave every queue (the coordinator's tick)."""
        group.state = "timed out"  # it waits no more: the keys it held back go to the next in line
        for key in group.candidates:
            self._apply(key, lambda book, i=group.entries[key]: book.cancel(i, self.now, EndReason.WAIT_TIMED_OUT))

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
            elif group.state == "waiting" and group.deadline is not None and group.deadline <= self.now:
                self._time_out(group)

    @rule(key=st.sampled_from(KEYS), on=st.booleans())
    def maintenance(self, key: str, on: bool) -> None:
        self._apply(key, lambda book: book.tick(self.now))  # what was due before it (a grant may be)
        self.maintenance_flags[key] = on
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
        """Liveness: with no new requests, every request ends granted or timed out while holders end
        and time passes (a maintenance window ends too)."""
        for key in KEYS:
            if self.maintenance_flags[key]:
                self.maintenance_off(key)
        for _ in range(4 * (len(self.requests) + 2)):
            self.schedule("none")
            for group in [g for g in self.groups if g.state == "granted"]:
                self._end_group(group)
            for key, book in self.books.items():
                granted = book.granted
                if granted is not None and granted.group is None:
                    self._apply(key, lambda b, i=granted.lease_id: b.release(i, self.now))
            self.time_passes(5.0)
        waiting = [g.arrival for g in self.groups if g.state == "waiting"]
        assert not waiting, f"groups {waiting} neither granted nor timed out"
        assert all(g.deadline is not None for g in self.groups if g.state == "timed out")
        for lease_id, (key, _, arrival) in self.singles.items():
            lease = self.books[key].get(lease_id)
            assert lease.state is not LeaseState.QUEUED, f"single request {arrival} neither granted nor timed out"
            if lease.granted_at is None:
                assert lease.end_reason == EndReason.WAIT_TIMED_OUT and arrival in self.with_timeout, lease
        for group in self.groups:  # no key is left held back for a group that no longer waits
            for key in group.candidates:
                assert self.books[key].ready_for_group is None

    def maintenance_off(self, key: str) -> None:
        self.maintenance_flags[key] = False
        self._apply(key, lambda book: book.set_maintenance(False, "", self.now))


GroupScheduling.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_group_scheduling_rules = GroupScheduling.TestCase
