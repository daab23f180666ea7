"""The ledger under disk faults: short writes, failed syncs, power loss, and an old-format log.

``FaultyDisk`` runs every file operation of the ledger on real files and
keeps a model of what a power loss would leave: a file's bytes as of its
last successful fsync, a directory's entries as of its last fsync (a name
that was renamed or created since points back to what it pointed to then).
``power_loss()`` rewrites the files to that model — optionally keeping a
random prefix of bytes appended since the last sync, a torn tail. A harness
drives the real :class:`LeaseBook` and :class:`ResourceLedger` exactly like
``resource:<key>`` does (write, roll back on error, restore on start) and
checks after every reload: every acknowledged change is there, nothing
unacknowledged is, and no fencing token is handed out twice.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.core.book import LeaseBook, Maintenance, Outcome
from broker.disk.store import DiskOps, ResourceLedger, ResourceMeta, StateDir, read_log
from broker.errors import BrokerError
from broker.models import Lease, LeaseState, ReserveRequest

KEY = "radiance_sim_lane_a"


@dataclass(eq=False)
class _File:
    durable: bytes | None = None  # None: no byte of it ever synced


@dataclass
class FaultyDisk(DiskOps):
    """Real file operations, a power-loss model, and faults drawn from ``rng`` at rate ``fault_rate``."""

    root: Path
    rng: random.Random = field(default_factory=random.Random)
    fault_rate: float = 0.0
    torn_tails: bool = True
    names: dict[Path, _File] = field(default_factory=dict)  # what each path is now
    durable_names: dict[Path, _File] = field(default_factory=dict)  # what it is after a power loss
    fds: dict[int, tuple[Path, _File]] = field(default_factory=dict)
    faults: int = 0
    _enospc_next: bool = False

    def __post_init__(self) -> None:
        for path in self.root.rglob("*"):  # what is there already is on disk
            if path.is_file():
                node = _File(path.read_bytes())
                self.names[path] = self.durable_names[path] = node

    def _fault(self, code: int = errno.EIO) -> None:
        if self.fault_rate and self.rng.random() < self.fault_rate:
            self.faults += 1
            raise OSError(code, os.strerror(code))

    # ---------------------------------------------------------------- the operations

    def open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        path = Path(path)
        if flags & os.O_CREAT:
            self._fault(errno.ENOSPC)
        fd = os.open(path, flags, mode)
        node = self.names.get(path)
        if node is None:
            node = self.names[path] = _File()
        self.fds[fd] = (path, node)
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        if self._enospc_next:
            self._enospc_next = False
            self.faults += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.fault_rate and len(data) > 1 and self.rng.random() < self.fault_rate:
            # A full disk: the kernel writes what fits, then the next write fails.
            self._enospc_next = True
            return os.write(fd, data[: self.rng.randrange(1, len(data))])
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        self._fault()
        os.fsync(fd)
        path, node = self.fds[fd]
        node.durable = path.read_bytes()

    def fdatasync(self, fd: int) -> None:
        self.fsync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        self._fault()
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        self.fds.pop(fd, None)
        os.close(fd)

    def replace(self, source: Path, target: Path) -> None:
        self._fault()
        os.replace(source, target)
        self.names[Path(target)] = self.names.pop(Path(source), _File())

    def unlink(self, path: Path) -> None:
        os.unlink(path)
        self.names.pop(Path(path), None)

    def fsync_dir(self, directory: Path) -> None:
        self._fault()
        directory = Path(directory)
        for path in {*self.names, *self.durable_names}:
            if path.parent == directory:
                if path in self.names:
                    self.durable_names[path] = self.names[path]
                else:
                    self.durable_names.pop(path, None)

    # ---------------------------------------------------------------- crashes

    def crash(self) -> None:
        """kill -9: the process's descriptors go away; the page cache (the files) stays."""
        for fd in list(self.fds):
            self.close(fd)
        self._enospc_next = False

    def power_loss(self) -> None:
        """Everything not synced is gone (a synced file's unsynced tail may be partly kept)."""
        self.crash()
        for path in {*self.names, *self.durable_names}:
            node = self.durable_names.get(path)
            if node is None:
                path.unlink(missing_ok=True)
                continue
            data = node.durable or b""
            current = path.read_bytes() if path.exists() else b""
            if self.torn_tails and current.startswith(data) and len(current) > len(data):
                data = current[: len(data) + self.rng.randrange(len(current) - len(data) + 1)]
            path.write_bytes(data)
        self.names = {path: _File(path.read_bytes()) for path in self.durable_names}
        self.durable_names = dict(self.names)


class Broker:
    """One life of ``resource:<key>``: restore from the ledger, then commands as its ``_apply`` runs them."""

    def __init__(self, state: StateDir, disk: FaultyDisk, now: float, checkpoint_every: int, doubtful=()):
        """``doubtful``: refused changes of the last life that could not be cut from the log."""
        self.deferred: list = []
        self.doubtful: list[tuple[Outcome, Maintenance | None]] = []  # this life's
        self.ledger = ResourceLedger(state, KEY, defer=self.deferred.append, disk=disk)
        self.ledger.CHECKPOINT_RECORDS = checkpoint_every
        self.contents = self.ledger.load()
        try:
            self.ledger.checkpoint(self.contents)
            checkpointed = True
        except OSError:  # as the actor: the log stays and is replayed next start
            checkpointed = False
        # A doubtful change that is back is state now: on disk if the log (or the checkpoint) synced,
        # else not yet — then it is settled by this life's first successful append.
        back = [item for item in doubtful if _is_back(item, self.contents)]
        settled = self.ledger.replay_synced or checkpointed
        self.came_back_on_disk = back if settled else []
        self.unsettled = [] if settled else back
        self.book, fixes = LeaseBook.restore(
            KEY,
            self.contents.leases,
            fencing_floor=self.contents.meta.fencing_counter + len(self.contents.corrupt),
            maintenance=self.contents.meta.maintenance,
            now=now,
            claim_s=30.0,
        )
        self.restore_fixes = fixes
        self.appended = False
        try:
            self.ledger.write(fixes.changed_leases)
            self.appended = bool(fixes.changed_leases)
        except OSError:
            self.book.rollback()
            self.restore_fixes = Outcome()

    def pending(self) -> list[tuple[Outcome, Maintenance | None]]:
        """What of the doubtful may still come back after this life."""
        return self.doubtful + self.unsettled

    def apply(self, command: str, *args, **kwargs) -> Outcome | None:
        """Run a book command; the outcome if it was acknowledged, None if refused or failed."""
        try:
            outcome = getattr(self.book, command)(*args, **kwargs)
        except BrokerError:
            return None
        if not outcome.wrote_anything:
            return outcome
        meta = None
        if outcome.maintenance_changed:
            maintenance = self.book.maintenance
            meta = ResourceMeta(
                key=KEY,
                fencing_counter=self.book.fencing_counter,
                maintenance_reason=maintenance.reason if maintenance else None,
                maintenance_since=maintenance.since if maintenance else None,
                maintenance_by=maintenance.by if maintenance else "",
            )
        try:
            self.ledger.write(outcome.changed_leases, meta)
        except OSError:
            if self.ledger.cut_pending:
                # The sync failed and so did cutting the record back: after a crash it may come
                # back, though the caller was told it failed (see the README's "not promised").
                self.doubtful.append((outcome, self.book.maintenance))
            self.book.rollback()
            return None
        self.doubtful.clear()  # an append succeeded, so any failed one was cut from the log
        self.appended = True
        return outcome

    def run_deferred(self) -> None:
        work, self.deferred[:] = list(self.deferred), []
        for item in work:
            with contextlib.suppress(OSError):  # the actor journals ledger.files_behind; the log has them
                item()


def _is_back(item: tuple[Outcome, Maintenance | None], contents) -> bool:
    outcome, maintenance = item
    loaded = {lease.lease_id: lease for lease in contents.leases}
    if outcome.changed_leases:
        return any(loaded.get(lease.lease_id) == lease for lease in outcome.changed_leases)
    return contents.meta_replayed and contents.meta.maintenance == maintenance


class Acknowledged:
    """What callers were told: the latest acknowledged version of each lease, maintenance, tokens."""

    def __init__(self) -> None:
        self.leases: dict[str, Lease] = {}
        self.maintenance: Maintenance | None = None
        self.token_of: dict[int, str] = {}
        self.max_token = 0

    def record(self, outcome: Outcome, book: LeaseBook | None) -> None:
        for lease in outcome.changed_leases:
            self.leases[lease.lease_id] = lease
            token = lease.fencing_token
            if token is None:
                continue
            owner = self.token_of.setdefault(token, lease.lease_id)
            assert owner == lease.lease_id, f"fencing token {token} handed out twice"
        for change in outcome.changes:
            if change.event == "lease.granted":
                token = change.lease.fencing_token
                assert token is not None and token > self.max_token, f"token {token} after {self.max_token}"
                self.max_token = token
        if outcome.maintenance_changed and book is not None:
            self.maintenance = book.maintenance

    def adopt(self, item: tuple[Outcome, Maintenance | None]) -> None:
        """A refused change that came back and is on disk: it is the state now."""
        outcome, maintenance = item
        self.record(outcome, None)
        if outcome.maintenance_changed:
            self.maintenance = maintenance

    def settle(self, broker: Broker) -> None:
        """After a successful append the whole log is synced: what came back is on disk now."""
        if broker.appended:
            for item in broker.unsettled:
                self.adopt(item)
            broker.unsettled.clear()

    def check_reload(self, broker: Broker) -> None:
        for item in broker.came_back_on_disk:
            self.adopt(item)
        loaded = {lease.lease_id: lease for lease in broker.contents.leases}
        maybe = {lease.lease_id: lease for outcome, _ in broker.unsettled for lease in outcome.changed_leases}
        lost = {
            lid: lease.state
            for lid, lease in self.leases.items()
            if loaded.get(lid) not in (lease, maybe.get(lid, lease))
        }
        assert not lost, f"acknowledged changes lost or altered on reload: {lost}"
        unacknowledged = set(loaded) - set(self.leases) - set(maybe)
        assert not unacknowledged, f"records nobody was told about: {unacknowledged}"
        maintenances = [self.maintenance] + [m for o, m in broker.unsettled if o.maintenance_changed]
        assert broker.contents.meta.maintenance in maintenances
        assert broker.book.fencing_counter >= self.max_token, "the fencing floor went down"


COMMANDS = st.lists(
    st.tuples(
        st.sampled_from(
            ["reserve", "reserve", "wait", "release", "release", "renew", "revoke", "maint", "tick", "flush"]
            + ["crash", "power_loss"]
        ),
        st.integers(min_value=0, max_value=3),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    commands=COMMANDS,
    seed=st.integers(min_value=0, max_value=2**32),
    fault_rate=st.sampled_from([0.0, 0.05, 0.2]),
)
def test_random_commands_with_disk_faults_and_power_loss_lose_nothing_acknowledged(
    tmp_path_factory, commands, seed, fault_rate
):
    root = tmp_path_factory.mktemp("state")
    state = StateDir(root).ensure()
    disk = FaultyDisk(root, random.Random(seed), fault_rate)
    rng = random.Random(seed ^ 0x5EED)
    now = 1_000_000.0
    told = Acknowledged()
    ids = itertools.count()
    broker = Broker(state, disk, now, checkpoint_every=rng.choice([2, 3, 4096]))
    told.check_reload(broker)
    for command, arg in commands:
        holder = ["alice", "bob", "carol", "dave"][arg]
        book = broker.book
        known = list(told.leases)
        lease_id = rng.choice(known) if known else f"{KEY}.{0:032x}"
        outcome: Outcome | None = None
        if command in ("reserve", "wait"):
            request = ReserveRequest(
                resource=KEY, holder=holder, ttl_s=50.0, wait=command == "wait", request_id=f"r{rng.randrange(6)}"
            )
            new_id = f"{KEY}.{next(ids):032x}"
            outcome = broker.apply("reserve", request, new_id, now)
        elif command == "release":
            outcome = broker.apply("release", lease_id, now)
        elif command == "renew":
            outcome = broker.apply("renew", lease_id, 50.0, now)
        elif command == "revoke":
            outcome = broker.apply("revoke", "test", now, by="bob")
        elif command == "maint":
            on = book.maintenance is None
            outcome = broker.apply("set_maintenance", on, "flaky" if on else "", now, "bob")
        elif command == "tick":
            now += 10.0 * (arg + 1)
            outcome = broker.apply("tick", now)
        elif command == "flush":
            broker.run_deferred()
        else:
            disk.power_loss() if command == "power_loss" else disk.crash()
            broker = Broker(state, disk, now, rng.choice([2, 3, 4096]), broker.pending())
            told.check_reload(broker)
            outcome = broker.restore_fixes
        if outcome is not None:
            told.settle(broker)
            told.record(outcome, broker.book)
    disk.fault_rate = 0.0
    disk.power_loss()
    told.check_reload(Broker(state, disk, now, 4096, broker.pending()))


# -------------------------------------------------------------------- the scenario, step by step


def _reserve(broker: Broker, holder: str, now: float, n: int) -> Outcome | None:
    request = ReserveRequest(resource=KEY, holder=holder, ttl_s=600.0, request_id=f"req-{n}")
    return broker.apply("reserve", request, f"{KEY}.{n:032x}", now)


def test_a_torn_append_on_a_full_disk_never_hides_later_acknowledged_changes(tmp_path):
    """Issue 10, item 1: torn append, later acknowledged changes, power loss, restart: no token twice."""
    state = StateDir(tmp_path).ensure()
    disk = FaultyDisk(tmp_path, torn_tails=False)
    broker = Broker(state, disk, 100.0, checkpoint_every=4096)
    told = Acknowledged()
    for n, holder in enumerate(["alice", "bob"], start=1):
        outcome = _reserve(broker, holder, 100.0 + n, n)
        told.record(outcome, broker.book)
        told.record(broker.apply("release", outcome.result.lease_id, 101.0 + n), broker.book)
    # A full disk: the grant of carol's lease is written in part, then refused.
    disk._enospc_next = False
    real_write = disk.write

    def short_then_full(fd, data):
        disk.write = real_write
        disk._enospc_next = True
        return os.write(fd, data[: len(data) // 2])

    disk.write = short_then_full
    assert _reserve(broker, "carol", 110.0, 3) is None
    wal = state.resources_dir / f"{KEY}.wal"
    assert read_log(wal.read_bytes())[1] == wal.stat().st_size, "a partial record stayed in the log"
    # Space is back: dave's lease is granted (token 3) and released; erin's is granted (token 4).
    dave = _reserve(broker, "dave", 120.0, 4)
    told.record(dave, broker.book)
    assert dave.result.fencing_token == 3
    told.record(broker.apply("release", dave.result.lease_id, 121.0), broker.book)
    erin = _reserve(broker, "erin", 122.0, 5)
    told.record(erin, broker.book)
    broker.run_deferred()  # the record files are written, but never synced
    disk.power_loss()
    broker = Broker(state, disk, 123.0, checkpoint_every=4096)
    told.check_reload(broker)
    assert broker.book.get(dave.result.lease_id).state is LeaseState.RELEASED
    assert broker.book.granted.lease_id == erin.result.lease_id
    told.record(broker.apply("release", erin.result.lease_id, 124.0), broker.book)
    frank = _reserve(broker, "frank", 125.0, 6)
    told.record(frank, broker.book)
    assert frank.result.fencing_token == 5


def test_a_failed_sync_is_cut_from_the_log_before_the_caller_hears_of_it(tmp_path):
    state = StateDir(tmp_path).ensure()
    disk = FaultyDisk(tmp_path, torn_tails=False)
    broker = Broker(state, disk, 100.0, checkpoint_every=4096)
    told = Acknowledged()
    told.record(_reserve(broker, "alice", 100.0, 1), broker.book)
    wal = state.resources_dir / f"{KEY}.wal"
    good = wal.stat().st_size
    real_fdatasync = disk.fdatasync

    def failing(fd):
        disk.fdatasync = real_fdatasync
        raise OSError(errno.EIO, "I/O error")

    disk.fdatasync = failing
    assert broker.apply("release", f"{KEY}.{1:032x}", 101.0) is None
    assert wal.stat().st_size == good
    assert broker.book.granted.holder == "alice"  # rolled back, as the caller was told
    disk.power_loss()
    told.check_reload(Broker(state, disk, 102.0, checkpoint_every=4096))


def test_a_lost_lease_record_cannot_lower_the_fencing_floor(tmp_path):
    state = StateDir(tmp_path).ensure()
    disk = FaultyDisk(tmp_path)
    broker = Broker(state, disk, 100.0, checkpoint_every=4096)
    for n in range(1, 4):
        outcome = _reserve(broker, f"h{n}", 100.0 + n, n)
        broker.apply("release", outcome.result.lease_id, 100.5 + n)
    broker.run_deferred()
    Broker(state, disk, 110.0, checkpoint_every=4096)  # a restart: checkpoint, the log starts empty
    for path in state.leases_dir.iterdir():
        path.unlink()  # every record lost (archived, deleted by hand, a bad disk)
    meta = json.loads(state.resource_meta_path(KEY).read_text())
    assert meta["fencing_counter"] == 3
    broker = Broker(state, FaultyDisk(tmp_path), 120.0, checkpoint_every=4096)
    assert _reserve(broker, "next", 121.0, 9).result.fencing_token == 4


def test_a_periodic_checkpoint_puts_the_fencing_floor_in_the_meta_file(tmp_path):
    state = StateDir(tmp_path).ensure()
    broker = Broker(state, FaultyDisk(tmp_path), 100.0, checkpoint_every=2)
    outcome = _reserve(broker, "alice", 101.0, 1)
    broker.apply("release", outcome.result.lease_id, 102.0)
    assert (state.resources_dir / f"{KEY}.wal").read_bytes() == b""  # checkpointed after two records
    assert json.loads(state.resource_meta_path(KEY).read_text())["fencing_counter"] == 1


# -------------------------------------------------------------------- upgrading from the old log format


def _old_line(leases: list[Lease], meta: ResourceMeta | None = None) -> bytes:
    """A record as brokers before the framing wrote it: one bare JSON line."""
    line = '{"leases":[' + ",".join(lease.model_dump_json() for lease in leases) + "]"
    line += f',"meta":{meta.model_dump_json()}}}\n' if meta is not None else "}\n"
    return line.encode()


def test_an_old_format_log_is_replayed_including_lines_behind_a_torn_one(tmp_path):
    state = StateDir(tmp_path).ensure()
    book = LeaseBook(KEY)
    now = 100.0
    alice = book.reserve(ReserveRequest(resource=KEY, holder="alice", request_id="a"), f"{KEY}.{1:032x}", now)
    released = book.release(alice.result.lease_id, now + 1)
    bob = book.reserve(ReserveRequest(resource=KEY, holder="bob", request_id="b"), f"{KEY}.{2:032x}", now + 2)
    maintenance = ResourceMeta(key=KEY, fencing_counter=2, maintenance_reason="flaky", maintenance_since=now)
    torn = _old_line(released.changed_leases)[:57]  # refused on a full disk; the old code left it there
    wal = state.resources_dir / f"{KEY}.wal"
    wal.write_bytes(
        _old_line(alice.changed_leases) + torn + _old_line(bob.changed_leases) + _old_line([], maintenance) + b'{"lea'
    )
    contents = ResourceLedger(state, KEY).load()
    loaded = {lease.lease_id: lease for lease in contents.leases}
    assert loaded[bob.result.lease_id] == bob.result  # behind the torn line: acknowledged, kept
    assert loaded[alice.result.lease_id] == alice.result  # the torn release was never acknowledged
    assert contents.meta.maintenance_reason == "flaky" and contents.meta.fencing_counter == 2
    assert contents.torn_bytes == len(b'{"lea')
    # The upgraded broker appends framed records after the old ones (its checkpoint failed, say).
    ledger = ResourceLedger(state, KEY)
    ledger.load()
    ledger.write(book.release(bob.result.lease_id, now + 3).changed_leases)
    again = {lease.lease_id: lease for lease in ResourceLedger(state, KEY).load().leases}
    assert again[bob.result.lease_id].state is LeaseState.RELEASED
    raw = wal.read_bytes()
    records, good = read_log(raw)
    assert good == len(raw) and len(records) == 4  # the torn tail was cut before the first append


def test_a_record_with_a_bad_checksum_ends_the_log(tmp_path):
    state = StateDir(tmp_path).ensure()
    ledger = ResourceLedger(state, KEY)
    book = LeaseBook(KEY)
    first = book.reserve(ReserveRequest(resource=KEY, holder="alice", request_id="a"), f"{KEY}.{1:032x}", 1.0)
    ledger.write(first.changed_leases)
    ledger.write(book.release(first.result.lease_id, 2.0).changed_leases)
    wal = state.resources_dir / f"{KEY}.wal"
    raw = bytearray(wal.read_bytes())
    raw[-10] ^= 0x01  # one flipped bit in the second record
    wal.write_bytes(bytes(raw))
    records, good = read_log(bytes(raw))
    assert len(records) == 1 and good == raw.index(b"\n") + 1
    (lease,) = ResourceLedger(state, KEY).load().leases
    assert lease == first.result
