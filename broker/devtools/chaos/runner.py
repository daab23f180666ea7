"""``merlin chaos``: clients hammer the broker while a killer kill -9s its actors; then a checker.

Short mode (CI): 25 s, 4 clients, 2 keys, a client killed every 8-12 s. Long mode
(the README's figures): 10 minutes, 8 clients, 3 keys, a client killed every 4-8 s. Every key is in
one pool (``kind=chaos``), so clients mix single-key requests with group ones (any one of the pool,
any two, two named keys together) on the same keys. The killer picks a resource actor or the
coordinator at random every 1-4 s and SIGKILLs its process; Ray restarts it;
the clients' shim retries with the same request ids. A second killer SIGKILLs
a client process and starts another in its place: what the dead
client held or waited for must let its key go within 5 s (the promise). Afterwards
every lease record, every group record, the journal and every answer a client got go through
:func:`broker.devtools.chaos.checker.check`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.devtools.chaos.checker import ClientDeath, ClientOp, Report, check
from broker.disk.journal import read_journal

__all__ = ["ChaosSettings", "SHORT", "LONG", "run_chaos", "let_go_line"]


@dataclass(frozen=True)
class ChaosSettings:
    duration_s: float
    clients: int
    keys: int
    kill_every_s: tuple[float, float] = (1.0, 4.0)
    coordinator_share: float = 0.3  # of kills that hit the coordinator
    seed: int = 1
    client_kill_every_s: tuple[float, float] | None = (4.0, 8.0)  # None: clients are never killed
    # A dead client's tied request or lease must end within this: the promise (issue 13, README
    # "When a client dies"), though the killer also kill -9s actors meanwhile.
    client_bound_s: float = 5.0


SELECTOR = "kind=chaos"  # the pool every chaos key is in
# A replacement client needs seconds to start on 2 cores: the short run kills clients less often.
SHORT = ChaosSettings(duration_s=25.0, clients=4, keys=2, client_kill_every_s=(8.0, 12.0))
LONG = ChaosSettings(duration_s=600.0, clients=8, keys=3)


@dataclass
class ChaosResult:
    settings: ChaosSettings
    report: Report
    kills: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    workdir: str = ""
    client_deaths: list[ClientDeath] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "duration_s": self.settings.duration_s,
            "wall_s": round(self.wall_s, 1),
            "clients": self.settings.clients,
            "keys": self.settings.keys,
            "kills": len(self.kills),
            "kills_by_target": {
                target: sum(1 for kill in self.kills if kill["target"] == target)
                for target in ("coordinator", "resource")
            },
            **self.report.as_dict(),
            "client_bound_s": self.settings.client_bound_s,
            "workdir": self.workdir,
        }


def _killer(
    namespace: str, keys: list[str], settings: ChaosSettings, stop: threading.Event, kills: list[dict[str, Any]]
) -> None:
    import ray

    rng = random.Random(settings.seed + 1000)
    while not stop.wait(rng.uniform(*settings.kill_every_s)):
        name = "broker" if rng.random() < settings.coordinator_share else f"resource:{rng.choice(keys)}"
        try:
            pid = ray.get(ray.get_actor(name, namespace=namespace).ping.remote(), timeout=10)["pid"]
            os.kill(pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001 - restarting: try another moment
            continue
        kills.append({"target": "coordinator" if name == "broker" else "resource", "name": name, "at": time.time()})


class _Clients:
    """The client processes: started, SIGKILLed at random, replaced by a fresh one (a new name)."""

    def __init__(self, spec: dict[str, Any], count: int, logs_dir: Path):
        self._spec = spec
        self._logs = logs_dir
        self._lock = threading.Lock()
        self.procs: list[subprocess.Popen[str]] = []
        self._live: dict[str, subprocess.Popen[str]] = {}
        self.deaths: list[ClientDeath] = []
        for index in range(count):
            self._start(f"client-{index}", settings_seed=index)

    def _start(self, name: str, settings_seed: int) -> None:
        spec = {**self._spec, "name": name, "seed": self._spec["seed"] * 100 + settings_seed,
                "log": str(self._logs / f"{name}.jsonl")}  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker.devtools.chaos.client", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=open(self._logs / f"{name}.err", "wb"),
            text=True,
        )
        self.procs.append(proc)
        self._live[name] = proc

    def kill_one(self, rng: random.Random, replacement: int) -> None:
        with self._lock:
            live = sorted(name for name, proc in self._live.items() if proc.poll() is None)
            if not live:
                return
            name = rng.choice(live)
            proc = self._live.pop(name)
            self.deaths.append(ClientDeath(name, time.time()))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            self._start(f"{name.split('~')[0]}~{replacement}", settings_seed=1000 + replacement)


def _client_killer(clients: _Clients, settings: ChaosSettings, stop: threading.Event) -> None:
    if settings.client_kill_every_s is None:
        return
    rng = random.Random(settings.seed + 2000)
    replacement = 0
    while not stop.wait(rng.uniform(*settings.client_kill_every_s)):
        replacement += 1
        clients.kill_one(rng, replacement)


def _ops(path: Path) -> list[ClientOp]:
    """A client's log; a SIGKILLed client may have left half a line at the end."""
    ops = []
    for line in path.read_text().splitlines():
        try:
            ops.append(ClientOp.from_dict(json.loads(line)))
        except ValueError:
            continue
    return ops


def _settle(namespace: str, keys: list[str], timeout_s: float = 120.0) -> None:
    """Wait until every actor answers again after the last kill."""
    import ray

    deadline = time.monotonic() + timeout_s
    for name in ["broker", *(f"resource:{key}" for key in keys)]:
        while True:
            try:
                ray.get(ray.get_actor(name, namespace=namespace).ping.remote(), timeout=10)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def run_chaos(
    settings: ChaosSettings,
    *,
    address: str | None = None,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> ChaosResult:
    from broker.actors.deploy import broker_down, broker_up
    from broker.disk.store import StateDir
    from broker.seam.cluster import connect_ray, start_local, stop_local

    started = time.monotonic()
    workdir = Path(workdir or tempfile.mkdtemp(prefix="merlin-chaos-"))
    state = StateDir(workdir / "state").ensure()
    own_cluster = address is None
    if own_cluster:
        progress("chaos: starting a loopback Ray cluster ...")
        start_local(state)
    namespace = f"chaos-{uuid.uuid4().hex[:8]}"
    connect_ray(state, address=address, namespace=namespace)
    keys = [f"chaos_{index:02d}" for index in range(settings.keys)]
    catalog = {
        "broker": {"claim": "5s"},
        "pools": {"chaos": SELECTOR},
        "resources": {key: {"labels": {"kind": "chaos"}} for key in keys},
    }
    broker_up(state, namespace, catalog, metrics_port=0)
    kills: list[dict[str, Any]] = []
    try:
        deadline = time.time() + 5.0 + settings.duration_s  # clients need a few seconds to connect
        logs_dir = workdir / "clients"
        logs_dir.mkdir()
        spec = {"seed": settings.seed, "keys": keys, "selector": SELECTOR, "deadline": deadline,
                "state_dir": str(state.root), "namespace": namespace}  # fmt: skip
        clients = _Clients(spec, settings.clients, logs_dir)
        progress(
            f"chaos: {settings.clients} clients on {settings.keys} keys for {settings.duration_s:g}s, killing actors ..."
        )
        stop = threading.Event()
        killer = threading.Thread(target=_killer, args=(namespace, keys, settings, stop, kills), daemon=True)
        client_killer = threading.Thread(target=_client_killer, args=(clients, settings, stop), daemon=True)
        time.sleep(5.0)
        killer.start()
        client_killer.start()
        while time.time() < deadline:
            time.sleep(1.0)
        stop.set()
        killer.join(30)
        client_killer.join(30)
        progress(f"chaos: {len(kills)} kills, {len(clients.deaths)} clients killed; waiting for clients to finish ...")
        for proc in clients.procs:
            proc.communicate(timeout=300)
        _settle(namespace, keys)
        _until_dead_clients_let_go(clients.deaths, settings.client_bound_s)
        leases = [json.loads(path.read_text()) for path in state.leases_dir.glob("*.json")]
        ops = [op for path in sorted(logs_dir.glob("*.jsonl")) for op in _ops(path)]
        groups = [json.loads(path.read_text()) for path in (state.root / "groups").glob("*.json")]
        report = check(
            leases, read_journal(state.events_path), ops, groups, deaths=clients.deaths, bound_s=settings.client_bound_s
        )
        progress(f"chaos: {let_go_line(report, settings.client_bound_s)}")
    finally:
        broker_down(namespace)
        if own_cluster:
            import ray

            ray.shutdown()
            stop_local(state)
    return ChaosResult(settings, report, kills, time.monotonic() - started, str(workdir), clients.deaths)


def let_go_line(report: Report, bound_s: float) -> str:
    """The worst dead client → its key moved on figure, as the summary prints it."""
    if report.slowest_let_go_s is None:
        return f"dead clients: {report.client_deaths} killed, none holding or waiting at its death (bound {bound_s:g}s)"
    return (
        f"dead clients: {report.client_deaths} killed; worst dead client → its key moved on: "
        f"{report.slowest_let_go_s:.2f}s ({report.let_go_measured} held or queued at a death; bound {bound_s:g}s)"
    )


def _until_dead_clients_let_go(deaths: list[ClientDeath], bound_s: float) -> None:
    """A client killed in the last moments still has its bound to let go: wait it out before reading."""
    if deaths:
        time.sleep(max(0.0, deaths[-1].at + bound_s - time.time()))
