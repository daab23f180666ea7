"""Scale: throughput across keys, footprint per key, the control plane at 40 keys, the cost of metrics pushes."""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

import ray

from broker.devtools.bench.common import BenchContext, extra_broker, run_workers, timed
from broker.devtools.bench.stats import Result, Target, summarize

__all__ = ["metrics", "throughput", "footprint", "control_plane"]

# The lab size the control-plane targets are set for (issue 15: Carol's 40 boards).
LAB_KEYS = 40


def _scrape_samples(url: str, count: int, token: str | None = None) -> list[float]:
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def scrape() -> None:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            response.read()

    return timed(scrape, count, 10)


def metrics(ctx: BenchContext) -> Result:
    """Scrape time at a few keys (40 keys: the control-plane scenario); what a snapshot push costs a cycle."""
    from broker.actors.deploy import broker_down

    result = Result("metrics")
    namespace, _keys, handle = extra_broker(ctx, 3)
    url = ray.get(handle.status.remote()).metrics_url
    result.figures["scrape, 3 keys"] = summarize(_scrape_samples(url, ctx.samples(300, 40)))
    broker_down(namespace)

    key = ctx.keys[0]
    resource = ctx.resource(key)

    def direct() -> None:
        lease = ray.get(resource.reserve.remote("bench", request_id=uuid.uuid4().hex))
        ray.get(resource.release.remote(lease.lease_id))

    def set_pushing(on: bool) -> None:
        # A pending flag that never clears suppresses pushes: the cycle without them.
        ray.get(resource.__ray_call__.remote(lambda actor, on=on: setattr(actor, "_push_pending", not on)))

    def push_cost(actor: Any) -> float:
        started = time.perf_counter()
        for _ in range(200):
            actor._push()
        return (time.perf_counter() - started) / 200

    count = ctx.samples(600, 100)
    with_push, without_push = [], []
    for _ in range(3):
        set_pushing(True)
        with_push += timed(direct, count // 3, 10)
        set_pushing(False)
        without_push += timed(direct, count // 3, 10)
    set_pushing(True)
    result.figures["cycle with pushes"] = summarize(with_push)
    result.figures["cycle without pushes"] = summarize(without_push)
    result.ratio("with / without", "cycle with pushes", "cycle without pushes")
    result.figures["one push, in the actor (us)"] = ray.get(resource.__ray_call__.remote(push_cost)) * 1e6
    result.notes.append("a push is sent after the call has answered; it costs CPU, not the caller's latency")
    return result


def _uss_mb(pid: int) -> float:
    """Unique set size: the memory only this process holds (what killing it frees)."""
    total_kb = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith(("Private_Clean:", "Private_Dirty:", "Private_Hugetlb:")):
                total_kb += int(line.split()[1])
    return total_kb / 1024.0


def throughput(ctx: BenchContext) -> Result:
    """Lease cycles per second with 1, 4 and 16 keys (--quick: 1 and 4) and as many client processes;
    Ray's gating beside."""
    from broker.actors.deploy import broker_down

    result = Result("throughput")
    duration = ctx.samples(10.0, 2.0)
    sizes: tuple[int, ...] = (1, 4) if ctx.quick else (1, 4, 16)
    rates: dict[int, float] = {}
    for keys in sizes:
        namespace, names, _handle = extra_broker(ctx, keys)
        specs = [{"mode": "cycles", "target": "shim", "key": key, "duration_s": duration} for key in names]
        answers = run_workers(ctx, specs, namespace=namespace)
        rates[keys] = sum(answer.get("cycles", 0) for answer in answers) / duration
        result.figures[f"shim, {keys} keys (cycles/s)"] = rates[keys]
        broker_down(namespace)
        gates = [{"mode": "gated", "gate": f"bench_gate_{index:02d}", "duration_s": duration} for index in range(keys)]
        if ray.cluster_resources().get("bench_gate_00"):
            answers = run_workers(ctx, gates)
            result.figures[f"Ray resource gating, {keys} keys (tasks/s)"] = (
                sum(answer.get("cycles", 0) for answer in answers) / duration
            )
    most = sizes[-1]
    scaling = rates[most] / rates[1] if rates[1] else float("nan")
    result.figures[f"{most} keys / 1 key"] = scaling
    result.targets.append(Target(f"throughput at {most} keys >= 2x at 1 key", scaling, 2.0, at_least=True))
    result.notes.append(f"one client process per key, reserve+release through the shim for {duration:g}s")
    return result


def footprint(ctx: BenchContext) -> Result:
    """Memory (USS) per resource actor and actor start time at 10 and 50 keys, beside a bare idle actor."""
    from broker.actors.deploy import broker_down
    from broker.devtools.bench.baselines import BareActor

    result = Result("footprint")
    bare_uss, bare_start = [], []
    for _ in range(ctx.samples(5, 2)):
        started = time.perf_counter()
        actor = BareActor.options(namespace=ctx.namespace).remote()
        pid = ray.get(actor.ping.remote())
        bare_start.append(time.perf_counter() - started)
        time.sleep(0.5)
        bare_uss.append(_uss_mb(pid))
        ray.kill(actor)
    result.figures["bare idle actor USS (MB)"] = statistics.median(bare_uss)
    result.figures["bare actor start"] = summarize(bare_start)
    for size in (ctx.samples(10, 3), ctx.samples(LAB_KEYS, 6)):
        started = time.perf_counter()
        namespace, names, _handle = extra_broker(ctx, size)  # returns when every actor answers
        wall = time.perf_counter() - started
        pids = [ray.get(ray.get_actor(f"resource:{key}", namespace=namespace).ping.remote())["pid"] for key in names]
        time.sleep(0.5)
        uss = statistics.median(_uss_mb(pid) for pid in pids)
        result.figures[f"resource actor USS at {size} keys (MB)"] = uss
        result.figures[f"broker up with {size} keys (s)"] = wall
        result.figures[f"start time per key at {size} keys (s)"] = wall / size
        broker_down(namespace)
    ratio = float(result.figures[f"resource actor USS at {ctx.samples(LAB_KEYS, 6)} keys (MB)"]) / float(  # type: ignore[arg-type]
        result.figures["bare idle actor USS (MB)"]  # type: ignore[arg-type]
    )  # both are plain medians (floats), not Summaries
    result.figures["USS per key / bare actor"] = ratio
    result.targets.append(Target("memory per key <= 1.2x a bare idle actor's USS", ratio, 1.2))
    result.notes.append("USS = Private_Clean + Private_Dirty from /proc/<pid>/smaps_rollup")
    return result


def _render_costs(coordinator: Any, count: int = 50) -> tuple[float, float]:
    """Inside the coordinator: seconds per exposition rendered from scratch, and from the cache."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from broker.http.metrics import BrokerCollector, Exposition

    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(coordinator._board))
    started = time.perf_counter()
    for _ in range(count):
        generate_latest(registry)
    full = (time.perf_counter() - started) / count
    exposition = Exposition(coordinator._board)
    exposition.render()
    started = time.perf_counter()
    for _ in range(count):
        exposition.render()
    return full, (time.perf_counter() - started) / count


def control_plane(ctx: BenchContext) -> Result:
    """A lab-sized broker: `broker up` with 40 keys, a scrape, and `merlin ray resources list` at 40 keys.

    Baselines from the same run: as many bare actors started at once (Ray
    starting that many worker processes on this machine: the floor of ``broker
    up``), and the CLI's own start-up (``merlin --help``) beside the read API's
    answer (``GET /api/v1/resources``), which together make up ``resources list``.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    from broker.actors.deploy import broker_down
    from broker.devtools.bench.baselines import BareActor

    size = ctx.samples(LAB_KEYS, 5)
    result = Result(f"control plane, {size} keys")
    started = time.perf_counter()
    actors = [BareActor.options(namespace=ctx.namespace).remote() for _ in range(size)]
    ray.get([actor.ping.remote() for actor in actors])
    result.figures[f"{size} bare actors started at once (s)"] = time.perf_counter() - started
    # The floor of resources(): one call on every key's actor, all at once, answered.
    result.figures[f"one call on {size} bare actors at once"] = summarize(
        timed(lambda: ray.get([actor.ping.remote() for actor in actors]), ctx.samples(100, 20), 5)
    )
    for actor in actors:
        ray.kill(actor)
    started = time.perf_counter()
    namespace, _names, handle = extra_broker(ctx, size)  # returns when every actor answers
    up_s = time.perf_counter() - started
    result.figures[f"broker up with {size} keys (s)"] = up_s
    try:
        url = ray.get(handle.status.remote()).metrics_url
        scrape = summarize(_scrape_samples(url, ctx.samples(300, 40)))
        result.figures[f"scrape, {size} keys"] = scrape
        full, cached = ray.get(handle.__ray_call__.remote(_render_costs))
        result.figures[f"exposition built from scratch, {size} keys (ms, in the coordinator)"] = full * 1000
        result.figures[f"exposition from the cache, {size} keys (ms, in the coordinator)"] = cached * 1000
        from broker.disk.store import StateDir
        from broker.disk.token_store import read_operator_token

        extra_state = StateDir(ctx.state.root.parent / namespace)
        status = ray.get(handle.status.remote())
        deadline = time.monotonic() + 30
        while status.http_url is None and time.monotonic() < deadline:  # its listener starts beside it
            time.sleep(0.1)
            status = ray.get(handle.status.remote())
        api = f"{status.http_url}/resources"
        token = read_operator_token(extra_state)
        samples = _scrape_samples(api, ctx.samples(100, 20), token)
        result.figures[f"GET /api/v1/resources, {size} keys"] = summarize(samples)
        merlin = Path(sys.executable).parent / "merlin"
        command = [str(merlin)] if merlin.exists() else [sys.executable, "-m", "broker.cli"]
        env = {
            **os.environ,
            "MERLIN_STATE_DIR": str(ctx.state.root.parent / namespace),
            "MERLIN_RAY_NAMESPACE": namespace,
        }

        def wall(argv: list[str]) -> float:
            begun = time.perf_counter()
            subprocess.run(argv, env=env, capture_output=True, check=True, timeout=120)
            return time.perf_counter() - begun

        helps, lists = [], []
        for _ in range(ctx.samples(7, 2)):
            helps.append(wall([*command, "--help"]))
            lists.append(wall([*command, "ray", "resources", "list"]))
        result.figures["merlin --help (CLI start-up)"] = summarize(helps, scale=1.0, unit="s")
        result.figures[f"merlin ray resources list, {size} keys"] = summarize(lists, scale=1.0, unit="s")
        list_s = result.figures[f"merlin ray resources list, {size} keys"].median  # type: ignore[union-attr]
    finally:
        broker_down(namespace)
    result.ratio(
        "broker up / bare actors at once", f"broker up with {size} keys (s)", f"{size} bare actors started at once (s)"
    )
    result.ratio(
        "GET resources / one call on every bare actor",
        f"GET /api/v1/resources, {size} keys",
        f"one call on {size} bare actors at once",
    )
    result.ratio("list / CLI start-up", f"merlin ray resources list, {size} keys", "merlin --help (CLI start-up)")
    result.targets += [
        Target(f"broker up with {size} keys <= 8 s", up_s, 8.0),
        Target(f"scrape at {size} keys <= 8 ms", scrape.median, 8.0),
        Target(f"resources list at {size} keys <= 0.3 s", list_s, 0.3),
    ]
    if size != LAB_KEYS:
        result.notes.append(f"--quick: {size} keys; the targets are set for {LAB_KEYS}")
    return result
