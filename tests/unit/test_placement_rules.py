"""Where keys live and where jobs go: the pure rules, the book's host-down flag, and the edges
(catalog ``host``, a bundle's ``job``) that feed them."""

from __future__ import annotations

import itertools
import pickle

import pytest

from broker.core.book import LeaseBook
from broker.core.catalog import parse_catalog
from broker.core.placement_rules import (
    HOST_LABEL,
    MARKET_TYPE_LABEL,
    JobNeeds,
    NodeInfo,
    host_down_reason,
    parse_memory,
    placement,
    unsatisfiable,
)
from broker.errors import InvalidRequest, ResourceBusy
from broker.models import LeaseEvent, LeaseState, ReserveRequest
from targetgen.bundle import ExecutionBundle, parse_bundle

GIB = 1024**3
HEAD = NodeInfo("head", {}, {"CPU": 2.0, "memory": 8.0 * GIB}, is_head=True)
BENCH = NodeInfo("bench", {HOST_LABEL: "bench-02"}, {"CPU": 1.0, "memory": 2.0 * GIB, "bench_gpu": 1.0})
SPOT = NodeInfo("spot", {HOST_LABEL: "spot-01", MARKET_TYPE_LABEL: "spot"}, {"CPU": 16.0, "memory": 64.0 * GIB})


# ---------------------------------------------------------------------- hosts


def test_a_host_is_down_exactly_when_no_alive_node_carries_its_label():
    assert host_down_reason(None, []) is None  # a key without a host is never host-down
    assert host_down_reason("bench-02", [HEAD, BENCH]) is None
    reason = host_down_reason("bench-02", [HEAD, SPOT])
    assert reason is not None and "bench-02" in reason and f"{HOST_LABEL}=bench-02" in reason
    assert host_down_reason("bench-02", []) is not None


def test_the_placement_selects_the_host_label_and_keeps_off_spot_nodes_when_asked():
    assert placement(None, JobNeeds()).label_selector == {}
    assert placement("bench-02", JobNeeds()).label_selector == {HOST_LABEL: "bench-02"}
    steady = placement("bench-02", JobNeeds(preemptible=False)).label_selector
    assert steady == {HOST_LABEL: "bench-02", MARKET_TYPE_LABEL: "!spot"}


# ---------------------------------------------------------------------- feasibility


@pytest.mark.parametrize(
    ("host", "needs", "words"),
    [
        (None, JobNeeds(num_cpus=32), "32 CPUs (most on one node: 16)"),
        (None, JobNeeds(memory_bytes=128 * GIB), "memory"),
        (None, JobNeeds(resources={"unobtainium": 1}), "unobtainium"),
        ("bench-02", JobNeeds(num_cpus=2), "on host 'bench-02'"),  # the head has 2, the host has 1
        ("bench-02", JobNeeds(resources={"bench_gpu": 2}), "2 bench_gpu (most: 1)"),
        ("spot-01", JobNeeds(preemptible=False), "preemptible"),
        (None, JobNeeds(num_cpus=4, preemptible=False), "4 CPUs"),  # 16 CPUs only on the spot node
    ],
)
def test_a_job_no_alive_node_could_run_is_refused_with_what_is_missing(host, needs, words):
    why = unsatisfiable(placement(host, needs), [HEAD, BENCH, SPOT])
    assert why is not None and words in why, why


@pytest.mark.parametrize(
    ("host", "needs"),
    [
        (None, JobNeeds()),
        (None, JobNeeds(num_cpus=16, memory_bytes=64 * GIB)),  # the spot node has it
        (None, JobNeeds(num_cpus=2, preemptible=False)),  # the head has it
        ("bench-02", JobNeeds(num_cpus=1, resources={"bench_gpu": 1}, preemptible=False)),
        ("gone-07", JobNeeds(num_cpus=999)),  # a host with no node: the key is down, its run waits
    ],
)
def test_a_job_some_alive_node_could_run_passes(host, needs):
    assert unsatisfiable(placement(host, needs), [HEAD, BENCH, SPOT]) is None


def test_feasibility_does_not_depend_on_the_order_of_the_nodes():
    cases = [(None, JobNeeds(num_cpus=16, preemptible=False)), ("bench-02", JobNeeds(num_cpus=1)), (None, JobNeeds())]
    for host, needs in cases:
        answers = {
            unsatisfiable(placement(host, needs), order) for order in itertools.permutations([HEAD, BENCH, SPOT])
        }
        assert len(answers) == 1, (host, needs, answers)


@pytest.mark.parametrize(
    ("text", "size"),
    [(0, 0), (1536, 1536), ("512m", 512 * 1024**2), ("2g", 2 * GIB), ("2GiB", 2 * GIB), ("1.5Gi", 3 * GIB // 2)],
)
def test_memory_sizes_read_in_binary_units(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("bad", ["lots", "-1g", "2 gigs", True, None, [1], float("inf")])
def test_a_memory_size_that_is_no_size_is_refused(bad):
    with pytest.raises(ValueError):
        parse_memory(bad)


# ---------------------------------------------------------------------- the book


def request(holder: str, *, wait: bool = False, timeout_s: float | None = None) -> ReserveRequest:
    return ReserveRequest(
        resource="k", holder=holder, ttl_s=60.0, wait=wait, timeout_s=timeout_s, request_id=f"{holder}-1"
    )


def test_a_down_host_refuses_new_grants_keeps_the_holder_and_grants_the_waiter_when_back():
    book = LeaseBook("k")
    alice = book.reserve(request("alice"), "k." + "a" * 32, now=0.0).result
    assert alice is not None and alice.state is LeaseState.GRANTED
    down = book.set_host_down("host 'b' is not in the cluster", now=1.0)
    assert [change.event for change in down.changes] == [LeaseEvent.DOWN]
    assert not down.changed_leases and not down.maintenance_changed  # nothing to write: the cluster is the authority
    assert book.granted == alice  # its holder keeps the lease
    bob = book.reserve(request("bob", wait=True), "k." + "b" * 32, now=2.0).result
    assert bob is not None and bob.state is LeaseState.QUEUED
    book.release(alice.lease_id, now=3.0)
    assert book.granted is None and [lease.holder for lease in book.queue] == ["bob"]  # no grant while down
    with pytest.raises(ResourceBusy) as busy:
        book.reserve(request("carol"), "k." + "c" * 32, now=4.0)
    assert busy.value.down_reason == "host 'b' is not in the cluster"
    assert "is down: host 'b'" in str(busy.value)
    assert book.set_host_down("host 'b' is not in the cluster", now=5.0).changes == []  # idempotent
    up = book.set_host_down(None, now=6.0)
    assert [change.event for change in up.changes] == [LeaseEvent.UP, LeaseEvent.GRANTED]
    assert book.granted is not None and book.granted.holder == "bob"


def test_a_waiter_on_a_down_host_times_out_cleanly():
    book = LeaseBook("k")
    book.set_host_down("gone", now=0.0)
    queued = book.reserve(request("bob", wait=True, timeout_s=5.0), "k." + "b" * 32, now=0.0).result
    assert queued is not None and queued.state is LeaseState.QUEUED
    ended = book.tick(now=5.0).changed_leases
    assert [lease.state for lease in ended] == [LeaseState.CANCELLED]


def test_host_down_and_maintenance_are_separate_flags():
    book = LeaseBook("k")
    book.set_maintenance(True, "fan swap", now=0.0, by="bob")
    book.set_host_down("gone", now=1.0)
    book.set_host_down(None, now=2.0)  # the host's return never lifts an admin's maintenance
    assert book.maintenance is not None and book.maintenance.reason == "fan swap"
    book.set_maintenance(False, "", now=3.0)
    book.set_host_down("gone", now=4.0)
    assert book.maintenance is None and book.host_down is not None


def test_a_restored_book_that_knows_its_host_is_down_grants_nobody():
    from broker.core.book import HostDown

    book = LeaseBook("k")
    book.set_host_down("gone", now=0.0)
    queued = book.reserve(request("bob", wait=True), "k." + "b" * 32, now=0.0).result
    assert queued is not None and queued.state is LeaseState.QUEUED
    restored, fixes = LeaseBook.restore("k", [queued], host_down=HostDown("gone", 1.0), now=1.0)
    assert restored.granted is None and fixes.changes == [] and len(restored.queue) == 1
    unknown, fixes = LeaseBook.restore("k", [queued], now=1.0)  # without the flag the waiter is served
    assert unknown.granted is not None and unknown.granted.holder == "bob"


def test_resource_busy_with_a_down_reason_pickles():
    busy = ResourceBusy("k", None, None, 2, None, down_reason="gone")
    again = pickle.loads(pickle.dumps(busy))
    assert again.down_reason == "gone" and str(again) == str(busy)


# ---------------------------------------------------------------------- the edges


def test_a_catalog_entry_names_its_host_as_a_label_value():
    catalog = parse_catalog({"resources": {"board": {"host": "bench-02"}, "lane": {}}})
    assert catalog.resources["board"].host == "bench-02" and catalog.resources["lane"].host is None
    for bad in ["bench 02", "-bench", "x" * 64, ""]:
        with pytest.raises(InvalidRequest) as refused:
            parse_catalog({"resources": {"board": {"host": bad}}})
        assert "resources.board.host" in str(refused.value)


def test_the_lab_catalog_with_hosts_loads():
    from pathlib import Path

    from broker.core.catalog import load_catalog

    root = Path(__file__).resolve().parents[2]
    catalog = load_catalog(root / "configs" / "lab" / "resources.yaml")
    hosts = {key: spec.host for key, spec in catalog.resources.items()}
    assert hosts["firesim_u250"] == hosts["firesim_u250_b"] == "fpga-host-01"
    assert hosts["spacemit_x60_board_01"] == "bench-01"


def bundle(job: object) -> dict[str, object]:
    step = {"id": "s", "argv": ["true"], "resource": "k"}
    return {"target": "t", "target_class": "silicon_board", "resource": "k", "job": job, "steps": [step]}


def test_a_bundle_states_its_job_resources_and_they_round_trip():
    parsed = parse_bundle(bundle({"num_cpus": 2, "memory": "4g", "resources": {"bench_gpu": 1}, "preemptible": False}))
    assert parsed.job is not None and parsed.job.memory_bytes == 4 * GIB and parsed.job.preemptible is False
    again = ExecutionBundle.model_validate_json(parsed.model_dump_json())
    assert again == parsed
    assert parse_bundle(bundle(None)).job is None


@pytest.mark.parametrize(
    ("job", "where"),
    [
        ({"cpus": 2}, "job.cpus"),
        ({"num_cpus": -1}, "job.num_cpus"),
        ({"num_cpus": 5000}, "job.num_cpus"),
        ({"memory": "lots"}, "job.memory"),
        ({"resources": {"CPU": 1}}, "job.resources"),
        ({"resources": {"bench gpu": 1}}, "job.resources"),
        ({"resources": {"bench_gpu": 0}}, "job.resources"),
        ({"preemptible": "no"}, "job.preemptible"),
    ],
)
def test_a_bad_job_request_is_one_clear_error(job, where):
    with pytest.raises(InvalidRequest) as refused:
        parse_bundle(bundle(job), "bundle.json")
    assert str(refused.value).startswith(f"bundle.json: {where}"), refused.value


def test_a_spec_carries_its_job_into_the_bundle():
    import sys

    from targetgen.build import execution_bundle
    from targetgen.plan import support_plan
    from targetgen.spec import parse_spec
    from tests.unit.test_targetgen import CATALOG

    spec = parse_spec(
        {
            "name": "Radiance",
            "platform": {"simulator": "verilator"},
            "resource": "radiance_sim_lane_a",
            "job": {"num_cpus": 4, "memory": "16g"},
        }
    )
    made = execution_bundle(spec, support_plan(spec, CATALOG), python=sys.executable)
    assert made.job is not None and made.job.num_cpus == 4 and made.job.memory_bytes == 16 * GIB


def test_the_local_engine_ignores_job_resources_with_a_note(tmp_path, monkeypatch):
    from executor.local import LocalEngine
    from executor.state import BundleStatus
    from targetgen.bundle import write_bundle

    monkeypatch.delenv("MERLIN_RUN_ID", raising=False)
    data = bundle({"num_cpus": 512, "preemptible": False})
    data["resource"], data["steps"] = None, [{"id": "s", "argv": ["true"]}]
    write_bundle(tmp_path, parse_bundle(data))
    lines: list[str] = []
    state = LocalEngine(tmp_path, report=lines.append).run()
    assert state.status is BundleStatus.SUCCEEDED  # 512 CPUs asked, none needed here
    assert any(line.startswith("note: the bundle's job resources") for line in lines), lines
