"""``merlin targetgen plan|bundle|execute|approve|status``: specs to bundles, and running them."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path
from typing import Any

from broker.cli.common import Context, emit_json, json_option, note, table, when
from broker.errors import BrokerUnavailable, InvalidRequest
from broker.holders import default_holder

__all__ = ["register"]


def register(top: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    targetgen = top.add_parser("targetgen", help="capability specs -> plans -> bundles, and running them")
    verbs = targetgen.add_subparsers(dest="verb", required=True)

    for verb, text in (
        ("plan", "write and print the support plan (the verification ladder)"),
        ("bundle", "write and print the execution bundle (plans too)"),
    ):
        parser = verbs.add_parser(verb, parents=[common], help=text)
        _target_options(parser)
        json_option(parser)
        parser.set_defaults(run=_plan if verb == "plan" else _bundle)

    execute = verbs.add_parser(
        "execute",
        parents=[common],
        help="run a target dir's bundle: --engine local (here) or ray (queued on the broker)",
        description="local: runs in this process, stops at operator gates (exit 20), fails on a failed step "
        "(exit 21), --resume continues. ray: queues the bundle on the broker; it runs as a Ray job once its "
        "resource is leased.",
    )
    execute.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="local: here, now; ray: queued on the broker"
    )
    _target_options(execute)
    execute.add_argument("--resume", action="store_true", help="continue after a gate, a crash or a fixed failure")
    execute.add_argument("--restart", action="store_true", help="forget the previous run and start over")
    execute.add_argument(
        "--no-broker",
        action="store_true",
        help="local engine on a machine with no broker: run hardware steps without taking their leases",
    )
    from broker.cli.jobs_cmds import add_submit_options

    add_submit_options(execute)
    execute.set_defaults(run=_execute)

    approve = verbs.add_parser("approve", parents=[common], help="approve (or skip) a gated step; recorded with who")
    approve.add_argument("target_dir", help="the target dir whose run waits at the gate")
    approve.add_argument("step", help="the gated step's id (`merlin targetgen status DIR` shows it)")
    approve.add_argument("--by", default=None, help="who approves (default: user@host)")
    approve.add_argument("--skip", action="store_true", help="skip the step instead of running it")
    approve.set_defaults(run=_approve)

    status = verbs.add_parser("status", parents=[common], help="where a target dir's run stands")
    status.add_argument("target_dir", help="a target dir (bundle.json, run_state.json)")
    json_option(status)
    status.set_defaults(run=_status)


def _target_options(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--from-dir", dest="from_dir", default=None, help="a target dir holding target.yaml")
    where.add_argument("--spec", default=None, help="a spec file; copied into --dir (default build/targets/<name>)")
    parser.add_argument("--dir", default=None, help="with --spec: the target dir to create")
    parser.add_argument(
        "--catalog", default=None, help="resource catalog (default: the broker's, else configs/resources.yaml)"
    )


def _catalog(ctx: Context) -> Any:
    from broker.core.catalog import Catalog, load_catalog
    from broker.disk.store import read_json

    if ctx.args.catalog:
        return load_catalog(ctx.args.catalog)
    if ctx.state.catalog_path.exists():  # what the running broker uses
        return Catalog.model_validate(read_json(ctx.state.catalog_path))
    return load_catalog("configs/resources.yaml")


def _target_dir(ctx: Context) -> Path:
    """The target dir named by --from-dir, or prepared from --spec."""
    from targetgen import load_spec, prepare_target_dir

    if ctx.args.from_dir:
        target_dir = Path(ctx.args.from_dir)
        if not target_dir.is_dir():
            raise InvalidRequest(f"target dir {target_dir} does not exist", "target_dir")
        return target_dir.resolve()
    spec = load_spec(Path(ctx.args.spec))  # validate before creating anything
    target_dir = Path(ctx.args.dir or Path("build") / "targets" / spec.target)
    prepare_target_dir(Path(ctx.args.spec), target_dir)
    return target_dir.resolve()


def _make_plan(ctx: Context, target_dir: Path) -> tuple[Any, Any]:
    from targetgen import load_target_spec, support_plan

    spec = load_target_spec(target_dir)
    return spec, support_plan(spec, _catalog(ctx))


def _plan(ctx: Context) -> int:
    from targetgen import write_plan

    target_dir = _target_dir(ctx)
    _, plan = _make_plan(ctx, target_dir)
    path = write_plan(target_dir, plan)
    if ctx.args.json:
        emit_json(plan)
        return 0
    print(f"{plan.target} ({plan.target_class.value}) on {plan.where}: {len(plan.rungs)} rungs -> {path}")
    rows = [
        [rung.name, rung.resource or "-", ", ".join(step.id for step in rung.steps), "; ".join(rung.gates) or "-"]
        for rung in plan.rungs
    ]
    print(table(["rung", "resource", "steps", "operator gates"], rows))
    return 0


def ensure_bundle(ctx: Context, target_dir: Path) -> Any:
    """The target dir's bundle: rebuilt from target.yaml when missing or made from another spec."""
    import hashlib

    from targetgen import TARGET_FILE, execution_bundle, load_bundle, write_bundle, write_plan

    spec_path = target_dir / TARGET_FILE
    if (target_dir / "bundle.json").exists():
        bundle = load_bundle(target_dir)
        if not spec_path.exists() or hashlib.sha256(spec_path.read_bytes()).hexdigest() == bundle.spec_sha256:
            return bundle
    spec, plan = _make_plan(ctx, target_dir)
    bundle = execution_bundle(spec, plan, python=sys.executable)
    write_plan(target_dir, plan)
    write_bundle(target_dir, bundle)
    return bundle


def _bundle(ctx: Context) -> int:
    from targetgen import execution_bundle, write_bundle, write_plan

    target_dir = _target_dir(ctx)
    spec, plan = _make_plan(ctx, target_dir)
    bundle = execution_bundle(spec, plan, python=sys.executable)
    write_plan(target_dir, plan)
    path = write_bundle(target_dir, bundle)
    if ctx.args.json:
        emit_json(bundle)
        return 0
    print(f"{bundle.target}: {len(bundle.steps)} steps on {_where(bundle)} -> {path}")
    rows = [
        [step.id, step.rung, step.resource or "-", f"{step.timeout_s:g}s", step.gate.prompt if step.gate else "-"]
        for step in bundle.steps
    ]
    print(table(["step", "rung", "resource", "timeout", "gate"], rows))
    return 0


def _where(bundle: Any) -> str:
    """A bundle's hardware, for people: its key, or ``any of: k1, k2 (labels)`` for a pool."""
    from targetgen.plan import pool_text

    if bundle.pool:
        return pool_text(bundle.resource_labels, bundle.count, bundle.candidates or bundle.resource_keys)
    return bundle.resource or "no hardware"


def _execute(ctx: Context) -> int:
    args = ctx.args
    if args.engine == "ray":
        if args.resume:
            raise InvalidRequest("--resume is for --engine local (a Ray run always resumes)", "engine")
        from broker.cli.jobs_cmds import finish_submission
        from executor.engines import submit_ray

        target_dir = _target_dir(ctx)
        ensure_bundle(ctx, target_dir)
        handle = submit_ray(
            target_dir,
            holder=default_holder() if args.holder is None else args.holder,
            priority=args.priority,
            request_id=args.request_id,
            source=f"merlin targetgen execute --engine ray ({default_holder()})",
            restart=args.restart,
            state_dir=str(ctx.state.root),
            namespace=ctx.namespace,
            address=ctx.address,
            client=ctx.http_client(),  # over the HTTP API when the state dir names one, as `jobs submit`
        )
        return finish_submission(ctx, handle)
    return _execute_local(ctx)


def _execute_local(ctx: Context) -> int:
    from executor.local import BrokerFence, FenceCheck, LocalEngine, exit_code_for, held_leases, load_state
    from targetgen.bundle import POOL_RESOURCE

    target_dir = _target_dir(ctx)
    bundle = ensure_bundle(ctx, target_dir)
    env_fence = BrokerFence.from_env()  # a Ray-engine job: the broker leased the key(s) for this run
    fence: FenceCheck | None = env_fence
    bound: tuple[str, ...] = env_fence.keys if env_fence is not None and bundle.pool else ()
    resources = sorted({step.resource for step in bundle.steps if step.resource not in (None, POOL_RESOURCE)})
    with contextlib.ExitStack() as leases:
        if fence is None and (resources or bundle.pool) and not ctx.args.no_broker:
            # Nobody leased the hardware for us: take the leases ourselves, for the whole run.
            holder = default_holder() if ctx.args.holder is None else ctx.args.holder
            try:
                client = ctx.ray_client()  # held leases need the shim's lease() (heartbeats); HTTP has none
            except BrokerUnavailable as exc:
                wanted = ", ".join(resources or bundle.resource_keys) or f"a key of {bundle.resource_labels}"
                raise BrokerUnavailable(
                    f"{wanted} must be leased before its steps run, and {exc.message}",
                    "start the broker, or pass --no-broker on a machine that has none",
                ) from None
            pool = None
            if bundle.pool:  # a resumed run asks for the keys it began on
                previous = None if ctx.args.restart else load_state(target_dir)
                began = previous.resources if previous is not None else ()
                pool = (bundle.resource_labels or "", bundle.count, began or bundle.resource_keys)
            held = leases.enter_context(held_leases(client, resources, holder, report=note, pool=pool))
            fence = held
            bound = held.keys if bundle.pool else ()
        elif fence is None and bundle.pool:
            # --no-broker: nothing picks a member, so the pool's first members (at plan time) stand in.
            bound = bundle.candidates[: bundle.count]
            if bundle.resource_labels is not None:
                note(f"--no-broker: {{resource}} is {', '.join(bound)} (the first of {bundle.resource_labels})")
        engine = LocalEngine(target_dir, fence=fence, report=lambda line: print(line, flush=True), bound=bound)
        # Ray stops a job with SIGTERM: stop the running step's process group, record "cancelled".
        signal.signal(signal.SIGTERM, lambda *_: engine.stop.set())
        state = engine.run(resume=ctx.args.resume, restart=ctx.args.restart)
    if ctx.args.json:
        emit_json(state)
    return exit_code_for(state)


def _approve(ctx: Context) -> int:
    from executor.local import approve_step

    state = approve_step(Path(ctx.args.target_dir), ctx.args.step, ctx.args.by or default_holder(), skip=ctx.args.skip)
    decision = state.step(ctx.args.step).approval
    assert decision is not None  # approve_step has just recorded it
    verb = "skipped" if decision.decision == "skip" else "approved"
    print(f"{ctx.args.step}: {verb} by {decision.by} at {when(decision.at, relative=False)}; run with --resume")
    return 0


def _status(ctx: Context) -> int:
    from executor.local import load_state

    target_dir = Path(ctx.args.target_dir)
    if not target_dir.is_dir():
        raise InvalidRequest(f"target dir {target_dir} does not exist", "target_dir")
    state = load_state(target_dir)
    if state is None:
        raise InvalidRequest(f"{target_dir} has not been run yet", "target_dir")
    if ctx.args.json:
        emit_json(state)
        return 0
    print(f"{state.target}: {state.status.value}" + (f" - {state.message}" if state.message else ""))
    rows = [
        [s.id, s.status.value, str(s.attempts), when(s.started_at, relative=False), str(s.exit_code if s.exit_code is not None else "-"),
         (s.approval.by if s.approval else "-")]
        for s in state.steps
    ]  # fmt: skip
    print(table(["step", "status", "attempts", "started", "exit", "approved by"], rows))
    return 0
