"""Support plans and bundles: ladders per class, overrides, resources, gates, order, and refusals."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.core.catalog import load_catalog
from broker.errors import InvalidRequest
from targetgen import (
    POOL_RESOURCE,
    SupportPlan,
    TargetClass,
    bound_step,
    execution_bundle,
    load_bundle,
    load_plan,
    load_target_spec,
    parse_bundle,
    parse_spec,
    prepare_target_dir,
    support_plan,
    write_bundle,
    write_plan,
)

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(ROOT / "configs" / "resources.yaml")
PYTHON = sys.executable

FPGA = {"name": "FPGA Target", "platform": {"fpga": "u250"}, "resource": "firesim_u250"}
BOARD = {"name": "Board Target", "platform": {"soc": "spacemit_k1"}, "resource": "spacemit_x60_board_01"}
SIM = {"name": "Sim Target", "platform": {"simulator": "verilator"}, "resource": "radiance_sim_lane_a"}


def spec(base: dict[str, Any], **changes: Any):
    return parse_spec({**base, **changes}, "t.yaml")


def plan_of(base: dict[str, Any], **changes: Any):
    return support_plan(spec(base, **changes), CATALOG)


CYCLE = [{"id": "a", "run": ["x"], "needs": ["b"]}, {"id": "b", "run": ["y"]}]


def steps_by_id(plan: SupportPlan) -> dict[str, Any]:
    return {step.id: step for step in plan.steps()}


# --- default ladders ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "target_class", "rungs", "hardware", "gated"),
    [
        (
            FPGA,
            TargetClass.FPGA_EMULATION,
            ["build-bitstream", "flash-fpga", "boot", "smoke-test"],
            [False, True, True, True],
            {"flash-fpga": "confirm the bitstream may be loaded on firesim_u250"},
        ),
        (
            BOARD,
            TargetClass.SILICON_BOARD,
            ["build-image", "flash-board", "boot", "smoke-test"],
            [False, True, True, True],
            {"flash-board": "confirm the image may be flashed onto spacemit_x60_board_01"},
        ),
        (SIM, TargetClass.RTL_SIMULATION, ["verilate", "simulate", "check-results"], [False, True, False], {}),
    ],
)
def test_each_class_has_its_default_ladder(base, target_class, rungs, hardware, gated):
    plan = plan_of(base)
    assert plan.target_class is target_class
    assert [rung.name for rung in plan.rungs] == rungs
    assert [rung.resource == base["resource"] for rung in plan.rungs] == hardware
    assert [rung.resource for rung in plan.rungs if not rung.resource] == [None] * hardware.count(False)
    assert {rung.name: rung.gates[0] for rung in plan.rungs if rung.gates} == gated
    assert all(rung.standin for rung in plan.rungs)
    # One step per default rung, each needing the one before: a straight ladder.
    ids = [step.id for step in plan.steps()]
    assert ids == rungs
    assert [step.needs for step in plan.steps()] == [()] + [(previous,) for previous in ids[:-1]]
    for rung in plan.rungs:
        step = rung.steps[0]
        assert step.resource == rung.resource
        assert step.artifacts and all(path.startswith("artifacts/") for path in step.artifacts)
        assert step.argv[:3] == ("{python}", "-m", "targetgen.standins")
        assert ("--resource" in step.argv) == (rung.resource is not None)
    assert plan.resource == base["resource"]


def test_a_replaced_rung_keeps_its_default_gate_on_its_first_step():
    steps = [{"id": "load", "run": ["fpga-util", "load"]}, {"run": ["x"]}]
    plan = plan_of(FPGA, ladder={"flash-fpga": {"steps": steps}})
    rung = next(rung for rung in plan.rungs if rung.name == "flash-fpga")
    assert [step.id for step in rung.steps] == ["load", "flash-fpga"]
    assert rung.gates == ("confirm the bitstream may be loaded on firesim_u250",)
    assert rung.steps[0].gate is not None and rung.steps[1].gate is None
    assert not rung.standin
    assert rung.steps[0].timeout_s == 900.0  # the default rung's budget


def test_a_step_can_reword_or_drop_a_gate():
    reworded = plan_of(FPGA, ladder={"flash-fpga": {"steps": [{"run": ["x"], "gate": "Fans on?"}]}})
    dropped = plan_of(FPGA, ladder={"flash-fpga": {"steps": [{"run": ["x"], "gate": None}]}})
    assert steps_by_id(reworded)["flash-fpga"].gate.prompt == "Fans on?"
    assert steps_by_id(dropped)["flash-fpga"].gate is None


def test_override_steps_carry_their_fields_and_chain_after_the_previous_rung():
    step = {
        "id": "boot-linux",
        "description": "boot to a shell",
        "run": ["uart-boot", "--board", "{resource}", "--name", "{target}"],
        "timeout": "15m",
        "artifacts": ["artifacts/boot/uart.log"],
        "env": {"BAUD": 115200, "WHERE": "{resource}"},
        "cwd": "work",
    }
    plan = plan_of(BOARD, ladder={"boot": {"purpose": "serial boot", "steps": [step]}})
    got = steps_by_id(plan)["boot-linux"]
    assert got.argv == ("uart-boot", "--board", "spacemit_x60_board_01", "--name", "board-target")
    assert got.env == {"BAUD": "115200", "WHERE": "spacemit_x60_board_01"}
    assert got.timeout_s == 900.0 and got.cwd == "work" and got.artifacts == ("artifacts/boot/uart.log",)
    assert got.needs == ("flash-board",) and got.resource == "spacemit_x60_board_01"
    assert steps_by_id(plan)["smoke-test"].needs == ("boot-linux",)
    assert next(rung for rung in plan.rungs if rung.name == "boot").purpose == "serial boot"


def test_explicit_needs_replace_the_chaining():
    steps = [{"id": "a", "run": ["x"], "needs": []}, {"id": "b", "run": ["x"], "needs": ["verilate"]}]
    plan = plan_of(SIM, ladder={"simulate": {"steps": steps}})
    steps = steps_by_id(plan)
    assert steps["a"].needs == () and steps["b"].needs == ("verilate",)
    # a and b both end the rung (no step of the rung needs them), so the next rung waits for both.
    assert steps["check-results"].needs == ("a", "b")


def test_a_new_rung_is_appended_and_holds_the_resource_unless_told_otherwise():
    plan = plan_of(
        BOARD,
        ladder={
            "benchmark": {"steps": [{"run": ["coremark"]}]},
            "report": {"hardware": False, "steps": [{"run": ["report"]}]},
        },
    )
    assert [rung.name for rung in plan.rungs][-2:] == ["benchmark", "report"]
    steps = steps_by_id(plan)
    assert steps["benchmark"].resource == "spacemit_x60_board_01" and steps["benchmark"].needs == ("smoke-test",)
    assert steps["benchmark"].timeout_s == 600.0
    assert steps["report"].resource is None and steps["report"].needs == ("benchmark",)


def test_a_default_rung_can_change_purpose_and_hardware_without_new_steps():
    plan = plan_of(SIM, ladder={"check-results": {"purpose": "diff on the lane", "hardware": True}})
    rung = plan.rungs[-1]
    assert rung.purpose == "diff on the lane" and rung.resource == "radiance_sim_lane_a" and rung.standin
    assert "--resource" in rung.steps[0].argv


def test_resource_labels_plan_a_pool_and_bind_no_key():
    plan = plan_of({"name": "t", "platform": {"fpga": "u250"}}, resource_labels={"kind": "fpga", "board": "u250"})
    assert plan.resource is None and plan.resource_labels == "board=u250,kind=fpga" and plan.count == 1
    assert plan.candidates == ("firesim_u250", "firesim_u250_b")
    assert plan.where == "any of: firesim_u250, firesim_u250_b (board=u250,kind=fpga)"
    steps = steps_by_id(plan)
    # Hardware steps hold the pool; {resource} stays in their texts until the run is bound.
    assert steps["flash-fpga"].resource == POOL_RESOURCE and "{resource}" in steps["flash-fpga"].argv
    assert steps["flash-fpga"].gate is not None and "{resource}" in steps["flash-fpga"].gate.prompt
    assert steps["build-bitstream"].resource is None
    plan = plan_of({"name": "t", "platform": {"simulator": "verilator"}}, resource_labels={"kind": "sim"}, count=2)
    assert plan.count == 2 and plan.where.startswith("any 2 of: radiance_sim_lane_a, radiance_sim_lane_b")


def test_a_pool_bundle_keeps_the_pool_and_binds_its_steps_at_run_time():
    target = spec(
        {"name": "t", "platform": {"simulator": "verilator"}},
        resource_labels={"kind": "sim"},
        ladder={"simulate": {"steps": [{"run": ["{python}", "sim", "--lane", "{resource}"], "env": {"LANE": "{resource}"},
                                        "gate": "is {resource} idle?"}]}},
    )  # fmt: skip
    bundle = execution_bundle(target, support_plan(target, CATALOG), python=PYTHON)
    assert bundle.resource is None and bundle.resource_labels == "kind=sim" and bundle.count == 1
    step = bundle.step("simulate")
    assert step.resource == POOL_RESOURCE and step.argv == (PYTHON, "sim", "--lane", "{resource}")
    bound = bound_step(step, ["radiance_sim_lane_b"])
    assert bound.argv[-1] == "radiance_sim_lane_b" and bound.env == {"LANE": "radiance_sim_lane_b"}
    assert bound.gate is not None and bound.gate.prompt == "is radiance_sim_lane_b idle?"
    assert bound_step(step, ["a", "b"]).argv[-1] == "a,b"  # several keys: joined
    other = bundle.step("verilate")
    assert bound_step(other, ["radiance_sim_lane_b"]) is other  # a step without hardware is left alone


def test_old_bundles_and_plans_still_load_and_a_pool_bundle_is_checked():
    old = {"target": "a", "target_class": "silicon_board", "resource": "k",
           "steps": [{"id": "s", "argv": ["x"], "resource": "k"}]}  # fmt: skip
    assert parse_bundle(old).resource == "k" and parse_bundle(old).resource_labels is None
    pool = {"target": "a", "target_class": "fpga_emulation", "resource_labels": "kind=fpga , board=u250", "count": 2,
            "steps": [{"id": "s", "argv": ["x"], "resource": POOL_RESOURCE}]}  # fmt: skip
    assert parse_bundle(pool).resource_labels == "board=u250,kind=fpga"  # canonical text
    bad = [
        ({**pool, "resource": "k"}, "not both"),
        ({**old, "count": 2}, "needs resource_labels"),
        ({**pool, "steps": [{"id": "s", "argv": ["x"], "resource": "k"}]}, "hold {resource}"),
        ({**old, "steps": [{"id": "s", "argv": ["x"], "resource": POOL_RESOURCE}], "resource": None}, "no pool"),
        ({**pool, "resource_labels": "kind fpga"}, "invalid labels"),
        ({**pool, "count": 0}, "count"),
    ]
    for data, words in bad:
        with pytest.raises(InvalidRequest, match=re.escape(words)):
            parse_bundle(data)


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "changes", "named"),
    [
        (FPGA, {"resource": "firesim_u999"}, ["resource='firesim_u999'", "not in the catalog", "firesim_u250_b"]),
        (FPGA, {"resource": None, "resource_labels": {"board": "u999"}}, ["board=u999", "no catalog resource"]),
        (FPGA, {"resource": None, "resource_labels": {"board": "u250"}, "count": 3}, ["only 2 keys", "count 3"]),
        (FPGA, {"count": 2}, ["count", "needs resource_labels"]),
        (FPGA, {"resource": None}, ["rung flash-fpga needs hardware", "add resource:"]),
        (FPGA, {"ladder": {"warmup": {"purpose": "x"}}}, ["ladder.warmup", "needs steps"]),
        (
            FPGA,
            {"ladder": {"smoke-test": {"steps": [{"id": "boot", "run": ["x"]}]}}},
            ["duplicate step id 'boot'", "rungs boot and smoke-test"],
        ),
        (
            FPGA,
            {"ladder": {"smoke-test": {"steps": [{"run": ["x"]}, {"run": ["y"]}]}}},
            ["duplicate step id 'smoke-test'", "rung smoke-test"],
        ),
        (
            FPGA,
            {"ladder": {"smoke-test": {"steps": CYCLE}}},
            ["cycle", "a -> b -> a"],
        ),
        (
            FPGA,
            {"ladder": {"boot": {"steps": [{"run": ["x"], "needs": ["smoke-test"]}]}}},
            ["cycle", "boot -> smoke-test -> boot"],
        ),
        (FPGA, {"ladder": {"boot": {"steps": [{"run": ["x"], "needs": ["flsh"]}]}}}, ["needs unknown steps 'flsh'"]),
        (
            FPGA,
            {"ladder": {"report": {"hardware": False, "steps": [{"run": ["ssh", "{resource}"]}]}}},
            ["step 'report' names {resource}", "does not hold"],
        ),
        ({"name": "t", "platform": {"fpga": "u250", "soc": "k1"}, "resource": "firesim_u250"}, {}, ["ambiguous"]),
    ],
)
def test_bad_plans_name_the_problem(base, changes, named):
    with pytest.raises(InvalidRequest) as info:
        plan_of(base, **changes)
    message = str(info.value)
    assert message.startswith("t.yaml: ")
    for fragment in named:
        assert fragment in message, message


# --- bundles -----------------------------------------------------------------------------------


def test_the_bundle_binds_python_and_names_the_resource():
    the_spec = spec(FPGA, ladder={"boot": {"steps": [{"run": ["{python}", "-c", "pass"], "env": {"PY": "{python}"}}]}})
    bundle = execution_bundle(the_spec, support_plan(the_spec, CATALOG), python=PYTHON)
    assert bundle.target == "fpga-target" and bundle.target_class == "fpga_emulation"
    assert bundle.resource == "firesim_u250" and bundle.workflow == "bringup"
    assert [step.id for step in bundle.steps] == ["build-bitstream", "flash-fpga", "boot", "smoke-test"]
    assert [step.resource for step in bundle.steps] == [None, "firesim_u250", "firesim_u250", "firesim_u250"]
    assert all(step.argv[0] == PYTHON for step in bundle.steps)
    assert bundle.step("boot").env == {"PY": PYTHON}
    assert "{python}" not in json.dumps(bundle.model_dump())
    assert bundle.step("flash-fpga").gate is not None


def test_bundle_steps_follow_needs_even_against_ladder_order():
    # "prepare" is a new rung, so it comes last in the ladder; boot needs it, so it runs first.
    the_spec = spec(
        FPGA,
        ladder={
            "boot": {"steps": [{"run": ["boot"], "needs": ["flash-fpga", "prepare"]}]},
            "prepare": {"hardware": False, "steps": [{"run": ["prep"], "needs": []}]},
        },
    )
    plan = support_plan(the_spec, CATALOG)
    assert [step.id for step in plan.steps()][-1] == "prepare"
    ids = [step.id for step in execution_bundle(the_spec, plan, python=PYTHON).steps]
    assert ids.index("prepare") < ids.index("boot")
    assert sorted(ids) == sorted(step.id for step in plan.steps())


def test_a_bundle_without_hardware_steps_holds_no_resource():
    the_spec = spec(SIM, ladder={"simulate": {"hardware": False}})
    bundle = execution_bundle(the_spec, support_plan(the_spec, CATALOG), python=PYTHON)
    assert bundle.resource is None and all(step.resource is None for step in bundle.steps)


def test_bundle_refuses_a_relative_python_and_a_plan_of_another_spec():
    the_spec = spec(FPGA)
    plan = support_plan(the_spec, CATALOG)
    with pytest.raises(InvalidRequest, match="absolute path"):
        execution_bundle(the_spec, plan, python="python3")
    with pytest.raises(InvalidRequest, match="the plan is for target 'sim-target'"):
        execution_bundle(the_spec, support_plan(spec(SIM), CATALOG), python=PYTHON)
    older = parse_spec({**FPGA}, "t.yaml", spec_sha256="1" * 64)
    newer = parse_spec({**FPGA}, "t.yaml", spec_sha256="2" * 64)
    with pytest.raises(InvalidRequest, match="another version of the spec"):
        execution_bundle(newer, support_plan(older, CATALOG), python=PYTHON)


def test_bundle_rechecks_a_hand_edited_plan():
    the_spec = spec(FPGA)
    plan = support_plan(the_spec, CATALOG)
    first = plan.rungs[0]
    looped = first.model_copy(update={"steps": (first.steps[0].model_copy(update={"needs": ("smoke-test",)}),)})
    edited = plan.model_copy(update={"rungs": (looped, *plan.rungs[1:])})
    with pytest.raises(InvalidRequest, match="cycle: build-bitstream -> smoke-test"):
        execution_bundle(the_spec, edited, python=PYTHON)


# --- the target dir ----------------------------------------------------------------------------


def make_target(spec_path: Path, target_dir: Path) -> None:
    """What `merlin targetgen plan` + `bundle` do: prepare, plan, write, bundle, write."""
    prepare_target_dir(spec_path, target_dir)
    the_spec = load_target_spec(target_dir)
    plan = support_plan(the_spec, CATALOG)
    write_plan(target_dir, plan)
    write_bundle(target_dir, execution_bundle(the_spec, plan, python=PYTHON))


def test_a_target_dir_round_trips_spec_plan_and_bundle(tmp_path):
    source = tmp_path / "in.yaml"
    source.write_text(yaml.safe_dump(FPGA))
    target_dir = tmp_path / "deep" / "fpga"
    make_target(source, target_dir)
    assert sorted(p.name for p in target_dir.iterdir()) == ["bundle.json", "plan.json", "target.yaml"]
    assert (target_dir / "target.yaml").read_bytes() == source.read_bytes()
    the_spec = load_target_spec(target_dir)
    assert the_spec.source == str(target_dir / "target.yaml")
    plan = load_plan(target_dir)
    assert plan == support_plan(the_spec, CATALOG)
    bundle = load_bundle(target_dir)
    assert bundle.spec_sha256 == hashlib.sha256(source.read_bytes()).hexdigest() == plan.spec_sha256
    assert bundle == execution_bundle(the_spec, plan, python=PYTHON)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"resource": "nope"}, "resource='nope'"),
        ({"ladder": {"smoke-test": {"steps": CYCLE}}}, "cycle"),
        ({"ladder": {"smoke-test": {"steps": [{"id": "boot", "run": ["x"]}]}}}, "duplicate step id"),
    ],
)
def test_a_bad_plan_writes_no_plan_or_bundle(tmp_path, changes, named):
    source = tmp_path / "in.yaml"
    source.write_text(yaml.safe_dump({**FPGA, **changes}))
    target_dir = tmp_path / "t"
    with pytest.raises(InvalidRequest, match=named):
        make_target(source, target_dir)
    assert sorted(p.name for p in target_dir.iterdir()) == ["target.yaml"]


def test_a_missing_target_dir_is_refused_and_not_created(tmp_path):
    missing = tmp_path / "nope"
    for call in (load_target_spec, load_plan, load_bundle, lambda d: write_plan(d, plan_of(FPGA))):
        with pytest.raises(InvalidRequest, match=f"target dir {missing} does not exist"):
            call(missing)
    assert not missing.exists()


def test_a_target_dir_without_its_files_says_what_to_do(tmp_path):
    with pytest.raises(InvalidRequest, match="no target.yaml in"):
        load_target_spec(tmp_path)
    with pytest.raises(InvalidRequest, match="no plan.json in"):
        load_plan(tmp_path)
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="plan.json: target"):
        load_plan(tmp_path)


def test_the_plan_is_plain_json(tmp_path):
    plan = plan_of(SIM)
    data = json.loads(plan.to_json())
    assert data["target_class"] == "rtl_simulation" and data["resource"] == "radiance_sim_lane_a"
    assert [rung["name"] for rung in data["rungs"]] == ["verilate", "simulate", "check-results"]
    assert SupportPlan.model_validate(data) == plan


def test_resource_keys_plan_a_set_held_together():
    target = spec(
        {"name": "cosim", "kind": "fpga_emulation", "platform": {"fpga": "u250", "simulator": "verilator"}},
        resource_keys=["firesim_u250", "radiance_sim_lane_a"],
    )
    plan = support_plan(target, CATALOG)
    assert plan.resource is None and plan.resource_labels is None and plan.count == 2
    assert plan.resource_keys == ("firesim_u250", "radiance_sim_lane_a")
    assert plan.where == "all of: firesim_u250, radiance_sim_lane_a"
    bundle = execution_bundle(target, plan, python=PYTHON)
    assert bundle.pool and bundle.resource_keys == plan.resource_keys and bundle.count == 2
    assert bundle.step("flash-fpga").resource == POOL_RESOURCE
    with pytest.raises(InvalidRequest, match="firesim_u999 not in the catalog"):
        support_plan(spec(FPGA, resource=None, resource_keys=["firesim_u999"]), CATALOG)
    with pytest.raises(InvalidRequest, match="one of resource, resource_labels or resource_keys"):
        spec(FPGA, resource_keys=["firesim_u250"])
    data = bundle.model_dump()
    with pytest.raises(InvalidRequest, match="held whole"):
        parse_bundle({**data, "count": 1})
