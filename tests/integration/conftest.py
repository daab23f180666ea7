"""One real local Ray cluster per test session (on loopback, token auth); each test gets its own
namespace and state dir (or its module's, see ``shared_broker``), and its broker actors are killed
afterwards.

Starting a broker (four actor processes, ~4 s of CPU) is most of a short test's time, so the next
test's broker with the default catalog starts in the background while the current test runs, and
a module's tests that need no broker of their own share one (``shared_broker``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.client import BrokerClient
from broker.disk.store import StateDir
from broker.seam.cluster import Bootstrap, connect_ray, start_local, stop_local

ROOT = Path(__file__).resolve().parents[2]
TEST_CATALOG: dict[str, Any] = {
    "version": 1,
    "broker": {"claim": "20s"},
    "resources": {
        "firesim_u250": {"labels": {"kind": "fpga"}, "properties": {"slot": 0}},
        "spacemit_x60_board_01": {"labels": {"kind": "board"}},
        "radiance_sim_lane_a": {"labels": {"kind": "sim"}},
    },
}


@dataclass
class Cluster:
    state: StateDir
    bootstrap: Bootstrap


@dataclass
class BrokerEnv:
    """A broker of its own for one test."""

    state: StateDir
    namespace: str
    client: BrokerClient

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (CLI or second driver) to reach this broker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
        env.update(MERLIN_STATE_DIR=str(self.state.root), MERLIN_RAY_NAMESPACE=self.namespace)
        return env

    def cli(self, *args: str, timeout: float = 120.0, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd=ROOT,
        )

    def actor(self, key: str) -> Any:
        import ray

        return ray.get_actor(f"resource:{key}", namespace=self.namespace)

    def metrics_url(self) -> str:
        url = self.client.status().metrics_url
        assert url is not None and url.startswith("http://127.0.0.1:")
        return url

    def actor_pid(self, name: str) -> int:
        import ray

        return ray.get(ray.get_actor(name, namespace=self.namespace).ping.remote(), timeout=60)["pid"]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = StateDir(tmp_path_factory.mktemp("cluster")).ensure()
    # The actors inherit the head's environment: probe resource actors every second.
    os.environ.setdefault("MERLIN_HEALTH_INTERVAL_S", "1")
    os.environ.setdefault("MERLIN_ACTOR_RETRY_S", "8")  # short, so a test can wait past it
    try:
        bootstrap, _ = start_local(state)
        connect_ray(state, namespace="merlin-tests")
        yield Cluster(state, bootstrap)
    finally:
        import ray

        ray.shutdown()
        stop_local(state)


def broker_place(cluster: Cluster, root: Path) -> BrokerEnv:
    """A fresh namespace and state dir (with the cluster's record) for a broker; nothing started."""
    namespace = f"t-{uuid.uuid4().hex[:10]}"
    state = StateDir(root).ensure()
    shutil.copy(cluster.state.bootstrap_path, state.bootstrap_path)
    return BrokerEnv(state=state, namespace=namespace, client=BrokerClient(namespace, retry_s=60.0))


def make_broker(cluster: Cluster, root: Path, catalog: dict[str, Any] | None = None) -> BrokerEnv:
    from broker.actors.deploy import broker_up

    env = broker_place(cluster, root)
    broker_up(env.state, env.namespace, catalog or TEST_CATALOG, metrics_port=0)
    return env


class SpareBrokers:
    """Brokers, each started while the test before it runs: always the next one with the default
    catalog, and the next one with a module's own catalog when the next test asks for it too."""

    next_item: pytest.Item | None = None  # the test after the one running (see pytest_runtest_protocol)

    def __init__(self, cluster: Cluster, root: Path):
        self._cluster = cluster
        self._root = root
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spare-broker")
        self._spares: dict[str, Future[BrokerEnv]] = {}  # catalog (as JSON) -> its next broker

    def _start(self, catalog: dict[str, Any] | None) -> BrokerEnv:
        return make_broker(self._cluster, self._root / uuid.uuid4().hex[:12], catalog)

    def take(self, catalog: dict[str, Any] | None = None, *, again: bool = True) -> BrokerEnv:
        """A fresh broker with ``catalog`` (default: TEST_CATALOG); ``again``: start the next one now."""
        key = json.dumps(catalog, sort_keys=True)
        spare = self._spares.pop(key, None)
        if again:
            self._spares[key] = self._starter.submit(self._start, catalog)
        return spare.result() if spare is not None else self._start(catalog)

    def close(self) -> None:
        from broker.actors.deploy import broker_down

        for spare in self._spares.values():
            with contextlib.suppress(Exception):  # a spare that failed to start has nothing to stop
                broker_down(spare.result(timeout=300).namespace)
        self._starter.shutdown(wait=False, cancel_futures=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    SpareBrokers.next_item = nextitem
    yield


def next_test_uses(request: pytest.FixtureRequest, fixture: str) -> bool:
    """Whether the next test is in this module and uses ``fixture`` (then its broker is started now)."""
    following = SpareBrokers.next_item
    return (
        following is not None
        and getattr(following, "module", None) is request.module
        and fixture in getattr(following, "fixturenames", ())
    )


@pytest.fixture(scope="session")
def spare_brokers(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpareBrokers]:
    spares = SpareBrokers(ray_cluster, tmp_path_factory.mktemp("brokers"))
    yield spares
    spares.close()


@pytest.fixture(scope="module")
def unchanging_broker(spare_brokers: SpareBrokers) -> Iterator[BrokerEnv]:
    """One broker for a module's cases that each assert they changed nothing (bad input): a case that
    did change something fails itself, and starting a broker per case cost most of their time."""
    from broker.actors.deploy import broker_down

    env = spare_brokers.take()
    yield env
    broker_down(env.namespace)


@pytest.fixture
def broker_env(spare_brokers: SpareBrokers) -> Iterator[BrokerEnv]:
    from broker.actors.deploy import broker_down

    env = spare_brokers.take()
    yield env
    broker_down(env.namespace)


def left_over(env: BrokerEnv) -> list[str]:
    """What is held, queued, in maintenance, down or running on ``env``'s broker (nothing: [])."""
    found = [
        f"{s.key} is {s.state.value}" + (f" (held by {s.holder})" if s.holder else "") + f", {len(s.queue)} waiting"
        for s in env.client.resources()
        if s.state.value != "free" or s.holder is not None or s.queue
    ]
    found += [f"a {g['state']} group of {g['holder']}" for g in env.client.groups()]
    found += [f"run {r.run_id} is {r.status.value}" for r in env.client.call("runs", True)]
    return found


def wait_idle(env: BrokerEnv, when: str, timeout_s: float = 60.0) -> None:
    """Wait until nothing is left over on ``env`` (an ended client's lease may take a moment to end)."""
    deadline = time.monotonic() + timeout_s
    while found := left_over(env):
        if time.monotonic() > deadline:
            raise AssertionError(f"{when}, the shared broker is not idle after {timeout_s:g}s: {'; '.join(found)}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def module_broker(spare_brokers: SpareBrokers) -> Iterator[BrokerEnv]:
    from broker.actors.deploy import broker_down

    env = spare_brokers.take()
    yield env
    broker_down(env.namespace)


@pytest.fixture
def shared_broker(module_broker: BrokerEnv) -> Iterator[BrokerEnv]:
    """The module's one broker (default catalog), for tests whose assertions cannot see what another test
    did there: no absolute fencing tokens, counters or journal counts; journal reads by holders or request
    ids of their own. Each test starts with every key free, nobody waiting and no run active, and must
    leave the broker so (checked after it: a test that leaves something fails there, not the next one)."""
    wait_idle(module_broker, "before this test")
    yield module_broker
    wait_idle(module_broker, "after this test")
