"""The Prometheus endpoint: one custom collector over snapshots held in memory.

A scrape makes no remote call. Resource actors push a
:class:`~broker.core.usage.ResourceSnapshot` when their state changes (and the
coordinator pulls one every few seconds as a fallback); the coordinator's run
manager reports run counts. :mod:`broker.http.api` serves it, in a thread of
the coordinator, bound to 127.0.0.1 unless configured otherwise.

A scrape serves a cached exposition (:class:`Exposition`): the text of every
family that does not move with the clock is rebuilt only when the board
changed (its ``version``); the two that do (leased seconds of a live hold, the
oldest waiter's wait) are rendered at each scrape — a few lines per key.
Rendering every family costs about 0.3 ms per key here, in the coordinator's
process, competing for its GIL with the event loop.

Pools (the catalog's named selectors) are summed from the same snapshots:
members, free members (that a new request could take now: a free member kept
for a waiting group is not one), and the requests waiting for a member — a group
request with entries on several members counts once (each key's snapshot names
the groups queued there). Group requests' waits come from the coordinator's
group manager, seeded from the group records at start, so a restart does not
reset them.

Labels are bounded: ``resource`` (catalog keys), ``pool`` (catalog pool names),
``state`` and ``status`` (enums). Never a lease id, a group ref or a holder.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from broker.core.groups import open_to_new
from broker.core.usage import WAIT_BUCKETS_S, Histogram, ResourceSnapshot
from broker.models import ResourceState

__all__ = [
    "DEFAULT_METRICS_HOST",
    "DEFAULT_METRICS_PORT",
    "RUN_STATUSES",
    "RUN_DURATION_BUCKETS_S",
    "RunStats",
    "BoardView",
    "MetricsBoard",
    "BrokerCollector",
    "Exposition",
    "pool_queue_depth",
]

DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9477
# How a run can end (runs_total{status}); pending and running are counted by runs_active.
RUN_STATUSES = ("succeeded", "failed", "stopped", "blocked")
RUN_DURATION_BUCKETS_S = (1.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0)


@dataclass
class RunStats:
    """Run counts for the ``runs_*`` families (filled by the coordinator's run manager)."""

    finished: dict[str, int] = field(default_factory=lambda: {status: 0 for status in RUN_STATUSES})
    active: int = 0
    duration: Histogram = field(default_factory=lambda: Histogram(RUN_DURATION_BUCKETS_S))


@dataclass(frozen=True)
class BoardView:
    """One consistent read of the board (taken under its lock)."""

    keys: tuple[str, ...]
    snapshots: dict[str, ResourceSnapshot]
    up: dict[str, bool]
    runs: RunStats
    version: str
    pools: dict[str, tuple[str, ...]]  # pool name -> its member keys, catalog order
    group_wait: Histogram


class MetricsBoard:
    """What a scrape serves. Written by the coordinator's event loop, read by the HTTP thread.

    ``version`` grows with every change a scrape could show, so an exposition
    built at one version is current until it moves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, tuple[tuple[float, int], ResourceSnapshot]] = {}
        self._up: dict[str, bool] = {}
        self._keys: tuple[str, ...] = ()
        self._runs = RunStats()
        self._version = ""
        self._pools: dict[str, tuple[str, ...]] = {}
        self._group_wait = Histogram(WAIT_BUCKETS_S)
        self.version = 0
        self._health: dict[str, tuple[bool | None, int]] = {}  # key -> (last probe ok, failures so far)

    def set_keys(self, keys: list[str], version: str = "", pools: Mapping[str, Sequence[str]] | None = None) -> None:
        """The catalog's keys and its named pools (name -> member keys); a pool not named is not shown."""
        with self._lock:
            self._keys = tuple(keys)
            self._version = version
            self._pools = {name: tuple(members) for name, members in (pools or {}).items()}
            for key in list(self._snapshots):
                if key not in keys:
                    del self._snapshots[key]
                    self._up.pop(key, None)
            self.version += 1

    def put(self, snapshot: ResourceSnapshot, started_at: float) -> bool:
        """Keep ``snapshot`` unless a newer one of the same key is already here."""
        order = (started_at, snapshot.seq)
        with self._lock:
            current = self._snapshots.get(snapshot.key)
            if current is not None and current[0] >= order:
                return False
            self._snapshots[snapshot.key] = (order, snapshot)
            # The coordinator's periodic pull brings a new seq with the same state: not a change.
            if current is None or _content(current[1]) != _content(snapshot) or not self._up.get(snapshot.key):
                self.version += 1
            self._up[snapshot.key] = True
            return True

    def set_up(self, key: str, up: bool) -> None:
        with self._lock:
            if self._up.get(key) != up:
                self._up[key] = up
                self.version += 1

    def set_runs(self, runs: RunStats) -> None:
        with self._lock:
            self._runs = runs
            self.version += 1

    def observe_group_wait(self, wait_s: float) -> None:
        """A group request was granted after ``wait_s`` (the group manager's ``observe_wait``)."""
        with self._lock:
            self._group_wait.observe(max(0.0, wait_s))
            self.version += 1

    def set_health(self, key: str, ok: bool | None, failures_total: int) -> None:
        with self._lock:
            if self._health.get(key) != (ok, failures_total):
                self._health[key] = (ok, failures_total)
                self.version += 1

    def health_view(self) -> dict[str, tuple[bool | None, int]]:
        with self._lock:
            return {key: value for key, value in self._health.items() if key in self._keys}

    def view(self) -> BoardView:
        with self._lock:
            snapshots = {key: entry[1] for key, entry in self._snapshots.items()}
            return BoardView(
                self._keys,
                snapshots,
                dict(self._up),
                self._runs,
                self._version,
                dict(self._pools),
                self._group_wait.copy(),
            )

    def snapshot(self, key: str) -> ResourceSnapshot | None:
        with self._lock:
            entry = self._snapshots.get(key)
            return entry[1] if entry else None


def _content(snapshot: ResourceSnapshot) -> ResourceSnapshot:
    """What a scrape shows of a snapshot: everything but its ordering fields."""
    return dataclasses.replace(snapshot, pid=0, seq=0)


class BrokerCollector(Collector):
    """Builds every ``merlin_broker_*`` family from the board; no I/O, no remote calls.

    ``part`` picks the families: ``"static"`` (unchanged until the board
    changes), ``"live"`` (they move with the clock), or both (None).
    """

    def __init__(self, board: MetricsBoard, part: str | None = None):
        self._board = board
        self._part = part

    def collect(self) -> Iterator[Metric]:
        view = self._board.view()
        if self._part in (None, "static"):
            yield from _static_families(view.keys, view.snapshots, view.up, view.runs, view.version)
            yield from _health_families(self._board.health_view())
            yield from _pool_families(view)
        if self._part in (None, "live"):
            yield from _live_families(view.keys, view.snapshots, time.time())


class Exposition:
    """The ``/metrics`` body: the clock-free families cached until the board's version moves."""

    def __init__(self, board: MetricsBoard):
        self._board = board
        self._static = CollectorRegistry(auto_describe=False)
        self._static.register(BrokerCollector(board, "static"))
        self._live = CollectorRegistry(auto_describe=False)
        self._live.register(BrokerCollector(board, "live"))
        self._lock = threading.Lock()
        self._cached: tuple[int, bytes] | None = None
        self.rebuilds = 0

    def render(self) -> bytes:
        # Read the version before the board: a change in between only makes the text
        # newer than its tag (rebuilt once more next time), never staler.
        version = self._board.version
        with self._lock:
            if self._cached is None or self._cached[0] != version:
                self._cached = (version, generate_latest(self._static))
                self.rebuilds += 1
            static = self._cached[1]
        return static + generate_latest(self._live)


def _static_families(
    keys: tuple[str, ...], snapshots: dict[str, ResourceSnapshot], up: dict[str, bool], runs: RunStats, version: str
) -> Iterator[Metric]:
    info = GaugeMetricFamily("merlin_broker_info", "Broker build information.", labels=["version"])
    info.add_metric([version], 1.0)
    yield info

    families: dict[str, Any] = {
        "up": GaugeMetricFamily("merlin_broker_resource_up", "1 if the resource actor answers.", labels=["resource"]),
        "leased": GaugeMetricFamily(
            "merlin_broker_resource_leased", "1 if the resource is leased now.", labels=["resource"]
        ),
        "state": GaugeMetricFamily(
            "merlin_broker_resource_state", "1 for the state the resource is in.", labels=["resource", "state"]
        ),
        "queue": GaugeMetricFamily(
            "merlin_broker_queue_depth", "Requests waiting for the resource.", labels=["resource"]
        ),
        "maint": GaugeMetricFamily(
            "merlin_broker_maintenance_since_timestamp_seconds",
            "When maintenance began (0 if the resource is not in maintenance).",
            labels=["resource"],
        ),
        "grants": CounterMetricFamily("merlin_broker_lease_grants", "Leases granted.", labels=["resource"]),
        "releases": CounterMetricFamily(
            "merlin_broker_lease_releases", "Leases released by their holder.", labels=["resource"]
        ),
        "expirations": CounterMetricFamily(
            "merlin_broker_lease_expirations", "Leases that ran out of time.", labels=["resource"]
        ),
        "revocations": CounterMetricFamily(
            "merlin_broker_lease_revocations", "Leases revoked by an admin.", labels=["resource"]
        ),
        "timeouts": CounterMetricFamily(
            "merlin_broker_lease_wait_timeouts", "Waiting requests that timed out.", labels=["resource"]
        ),
        "holder_gone": CounterMetricFamily(
            "merlin_broker_lease_holder_gone",
            "Waiting requests and leases ended because their client's session ended.",
            labels=["resource"],
        ),
        "wait": HistogramMetricFamily(
            "merlin_broker_lease_wait_seconds", "Time from request to grant.", labels=["resource"]
        ),
        "hold": HistogramMetricFamily(
            "merlin_broker_lease_hold_seconds", "Time from grant to the lease's end.", labels=["resource"]
        ),
    }
    for key in keys:
        snapshot = snapshots.get(key)
        answering = up.get(key, False)
        families["up"].add_metric([key], 1.0 if answering else 0.0)
        state = ResourceState(snapshot.state) if (snapshot is not None and answering) else ResourceState.DOWN
        for candidate in ResourceState:
            families["state"].add_metric([key, candidate.value], 1.0 if candidate is state else 0.0)
        if snapshot is None:
            continue  # never heard from it: no counters rather than false zeros
        counters = snapshot.counters
        families["leased"].add_metric([key], 1.0 if snapshot.granted_at is not None else 0.0)
        families["queue"].add_metric([key], float(snapshot.queue_depth))
        families["maint"].add_metric([key], snapshot.maintenance_since or 0.0)
        families["grants"].add_metric([key], float(counters.grants))
        families["releases"].add_metric([key], float(counters.releases))
        families["expirations"].add_metric([key], float(counters.expirations))
        families["revocations"].add_metric([key], float(counters.revocations))
        families["timeouts"].add_metric([key], float(counters.wait_timeouts))
        families["holder_gone"].add_metric([key], float(counters.holder_gone))
        families["wait"].add_metric([key], counters.wait.cumulative(), sum_value=counters.wait.total)
        families["hold"].add_metric([key], counters.hold.cumulative(), sum_value=counters.hold.total)
    yield from families.values()

    finished = CounterMetricFamily("merlin_broker_runs", "Runs that reached an end, by status.", labels=["status"])
    for status in RUN_STATUSES:
        finished.add_metric([status], float(runs.finished.get(status, 0)))
    yield finished
    active = GaugeMetricFamily("merlin_broker_runs_active", "Runs queued or running now.")
    active.add_metric([], float(runs.active))
    yield active
    duration = HistogramMetricFamily("merlin_broker_run_duration_seconds", "Wall time of finished runs.")
    duration.add_metric([], runs.duration.cumulative(), sum_value=runs.duration.total)
    yield duration


def _pool_families(view: BoardView) -> Iterator[Metric]:
    members = GaugeMetricFamily(
        "merlin_broker_pool_members", "Keys the pool's selector matches in the catalog.", labels=["pool"]
    )
    free = GaugeMetricFamily(
        "merlin_broker_pool_free",
        "Members a new request could take now: answering, free (not leased, in maintenance or down) "
        "and nobody queued; a free member kept for a waiting group request is not counted.",
        labels=["pool"],
    )
    queue = GaugeMetricFamily(
        "merlin_broker_pool_queue_depth",
        "Requests waiting for a member: single-key requests queued on a member, plus group requests "
        "queued on at least one member, each counted once.",
        labels=["pool"],
    )
    for name, keys in sorted(view.pools.items()):
        members.add_metric([name], float(len(keys)))
        free.add_metric([name], float(sum(1 for key in keys if _is_free(view, key))))
        queue.add_metric([name], float(pool_queue_depth(view.snapshots, keys)))
    yield members
    yield free
    yield queue
    wait = HistogramMetricFamily(
        "merlin_broker_group_wait_seconds", "Time from a group request (selector or set of keys) to its grant."
    )
    wait.add_metric([], view.group_wait.cumulative(), sum_value=view.group_wait.total)
    yield wait


def _is_free(view: BoardView, key: str) -> bool:
    snapshot = view.snapshots.get(key)
    return (
        snapshot is not None
        and view.up.get(key, False)
        and open_to_new(ResourceState(snapshot.state), snapshot.queue_depth)
    )


def pool_queue_depth(snapshots: Mapping[str, ResourceSnapshot], keys: Sequence[str]) -> int:
    """Distinct requests waiting on ``keys``: each key's single-key waiters, plus every group queued on any."""
    singles = 0
    groups: set[str] = set()
    for key in keys:
        snapshot = snapshots.get(key)
        if snapshot is None:
            continue
        singles += max(0, snapshot.queue_depth - len(snapshot.queued_groups))
        groups.update(snapshot.queued_groups)
    return singles + len(groups)


def _live_families(keys: tuple[str, ...], snapshots: dict[str, ResourceSnapshot], now: float) -> Iterator[Metric]:
    oldest = GaugeMetricFamily(
        "merlin_broker_queue_oldest_wait_seconds",
        "How long the longest-waiting request has waited (0 if none).",
        labels=["resource"],
    )
    leased_s = CounterMetricFamily(
        "merlin_broker_leased_seconds",
        "Seconds the resource was leased; utilization is its rate.",
        labels=["resource"],
    )
    for key in keys:
        snapshot = snapshots.get(key)
        if snapshot is None:
            continue
        waited = now - snapshot.oldest_queued_at if snapshot.oldest_queued_at is not None else 0.0
        oldest.add_metric([key], max(0.0, waited))
        leased_s.add_metric([key], snapshot.leased_seconds_total(now))
    yield oldest
    yield leased_s


def _health_families(health: dict[str, tuple[bool | None, int]]) -> Iterator[Metric]:
    """Keys with a ``health_check``: did the last probe pass, and how many probes have failed."""
    ok = GaugeMetricFamily(
        "merlin_broker_health_ok", "1 if the key's last health probe passed, 0 if it failed.", labels=["resource"]
    )
    failures = CounterMetricFamily(
        "merlin_broker_health_check_failures", "Health probes of the key that failed.", labels=["resource"]
    )
    for key in sorted(health):
        passed, failed = health[key]
        if passed is not None:
            ok.add_metric([key], 1.0 if passed else 0.0)
        failures.add_metric([key], float(failed))
    yield ok
    yield failures
