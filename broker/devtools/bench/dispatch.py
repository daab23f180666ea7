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


def _job_client() -> Any:
    from ray._private.services import get_webui_url_from_internal_kv
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(f"http://{get_webui_url_from_internal_kv()}")


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
    for _ in range(ctx.samples(6, 2)):
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
    key = ctx.keys[0]
    merlin = Path(sys.executable).parent / "merlin"
    command = [str(merlin)] if merlin.exists() else [sys.executable, "-m", "broker.cli"]
    env = {**os.environ, "MERLIN_STATE_DIR": str(ctx.state.root), "MERLIN_RAY_NAMESPACE": ctx.namespace}
    count = ctx.samples(7, 3)
    imports, lists, reserves = [], [], []
    broker = ctx.broker()
    for _ in range(count):
        imports.append(_wall([sys.executable, "-c", "import ray"], env))
        lists.append(_wall([*command, "ray", "resources", "list"], env))
        started = time.perf_counter()
        out = subprocess.run([*command, "ray", "resources", "reserve", key, "--json"], env=env, capture_output=True,
                             text=True, check=True, timeout=120)  # fmt: skip
        reserves.append(time.perf_counter() - started)
        import json

        ray.get(broker.release.remote(json.loads(out.stdout)["lease_id"]))
    result = Result("cli")
    result.figures['python -c "import ray"'] = summarize(imports, scale=1.0, unit="s")
    result.figures["merlin ray resources list"] = summarize(lists, scale=1.0, unit="s")
    result.figures["merlin ray resources reserve --json"] = summarize(reserves, scale=1.0, unit="s")
    ratio = result.ratio("list / import ray", "merlin ray resources list", 'python -c "import ray"')
    result.ratio("reserve / import ray", "merlin ray resources reserve --json", 'python -c "import ray"')
    result.targets.append(Target("CLI read <= 1.3x `import ray` alone", ratio, 1.3))
    return result
