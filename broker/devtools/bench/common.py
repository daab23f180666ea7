"""What every benchmark scenario shares: the context, timing loops, client processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import ray

from broker.disk.store import StateDir

N = TypeVar("N", int, float)

__all__ = ["BenchContext", "timed", "interleaved", "run_workers", "extra_broker"]


@dataclass
class BenchContext:
    state: StateDir
    namespace: str
    keys: list[str]
    quick: bool

    def samples(self, full: N, quick: N) -> N:
        return quick if self.quick else full

    def broker(self) -> Any:
        return ray.get_actor("broker", namespace=self.namespace)

    def resource(self, key: str) -> Any:
        return ray.get_actor(f"resource:{key}", namespace=self.namespace)


def timed(fn: Callable[[], Any], count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def interleaved(fns: dict[str, Callable[[], Any]], count: int, rounds: int = 5) -> dict[str, list[float]]:
    """Alternate the contenders in rounds so machine noise hits each alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        timed(fn, 0, max(10, count // 20))
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += timed(fn, max(1, count // rounds), 0)
    return samples


def run_workers(
    ctx: BenchContext, specs: list[dict[str, Any]], *, namespace: str | None = None
) -> list[dict[str, Any]]:
    """Run one worker process per spec, all starting together; returns each one's JSON answer."""
    start_at = time.time() + 4.0 + 0.5 * len(specs)  # time for every worker to import Ray and connect
    procs = []
    for spec in specs:
        spec = {**spec, "start_at": start_at, "state_dir": str(ctx.state.root), "namespace": namespace or ctx.namespace}
        if "duration_s" in spec:
            spec["until"] = start_at + spec["duration_s"]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "broker.devtools.bench.worker", json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env={**os.environ},
            )
        )
    answers = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        answers.append(json.loads(lines[-1]) if lines else {})
    return answers


def extra_broker(ctx: BenchContext, keys: int) -> tuple[str, list[str], Any]:
    """A second broker with ``keys`` keys in a namespace of its own; returns (namespace, keys, handle)."""
    from broker.actors.deploy import broker_up

    namespace = f"{ctx.namespace}-{keys}k-{uuid.uuid4().hex[:4]}"
    names = [f"bench_{keys}k_{index:02d}" for index in range(keys)]
    state = StateDir(ctx.state.root.parent / namespace).ensure()
    broker_up(state, namespace, {"resources": {key: {} for key in names}}, metrics_port=0)
    return namespace, names, ray.get_actor("broker", namespace=namespace)
