"""Requests and leases tied to their caller's session (its Ray job) end when it ends: the book's
rules, random interleavings of them, and the shells on FakeSystem (a test ends a session the way
a driver's death does on Ray)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.cli import interrupts
from broker.core.book import LeaseBook, Outcome
from broker.errors import SIGNAL_EXIT_CODES, BrokerError, InvalidRequest, LeaseNotHeld
from broker.models import EndReason, Lease, LeaseEvent, LeaseState, ReserveRequest, SessionTie
from broker.seam.fake import FakeSystem
from tests.unit.test_shells import NS, queue_of, run, until, up

KEY = "firesim_u250"
ALICE, BOB, CAROL = "0000000a", "0000000b", "0000000c"  # sessions are Ray job ids (8 hex digits)
_ids = itertools.count()


def new_id() -> str:
    return f"{KEY}.{next(_ids):032x}"


def ask(book: LeaseBook, holder: str, now: float, request_id: str | None = None, **options) -> Lease:
    request = ReserveRequest(resource=KEY, holder=holder, request_id=request_id or f"r-{holder}-{now}", **options)
    return book.reserve(request, new_id(), now).result  # type: ignore[return-value]


# ---------------------------------------------------------------------- the book's rules


def test_a_waiter_whose_session_ended_leaves_the_queue_and_is_never_granted():
    book = LeaseBook(KEY)
    held = ask(book, "alice", 100.0)
    bob = ask(book, "bob", 101.0, wait=True, session=BOB)
    carol = ask(book, "carol", 102.0, wait=True, session=CAROL)
    outcome = book.end_session(BOB, 103.0)
    gone = book.get(bob.lease_id)
    assert gone.state is LeaseState.CANCELLED and gone.end_reason is EndReason.HOLDER_GONE
    assert [lease.holder for lease in book.queue] == ["carol"]
    assert [change.event for change in outcome.changes] == [LeaseEvent.CANCELLED]
    book.release(held.lease_id, 104.0)
    assert book.granted.lease_id == carol.lease_id  # bob was never granted


def test_a_session_bound_lease_ends_holder_gone_and_the_next_waiter_is_granted_in_the_same_step():
    book = LeaseBook(KEY)
    held = ask(book, "alice", 100.0, ttl_s=3600, session=ALICE)
    assert held.session_tie is SessionTie.LEASE
    waiter = ask(book, "bob", 101.0, wait=True)
    outcome = book.end_session(ALICE, 102.0)
    ended = book.get(held.lease_id)
    assert ended.state is LeaseState.EXPIRED and ended.end_reason is EndReason.HOLDER_GONE and ended.ended_at == 102.0
    assert [change.event for change in outcome.changes] == [LeaseEvent.EXPIRED, LeaseEvent.GRANTED]
    assert book.granted.lease_id == waiter.lease_id and book.granted.fencing_token == 2


def test_a_grant_its_caller_never_acknowledged_is_taken_back_and_its_token_is_not_reused():
    book = LeaseBook(KEY)
    held = ask(book, "alice", 100.0)
    cli = ask(book, "cli", 101.0, wait=True, session=BOB, bind_session=False)
    assert cli.session_tie is SessionTie.UNTIL_ACKNOWLEDGED
    book.release(held.lease_id, 102.0)
    granted = book.get(cli.lease_id)
    assert granted.state is LeaseState.GRANTED and granted.fencing_token == 2
    book.end_session(BOB, 102.5)  # it died before it heard of its grant
    taken = book.get(cli.lease_id)
    assert taken.state is LeaseState.EXPIRED and taken.end_reason is EndReason.HOLDER_GONE
    assert ask(book, "dave", 103.0).fencing_token == 3


def test_an_acknowledged_grant_outlives_its_session_to_its_ttl():
    book = LeaseBook(KEY)
    held = ask(book, "alice", 100.0)
    cli = ask(book, "cli", 101.0, "cli-1", wait=True, session=BOB, bind_session=False)
    book.release(held.lease_id, 102.0)
    outcome = book.reserve(
        ReserveRequest(resource=KEY, holder="cli", request_id="cli-1", wait=True, session=BOB, bind_session=False),
        new_id(),
        102.1,
    )
    assert outcome.result.lease_id == cli.lease_id and outcome.result.session_tie is SessionTie.NONE
    assert [change.event for change in outcome.changes] == [LeaseEvent.CLAIMED]  # written: it survives a restart
    assert book.end_session(BOB, 103.0).changes == []
    assert book.granted.lease_id == cli.lease_id
    assert book.tick(102.0 + 3600.0).changes[0].lease.end_reason is EndReason.TTL_ELAPSED


def test_a_grant_in_the_answer_itself_is_received_so_only_a_bound_one_ends_with_the_session():
    book = LeaseBook(KEY)
    cli = ask(book, "cli", 100.0, wait=True, session=BOB, bind_session=False)
    assert cli.state is LeaseState.GRANTED and cli.session_tie is SessionTie.NONE
    assert book.end_session(BOB, 101.0).changes == []


def test_a_retry_from_a_new_process_takes_the_request_over():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0)
    first = ask(book, "ci", 101.0, "ci-7", wait=True, session=BOB, bind_session=False)
    again = ask(book, "ci", 102.0, "ci-7", wait=True, session=CAROL, bind_session=False)
    assert again.lease_id == first.lease_id and again.session == CAROL
    assert book.end_session(BOB, 103.0).changes == []  # the old process's end takes nothing now
    assert book.position(first.lease_id) == 1
    book.end_session(CAROL, 104.0)
    assert book.get(first.lease_id).state is LeaseState.CANCELLED


def test_requests_without_a_session_never_end_with_one_and_ending_is_idempotent():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0)
    plain = ask(book, "plain", 101.0, wait=True)
    assert plain.session is None and plain.session_tie is SessionTie.NONE
    assert book.sessions() == {}
    assert book.end_session(BOB, 102.0).changes == []
    tied = ask(book, "bob", 103.0, wait=True, session=BOB)
    assert book.sessions() == {BOB: 103.0}
    assert book.end_session(BOB, 104.0).changes[0].lease.lease_id == tied.lease_id
    assert book.end_session(BOB, 105.0).changes == []
    assert book.get(plain.lease_id).state is LeaseState.QUEUED


def test_ending_a_session_is_rolled_back_completely_when_it_cannot_be_written():
    book = LeaseBook(KEY)
    ask(book, "alice", 100.0, session=ALICE)
    ask(book, "bob", 101.0, wait=True, session=BOB)
    before = book.contents()
    book.end_session(ALICE, 102.0)
    book.rollback()
    assert book.contents() == before


def test_the_tie_survives_a_restart_and_a_restored_session_still_ends_it():
    book = LeaseBook(KEY)
    held = ask(book, "alice", 100.0, session=ALICE)
    waiter = ask(book, "bob", 101.0, wait=True, session=BOB, bind_session=False)
    restored, _ = LeaseBook.restore(KEY, [book.get(held.lease_id), book.get(waiter.lease_id)], now=102.0)
    assert restored.sessions() == {ALICE: 100.0, BOB: 101.0}
    restored.end_session(ALICE, 103.0)
    taken = restored.granted
    assert taken.lease_id == waiter.lease_id and taken.session_tie is SessionTie.UNTIL_ACKNOWLEDGED
    restored.end_session(BOB, 104.0)
    assert restored.granted is None


@pytest.mark.parametrize("session", ["", "01", "0000000G", "job-1", "00000000a"])
def test_a_session_is_a_ray_job_id_or_the_request_is_refused(session):
    with pytest.raises(ValueError):
        ReserveRequest(resource=KEY, holder="alice", request_id="r", session=session)


# ---------------------------------------------------------------------- random interleavings

SESSIONS = st.sampled_from([ALICE, BOB, CAROL])


class SessionMachine(RuleBasedStateMachine):
    """Reserves from three sessions (bound or wait-only), acks, releases, ends and time passing."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.book = LeaseBook(KEY)
        self.ended: dict[str, float] = {}  # session -> when the book was told it ended
        self.requests = itertools.count()
        self.max_token = 0

    def _run(self, command) -> Outcome | None:
        try:
            outcome = command()
        except BrokerError:
            return None
        for change in outcome.changes:
            if change.event is LeaseEvent.GRANTED:
                token = change.lease.fencing_token
                assert token > self.max_token, "fencing token did not increase"
                self.max_token = token
                assert change.lease.session not in self.ended or change.lease.session_tie is SessionTie.NONE, (
                    "granted to a session that had ended"
                )
        return outcome

    @rule(session=SESSIONS, bind=st.booleans(), wait=st.booleans(), ttl=st.sampled_from([5.0, 60.0]))
    def reserve(self, session: str, bind: bool, wait: bool, ttl: float) -> None:
        if session in self.ended:
            return  # a dead process asks nothing (in flight calls are the coordinator's to retell)
        request = ReserveRequest(
            resource=KEY,
            holder=f"h-{session}",
            request_id=f"r{next(self.requests)}",
            wait=wait,
            ttl_s=ttl,
            session=session,
            bind_session=bind,
        )
        self._run(lambda: self.book.reserve(request, new_id(), self.now))

    @rule()
    def acknowledge(self) -> None:
        granted = self.book.granted
        if granted is None or granted.session is None or granted.session in self.ended:
            return
        request = ReserveRequest(
            resource=KEY,
            holder=granted.holder,
            request_id=granted.request_id,
            session=granted.session,
            bind_session=granted.session_tie is SessionTie.LEASE,
        )
        self._run(lambda: self.book.reserve(request, new_id(), self.now))
        assert self.book.granted.session_tie is not SessionTie.UNTIL_ACKNOWLEDGED

    @rule()
    def release(self) -> None:
        granted = self.book.granted
        if granted is not None:
            self._run(lambda: self.book.release(granted.lease_id, self.now))

    @rule(session=SESSIONS)
    def end_session(self, session: str) -> None:
        self.ended.setdefault(session, self.now)
        self._run(lambda: self.book.end_session(session, self.now))

    @rule(seconds=st.sampled_from([0.5, 3.0, 30.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self._run(lambda: self.book.tick(self.now))

    @invariant()
    def nothing_active_is_tied_to_an_ended_session(self) -> None:
        for lease in self.book.leases():
            if lease.active and lease.session in self.ended:
                assert lease.session_tie is SessionTie.NONE, f"{lease.state} lease of a gone session stayed tied"
                assert lease.state is LeaseState.GRANTED, "a gone session's request is still queued"

    @invariant()
    def what_ended_with_a_session_says_so(self) -> None:
        for lease in self.book.leases():
            if lease.end_reason is EndReason.HOLDER_GONE:
                assert lease.session in self.ended and lease.ended_at == self.ended[lease.session]

    @invariant()
    def at_most_one_grant(self) -> None:
        assert sum(lease.state is LeaseState.GRANTED for lease in self.book.leases()) <= 1


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---------------------------------------------------------------------- the shells on FakeSystem


def journal(state_dir) -> list[dict]:
    return [json.loads(line) for line in (state_dir / "events.jsonl").read_text().splitlines()]


def test_a_dead_callers_waiter_leaves_the_queue_and_the_next_live_waiter_gets_the_key(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", KEY, "alice", ttl_s=600)
        bob = asyncio.ensure_future(system.call(broker, "reserve", KEY, "bob", wait=True, session=BOB))
        carol = asyncio.ensure_future(system.call(broker, "reserve", KEY, "carol", wait=True, session=CAROL))
        await until(lambda: queue_of(system, KEY) == 2, "two waiters")
        system.end_session(BOB)  # bob's driver died
        with pytest.raises(LeaseNotHeld, match="holder gone"):
            await bob
        assert queue_of(system, KEY) == 1
        await system.call(broker, "release", held.lease_id)
        granted = await carol
        assert granted.holder == "carol" and granted.fencing_token == 2
        ended = [e for e in journal(tmp_path) if e["event"] == "lease.cancelled" and e["holder"] == "bob"]
        assert ended and ended[0]["reason"] == EndReason.HOLDER_GONE.value

    run(body)


def test_a_session_bound_holders_death_grants_the_next_waiter_and_is_journaled_and_counted(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", KEY, "kernel", ttl_s=3600, session=ALICE)
        assert held.session_tie is SessionTie.LEASE
        nxt = asyncio.ensure_future(system.call(broker, "reserve", KEY, "bob", wait=True))
        await until(lambda: queue_of(system, KEY) == 1, "bob queued")
        system.end_session(ALICE)
        granted = await nxt
        assert granted.holder == "bob" and granted.fencing_token == 2
        ended = await system.call(broker, "lease", held.lease_id)
        assert ended.state is LeaseState.EXPIRED and ended.end_reason is EndReason.HOLDER_GONE
        expired = [e for e in journal(tmp_path) if e["event"] == "lease.expired"]
        assert expired[-1]["holder"] == "kernel" and expired[-1]["reason"] == "holder gone"
        coordinator = system.instance("broker", NS)
        counters = await until(
            lambda: (s := coordinator._board.snapshot(KEY)) and s.counters.holder_gone == 1 and s.counters,
            "holder_gone counted",
        )
        assert counters.expirations == 1

    run(body)


def test_a_cli_style_lease_acknowledged_outlives_its_session_and_an_unacknowledged_one_does_not(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", KEY, "alice", ttl_s=600)
        kwargs = dict(wait=True, session=BOB, bind_session=False, request_id="cli-1", ttl_s=600)
        cli = asyncio.ensure_future(system.call(broker, "reserve", KEY, "cli", **kwargs))
        await until(lambda: queue_of(system, KEY) == 1, "cli queued")
        await system.call(broker, "release", held.lease_id)
        granted = await cli
        assert granted.session_tie is SessionTie.UNTIL_ACKNOWLEDGED
        acked = await system.call(broker, "reserve", KEY, "cli", **kwargs)  # what the shim does next
        assert acked.lease_id == granted.lease_id and acked.session_tie is SessionTie.NONE
        system.end_session(BOB)
        await until(lambda: system.instance("broker", NS)._sessions.get(KEY) == {}, "the watch moved on")
        assert (await system.call(broker, "lease", granted.lease_id)).state is LeaseState.GRANTED

        # The same, but the command died between its grant and its acknowledgement.
        racer = asyncio.ensure_future(
            system.call(broker, "reserve", KEY, "cli2", wait=True, session=CAROL, bind_session=False)
        )
        await until(lambda: queue_of(system, KEY) == 1, "cli2 queued")
        await system.call(broker, "release", granted.lease_id)
        raced = await racer
        system.end_session(CAROL)
        await until(
            lambda: system.instance(f"resource:{KEY}", NS)._book.granted is None,
            "the raced grant taken back",
        )
        taken = await system.call(broker, "lease", raced.lease_id)
        assert taken.state is LeaseState.EXPIRED and taken.end_reason is EndReason.HOLDER_GONE
        assert (await system.call(broker, "reserve", KEY, "dave")).fencing_token == 4  # 3 was never reused

    run(body)


def test_a_restarted_resource_actor_and_coordinator_still_end_a_dead_sessions_lease(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        held = await system.call(broker, "reserve", KEY, "kernel", ttl_s=3600, session=ALICE)
        system.restart(f"resource:{KEY}", NS)
        system.restart("broker", NS)
        system.end_session(ALICE)  # the coordinator relearns the session from the snapshots
        await until(
            lambda: system.instance(f"resource:{KEY}", NS)._book.granted is None,
            "the dead session's lease ended",
        )
        ended = await system.call(broker, "lease", held.lease_id)
        assert ended.end_reason is EndReason.HOLDER_GONE

    run(body)


def test_a_bad_session_is_refused_and_changes_nothing(tmp_path):
    async def body() -> None:
        system = FakeSystem()
        broker = await up(tmp_path, system)
        with pytest.raises(InvalidRequest, match="session"):
            await system.call(broker, "reserve", KEY, "alice", session="not-a-job")
        assert (await system.call(broker, "reserve", KEY, "alice")).fencing_token == 1
        actor = f"resource:{KEY}"
        with pytest.raises(InvalidRequest, match="session"):
            await system.call(ActorRefFor(system, actor), "session_gone", "nope")

    run(body)


def ActorRefFor(system: FakeSystem, name: str):
    from broker.seam import ActorRef

    return ActorRef(system, name, NS)


# ---------------------------------------------------------------------- signals on the command line


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_signal_is_a_keyboard_interrupt_naming_itself_with_its_exit_code(sig, code):
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), sig)
        stop = interrupts.stopped(caught.value, "the request left the queue")
        assert stop.name == sig.name and interrupts.exit_code(stop) == code == SIGNAL_EXIT_CODES[sig.name]
        # Inside ray.get, Ray swallows ours and raises a plain KeyboardInterrupt: the signal is still known.
        assert interrupts.stopped(KeyboardInterrupt()).name == sig.name
    finally:
        for each in interrupts.STOP_SIGNALS:
            signal.signal(each, signal.default_int_handler if each is signal.SIGINT else signal.SIG_DFL)
        interrupts._caught.clear()


def test_main_turns_a_stop_into_one_line_and_its_exit_code(capsys, monkeypatch):
    from broker import cli

    def stopped_run(ctx):
        raise interrupts.stopped(interrupts.Stopped(signal.SIGTERM), f"the request for {KEY} left the queue")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: parser)
    args = parser.parse_args(["ray", "resources", "list"])
    monkeypatch.setattr(parser, "parse_args", lambda argv: args)
    args.run = stopped_run
    try:
        assert cli.main(["ray", "resources", "list"]) == 143
    finally:
        for each in interrupts.STOP_SIGNALS:
            signal.signal(each, signal.default_int_handler if each is signal.SIGINT else signal.SIG_DFL)
    err = capsys.readouterr().err
    assert err.splitlines() == [f"merlin: stopped by SIGTERM; the request for {KEY} left the queue"]


# ---------------------------------------------------------------------- the bench's holder-death figures


@pytest.mark.parametrize(("kind", "bound"), [("session", True), ("ttl", False)])
def test_the_holder_death_bench_kills_a_session_bound_and_a_ttl_bound_holder(kind, bound, monkeypatch, capsys):
    import sys
    import time
    import types

    from broker.devtools.bench.recovery import HOLDER, HOLDER_KINDS, holder_figure

    asked: dict = {}

    class Held:
        lease_id = "lease-1"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Client:
        def lease(self, key, holder, **options):
            asked.update(options, key=key, holder=holder)
            return Held()

    class Killed(Exception):
        """Stands for the SIGKILL the bench sends while the holder sleeps."""

    def sleep(_seconds):
        raise Killed

    monkeypatch.setitem(sys.modules, "broker", types.SimpleNamespace(connect=Client))
    monkeypatch.setattr(time, "sleep", sleep)
    monkeypatch.setattr(sys, "argv", ["holder", KEY, "2.0", kind])
    with pytest.raises(Killed):
        exec(compile(HOLDER, "holder", "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out == "held lease-1\n"  # the bench waits for this lease's first renewal
    assert asked == {"key": KEY, "holder": "bench-doomed", "ttl_s": 2.0, "heartbeat_s": 0.5, "bind_session": bound}
    assert len({holder_figure(each) for each in HOLDER_KINDS}) == 2 and HOLDER_KINDS[kind] in holder_figure(kind)
