"""Input that could hurt the coordinator is refused with one clear error (issue 10, items 9 and 11)."""

from __future__ import annotations

import json

import pytest

from broker.core.catalog import MAX_CATALOG_FILE_BYTES, MAX_PROPERTIES_BYTES, load_catalog, parse_catalog
from broker.errors import InvalidRequest
from broker.models import MIN_TTL_S, ReserveRequest, TtlSeconds, checked, validated


def _write(tmp_path, text: str | bytes):
    path = tmp_path / "catalog.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _alias_bomb(levels: int) -> str:
    lines = ["resources:", "  lane:", "    properties:", '      a0: &a0 ["xxxxxxxxxx","xxxxxxxxxx","xxxxxxxxxx"]']
    for level in range(1, levels):
        refs = ",".join([f"*a{level - 1}"] * 10)
        lines.append(f"      a{level}: &a{level} [{refs}]")
    return "\n".join(lines) + "\n"


def test_nested_yaml_aliases_are_refused_not_expanded(tmp_path):
    path = _write(tmp_path, _alias_bomb(9))
    assert path.stat().st_size < 1000
    with pytest.raises(InvalidRequest) as info:
        load_catalog(path)
    assert "expands to more than" in str(info.value) and info.value.exit_code == 3


def test_a_few_aliases_are_still_fine(tmp_path):
    catalog = load_catalog(_write(tmp_path, _alias_bomb(2)))
    assert len(catalog.resources["lane"].properties["a1"]) == 10


def test_a_key_given_twice_is_an_error_not_last_one_wins(tmp_path):
    text = "resources:\n  lane:\n    labels: {kind: sim}\n  lane:\n    labels: {kind: fpga}\n"
    with pytest.raises(InvalidRequest) as info:
        load_catalog(_write(tmp_path, text))
    assert "duplicate key 'lane'" in str(info.value) and ":4" in str(info.value)


def test_a_binary_file_is_an_invalid_catalog(tmp_path):
    for data in (bytes(range(256)) * 4, b"resources:\n  lane: {}\n\x00\x01\x02"):
        with pytest.raises(InvalidRequest) as info:
            load_catalog(_write(tmp_path, data))
        assert info.value.exit_code == 3


def test_a_huge_file_is_refused_before_parsing(tmp_path):
    path = _write(tmp_path, "resources:\n  lane: {}\n#" + "x" * MAX_CATALOG_FILE_BYTES)
    with pytest.raises(InvalidRequest, match="larger than"):
        load_catalog(path)


def test_properties_too_many_keys_and_labels_are_bounded():
    big = {"resources": {"lane": {"properties": {"blob": "x" * (MAX_PROPERTIES_BYTES + 1)}}}}
    with pytest.raises(InvalidRequest, match="properties"):
        parse_catalog(big)
    many = {"resources": {f"k{i}": {} for i in range(2001)}}
    with pytest.raises(InvalidRequest, match="at most 2000"):
        parse_catalog(many)
    labels = {"resources": {"lane": {"labels": {f"l{i}": "v" for i in range(65)}}}}
    with pytest.raises(InvalidRequest, match="labels"):
        parse_catalog(labels)


@pytest.mark.parametrize("version", [99, 0, "1", True, None])
def test_only_known_catalog_versions_are_accepted(version):
    with pytest.raises(InvalidRequest) as info:
        parse_catalog({"version": version, "resources": {"lane": {}}}, "c.yaml")
    assert "unknown catalog version" in str(info.value) and info.value.field == "version"
    assert parse_catalog({"version": 1, "resources": {"lane": {}}}).version == 1


@pytest.mark.parametrize("ttl", [1e-300, 0.5, 0.999])
def test_a_ttl_below_the_minimum_is_refused(ttl):
    with pytest.raises(InvalidRequest, match="ttl_s"):
        validated(ReserveRequest, resource="lane", holder="alice", ttl_s=ttl, request_id="r")
    with pytest.raises(InvalidRequest, match="ttl_s"):
        checked(TtlSeconds, ttl, "ttl_s")
    assert checked(TtlSeconds, MIN_TTL_S, "ttl_s") == MIN_TTL_S


@pytest.mark.parametrize("note", ["\x1b[31mred", "nul\x00", "bell\x07", "line\nbreak"])
def test_notes_must_be_printable(note):
    with pytest.raises(InvalidRequest, match="note"):
        validated(ReserveRequest, resource="lane", holder="alice", request_id="r", note=note)
    assert validated(ReserveRequest, resource="lane", holder="a", request_id="r", note="for the demo ✓").note


def test_the_catalog_json_of_a_bounded_catalog_stays_small(tmp_path):
    catalog = load_catalog(_write(tmp_path, _alias_bomb(3)))
    assert len(json.dumps(catalog.model_dump(mode="json"))) < 20_000


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (_alias_bomb(9), "expands to more than"),
        ("resources:\n  lane: {}\n  lane: {}\n", "duplicate key"),
        (bytes(range(256)) * 8, "not UTF-8"),
        ("version: 99\nresources:\n  lane: {}\n", "unknown catalog version 99"),
    ],
)
def test_broker_up_refuses_a_hostile_catalog_in_one_line_before_touching_a_cluster(tmp_path, content, named):
    from tests.unit.test_cli_offline import merlin

    path = _write(tmp_path, content)
    out = merlin(tmp_path, "broker", "up", "--catalog", str(path))
    assert out.returncode == 3 and named in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "state").exists()
