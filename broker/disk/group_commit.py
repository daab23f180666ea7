"""Group commit of one key's write-ahead log: one fdatasync for every change that arrived while one was in flight.

The resource actor appends a change's record the moment the book applies it
(so the log's order is the book's), then awaits the sync that covers it. One
fdatasync runs at a time, in a worker thread (the event loop keeps taking
calls); whatever was appended while it ran goes into the next one. A caller
is answered only after a sync that began after its record was appended has
returned. A failed sync fails every record not yet on disk — the ones it
covered and the ones appended behind them, which the cut-back of the log
removes too — and nobody is told any of them happened.

:class:`CommitQueue` is that decision, pure (record numbers only, no I/O);
:class:`GroupCommitter` runs it against a :class:`~broker.disk.store.ResourceLedger`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from broker.disk.store import ResourceLedger, ResourceMeta
from broker.models import Lease

__all__ = ["CommitQueue", "GroupCommitter"]


@dataclass
class CommitQueue:
    """Which appended records (numbered 1, 2, …) a sync covers, and what a failed one takes with it.

    Invariants: ``durable <= in_flight <= appended`` (when a sync is in flight);
    every record number is reported exactly once, by :meth:`succeeded` or :meth:`failed`,
    in increasing order; a sync covers only records appended before it began.
    """

    appended: int = 0  # the last record number handed out
    durable: int = 0  # every record up to this one is on disk
    in_flight: int | None = None  # the sync running now covers records up to this one

    def append(self) -> int:
        self.appended += 1
        return self.appended

    def start(self) -> int | None:
        """Begin a sync of everything appended so far; None if one is running or nothing waits."""
        if self.in_flight is not None or self.appended == self.durable:
            return None
        self.in_flight = self.appended
        return self.in_flight

    def succeeded(self) -> range:
        """The running sync returned: the records it covered are on disk."""
        covered = range(self.durable + 1, self._finish() + 1)
        self.durable = covered.stop - 1 if covered else self.durable
        return covered

    def failed(self) -> range:
        """The running sync failed: every record not on disk is gone (the log is cut back to ``durable``)."""
        self._finish()
        lost = range(self.durable + 1, self.appended + 1)
        self.appended = self.durable  # numbers are reused: the records they named no longer exist
        return lost

    def _finish(self) -> int:
        if self.in_flight is None:
            raise RuntimeError("no sync is in flight")
        upto, self.in_flight = self.in_flight, None
        return upto


@dataclass
class _Record:
    deliver: Callable[[], None] | None  # what the actor does once the change is on disk (wake, log, push)
    futures: list[asyncio.Future[None]] = field(default_factory=list)


def _then(first: Callable[[], None] | None, second: Callable[[], None]) -> Callable[[], None]:
    if first is None:
        return second

    def both() -> None:
        first()
        second()

    return both


class GroupCommitter:
    """Appends records to ``ledger`` at once and makes them durable in groups, off the event loop.

    Args:
        ledger: the key's ledger (loaded; nothing staged in it).
        loop: the actor's event loop; every method is called on it.
        on_failure: called on the loop, after the log was cut back and before any
            caller hears of the failure, so the actor can put its book back to
            what the disk holds before the next call reads it.
    """

    def __init__(
        self,
        ledger: ResourceLedger,
        loop: asyncio.AbstractEventLoop,
        on_failure: Callable[[BaseException], None],
    ):
        self._ledger = ledger
        self._loop = loop
        self._on_failure = on_failure
        self._queue = CommitQueue()
        self._records: dict[int, _Record] = {}
        self._start_scheduled = False
        self._closed = False
        # One worker: syncs never overlap, so "covered" always means "appended before it began".
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wal-sync-{ledger.key}")
        self.syncs = 0  # fdatasyncs begun (the bench's records-per-sync figure)
        self.records = 0  # records made durable by them

    @property
    def last(self) -> int:
        """The number of the last record appended (0: none yet); :meth:`durable` of it is a barrier."""
        return self._queue.appended

    @property
    def busy(self) -> bool:
        """Whether some appended record is not on disk yet."""
        return self._queue.appended > self._queue.durable

    def append(
        self, leases: Iterable[Lease], meta: ResourceMeta | None, deliver: Callable[[], None] | None = None
    ) -> int | None:
        """Append one command's record now; ``deliver`` runs once it is on disk. None: nothing to write.

        A change with nothing to write (a key's host went away) is still told: at once when
        nothing waits for a sync, else right after the record before it (in the log's order).

        Raises:
            OSError: the record could not be appended; the log was cut back, nothing of it is
                on disk, and ``deliver`` never runs (the caller rolls the book back).
        """
        if not self._ledger.append(leases, meta):
            if deliver is not None:
                before = self._records.get(self._queue.appended) if self.busy else None
                if before is None:
                    deliver()
                else:
                    before.deliver = _then(before.deliver, deliver)
            return None
        seq = self._queue.append()
        self._records[seq] = _Record(deliver)
        if not self._start_scheduled and self._queue.in_flight is None:
            # Not at once: calls already ready in this turn of the loop join this sync.
            self._start_scheduled = True
            self._loop.call_soon(self._start)
        return seq

    def durable(self, seq: int | None) -> asyncio.Future[None]:
        """Done once record ``seq`` is on disk; it fails with the sync's error if it never will be.

        The future is made now (not when first awaited): record numbers are reused after a failure.
        """
        future: asyncio.Future[None] = self._loop.create_future()
        record = self._records.get(seq) if seq is not None and seq > self._queue.durable else None
        if record is None:
            future.set_result(None)
        else:
            record.futures.append(future)
        return future

    async def settled(self) -> None:
        """Return once everything appended so far is on disk, or was dropped (never raises).

        For answers that reveal state without changing it (a read, a refusal, a retried
        request's lease): they must not tell of a change before it is durable.
        """
        if self.busy:
            with contextlib.suppress(Exception):  # dropped: the book is back to what the disk holds
                await self.durable(self._queue.appended)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False)

    def _start(self) -> None:
        self._start_scheduled = False
        if self._closed:
            return
        upto = self._queue.start()
        if upto is None:
            return
        try:
            sync = self._ledger.sync_begin()
        except OSError as exc:  # the log cannot even be opened
            self._finish(exc)
            return
        self.syncs += 1
        self._loop.run_in_executor(self._pool, sync).add_done_callback(self._on_synced)

    def _on_synced(self, done: asyncio.Future[None]) -> None:
        self._finish(done.exception() if not done.cancelled() else OSError("the log's sync was cancelled"))

    def _finish(self, error: BaseException | None) -> None:
        if error is None:
            covered = self._queue.succeeded()
            self.records += len(covered)
            for seq in covered:  # in the book's order: wakes and journal lines follow it
                record = self._records.pop(seq)
                if record.deliver is not None:
                    try:
                        record.deliver()
                    except Exception as exc:  # noqa: BLE001 - one bad delivery must not strand the rest
                        self._loop.call_exception_handler({"message": "delivery failed", "exception": exc})
                for future in record.futures:
                    if not future.done():
                        future.set_result(None)
            # After the answers are on their way: the file updates it defers run behind them.
            self._ledger.synced(len(covered))
        else:
            lost = self._queue.failed()
            self._ledger.sync_failed()
            records = [self._records.pop(seq) for seq in lost]
            self._on_failure(error)
            for record in records:
                for future in record.futures:
                    if not future.done():
                        future.set_exception(error)
        if self.busy and not self._start_scheduled:
            self._start_scheduled = True
            self._loop.call_soon(self._start)
