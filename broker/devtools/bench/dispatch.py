"""Run dispatch (a lease becoming free to the next bundle's Ray job running) and CLI wall time,
beside Ray's own job submit-to-running and ``python -c "import ray"``."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from broker.devtools.bench.common import BenchContext
from broker.devtools.bench.stats import Result, Target, summarize

__all__ = ["dispatch", "cli"]

_STEP = "import time; time.sleep(0.2)"


def _job_client(timeout_s: float = 60.0) -> Any:
    """Ray's job client, once the dashboard answers (a fresh head starts it after `ray start` returns)."""
    from ray._private.services import get_webui_url_from_internal_kv
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(f"http://{get_webui_url_from_internal_kv()}")
        except Exception:  # not up yet (no URL, connection refused): retried until the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _until_running(jobs: Any, submission_id: str, timeout_s: float = 120.0) -> float:
    """Poll every 10 ms until Ray reports the job RUNNING (or already done); returns time.time()."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            status = str(getattr(jobs.get_job_status(submission_id), "value", ""))
        except RuntimeError:  # not submitted yet
            status = ""
        if status in ("RUNNING", "SUCCEEDED", "FAILED"):
            return time.time()
        time.sleep(0.01)
    raise TimeoutError(f"job {submission_id} never ran")


def _target_dir(root: Path, key: str) -> Path:
    from targetgen.bundle import ExecutionBundle, write_bundle

    directory = root / uuid.uuid4().hex[:8]
    directory.mkdir(parents=True)
    step = {"id": "use-board", "argv": [sys.executable, "-c", _STEP], "resource": key}
    write_bundle(directory, ExecutionBundle.model_validate(
        {"target": "bench", "target_class": "silicon_board", "resource": key, "steps": [step]}
    ))  # fmt: skip
    return directory


def dispatch(ctx: BenchContext) -> Result:
    key = ctx.keys[0]
    broker = ctx.broker()
    jobs = _job_client()
    root = Path(tempfile.mkdtemp(prefix="merlin-bench-runs-"))
    ours, theirs = [], []
    for _ in range(ctx.samples(6, 1)):
        started = time.time()
        job_id = jobs.submit_job(entrypoint=f"{sys.executable} -c '{_STEP}'", entrypoint_num_cpus=0)
        theirs.append(_until_running(jobs, job_id) - started)
        holder = ray.get(broker.reserve.remote(key, "bench-holder", request_id=uuid.uuid4().hex))
        run = ray.get(broker.submit.remote(str(_target_dir(root, key)), holder="bench"))
        while not ray.get(broker.resources.remote())[0].queue:
            time.sleep(0.01)
        freed = time.time()
        ray.get(broker.release.remote(holder.lease_id))
        ours.append(_until_running(jobs, f"merlin-{run.run_id}") - freed)
        while not ray.get(broker.run.remote(run.run_id)).finished:
            time.sleep(0.05)
    result = Result("run dispatch")
    result.figures["lease free -> next bundle's Ray job running"] = summarize(ours, scale=1.0, unit="s")
    result.figures["Ray job submit -> running"] = summarize(theirs, scale=1.0, unit="s")
    ratio = result.ratio("ours / Ray's", "lease free -> next bundle's Ray job running", "Ray job submit -> running")
    result.targets.append(Target("run dispatch <= 1.3x Ray's own submit-to-running", ratio, 1.3))
    result.notes.append("both observed the same way: Ray's job status polled every 10 ms")
    return result


def _wall(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, capture_output=True, check=True, timeout=120)
    return time.perf_counter() - started


def cli(ctx: BenchContext) -> Result:
    """The CLI's wall time per command, over the HTTP API (the default) and over Ray, beside
    ``python -c pass`` and ``python -c "import ray"`` measured in the same rounds."""
    import json

    key = ctx.keys[0]
    merlin = Path(sys.executable).parent / "merlin"
    command = [str(merlin)] if merlin.exists() else [sys.executable, "-m", "broker.cli"]
    env = {**os.environ, "MERLIN_STATE_DIR": str(ctx.state.root), "MERLIN_RAY_NAMESPACE": ctx.namespace}
    over_ray = {**env, "MERLIN_CLI_TRANSPORT": "ray"}
    count = ctx.samples(7, 1)
    walls: dict[str, list[float]] = {}

    def timed_run(name: str, argv: list[str], environ: dict[str, str]) -> str:
        started = time.perf_counter()
        out = subprocess.run(argv, env=environ, capture_output=True, text=True, check=True, timeout=120)
        walls.setdefault(name, []).append(time.perf_counter() - started)
        return out.stdout

    for _ in range(count):
        timed_run("python -c pass", [sys.executable, "-c", "pass"], env)
        timed_run('python -c "import ray"', [sys.executable, "-c", "import ray"], env)
        timed_run("merlin ray resources list", [*command, "ray", "resources", "list"], env)
        for transport, environ in (("HTTP", env), ("Ray", over_ray)):
            lease = json.loads(
                timed_run(
                    f"reserve --json ({transport})", [*command, "ray", "resources", "reserve", key, "--json"], environ
                )
            )
            timed_run(f"show LEASE ({transport})", [*command, "ray", "resources", "show", lease["lease_id"]], environ)
            timed_run(
                f"release LEASE ({transport})", [*command, "ray", "resources", "release", lease["lease_id"]], environ
            )
    result = Result("cli")
    for name, samples in walls.items():
        result.figures[name] = summarize(samples, scale=1.0, unit="s")
    ratio = result.ratio("list / import ray", "merlin ray resources list", 'python -c "import ray"')
    result.ratio("reserve HTTP / Ray", "reserve --json (HTTP)", "reserve --json (Ray)")
    result.ratio("reserve HTTP / python -c pass", "reserve --json (HTTP)", "python -c pass")
    result.targets.append(Target("CLI read <= 1.3x `import ray` alone", ratio, 1.3))
    write, read = summarize(walls["reserve --json (HTTP)"], scale=1.0), summarize(walls["show LEASE (HTTP)"], scale=1.0)
    result.targets.append(Target("a write over HTTP <= 0.3 s", write.median, 0.3))
    result.targets.append(Target("a read over HTTP <= 0.2 s", read.median, 0.2))
    return result
