"""``merlin bench``: set up a cluster and a broker of its own, run scenarios, print a table."""

from __future__ import annotations

import math
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.devtools.bench.stats import Result, Summary, Target

__all__ = ["run", "render", "SCENARIOS"]


def _scenarios() -> dict[str, Callable[..., Result]]:
    from broker.devtools.bench import dispatch, group_commit, latency, pools, recovery, scale

    return {
        "cycle": latency.cycle,
        "handoff": latency.handoff,
        "pools": pools.pools,
        "throughput": scale.throughput,
        "group-commit": group_commit.group_commit,
        "footprint": scale.footprint,
        "recovery": recovery.recovery,
        "holder-death": recovery.holder_death,
        "dispatch": dispatch.dispatch,
        "cli": dispatch.cli,
        "metrics": scale.metrics,
        "control-plane": scale.control_plane,
    }


SCENARIOS = (
    "cycle",
    "handoff",
    "pools",
    "throughput",
    "group-commit",
    "footprint",
    "recovery",
    "holder-death",
    "dispatch",
    "cli",
    "metrics",
    "control-plane",
)


def _catalog(keys: list[str]) -> dict[str, Any]:
    return {"version": 1, "resources": {key: {"labels": {"kind": "bench"}} for key in keys}}


def run(
    *,
    quick: bool,
    address: str | None,
    only: list[str] | None = None,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> list[Result]:
    """Run the scenarios; starts (and stops) a loopback cluster of its own unless ``address`` is given."""
    from broker.actors.deploy import broker_down, broker_up
    from broker.devtools.bench.common import BenchContext
    from broker.disk.store import StateDir
    from broker.seam.cluster import connect_ray, start_local, stop_local

    workdir = Path(tempfile.mkdtemp(prefix="merlin-bench-"))
    state = StateDir(workdir / "state").ensure()
    own_cluster = address is None
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    results: list[Result] = []
    connected = False
    ctx: BenchContext | None = None
    # Stopped from outside (CI cancels, a test times out): unwind, so `finally` stops our cluster.
    previous = {sig: signal.signal(sig, _unwind) for sig in UNWIND_SIGNALS}
    try:
        if own_cluster:
            progress("starting a loopback Ray cluster for the benchmark ...")
            # Custom resources for the Ray-gating baseline of the throughput scenario.
            start_local(state, resources={f"bench_gate_{index:02d}": 1 for index in range(16)})
        connect_ray(state, address=address, namespace=namespace)
        connected = True
        for sig in UNWIND_SIGNALS:  # ray.init put its own SIGTERM handler (a stack dump, no clean-up) in place
            signal.signal(sig, _unwind)
        keys = ["bench_key_00"]
        # Ports the OS picks: a broker already on 9477/9478 (`make demo`) must not take the bench's listeners.
        broker_up(state, namespace, _catalog(keys), metrics_port=0)
        ctx = BenchContext(state=state, namespace=namespace, keys=keys, quick=quick)
        # A fresh head keeps starting its dashboard modules for a while: let it settle (figures only;
        # --quick is a smoke run, and what needs the dashboard waits for it).
        time.sleep(ctx.samples(15.0, 0.0))
        for name, scenario in _scenarios().items():
            if only and name not in only:
                continue
            progress(f"[{len(results) + 1}] {name} ...")
            started = time.monotonic()
            result = scenario(ctx)
            progress(f"[{len(results) + 1}] {name} done in {time.monotonic() - started:.1f}s")
            results.append(result)
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        try:
            if ctx is not None:
                ctx.close()
            if connected:
                broker_down(namespace)
            if own_cluster:
                import ray

                ray.shutdown()
                stop_local(state)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return results


UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _unwind(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _cell(value: Summary | float) -> str:
    if isinstance(value, Summary):
        return f"{value.median:9.3f} {value.unit}   p99 {value.p99:9.3f}   n={value.n}"
    if math.isnan(value):
        return "n/a"
    return f"{value:9.3f}"


def render(results: list[Result]) -> str:
    lines: list[str] = []
    for result in results:
        lines.append(f"== {result.name}")
        width = max((len(name) for name in result.figures), default=10)
        for name, value in result.figures.items():
            lines.append(f"  {name.ljust(width)}  {_cell(value)}")
        for note in result.notes:
            lines.append(f"  ({note})")
        for target in result.targets:
            lines.append(f"  target: {_verdict(target)}")
    targets = [target for result in results for target in result.targets]
    if targets:
        lines.append(f"== targets: {sum(target.met for target in targets)} of {len(targets)} met")
        lines += [f"  {'met    ' if target.met else 'NOT MET'}  {_verdict(target)}" for target in targets]
    return "\n".join(lines)


def _verdict(target: Target) -> str:
    relation = ">=" if target.at_least else "<="
    verdict = "met" if target.met else "NOT MET"
    return f"{target.text}: {target.value:.3f} (needs {relation} {target.limit:g}) -> {verdict}"


def as_json(results: list[Result]) -> list[dict[str, Any]]:
    return [
        {
            "name": result.name,
            "figures": {
                name: value.as_dict() if isinstance(value, Summary) else value for name, value in result.figures.items()
            },
            "notes": result.notes,
            "targets": [{"target": t.text, "value": t.value, "limit": t.limit, "met": t.met} for t in result.targets],
        }
        for result in results
    ]
