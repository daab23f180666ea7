"""TargetGen end to end: the public names, no Ray, and the shipped specs planned, bundled and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import targetgen
from broker.core.catalog import load_catalog
from targetgen import (
    POOL_RESOURCE,
    ExecutionBundle,
    TargetClass,
    bound_step,
    execution_bundle,
    load_target_spec,
    prepare_target_dir,
    support_plan,
    write_bundle,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(ROOT / "configs" / "resources.yaml")
TARGETS = ROOT / "configs" / "targets"

SHIPPED = [
    ("firesim_u250_rocket.yaml", "firesim-u250-rocket", TargetClass.FPGA_EMULATION, "firesim_u250"),
    ("spacemit_x60_k1.yaml", "spacemit-x60-k1", TargetClass.SILICON_BOARD, "spacemit_x60_board_01"),
    # A pool: any free Verilator lane, bound when the run starts.
    ("radiance_sim.yaml", "radiance-sim", TargetClass.RTL_SIMULATION, POOL_RESOURCE),
]


def test_the_public_names_are_exported():
    expected = {
        "load_spec", "parse_spec", "TargetSpec", "Platform", "RungSpec", "StepSpec",
        "TargetClass", "classify", "normalize_name",
        "support_plan", "resolve_resource", "resolve_pool", "SupportPlan", "Rung",
        "execution_bundle", "ExecutionBundle", "BundleStep", "Gate", "load_bundle", "parse_bundle", "write_bundle",
        "POOL_RESOURCE", "bound_step",
        "prepare_target_dir", "load_target_spec", "write_plan", "load_plan", "TARGET_FILE", "PLAN_FILE", "BUNDLE_FILE",
    }  # fmt: skip
    assert set(targetgen.__all__) == expected
    for name in expected:
        assert getattr(targetgen, name) is not None


def test_importing_targetgen_does_not_import_ray():
    code = (
        "import sys, targetgen, targetgen.standins.run; "
        "assert targetgen.support_plan; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def prepare(spec_name: str, target_dir: Path) -> ExecutionBundle:
    prepare_target_dir(TARGETS / spec_name, target_dir)
    spec = load_target_spec(target_dir)
    plan = support_plan(spec, CATALOG)
    write_plan(target_dir, plan)
    bundle = execution_bundle(spec, plan, python=sys.executable)
    write_bundle(target_dir, bundle)
    return bundle


@pytest.mark.parametrize(("spec_name", "target", "target_class", "resource"), SHIPPED)
def test_shipped_specs_plan_and_bundle_against_the_shipped_catalog(tmp_path, spec_name, target, target_class, resource):
    bundle = prepare(spec_name, tmp_path / target)
    assert bundle.target == target and bundle.target_class == target_class.value
    if resource == POOL_RESOURCE:
        assert bundle.resource is None and bundle.resource_labels == "kind=sim,simulator=verilator"
        assert bundle.candidates == ("radiance_sim_lane_a", "radiance_sim_lane_b") and bundle.count == 1
    else:
        assert bundle.resource == resource and bundle.resource_labels is None
    assert len({step.id for step in bundle.steps}) == len(bundle.steps)
    assert any(step.resource is None for step in bundle.steps), "the build needs no hardware"
    assert {step.resource for step in bundle.steps} == {None, resource}


@pytest.mark.parametrize(("spec_name", "target", "target_class", "resource"), SHIPPED)
def test_shipped_bundles_run_with_the_standins_and_leave_their_artifacts(
    tmp_path, spec_name, target, target_class, resource
):
    target_dir = tmp_path / target
    bundle = prepare(spec_name, target_dir)
    inherited = ("MERLIN_STANDIN_FAIL", "MERLIN_TARGET_DIR", "MERLIN_STEP_ID", "MERLIN_LEASE_ID")
    env = {name: value for name, value in os.environ.items() if name not in inherited}
    env.update({"MERLIN_STANDIN_SECONDS": "0", "MERLIN_FENCING_TOKEN": "42"})
    for step in bundle.steps:  # in bundle order: each stand-in reads what the one before it wrote
        held = bundle.candidates[0] if step.resource == POOL_RESOURCE else step.resource
        step = bound_step(step, [bundle.candidates[0]]) if bundle.pool else step  # what the executor does
        done = subprocess.run(
            step.argv, cwd=target_dir / step.cwd, env={**env, **step.env}, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{step.id}: {done.stderr}"
        assert f"[{step.id}]" in done.stdout
        for artifact in step.artifacts:
            path = target_dir / artifact
            assert path.is_file() and path.stat().st_size > 0, f"{step.id} did not write {artifact}"
            if path.suffix == ".json":
                record = json.loads(path.read_text())
                assert record["standin"] is True and record["step"] == step.id and record["target"] == target
                assert record["resource"] == held
                assert record["fencing_token"] == 42
    written = {str(p.relative_to(target_dir)) for p in (target_dir / "artifacts").rglob("*") if p.is_file()}
    assert written == {artifact for step in bundle.steps for artifact in step.artifacts}
