"""TargetGen: capability specs -> support plans (verification ladders) -> execution bundles; pure, no Ray.

Read in this order: :mod:`targetgen.spec` (the YAML schema),
:mod:`targetgen.normalize` (canonical names, classes), :mod:`targetgen.ladders`
(default rungs per class), :mod:`targetgen.plan` (spec + catalog -> plan),
:mod:`targetgen.build` (plan -> bundle), :mod:`targetgen.bundle` (the bundle the
executor runs), :mod:`targetgen.target_dir` (the files on disk),
:mod:`targetgen.standins` (fake tools for the default ladders).

Typical use::

    spec = load_target_spec(target_dir)            # after prepare_target_dir(spec_path, target_dir)
    plan = support_plan(spec, load_catalog("configs/resources.yaml"))
    write_plan(target_dir, plan)
    write_bundle(target_dir, execution_bundle(spec, plan, python=sys.executable))
"""

from targetgen.build import execution_bundle
from targetgen.bundle import (
    BUNDLE_FILE,
    POOL_RESOURCE,
    BundleStep,
    ExecutionBundle,
    Gate,
    bound_step,
    load_bundle,
    parse_bundle,
    write_bundle,
)
from targetgen.normalize import TargetClass, classify, normalize_name
from targetgen.plan import Rung, SupportPlan, resolve_pool, resolve_resource, support_plan
from targetgen.spec import Platform, RungSpec, StepSpec, TargetSpec, load_spec, parse_spec
from targetgen.target_dir import PLAN_FILE, TARGET_FILE, load_plan, load_target_spec, prepare_target_dir, write_plan

__all__ = [
    # specs
    "load_spec",
    "parse_spec",
    "TargetSpec",
    "Platform",
    "RungSpec",
    "StepSpec",
    # normalization and classification
    "TargetClass",
    "classify",
    "normalize_name",
    # plans
    "support_plan",
    "resolve_resource",
    "resolve_pool",
    "SupportPlan",
    "Rung",
    # bundles
    "execution_bundle",
    "ExecutionBundle",
    "BundleStep",
    "Gate",
    "POOL_RESOURCE",
    "bound_step",
    "load_bundle",
    "parse_bundle",
    "write_bundle",
    # the target dir
    "prepare_target_dir",
    "load_target_spec",
    "write_plan",
    "load_plan",
    "TARGET_FILE",
    "PLAN_FILE",
    "BUNDLE_FILE",
]
