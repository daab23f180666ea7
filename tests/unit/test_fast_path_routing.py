"""The shim's fast-path routing: which calls go straight to resource:<key>, with which arguments."""

from __future__ import annotations

import pytest

from broker.client import _route

KEY = "firesim_u250"
LEASE = f"{KEY}.{'ab' * 16}"


@pytest.mark.parametrize(
    "method, args, expected",
    [
        ("queue_position", (KEY, "alice", "r-1"), (KEY, ("alice", "r-1"))),
        ("withdraw", (KEY, "alice", "r-1"), (KEY, ("alice", "r-1"))),
        ("release", (LEASE,), (KEY, (LEASE,))),
        ("renew", (LEASE, 60.0), (KEY, (LEASE, 60.0))),
        ("lease", (LEASE,), (KEY, (LEASE,))),
        ("check_fence", (LEASE, 3), (KEY, (LEASE, 3))),
    ],
)
def test_single_key_lease_calls_go_to_their_key_with_the_resource_actors_arguments(method, args, expected):
    assert _route(method, args) == expected


@pytest.mark.parametrize(
    "method, args",
    [
        ("reserve", (KEY, "alice")),  # the coordinator keeps one key per request id
        ("reserve", ("Not A Key!", "alice")),  # the coordinator says InvalidRequest
        ("reserve", (None, "alice")),
        ("reserve", ()),
        ("release", ("garbage",)),
        ("renew", (42, 60.0)),
        ("revoke", (KEY, "holiday")),  # administrative: the coordinator checks the secret
        ("set_maintenance", (KEY, True)),
        ("resources", ()),
        ("submit", ("/abs/dir",)),
    ],
)
def test_everything_else_goes_to_the_coordinator(method, args):
    assert _route(method, args) is None
