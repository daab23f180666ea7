"""The run lifecycle's table and the one exit-code table both engines share."""

from __future__ import annotations

import pytest

from broker.core.runs import (
    END_STATUS,
    RUN_TRANSITIONS,
    TERMINAL_RUN_STATUSES,
    RunRecord,
    RunStatus,
    advance,
    end_run,
    run_status_from_job,
)
from broker.errors import RUN_EXIT_CODES, InvalidRequest, RunEnd
from executor.local import exit_code_for, run_end_of
from executor.state import BundleStatus, RunState


def record(status: RunStatus = RunStatus.PENDING) -> RunRecord:
    return RunRecord(run_id="run-20260101-000000-00000000", target="t", workflow="w", source="s", holder="h",
                     request_id="r", resource=None, command="c", workdir="/w", artifact_dir="/w/a",
                     status=status, created_at=1.0)  # fmt: skip


def test_every_end_has_a_distinct_exit_code_and_a_status():
    assert set(RUN_EXIT_CODES) == set(RunEnd) == set(END_STATUS)
    assert len(set(RUN_EXIT_CODES.values())) == len(RunEnd)


@pytest.mark.parametrize(
    "status", [BundleStatus.SUCCEEDED, BundleStatus.AWAITING_GATE, BundleStatus.FAILED, BundleStatus.CANCELLED]
)
def test_a_ray_job_ends_the_way_the_local_engine_did(status):
    """The local engine's exit code, read back by the Ray engine, names the same end (one table)."""
    end = run_end_of(RunState(target="t", bundle_sha256="x", status=status))
    code = exit_code_for(RunState(target="t", bundle_sha256="x", status=status))
    job_status = "SUCCEEDED" if code == 0 else "FAILED"
    _, seen, _ = run_status_from_job(job_status, code)
    assert seen is end and RUN_EXIT_CODES[end] == code


def test_the_stale_token_exit_is_the_error_trees():
    _, end, message = run_status_from_job("FAILED", 8)
    assert end is RunEnd.STALE_TOKEN and "stale" in message


def test_ended_runs_never_move_again():
    for status in TERMINAL_RUN_STATUSES:
        assert RUN_TRANSITIONS[status] == frozenset()
        for target in RunStatus:
            if target is not status:
                with pytest.raises(InvalidRequest, match="cannot go from"):
                    advance(record(status), target, 2.0)


def test_end_run_sets_status_end_and_time():
    ended = end_run(record(RunStatus.RUNNING), RunEnd.LEASE_LOST, "lease lost: revoked by bob", 5.0)
    assert (ended.status, ended.end, ended.ended_at) == (RunStatus.STOPPED, RunEnd.LEASE_LOST, 5.0)
    assert advance(record(), RunStatus.RUNNING, 3.0).started_at == 3.0


def test_the_public_record_hides_capabilities():
    secret = record().model_copy(update={"lease_id": "k." + "a" * 32, "lease_request_id": "b" * 32})
    shown = secret.public()
    assert shown.lease_id is None and shown.lease_request_id is None and shown.request_id == ""
