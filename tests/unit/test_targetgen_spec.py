"""Capability specs: the schema, canonical names, classes, and one clear line for every mistake."""

from __future__ import annotations

import hashlib
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidRequest
from targetgen import TargetClass, classify, load_spec, normalize_name, parse_spec, prepare_target_dir
from targetgen.normalize import TARGET_NAME_PATTERN


def spec_file(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- normalization -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("FireSim U250 Rocket", "firesim-u250-rocket"),
        ("  Radiance   Sim!! ", "radiance-sim"),
        ("SpacemiT_X60.K1", "spacemit_x60.k1"),
        ("Café Board (rev B)", "cafe-board-rev-b"),
        ("--a -- b--", "a-b"),
        ("x" * 100, "x" * 64),
        ("!!!", ""),
    ],
)
def test_normalize_name_makes_canonical_target_names(text, name):
    assert normalize_name(text) == name


@given(st.text(max_size=200))
def test_normalized_names_match_the_pattern_and_are_stable(text):
    name = normalize_name(text)
    assert name == "" or re.match(TARGET_NAME_PATTERN, name)
    assert normalize_name(name) == name


def test_a_minimal_spec_gets_its_defaults(tmp_path):
    spec = load_spec(spec_file(tmp_path, "name: FireSim U250 Rocket\nplatform: {fpga: u250, isa: RV64GC}\n"))
    assert spec.target == "firesim-u250-rocket"
    assert spec.platform.isa == "rv64gc"
    assert spec.workflow == "bringup"
    assert spec.kind is None and spec.ladder == {} and spec.resource is None


def test_load_spec_records_the_file_and_the_hash_of_its_bytes(tmp_path):
    path = spec_file(tmp_path, "name: t\nkind: rtl_simulation\n")
    spec = load_spec(path)
    assert spec.source == str(path)
    assert spec.spec_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "target_class"),
    [
        ({"fpga": "xilinx_u250"}, TargetClass.FPGA_EMULATION),
        ({"soc": "spacemit_k1"}, TargetClass.SILICON_BOARD),
        ({"board": "visionfive2", "soc": "jh7110"}, TargetClass.SILICON_BOARD),
        ({"simulator": "verilator", "isa": "rv32imaf"}, TargetClass.RTL_SIMULATION),
    ],
)
def test_the_class_is_inferred_from_platform_facts(platform, target_class):
    assert classify(parse_spec({"name": "t", "platform": platform})) is target_class


def test_an_explicit_kind_wins_over_the_facts():
    spec = parse_spec({"name": "t", "kind": "silicon_board", "platform": {"fpga": "u250", "simulator": "firesim"}})
    assert classify(spec) is TargetClass.SILICON_BOARD


def test_facts_of_two_classes_are_ambiguous_and_say_what_to_add():
    spec = parse_spec({"name": "t", "platform": {"fpga": "u250", "simulator": "firesim"}}, "t.yaml")
    with pytest.raises(InvalidRequest) as info:
        classify(spec)
    message = str(info.value)
    assert "ambiguous" in message and "add kind:" in message and "t.yaml" in message
    assert "platform.fpga='u250'" in message and "platform.simulator='firesim'" in message


def test_no_class_facts_say_what_to_add():
    spec = parse_spec({"name": "t", "platform": {"isa": "rv64gc", "cores": 4}}, "t.yaml")
    with pytest.raises(InvalidRequest, match=r"t\.yaml: cannot tell the target class.*add kind:.*platform\.fpga"):
        classify(spec)


# --- mistakes ----------------------------------------------------------------------------------

STEP = "ladder:\n  boot:\n    steps:\n      - "


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("name: t\ncolour: red\n", ["colour='red'", "unknown field"]),
        ("name: t\nplatfrom: {fpga: x}\n", ["platfrom", "did you mean 'platform'"]),
        ("name: t\n" + STEP + "{id: boot, run: [x], colour: red}\n", ["ladder.boot.steps[0].colour", "unknown field"]),
        ("name: t\n" + STEP + "{id: boot, timout: 5m, run: [x]}\n", ["did you mean 'timeout'"]),
        ("name: t\n" + STEP + "{id: boot}\n", ["ladder.boot.steps[0].run", "no command"]),
        ("name: t\n" + STEP + "{id: boot, run: []}\n", ["ladder.boot.steps[0].run=[]", "no command"]),
        ("name: t\n" + STEP + "{id: boot, run: ['']}\n", ["no command"]),
        ("name: t\n" + STEP + "{id: boot, run: make all}\n", ["'make all'", "argv list"]),
        ("name: t\n" + STEP + "{id: boot, run: [x], timeout: 10x}\n", ["timeout='10x'"]),
        ("name: t\n" + STEP + "{id: boot, run: [x], timeout: 0s}\n", ["timeout='0s'", "more than 0s"]),
        ("name: t\n" + STEP + "{id: Flash FPGA, run: [x]}\n", ["id='Flash FPGA'", "step id must match"]),
        ("name: t\n" + STEP + "{run: [x], artifacts: [/tmp/x]}\n", ["'/tmp/x'", "under artifacts/"]),
        ("name: t\n" + STEP + "{run: [x], artifacts: [out/x]}\n", ["'out/x'", "under artifacts/"]),
        ("name: t\n" + STEP + "{run: [x], env: {1BAD: x}}\n", ["'1BAD'"]),
        ("name: t\n" + STEP + "{run: [x], env: {A: yes}}\n", ["boolean", "quote it"]),
        ("name: t\n" + STEP + "{run: [x], cwd: /etc}\n", ["cwd='/etc'"]),
        ("name: t\nladder:\n  Boot Up: {steps: [{run: [x]}]}\n", ["'Boot Up'", "rung name"]),
        ("name: t\nladder:\n  boot: {hardware: 'yes'}\n", ["ladder.boot.hardware='yes'"]),
        ("name: t\nladder:\n  boot: {steps: []}\n", ["ladder.boot.steps=[]", "at least one step"]),
        ("name: t\nkind: asic\n", ["kind='asic'", "fpga_emulation"]),
        ("name: t\nplatform: {cores: many}\n", ["platform.cores='many'"]),
        ("name: t\nplatform: {cores: true}\n", ["platform.cores=True"]),
        ("name: t\nplatform: {isa: RV64 GC}\n", ["platform.isa='RV64 GC'"]),
        ("name: t\nresource: Bad Key\n", ["resource='Bad Key'"]),
        ("name: t\nresource: a\nresource_labels: {kind: fpga}\n", ["not both"]),
        ("name: '!!!'\n", ["name='!!!'", "no letters or digits"]),
        ("description: no name\n", ["name: required field is missing"]),
        ("name: t\nspec_sha256: abc\n", ["spec_sha256='abc'", "unknown field"]),
        ("- a\n- list\n", ["a mapping"]),
    ],
)
def test_bad_specs_name_the_file_the_field_and_the_value(tmp_path, text, named):
    path = spec_file(tmp_path, text)
    with pytest.raises(InvalidRequest) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}"), message
    assert "\n" not in message
    assert "more)" not in message, "one mistake, one error: no follow-on errors"
    for fragment in named:
        assert fragment in message, message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("name: t\nplatform:\n  fpga: [unclosed\n", ":4"),
        ("name: t\nladder:\n  boot: {steps: [{run: [x]}]}\n  boot: {steps: [{run: [y]}]}\n", ":4"),
    ],
)
def test_yaml_syntax_errors_and_repeated_keys_name_file_and_line(tmp_path, text, where):
    path = spec_file(tmp_path, text)
    with pytest.raises(InvalidRequest) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}{where}:")


def test_a_repeated_key_is_refused_rather_than_silently_dropped(tmp_path):
    with pytest.raises(InvalidRequest, match="'name' appears twice"):
        load_spec(spec_file(tmp_path, "name: a\nname: b\n"))


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(InvalidRequest, match="is empty"):
        load_spec(spec_file(tmp_path, ""))
    with pytest.raises(InvalidRequest, match="cannot read spec"):
        load_spec(tmp_path / "missing.yaml")


def test_numbers_in_run_and_env_are_text(tmp_path):
    spec = load_spec(spec_file(tmp_path, "name: t\n" + STEP + "{run: [sleep, 1], env: {N: 2000, F: 0.5}}\n"))
    step = spec.ladder["boot"].steps[0]
    assert step.run == ("sleep", "1")
    assert step.env == {"N": "2000", "F": "0.5"}


def test_a_bad_spec_prepares_no_target_dir(tmp_path):
    path = spec_file(tmp_path, "name: t\ncolour: red\n")
    with pytest.raises(InvalidRequest, match="colour"):
        prepare_target_dir(path, tmp_path / "targets" / "t")
    assert not (tmp_path / "targets").exists()
