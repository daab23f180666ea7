"""Bundles run on the hardware in turn, as real Ray jobs queued on the broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.core.runs import RunStatus
from broker.errors import InvalidRequest, RunEnd, UnknownResource
from broker.models import ResourceState
from executor.local import load_state
from executor.state import BundleStatus, StepStatus
from targetgen.bundle import ExecutionBundle, write_bundle
from tests.waiting import until

pytestmark = pytest.mark.ray
PY = sys.executable
MEET_WAIT_S = 150.0  # a step that waits longer for its partner fails (exit 97)


def target(
    root: Path,
    name: str,
    resource: str | None,
    seconds: float = 1.0,
    exit_code: int = 0,
    meet: tuple[Path, tuple[Path, ...]] | None = None,
) -> Path:
    """A target dir whose one hardware step holds the resource for ``seconds`` and leaves an artifact.

    ``meet=(mine, theirs)``: the step first writes the file ``mine`` and waits (holding its key)
    until one of ``theirs`` exists, so two runs that meet provably ran at the same time.
    """
    directory = root / name
    directory.mkdir(parents=True)
    lines = ["import os, pathlib, sys, time"]
    if meet is not None:
        mine, theirs = meet
        lines.append(f"pathlib.Path({str(mine)!r}).touch()")
        if theirs:
            lines += [
                f"end = time.monotonic() + {MEET_WAIT_S!r}",
                f"while not any(pathlib.Path(p).exists() for p in {[str(t) for t in theirs]!r}):",
                "    if time.monotonic() > end: sys.exit(97)",
                "    time.sleep(0.05)",
            ]
    lines += [
        f"time.sleep({seconds!r})",
        "p = pathlib.Path('artifacts/out.txt')",
        "p.parent.mkdir(exist_ok=True)",
        "p.write_text(os.environ.get('MERLIN_FENCING_TOKEN', '-'))",
        f"sys.exit({exit_code:d})",
    ]
    code = "\n".join(lines)
    step = {"id": "hold", "argv": [PY, "-c", code], "resource": resource}
    bundle = ExecutionBundle.model_validate(
        {"target": name, "target_class": "silicon_board", "resource": resource, "steps": [step]}
    )
    write_bundle(directory, bundle)
    return directory


def wait_for(client, run_id: str, statuses: set[RunStatus], timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    record = client.call("run", run_id)
    while record.status not in statuses and time.monotonic() < deadline:
        time.sleep(0.2)
        record = client.call("run", run_id)
    assert record.status in statuses, f"{run_id} is {record.status}: {record.message}"
    return record


def finished(client, run_id: str, timeout: float = 120.0):
    return wait_for(client, run_id, {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.STOPPED}, timeout)


def span(record) -> tuple[float, float]:
    (step,) = record.steps
    return step.started_at, step.ended_at


def test_bundles_on_one_key_run_in_turn_and_another_key_runs_alongside(shared_broker, tmp_path):
    client = shared_broker.client
    # a (on firesim_u250) and c (on the board) wait for each other: they can only both succeed
    # if c's key let it start while a held firesim_u250 (no timing involved).
    started_a, started_c = tmp_path / "a.started", tmp_path / "c.started"
    meet_a, meet_c = (started_a, (started_c,)), (started_c, (started_a,))
    a = client.call("submit", str(target(tmp_path, "a", "firesim_u250", 0.5, meet=meet_a)), holder="alice")
    b = client.call("submit", str(target(tmp_path, "b", "firesim_u250", 0.5)), holder="bob")
    c = client.call("submit", str(target(tmp_path, "c", "spacemit_x60_board_01", 0.5, meet=meet_c)), holder="carol")
    a, b, c = (finished(client, run.run_id, timeout=240.0) for run in (a, b, c))
    assert {a.status, b.status, c.status} == {RunStatus.SUCCEEDED}, [
        (r.message, client.call("logs", r.run_id)[-2000:]) for r in (a, b, c) if r.status is not RunStatus.SUCCEEDED
    ]
    (a0, a1), (b0, b1), (c0, c1) = span(a), span(b), span(c)
    assert a1 <= b0 or b1 <= a0, "two runs held firesim_u250 at once"
    overlaps = lambda x0, x1, y0, y1: x0 < y1 and y0 < x1  # noqa: E731
    assert overlaps(c0, c1, a0, a1) or overlaps(c0, c1, b0, b1), "the other key's run did not run alongside"
    assert b.fencing_token != a.fencing_token
    assert (Path(a.workdir) / "artifacts/out.txt").read_text() == str(a.fencing_token)
    statuses = {status.key: status for status in client.resources()}
    assert statuses["firesim_u250"].state is ResourceState.FREE and statuses["spacemit_x60_board_01"].holder is None
    artifacts = json.loads((shared_broker.state.runs_dir / a.run_id / "artifacts.json").read_text())["artifacts"]
    assert artifacts[0]["path"] == "out.txt" and len(artifacts[0]["sha256"]) == 64
    request = json.loads((shared_broker.state.runs_dir / a.run_id / "run_request.json").read_text())
    assert request["holder"] == "alice" and request["target_dir"] == a.workdir
    assert "--resume" in a.command and a.command.startswith(PY)


def test_cancel_a_queued_run_and_a_running_one(shared_broker, tmp_path):
    client = shared_broker.client
    long = client.call("submit", str(target(tmp_path, "long", "firesim_u250", 60.0)), holder="alice")
    queued = client.call("submit", str(target(tmp_path, "queued", "firesim_u250", 1.0)), holder="bob")
    after = client.call("submit", str(target(tmp_path, "after", "firesim_u250", 1.0)), holder="carol")
    wait_for(client, long.run_id, {RunStatus.RUNNING})
    assert [entry.holder for entry in client.resources()[0].queue] == ["bob", "carol"]

    stopped = client.call("cancel", queued.run_id)
    assert stopped.status is RunStatus.STOPPED
    assert [entry.holder for entry in client.resources()[0].queue] == ["carol"]

    until(lambda: _step_started(Path(long.workdir)), "the long run's step to start")
    cancelled = client.call("cancel", long.run_id)
    assert cancelled.status is RunStatus.STOPPED
    assert finished(client, after.run_id).status is RunStatus.SUCCEEDED
    assert client.call("cancel", long.run_id).status is RunStatus.STOPPED  # idempotent
    assert not (Path(long.workdir) / "artifacts/out.txt").exists()  # stopped before its step finished
    state = load_state(Path(long.workdir))  # the target dir says how it ended, never "running"
    assert state.status in (BundleStatus.CANCELLED, BundleStatus.FAILED), state.status
    assert all(step.status is not StepStatus.RUNNING for step in state.steps)


def test_a_failing_job_fails_the_run_with_its_exit_code_and_frees_the_key(shared_broker, tmp_path):
    client = shared_broker.client
    run = client.call("submit", str(target(tmp_path, "bad", "spacemit_x60_board_01", 0.2, exit_code=3)), holder="ci")
    record = finished(client, run.run_id)
    assert record.status is RunStatus.FAILED and record.exit_code == 21  # the executor's "a step failed"
    assert record.steps[0].exit_code == 3 and "21" in record.message
    board = next(s for s in client.resources() if s.key == "spacemit_x60_board_01")
    assert board.state is ResourceState.FREE


def test_killing_the_coordinator_mid_run_loses_nothing(broker_env, tmp_path):
    client = broker_env.client
    run = client.call("submit", str(target(tmp_path, "survivor", "radiance_sim_lane_a", 6.0)), holder="alice")
    wait_for(client, run.run_id, {RunStatus.RUNNING})
    os.kill(broker_env.actor_pid("broker"), signal.SIGKILL)
    record = finished(client, run.run_id)  # the shim waits for the restarted coordinator
    assert record.status is RunStatus.SUCCEEDED and record.ended_at and record.steps and record.artifacts == 1
    lane = next(s for s in client.resources() if s.key == "radiance_sim_lane_a")
    assert lane.state is ResourceState.FREE
    events = [json.loads(line) for line in broker_env.state.events_path.read_text().splitlines()]
    assert any(e["event"] == "run.reattached" and e["run_id"] == run.run_id for e in events)


def test_revoking_a_running_runs_lease_stops_its_job_at_once(shared_broker, tmp_path):
    client = shared_broker.client
    run = client.call("submit", str(target(tmp_path, "victim", "firesim_u250", 60.0)), holder="alice")
    wait_for(client, run.run_id, {RunStatus.RUNNING})
    until(lambda: _step_started(Path(run.workdir)), "the hardware step to start")
    revoked_at = time.monotonic()
    client.revoke("firesim_u250", "the board is needed for a demo", by="bob")
    record = finished(client, run.run_id)
    stopped_after = time.monotonic() - revoked_at
    print(f"revoke -> the run's record ended {record.status.value}: {stopped_after:.2f} s")
    assert record.status is RunStatus.STOPPED and record.end is RunEnd.LEASE_LOST, record.message
    assert record.message.startswith("lease lost: revoked by bob"), record.message
    assert not (Path(run.workdir) / "artifacts/out.txt").exists()  # the step never finished its work
    state = load_state(Path(run.workdir))
    assert state.status is not BundleStatus.RUNNING and state.status is not BundleStatus.SUCCEEDED
    assert "lease" in state.message


def test_a_succeeded_target_dir_runs_again_only_with_restart(shared_broker, tmp_path):
    client = shared_broker.client
    directory = target(tmp_path, "again", "radiance_sim_lane_a", 0.1)
    first = finished(client, client.call("submit", str(directory), holder="ci").run_id)
    assert first.status is RunStatus.SUCCEEDED
    with pytest.raises(InvalidRequest, match="--restart"):
        client.call("submit", str(directory), holder="ci")
    again = finished(client, client.call("submit", str(directory), holder="ci", restart=True).run_id)
    assert again.status is RunStatus.SUCCEEDED and again.run_id != first.run_id
    assert again.steps[0].started_at > first.steps[0].ended_at  # the step ran again, from the start
    assert again.fencing_token == first.fencing_token + 1


def test_the_local_engine_takes_the_lease_itself_and_waits_its_turn(shared_broker, tmp_path):
    client = shared_broker.client
    alice = client.reserve("spacemit_x60_board_01", "alice")
    directory = target(tmp_path, "local", "spacemit_x60_board_01", 0.1)
    proc = subprocess.Popen(
        [PY, "-m", "broker.cli", "targetgen", "execute", "--engine", "local", "--from-dir", str(directory),
         "--holder", "ci-local"],
        env=shared_broker.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    board = lambda: next(s for s in client.resources() if s.key == "spacemit_x60_board_01")  # noqa: E731
    until(lambda: [entry.holder for entry in board().queue] == ["ci-local"], "the local engine to queue")
    assert not (directory / "artifacts/out.txt").exists()  # no hardware step while alice holds it
    client.release(alice.lease_id)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "bundle local: succeeded" in out
    assert board().holder is None  # released at the end
    history = [json.loads(line) for line in shared_broker.state.events_path.read_text().splitlines()]
    granted = [e for e in history if e["event"] == "lease.granted" and e.get("holder") == "ci-local"]
    assert len(granted) == 1 and granted[0]["fencing_token"] == alice.fencing_token + 1


def _step_started(directory: Path) -> bool:
    state = load_state(directory)
    return state is not None and any(step.status is StepStatus.RUNNING for step in state.steps)


def test_bad_submissions_change_nothing(shared_broker, tmp_path):
    client = shared_broker.client
    runs_before = sorted(shared_broker.state.runs_dir.iterdir())
    with pytest.raises(InvalidRequest, match="does not exist"):
        client.call("submit", str(tmp_path / "missing"), holder="alice")
    with pytest.raises(UnknownResource):
        client.call("submit", str(target(tmp_path, "elsewhere", "not_in_catalog", 0.1)), holder="alice")
    with pytest.raises(InvalidRequest, match="absolute"):
        client.call("submit", "relative/dir", holder="alice")
    with pytest.raises(InvalidRequest, match="run id"):
        client.call("run", "../../etc")
    assert sorted(shared_broker.state.runs_dir.iterdir()) == runs_before  # no run record made


def test_run_metrics_and_events(broker_env, tmp_path):
    from tests.integration.test_observability import eventually, value

    client = broker_env.client
    run = client.call("submit", str(target(tmp_path, "m", "firesim_u250", 0.2)), holder="alice")
    finished(client, run.run_id)
    url = broker_env.metrics_url()
    eventually(url, "merlin_broker_runs_total", 1.0, status="succeeded")
    assert value(url, "merlin_broker_runs_active") == 0.0
    assert value(url, "merlin_broker_run_duration_seconds_count") == 1.0
    names = [json.loads(line)["event"] for line in broker_env.state.events_path.read_text().splitlines()]
    for event in ("run.queued", "run.started", "run.finished"):
        assert event in names
