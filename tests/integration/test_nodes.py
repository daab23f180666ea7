"""Keys live on hosts: a real two-node cluster on this machine (the session's head plus a second
Ray node labelled merlin-host=bench-02, both on 127.0.0.1, the second stopped by its own process group)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.core.runs import RunStatus
from broker.errors import InvalidRequest, ResourceBusy, WaitTimeout
from broker.models import ResourceState
from broker.seam.cluster import _free_port, _group_pids, _kill_group
from targetgen.bundle import ExecutionBundle, write_bundle
from tests.integration.conftest import BrokerEnv, Cluster, make_broker
from tests.waiting import until

pytestmark = pytest.mark.ray
PY = sys.executable
HOST = "bench-02"
CATALOG: dict[str, Any] = {
    "version": 1,
    "resources": {
        "bench_board": {"labels": {"kind": "board"}, "host": HOST},
        "sim_lane": {"labels": {"kind": "sim"}},
    },
}


# `ray start` for a node that joins the head, with every listener on loopback. Ray's switch for
# loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which the head and every client need) also makes
# its CLI refuse a second node; on one machine we keep the loopback and allow the node. A lab's
# hosts are separate machines and run plain `ray start --address=... --labels merlin-host=...`.
RAY_START_ON_LOOPBACK = """
import sys
from ray._private import ray_constants, services
from ray.scripts.scripts import main

ray_constants.ENABLE_RAY_CLUSTER = True
services.resolve_ip_for_localhost = lambda host: host
sys.argv = ["ray", *sys.argv[1:]]
main()
"""


class WorkerNode:
    """A second Ray node of the session cluster, in a process group of its own (never `ray stop`)."""

    def __init__(self, cluster: Cluster, root: Path):
        self.cluster = cluster
        self.root = root
        # Ray keeps unix sockets under the temp dir: keep the path short.
        self.temp_dir = Path("/tmp") / f"merlin-n-{os.getuid()}-{uuid.uuid4().hex[:8]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id: str | None = None

    def start(self) -> str:
        import ray

        bootstrap = self.cluster.bootstrap
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(bootstrap.env)  # loopback pinning and the token: the same as the head's
        env["RAY_NODE_MARKET_TYPE"] = "spot"  # a preemptible node (Ray's label ray.io/market-type)
        self.temp_dir.mkdir(mode=0o700, exist_ok=True)
        argv = [
            PY, "-c", RAY_START_ON_LOOPBACK, "start", "--block",
            f"--address={bootstrap.gcs_address}",
            "--node-ip-address=127.0.0.1",
            f"--labels=merlin-host={HOST}",
            f"--resources={json.dumps({'bench_gpu': 1})}",
            "--num-cpus=1",
            f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={_free_port('127.0.0.1')}",
            f"--object-manager-port={_free_port('127.0.0.1')}",
            f"--dashboard-agent-listen-port={_free_port('127.0.0.1')}",
            f"--dashboard-agent-grpc-port={_free_port('127.0.0.1')}",
            f"--runtime-env-agent-port={_free_port('127.0.0.1')}",
            f"--metrics-export-port={_free_port('127.0.0.1')}",
            f"--object-store-memory={100 * 1024 * 1024}",
            "--disable-usage-stats",
        ]  # fmt: skip
        before = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        log_path = self.root / f"node-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        proc = self.proc

        def joined() -> str | None:
            if proc.poll() is not None:
                return "exited"
            for node in ray.nodes():
                if node["Alive"] and node["NodeID"] not in before and node.get("Labels", {}).get("merlin-host") == HOST:
                    assert node["NodeManagerAddress"] == "127.0.0.1", node["NodeManagerAddress"]
                    return str(node["NodeID"])
            return None

        found = until(joined, "the second node to join", timeout_s=90)
        assert found != "exited", log_path.read_text()[-2000:]
        self.node_id = found
        return found

    def stop(self) -> None:
        import ray

        if self.proc is None:
            return
        _kill_group(self.proc.pid)
        self.proc.wait(timeout=30)
        self.proc = None
        gone = self.node_id
        until(lambda: all(n["NodeID"] != gone or not n["Alive"] for n in ray.nodes()), "the node to be dead", 90)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def node(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerNode]:
    worker = WorkerNode(ray_cluster, tmp_path_factory.mktemp("node"))
    worker.start()
    try:
        yield worker
    finally:
        worker.close()
        assert worker.proc is None or not _group_pids(worker.proc.pid)


@pytest.fixture
def lab(ray_cluster: Cluster, node: WorkerNode, tmp_path: Path) -> Iterator[BrokerEnv]:
    from broker.actors.deploy import broker_down

    env = make_broker(ray_cluster, tmp_path / "state", CATALOG)
    yield env
    broker_down(env.namespace)


def target(root: Path, name: str, resource: str | None, job: dict[str, Any] | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    step = {"id": "work", "argv": [PY, "-c", "print('on the bench')"], "resource": resource}
    bundle = ExecutionBundle.model_validate(
        {"target": name, "target_class": "silicon_board", "resource": resource, "job": job, "steps": [step]}
    )
    write_bundle(directory, bundle)
    return directory


def finished(client: Any, run_id: str, timeout_s: float = 120.0) -> Any:
    ends = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED}
    record = until(lambda: (r := client.call("run", run_id)).status in ends and r, f"run {run_id} to end", timeout_s)
    assert record.status is RunStatus.SUCCEEDED, (record.message, client.call("logs", run_id)[-2000:])
    return record


def ran_on(cluster: Cluster, record: Any) -> str:
    """The node the run's Ray job ran on (its driver node, as Ray's job API reports it)."""
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(cluster.bootstrap.dashboard_url).get_job_info(record.submission_id)
    return str(info.driver_node_id)


def status_of(env: BrokerEnv, key: str) -> Any:
    return next(status for status in env.client.resources() if status.key == key)


def scrape(env: BrokerEnv) -> str:
    with urllib.request.urlopen(env.metrics_url(), timeout=10) as response:
        return response.read().decode()


def events(env: BrokerEnv, name: str) -> list[dict[str, Any]]:
    lines = env.state.events_path.read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == name]


def test_a_key_runs_on_its_host_goes_down_with_it_and_comes_back(lab, node, ray_cluster, tmp_path):
    client = lab.client
    assert status_of(lab, "bench_board").state is ResourceState.FREE

    first = client.call("submit", str(target(tmp_path, "first", "bench_board")), holder="ci")
    record = finished(client, first.run_id)
    first_node = node.node_id
    assert ran_on(ray_cluster, record) == first_node  # executed where the board is attached
    plain = finished(client, client.call("submit", str(target(tmp_path, "plain", "sim_lane")), holder="ci").run_id)
    assert plain.status is RunStatus.SUCCEEDED  # a key without a host runs anywhere

    node.stop()
    down = until(lambda: (s := status_of(lab, "bench_board")).state is ResourceState.DOWN and s, "bench_board down")
    assert HOST in (down.down_reason or "") and status_of(lab, "sim_lane").state is ResourceState.FREE
    until(lambda: 'merlin_broker_resource_state{resource="bench_board",state="down"} 1.0' in scrape(lab), "metric")
    assert [e["host"] for e in until(lambda: events(lab, "resource.down"), "the down event")] == [HOST]
    with pytest.raises(ResourceBusy) as busy:
        client.reserve("bench_board", "alice")
    assert HOST in str(busy.value) and busy.value.down_reason == down.down_reason
    with pytest.raises(WaitTimeout):
        client.reserve("bench_board", "alice", wait=True, timeout_s=1.0)

    waiting = client.call("submit", str(target(tmp_path, "waiting", "bench_board")), holder="ci")
    until(lambda: len(status_of(lab, "bench_board").queue) == 1, "the run to queue for the down key")
    assert client.call("run", waiting.run_id).status is RunStatus.PENDING
    assert status_of(lab, "bench_board").holder is None  # no grant while its host is absent

    again = node.start()
    assert again != first_node
    back = finished(client, waiting.run_id)
    assert ran_on(ray_cluster, back) == again  # on the host's new node
    assert status_of(lab, "bench_board").state is ResourceState.FREE
    assert [e["host"] for e in events(lab, "resource.up")] == [HOST]


def test_job_resources_place_the_job_and_an_impossible_one_is_refused_at_submit(lab, node, ray_cluster, tmp_path):
    client = lab.client
    gpu = client.call("submit", str(target(tmp_path, "gpu", "sim_lane", {"resources": {"bench_gpu": 1}})), holder="a")
    assert ran_on(ray_cluster, finished(client, gpu.run_id)) == node.node_id  # only that node has bench_gpu

    steady = target(tmp_path, "steady", "sim_lane", {"preemptible": False, "num_cpus": 1})
    record = finished(client, client.call("submit", str(steady), holder="a").run_id)
    assert ran_on(ray_cluster, record) != node.node_id  # the spot node is skipped; the head has no market label

    for name, key, job, words in [
        ("cpus", "sim_lane", {"num_cpus": 64}, "64 CPUs"),
        ("memory", "sim_lane", {"memory": "64Ti"}, "memory"),
        ("custom", "bench_board", {"resources": {"unobtainium": 1}}, "unobtainium"),
        ("spot", "bench_board", {"preemptible": False}, "preemptible"),
    ]:
        with pytest.raises(InvalidRequest) as refused:
            client.call("submit", str(target(tmp_path, name, key, job)), holder="a")
        assert words in str(refused.value), refused.value
    assert [run.target for run in client.call("runs")] == ["gpu", "steady"]  # refused ones left no record


def test_the_second_node_listens_only_on_loopback(node):
    from tests.integration.test_guarantees import _listening_sockets

    assert node.proc is not None
    sockets = _listening_sockets()
    found = []
    for pid in _group_pids(node.proc.pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found += [(pid, hex_ip) for hex_ip in sockets.get(target[8:-1], [])]
    assert len(found) >= 3  # raylet, object manager, dashboard agent at least
    assert {hex_ip for _, hex_ip in found} == {"0100007F"}, found  # 127.0.0.1 only
