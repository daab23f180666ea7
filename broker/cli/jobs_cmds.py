"""``merlin ray jobs submit|status|logs|cancel|list`` and ``merlin ray artifacts list|fetch``.

Reads (status, list, artifacts) come from the run records in the state dir,
so they work without a cluster — including for runs that were ``blocked``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from broker.cli.common import Context, emit_json, json_option, note, table, when
from broker.core.runs import Artifact, RunRecord, check_run_id, safe_artifact_path, scan_artifacts
from broker.disk.run_records import RunRecords
from broker.errors import InvalidRequest
from broker.holders import default_holder

__all__ = ["register_jobs", "register_artifacts", "print_run", "RUN_ID_HELP", "TARGET_DIR_HELP"]

RUN_ID_HELP = "a run id, as `submit` printed it (`merlin ray jobs list` shows them)"
TARGET_DIR_HELP = "a target dir holding bundle.json (`merlin targetgen bundle --dir DIR` writes one)"


def register_jobs(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", help="bundles run on the hardware in turn").add_subparsers(dest="verb", required=True)

    submit = jobs.add_parser(
        "submit",
        parents=[common],
        help="queue a target dir's bundle; it runs as a Ray job once its resource is leased",
    )
    submit.add_argument("target_dir", help=TARGET_DIR_HELP)
    add_submit_options(submit)
    submit.set_defaults(run=_submit)

    status = jobs.add_parser("status", parents=[common], help="one run's record")
    status.add_argument("run_id", help=RUN_ID_HELP)
    json_option(status)
    status.set_defaults(run=_status)

    listing = jobs.add_parser("list", parents=[common], help="all runs (newest last)")
    listing.add_argument("--active", action="store_true", help="only queued or running runs")
    json_option(listing)
    listing.set_defaults(run=_list)

    logs = jobs.add_parser("logs", parents=[common], help="a run's Ray job output")
    logs.add_argument("run_id", help=RUN_ID_HELP)
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the run ends")
    logs.set_defaults(run=_logs)

    cancel = jobs.add_parser("cancel", parents=[common], help="leave the queue, or stop the running job")
    cancel.add_argument("run_id", help=RUN_ID_HELP)
    json_option(cancel)
    cancel.set_defaults(run=_cancel)


def add_submit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--holder", default=None, help="who the run's lease is for (default: user@host)")
    parser.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    parser.add_argument("--request-id", default=None, help="idempotency key: the same id returns the same run")
    parser.add_argument(
        "--wait", action="store_true", help="wait for the run to end; exit with the run's code (see --help)"
    )
    if "--restart" not in parser._option_string_actions:  # `targetgen execute` has its own
        parser.add_argument(
            "--restart", action="store_true", help="run a target dir that already ran to success again, from its start"
        )
    json_option(parser)


def register_artifacts(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    artifacts = sub.add_parser("artifacts", help="files a run left").add_subparsers(dest="verb", required=True)
    listing = artifacts.add_parser("list", parents=[common], help="a run's artifacts with size and sha256")
    listing.add_argument("run_id", help=RUN_ID_HELP)
    json_option(listing)
    listing.set_defaults(run=_artifacts_list)
    fetch = artifacts.add_parser("fetch", parents=[common], help="copy a run's artifacts (or one of them)")
    fetch.add_argument("run_id", help=RUN_ID_HELP)
    fetch.add_argument("path", nargs="?", default=None, help="one artifact, relative to the run's artifact dir")
    fetch.add_argument("--to", default=None, help="destination dir (default: ./<run_id>)")
    fetch.set_defaults(run=_artifacts_fetch)


# ---------------------------------------------------------------------- records on disk


def load_record(ctx: Context, run_id: str) -> RunRecord:
    return RunRecords(ctx.state).load(check_run_id(run_id))


def print_run(record: RunRecord) -> None:
    print(f"{record.run_id}  {record.status.value}  {record.target} on {record.where}  holder {record.holder}")
    if record.message:
        print(f"  {record.message}")
    print(f"  queued {when(record.created_at)}; started {when(record.started_at)}; ended {when(record.ended_at)}")
    if record.fencing_token is not None:
        print(f"  lease {record.lease_ref} token {record.fencing_token}; Ray job {record.submission_id or '-'}")
    print(f"  workdir {record.workdir}")
    for step in record.steps:
        span = f"{when(step.started_at, relative=False)} .. {when(step.ended_at, relative=False)}"
        print(f"    {step.id:<18} {step.status:<10} {span}")


# ---------------------------------------------------------------------- commands


def _submit(ctx: Context) -> int:
    from executor.engines import submit_ray

    args = ctx.args
    handle = submit_ray(
        Path(args.target_dir),
        holder=default_holder() if args.holder is None else args.holder,
        priority=args.priority,
        request_id=args.request_id,
        source=f"merlin ray jobs submit ({default_holder()})",
        restart=args.restart,
        state_dir=str(ctx.state.root),
        namespace=ctx.namespace,
        address=ctx.address,
        client=ctx.http_client(),  # over the HTTP API when the state dir names one: no Ray import
    )
    return finish_submission(ctx, handle)


def finish_submission(ctx: Context, handle: Any) -> int:
    """Print (and with --wait, follow) a submitted run; the exit code says how it went."""
    from broker.core.runs import RunStatus
    from broker.errors import RUN_EXIT_CODES, RunEnd

    record = handle.record
    if record.status is RunStatus.BLOCKED:
        if ctx.args.json:
            emit_json(record.public())
        print(f"merlin: run {record.run_id} blocked: {record.message}", file=sys.stderr)
        return RUN_EXIT_CODES[RunEnd.NOT_SUBMITTED]
    if ctx.args.wait:
        last = None
        while not handle.record.finished:
            handle.status()
            if handle.record.status != last:
                last = handle.record.status
                note(f"{record.run_id}: {last.value} ({handle.record.message})")
            time.sleep(0.5)
        record = handle.record
    if ctx.args.json:
        emit_json(record.public())
    else:
        print_run(record)
    if ctx.args.wait:
        return RUN_EXIT_CODES[record.end or RunEnd.STEP_FAILED]  # one table for both engines
    return 0


def _status(ctx: Context) -> int:
    record = load_record(ctx, ctx.args.run_id)
    if ctx.args.json:
        emit_json(record.public())
    else:
        print_run(record)
    return 0


def _list(ctx: Context) -> int:
    records, _unreadable = RunRecords(ctx.state).load_all()
    if ctx.args.active:
        records = [record for record in records if not record.finished]
    if ctx.args.json:
        emit_json([record.public() for record in records])
        return 0
    rows = [[r.run_id, r.status.value, r.target, r.where, r.holder, when(r.created_at)] for r in records]
    print(table(["run", "status", "target", "resource", "holder", "queued"], rows))
    return 0


def _logs(ctx: Context) -> int:
    run_id = check_run_id(ctx.args.run_id)
    load_record(ctx, run_id)  # unknown ids fail without a cluster
    client = ctx.client()
    shown = 0
    while True:
        text = client.call("logs", run_id)
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
        if not ctx.args.follow or client.call("run", run_id).finished:
            if ctx.args.follow:  # the last lines written before the end
                sys.stdout.write(client.call("logs", run_id)[shown:])
            return 0
        time.sleep(1.0)


def _cancel(ctx: Context) -> int:
    record = ctx.client().call("cancel", check_run_id(ctx.args.run_id))
    if ctx.args.json:
        emit_json(record)
    else:
        print_run(record)
    return 0


def _artifacts_of(ctx: Context, record: RunRecord) -> list[Artifact]:
    recorded = RunRecords(ctx.state).read_artifacts(record.run_id)
    if recorded is not None:
        return recorded
    return scan_artifacts(Path(record.artifact_dir))  # still running: what is there now


def _artifacts_list(ctx: Context) -> int:
    record = load_record(ctx, ctx.args.run_id)
    artifacts = _artifacts_of(ctx, record)
    if ctx.args.json:
        emit_json({"run_id": record.run_id, "artifact_dir": record.artifact_dir, "artifacts": artifacts})
        return 0
    print(f"{record.run_id}: {len(artifacts)} artifacts in {record.artifact_dir}")
    print(table(["path", "size", "sha256"], [[a.path, str(a.size), a.sha256[:16]] for a in artifacts]))
    return 0


def _artifacts_fetch(ctx: Context) -> int:
    record = load_record(ctx, ctx.args.run_id)
    source_dir = Path(record.artifact_dir)
    destination = Path(ctx.args.to or record.run_id).resolve()
    wanted = [ctx.args.path] if ctx.args.path else [artifact.path for artifact in _artifacts_of(ctx, record)]
    plan = []
    for relative in wanted:
        source = safe_artifact_path(source_dir, relative)  # rejects .., absolute paths, escaping symlinks
        if not source.is_file():
            raise InvalidRequest(f"run {record.run_id} has no artifact {relative!r}", "path")
        target = (destination / relative).resolve()
        if not target.is_relative_to(destination):
            raise InvalidRequest(f"invalid artifact path {relative!r}: it leads outside {destination}", "path")
        plan.append((source, target))
    for source, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target, follow_symlinks=True)
    print(f"fetched {len(plan)} artifacts of {record.run_id} to {destination}")
    return 0
