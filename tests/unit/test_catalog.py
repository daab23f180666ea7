"""The catalog: the shipped one is valid; mistakes name the file, field and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.core.catalog import load_catalog, parse_catalog
from broker.errors import InvalidRequest

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_catalog_has_the_lab_keys():
    catalog = load_catalog(ROOT / "configs" / "resources.yaml")
    assert {"firesim_u250", "spacemit_x60_board_01", "radiance_sim_lane_a"} <= set(catalog.resources)
    assert catalog.resources["firesim_u250"].labels["kind"] == "fpga"
    assert catalog.resources["firesim_u250"].max_hold_s == 12 * 3600


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"resources": {"Bad Key": {}}}, "Bad Key"),
        ({"resources": {"ok": {"colour": "red"}}}, "colour"),
        ({"resources": {"ok": {"max_hold": "2x"}}}, "2x"),
        ({"resources": {"ok": {"labels": {"Bad-Label": "x"}}}}, "Bad-Label"),
        ({"resources": {}}, "no resources"),
        ({"resources": {"ok": {}}, "extra": 1}, "extra"),
        ({"broker": {"claim": "soon"}, "resources": {"ok": {}}}, "soon"),
        (["not", "a", "mapping"], "mapping"),
    ],
)
def test_bad_catalogs_name_the_problem(data, named):
    with pytest.raises(InvalidRequest) as info:
        parse_catalog(data, "test.yaml")
    assert named in str(info.value) and "test.yaml" in str(info.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_catalog(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("resources:\n  a: [unclosed\n")
    with pytest.raises(InvalidRequest, match="broken.yaml:"):
        load_catalog(broken)


def test_catalog_round_trips_through_its_json_form():
    catalog = load_catalog(ROOT / "configs" / "resources.yaml")
    again = parse_catalog(catalog.model_dump(by_alias=True), "json")
    assert again == catalog
