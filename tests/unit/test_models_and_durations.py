"""Request validation at the edge, lease ids, and human durations."""

from __future__ import annotations

import math

import pytest

from broker.core.durations import format_duration, parse_duration
from broker.errors import InvalidRequest
from broker.models import Holder, ReserveRequest, TtlSeconds, checked, lease_ref, resource_of_lease_id, validated


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1d", 86400),
        ("45", 45),
        ("0.5s", 0.5),
        (" 2H ", 7200),
    ],
)
def test_durations_parse(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2x", "h", "10 minutes", "-5s", "1h-5m", "nan", "inf", "1e999"])
def test_bad_durations_name_the_text(text):
    with pytest.raises(InvalidRequest) as info:
        parse_duration(text, field="ttl")
    assert "ttl" in str(info.value)


def test_format_duration_reads_back():
    for seconds in (5, 59, 61, 3600, 5400, 90061):
        assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def _reserve(**fields):
    base = dict(resource="firesim_u250", holder="alice", request_id="r1")
    return validated(ReserveRequest, **{**base, **fields})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ttl_s", -1), ("ttl_s", 0), ("ttl_s", math.nan), ("ttl_s", math.inf), ("ttl_s", 10**9), ("ttl_s", "60"),
        ("holder", ""), ("holder", "x" * 129), ("holder", " alice"), ("holder", "a\nb"), ("holder", 7),
        ("priority", 1.5), ("priority", 10**6), ("priority", True), ("wait", "yes"), ("timeout_s", -1.0),
        ("request_id", "has space"), ("request_id", "x" * 200), ("note", "n" * 5000), ("resource", "Bad Key"),
    ],
)  # fmt: skip
def test_bad_reserve_arguments_are_one_invalid_request_naming_the_field(field, value):
    with pytest.raises(InvalidRequest) as info:
        _reserve(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


def test_unknown_arguments_are_refused():
    with pytest.raises(InvalidRequest):
        _reserve(colour="red")


def test_unicode_holders_are_fine():
    assert _reserve(holder="Zoë@lab-ü").holder == "Zoë@lab-ü"


def test_single_argument_checks():
    assert checked(TtlSeconds, 10, "ttl_s") == 10.0
    with pytest.raises(InvalidRequest):
        checked(Holder, "", "expected_holder")


def test_lease_ids_route_to_their_key_and_refs_hide_them():
    lease_id = "radiance_sim_lane_a." + "ab" * 16
    assert resource_of_lease_id(lease_id) == "radiance_sim_lane_a"
    assert lease_ref(lease_id) not in lease_id and len(lease_ref(lease_id)) == 12
    for bad in ["", "firesim_u250", "firesim_u250.xyz", "../etc/passwd", "a." + "0" * 31, None, 42]:
        with pytest.raises(InvalidRequest):
            resource_of_lease_id(bad)


def test_resource_tables_render_in_a_notebook_and_escape_what_they_show():
    from broker.models import QueueEntry, ResourceState, ResourceStatus, ResourceTable

    table = ResourceTable([
        ResourceStatus(key="firesim_u250", state=ResourceState.LEASED, holder="<alice>", fencing_token=3,
                       queue=(QueueEntry(position=1, holder="bob", priority=0, queued_at=1.0, ref="abc"),),
                       labels={"kind": "fpga"}),
    ])  # fmt: skip
    html = table._repr_html_()
    assert "<table>" in html and "firesim_u250" in html and "&lt;alice&gt;" in html and "bob" in html
    assert isinstance(table, list) and table[0].key == "firesim_u250"
