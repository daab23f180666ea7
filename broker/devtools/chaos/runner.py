"""``merlin chaos``: clients hammer the broker while a killer kill -9s its actors; then a checker.

Short mode (CI): 25 s, 4 clients, 2 keys. Long mode (the README's figures):
10 minutes, 8 clients, 3 keys. The killer picks a resource actor or the
coordinator at random every 1-4 s and SIGKILLs its process; Ray restarts it;
the clients' shim retries with the same request ids. Afterwards every lease
record, the journal and every answer a client got go through
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

from broker.devtools.chaos.checker import ClientOp, Report, check
from broker.disk.journal import read_journal

__all__ = ["ChaosSettings", "SHORT", "LONG", "run_chaos"]


@dataclass(frozen=True)
class ChaosSettings:
    duration_s: float
    clients: int
    keys: int
    kill_every_s: tuple[float, float] = (1.0, 4.0)
    coordinator_share: float = 0.3  # of kills that hit the coordinator
    seed: int = 1


SHORT = ChaosSettings(duration_s=25.0, clients=4, keys=2)
LONG = ChaosSettings(duration_s=600.0, clients=8, keys=3)


@dataclass
class ChaosResult:
    settings: ChaosSettings
    report: Report
    kills: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    workdir: str = ""

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
    broker_up(state, namespace, {"broker": {"claim": "5s"}, "resources": {key: {} for key in keys}}, metrics_port=0)
    kills: list[dict[str, Any]] = []
    try:
        deadline = time.time() + 5.0 + settings.duration_s  # clients need a few seconds to connect
        logs_dir = workdir / "clients"
        logs_dir.mkdir()
        procs = []
        for index in range(settings.clients):
            spec = {
                "name": f"client-{index}",
                "seed": settings.seed * 100 + index,
                "keys": keys,
                "deadline": deadline,
                "state_dir": str(state.root),
                "namespace": namespace,
                "log": str(logs_dir / f"client-{index}.jsonl"),
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "broker.devtools.chaos.client", json.dumps(spec)],
                    stdout=subprocess.PIPE,
                    stderr=open(logs_dir / f"client-{index}.err", "wb"),
                    text=True,
                )
            )
        progress(
            f"chaos: {settings.clients} clients on {settings.keys} keys for {settings.duration_s:g}s, killing actors ..."
        )
        stop = threading.Event()
        killer = threading.Thread(target=_killer, args=(namespace, keys, settings, stop, kills), daemon=True)
        time.sleep(5.0)
        killer.start()
        while time.time() < deadline:
            time.sleep(1.0)
        stop.set()
        killer.join(30)
        progress(f"chaos: {len(kills)} kills; waiting for clients to finish ...")
        for proc in procs:
            proc.communicate(timeout=300)
        _settle(namespace, keys)
        leases = [json.loads(path.read_text()) for path in state.leases_dir.glob("*.json")]
        ops = [
            ClientOp.from_dict(json.loads(line))
            for path in sorted(logs_dir.glob("*.jsonl"))
            for line in path.read_text().splitlines()
            if line.strip()
        ]
        report = check(leases, read_journal(state.events_path), ops)
    finally:
        broker_down(namespace)
        if own_cluster:
            import ray

            ray.shutdown()
            stop_local(state)
    return ChaosResult(settings, report, kills, time.monotonic() - started, str(workdir))
