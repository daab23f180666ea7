"""The local engine on real files and real subprocesses: order, gates, resume, failure, timeout, fencing."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from broker.errors import InvalidRequest, StaleFencingToken
from executor.handles import BlockedJobHandle, JobFailed, JobStatus, LocalJobHandle, wait_all
from executor.local import EXIT_AWAITING_GATE, LocalEngine, approve_step, exit_code_for, load_state
from executor.state import STEP_TRANSITIONS, BundleStatus, StepStatus, move, new_state
from targetgen.bundle import ExecutionBundle, write_bundle
from tests.waiting import until

PY = sys.executable


def step(step_id: str, code: str, **fields):
    return {"id": step_id, "argv": [PY, "-c", code], **fields}


def make_target(tmp_path: Path, steps: list[dict], resource: str | None = None) -> Path:
    target = tmp_path / "target"
    target.mkdir(parents=True, exist_ok=True)
    bundle = ExecutionBundle.model_validate(
        {"target": "demo", "target_class": "rtl_simulation", "resource": resource, "steps": steps}
    )
    write_bundle(target, bundle)
    return target


WRITE = "import pathlib,sys; p=pathlib.Path('artifacts/{name}'); p.parent.mkdir(exist_ok=True); p.write_text('ok'); print('wrote', p)"


def test_steps_run_in_order_with_logs_state_and_artifacts(tmp_path):
    target = make_target(tmp_path, [
        step("build", WRITE.format(name="image.bin"), artifacts=["artifacts/image.bin"]),
        step("test", "print('tests passed')", needs=["build"]),
    ])  # fmt: skip
    lines: list[str] = []
    state = LocalEngine(target, report=lines.append).run()
    assert state.status is BundleStatus.SUCCEEDED and exit_code_for(state) == 0
    assert [s.status for s in state.steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
    first, second = state.steps
    assert first.ended_at <= second.started_at
    assert "tests passed" in (target / "logs" / "test.log").read_text()
    assert json.loads((target / "run_state.json").read_text())["status"] == "succeeded"
    assert any("build: succeeded" in line for line in lines)


def test_a_gate_stops_the_run_until_approved_and_records_who(tmp_path):
    target = make_target(tmp_path, [
        step("build", "print(1)"),
        step("flash", "print('flashing')", gate={"prompt": "is the board cabled?"}),
    ])  # fmt: skip
    state = LocalEngine(target).run()
    assert state.status is BundleStatus.AWAITING_GATE and exit_code_for(state) == EXIT_AWAITING_GATE
    assert state.step("flash").status is StepStatus.AWAITING_GATE
    assert f"merlin targetgen approve {target} flash" in state.message
    approve_step(target, "flash", "bob@lab")
    resumed = LocalEngine(target).run(resume=True)
    assert resumed.status is BundleStatus.SUCCEEDED
    flash = resumed.step("flash")
    assert flash.approval.by == "bob@lab" and flash.approval.at > 0
    assert resumed.step("build").attempts == 1  # not run again


def test_a_gate_can_be_approved_ahead_or_skipped(tmp_path):
    target = make_target(tmp_path, [
        step("flash", "print(1)", gate={"prompt": "ok?"}),
        step("boot", "print(2)", gate={"prompt": "power?"}),
    ])  # fmt: skip
    approve_step(target, "flash", "bob")
    approve_step(target, "boot", "bob", skip=True)
    state = LocalEngine(target).run()
    assert [s.status for s in state.steps] == [StepStatus.SUCCEEDED, StepStatus.SKIPPED]


def test_failure_then_fix_then_resume_skips_finished_steps(tmp_path):
    flag = tmp_path / "broken"
    flag.write_text("x")
    target = make_target(tmp_path, [
        step("build", "print(1)"),
        step("test", f"import os,sys; sys.exit(3 if os.path.exists({str(flag)!r}) else 0)"),
        step("report", "print(3)"),
    ])  # fmt: skip
    failed = LocalEngine(target).run()
    assert failed.status is BundleStatus.FAILED
    assert failed.step("test").exit_code == 3 and failed.step("report").status is StepStatus.PENDING
    with pytest.raises(InvalidRequest, match="--resume"):
        LocalEngine(target).run()
    flag.unlink()  # the fix
    fixed = LocalEngine(target).run(resume=True)
    assert fixed.status is BundleStatus.SUCCEEDED
    assert (fixed.step("build").attempts, fixed.step("test").attempts) == (1, 2)


def test_a_crash_mid_step_is_rerun_on_resume(tmp_path):
    target = make_target(tmp_path, [step("build", "print(1)"), step("test", "print(2)")])
    bundle_state = new_state(ExecutionBundle.model_validate_json((target / "bundle.json").read_text()), "x")
    from executor.local import _bundle_sha256, _save

    crashed = move(
        bundle_state.model_copy(update={"bundle_sha256": _bundle_sha256(target)}), "build", StepStatus.RUNNING, 1.0
    )
    _save(target, crashed.model_copy(update={"status": BundleStatus.RUNNING}))
    state = LocalEngine(target).run(resume=True)
    assert state.status is BundleStatus.SUCCEEDED and state.step("build").attempts == 1


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    child = "import time; time.sleep(60)"
    code = (
        f"import pathlib,subprocess,sys,time; p = subprocess.Popen([sys.executable,'-c',{child!r}]); "
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid)); time.sleep(60)"
    )
    target = make_target(tmp_path, [step("hang", code, timeout_s=1.0)])
    state = LocalEngine(target).run()
    assert state.status is BundleStatus.FAILED and "timed out" in state.step("hang").message
    child_pid = int(pid_file.read_text())
    until(lambda: not _alive(child_pid), "the step's child to be killed with its group", timeout_s=20)


def test_missing_declared_artifacts_fail_the_step(tmp_path):
    target = make_target(tmp_path, [step("build", "print(1)", artifacts=["artifacts/never.bin"])])
    state = LocalEngine(target).run()
    assert state.status is BundleStatus.FAILED and "never.bin" in state.step("build").message


def test_a_stale_fencing_token_refuses_the_hardware_step(tmp_path):
    target = make_target(tmp_path, [
        step("build", "print(1)"),
        step("flash", "open('flashed','w').write('x')", resource="firesim_u250"),
    ], resource="firesim_u250")  # fmt: skip

    def fence(step):
        raise StaleFencingToken("firesim_u250", 3, 4)

    with pytest.raises(StaleFencingToken):
        LocalEngine(target, fence=fence).run()
    state = load_state(target)
    assert state.status is BundleStatus.FAILED and "stale" in state.message
    assert state.step("flash").status is StepStatus.PENDING
    assert not (target / "flashed").exists()


def test_one_executor_per_target_dir(tmp_path):
    target = make_target(tmp_path, [step("slow", "import time; time.sleep(2)")])
    handle = LocalJobHandle(target)
    until(lambda: _step_running(target, "slow"), "the step to start")
    with pytest.raises(InvalidRequest, match="another executor"):
        LocalEngine(target).run()
    assert handle.wait(30) is JobStatus.SUCCEEDED


def test_terminate_cancels_a_running_bundle(tmp_path):
    target = make_target(tmp_path, [step("slow", "import time; time.sleep(60)"), step("after", "print(1)")])
    handle = LocalJobHandle(target)
    until(lambda: _step_running(target, "slow"), "the step to start")
    handle.terminate()
    assert handle.status() is JobStatus.STOPPED
    assert load_state(target).status is BundleStatus.CANCELLED


def test_wait_all_fails_fast(tmp_path):
    slow = make_target(tmp_path / "a", [step("slow", "import time; time.sleep(30)")])
    bad = make_target(tmp_path / "b", [step("bad", "import sys; sys.exit(2)")])
    slow_handle, bad_handle = LocalJobHandle(slow), LocalJobHandle(bad)
    started = time.monotonic()
    with pytest.raises(JobFailed) as info:
        wait_all([slow_handle, bad_handle])
    assert time.monotonic() - started < 20 and info.value.job_id == bad_handle.job_id
    slow_handle.terminate()
    ok = make_target(tmp_path / "c", [step("ok", "print(1)")])
    assert wait_all([LocalJobHandle(ok)]) == [JobStatus.SUCCEEDED]


def test_blocked_handles_fail_wait_all_at_once():
    from broker.core.runs import RunRecord, RunStatus

    record = RunRecord(run_id="run-20260101-000000-00000000", target="t", workflow="w", source="s", holder="h",
                       request_id="r", resource=None, command="c", workdir="/w", artifact_dir="/w/a",
                       status=RunStatus.BLOCKED, message="run merlin ray cluster start-local", created_at=1.0)  # fmt: skip
    with pytest.raises(JobFailed, match="start-local"):
        wait_all([BlockedJobHandle(record)])
    assert wait_all([BlockedJobHandle(record)], raise_on_failure=False) == [JobStatus.BLOCKED]


def test_transition_table_guards_every_move(tmp_path):
    target = make_target(tmp_path, [step("a", "print(1)")])
    state = new_state(ExecutionBundle.model_validate_json((target / "bundle.json").read_text()), "x")
    with pytest.raises(InvalidRequest, match="pending to succeeded"):
        move(state, "a", StepStatus.SUCCEEDED, 1.0)
    assert StepStatus.SUCCEEDED not in STEP_TRANSITIONS[StepStatus.PENDING]


def test_bad_targets_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        LocalEngine(tmp_path / "nope").run()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidRequest, match="bundle.json"):
        LocalEngine(empty).run()
    assert os.listdir(empty) == []


def test_threads_do_not_leak(tmp_path):
    before = threading.active_count()
    target = make_target(tmp_path, [step("a", "print(1)")])
    LocalJobHandle(target).wait(30)
    until(lambda: threading.active_count() <= before, "the handle's thread to end", timeout_s=10)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _step_running(target, step_id: str) -> bool:
    state = load_state(target)
    return state is not None and state.step(step_id).status is StepStatus.RUNNING
