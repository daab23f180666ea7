"""What every benchmark scenario shares: the context, timing loops, client processes."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from broker.devtools.bench.together import Workers
from broker.disk.store import StateDir

N = TypeVar("N", int, float)

__all__ = ["BenchContext", "timed", "interleaved", "run_workers", "extra_broker"]


@dataclass
class BenchContext:
    state: StateDir
    namespace: str
    keys: list[str]
    quick: bool
    _workers: Workers | None = field(default=None, repr=False)

    def samples(self, full: N, quick: N) -> N:
        return quick if self.quick else full

    def workers(self) -> Workers:
        """The bench's client processes (:func:`run_workers`). ``--quick`` keeps them across runs, so each
        imports Ray and connects once; a full run starts fresh ones for every run, as its figures always had."""
        if self._workers is None:
            where = {"state_dir": str(self.state.root), "namespace": self.namespace}
            argv = [sys.executable, "-m", "broker.devtools.bench.worker", json.dumps(where)]
            self._workers = Workers(argv, env={**os.environ}, keep=self.quick)
        return self._workers

    def close(self) -> None:
        """Ends the client processes kept for ``--quick``."""
        if self._workers is not None:
            self._workers.close()

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
    """Run ``specs`` on one worker process each (in ``namespace``, default the bench's), all starting
    together once every one is ready; returns their answers. A spec's ``duration_s`` sets its ``until``."""
    return ctx.workers().run([{**spec, "namespace": namespace or ctx.namespace} for spec in specs])


def extra_broker(ctx: BenchContext, keys: int) -> tuple[str, list[str], Any]:
    """A second broker with ``keys`` keys in a namespace of its own; returns (namespace, keys, handle)."""
    from broker.actors.deploy import broker_up

    namespace = f"{ctx.namespace}-{keys}k-{uuid.uuid4().hex[:4]}"
    names = [f"bench_{keys}k_{index:02d}" for index in range(keys)]
    state = StateDir(ctx.state.root.parent / namespace).ensure()
    broker_up(state, namespace, {"resources": {key: {} for key in names}}, metrics_port=0)
    return namespace, names, ray.get_actor("broker", namespace=namespace)
