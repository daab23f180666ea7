"""Execution bundles from plans (pure): bind the interpreter, order the steps, name the resource."""

from __future__ import annotations

from pathlib import Path

from broker.errors import InvalidRequest
from targetgen.bundle import ExecutionBundle, parse_bundle, topological_order
from targetgen.graph import check_steps
from targetgen.plan import PYTHON_PLACEHOLDER, SupportPlan
from targetgen.spec import ARTIFACT_DIR, TargetSpec

__all__ = ["execution_bundle"]


def execution_bundle(spec: TargetSpec, plan: SupportPlan, *, python: str) -> ExecutionBundle:
    """The ordered steps an executor runs for a spec's plan.

    Args:
        spec: the spec the plan was made from (its file hash goes into the bundle).
        plan: the plan, fresh from ``support_plan`` or read back from ``plan.json``.
        python: the absolute path of the interpreter that has this project
            installed (callers pass ``sys.executable``); it replaces ``{python}``
            in argv and env values, because a Ray job or a fresh shell may not find ``python`` on PATH.

    Returns:
        The bundle: steps in an order that respects every ``needs``, ``resource``
        set on the steps that hold hardware and on the bundle (or, for a pool, the
        pool's ``resource_labels``/``count`` on the bundle and ``{resource}`` on its steps).

    Raises:
        InvalidRequest: ``python`` is not absolute, the plan belongs to another
            spec (or an older version of it), or its steps have a duplicate id,
            an unknown need or a cycle.
    """
    where = spec.source or spec.target
    if not Path(python).is_absolute():
        raise InvalidRequest(f"python={python!r}: give the interpreter's absolute path (sys.executable)", "python")
    if plan.target != spec.target:
        raise InvalidRequest(f"{where}: the plan is for target {plan.target!r}, the spec for {spec.target!r}", "plan")
    if plan.spec_sha256 and spec.spec_sha256 and plan.spec_sha256 != spec.spec_sha256:
        raise InvalidRequest(f"{where}: the plan was made from another version of the spec: plan it again", "plan")
    steps = [
        step.model_copy(
            update={
                "argv": tuple(arg.replace(PYTHON_PLACEHOLDER, python) for arg in step.argv),
                "env": {name: value.replace(PYTHON_PLACEHOLDER, python) for name, value in step.env.items()},
            }
        )
        for step in plan.steps()
    ]
    # plan.json may have been edited by hand since support_plan checked it.
    check_steps(steps, where)
    ordered = topological_order(steps)
    holds = any(step.resource is not None for step in ordered)
    return parse_bundle(
        {
            "target": plan.target,
            "target_class": plan.target_class.value,
            "workflow": plan.workflow,
            "resource": plan.resource if holds else None,
            "resource_labels": plan.resource_labels if holds else None,
            "resource_keys": plan.resource_keys if holds else (),
            "count": plan.count if holds and (plan.resource_labels is not None or plan.resource_keys) else 1,
            "candidates": plan.candidates if holds else (),
            "spec_sha256": spec.spec_sha256,
            "artifact_dir": ARTIFACT_DIR,
            "job": spec.job,
            "steps": ordered,
        },
        where,
    )
