"""Bad input, tried systematically: the coordinator answers each with a typed error, never dies,
and changes nothing; the CLI answers each with one line and a distinct exit code."""

from __future__ import annotations

import math

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.errors import BrokerError

pytestmark = pytest.mark.ray

HUGE = "x" * 100_000
BAD = {
    "resource": ["", "Bad Key", "no_such_board", "k" * 65, None, 7, ["firesim_u250"], "fïrësim", HUGE],
    "holder": ["", " alice", "a\nb", "h" * 129, None, 3.5, b"bytes", "\x00", HUGE],
    "ttl_s": [-1, 0, math.nan, math.inf, -math.inf, 1e12, "10", True, None, [1]],
    "wait": ["yes", 1, None, 0.0],
    "timeout_s": [-5, math.nan, "x", math.inf, 1e12],
    "priority": [1.5, 10**9, -(10**9), "1", True, None],
    "request_id": ["", "has space", "r" * 300, 5, "ü", "a/../b\n"],
    "note": ["n" * 5000, 5, HUGE],
    "lease_id": [
        "",
        "nope",
        "firesim_u250." + "z" * 32,
        None,
        12,
        "../../etc/passwd",
        "firesim_u250." + "0" * 31,
        HUGE,
    ],
    "on": ["on", 1, None, "true"],
    "reason": ["\x00", "r" * 1000, 5, None],
    "fencing_token": ["1", 1.5, None, True],
    "run_id": ["run-x", "../../etc", None, 5, "run-20260101-000000-zzzzzzzz", HUGE],
    "bundle": [5, None, {"target": "x"}, "relative/path", "/nonexistent/dir", ["a"], {"steps": []}],
    "active_only": [],
    "session": ["", "01", "0000000G", 5, "job-1", HUGE],
    "bind_session": ["yes", 1, None],
}
GOOD = {
    "resource": ["firesim_u250"],
    "holder": ["fuzzer"],
    "ttl_s": [60.0],
    "wait": [False],
    "timeout_s": [None],
    "priority": [0],
    "request_id": ["fuzz-1"],
    "note": [""],
    "lease_id": ["firesim_u250." + "0" * 32],
    "on": [True],
    "reason": ["fuzz"],
    "fencing_token": [1],
    "run_id": ["run-20260101-000000-00000000"],
    "bundle": ["/nonexistent/dir"],
    "session": [None],
    "bind_session": [True],
}
RESERVE_OPTIONS = ("ttl_s", "wait", "timeout_s", "priority", "request_id", "note", "session", "bind_session")
# (method, positional parameters, keyword parameters)
METHODS = [
    ("reserve", ["resource", "holder"], [*RESERVE_OPTIONS]),
    ("release", ["lease_id"], []),
    ("renew", ["lease_id", "ttl_s"], []),
    ("lease", ["lease_id"], []),
    ("revoke", ["resource", "reason"], ["request_id"]),
    ("set_maintenance", ["resource", "on", "reason"], []),
    ("queue_position", ["resource", "holder", "request_id"], []),
    ("withdraw", ["resource", "holder", "request_id"], []),
    ("check_fence", ["lease_id", "fencing_token"], []),
    ("submit", ["bundle"], ["holder", "priority", "request_id"]),
    ("run", ["run_id"], []),
    ("cancel", ["run_id"], []),
    ("logs", ["run_id"], []),
]


@st.composite
def bad_calls(draw):
    method, positional, keywords = draw(st.sampled_from(METHODS))
    names = positional + keywords
    corrupt = draw(st.sets(st.sampled_from(names), min_size=1, max_size=len(names)))
    values = {}
    for name in names:
        pool = BAD[name] if name in corrupt else GOOD[name]
        values[name] = draw(st.sampled_from(pool))
    args = [values[name] for name in positional]
    kwargs = {name: values[name] for name in keywords}
    return method, args, kwargs


def _state_files(env) -> dict[str, bytes]:
    files = {}
    for path in env.state.root.rglob("*"):
        if path.is_file() and path.name != "events.jsonl":
            files[str(path.relative_to(env.state.root))] = path.read_bytes()
    return files


def _lease_events(env) -> list[str]:
    return [
        line
        for line in env.state.events_path.read_text().splitlines()
        if '"event":"lease.' in line or '"event":"run.' in line
    ]


_BEFORE: dict[str, tuple[dict[str, bytes], list[str]]] = {}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=bad_calls())
def test_bad_calls_get_typed_errors_and_change_nothing(unchanging_broker, call):
    method, args, kwargs = call
    broker = ray.get_actor("broker", namespace=unchanging_broker.namespace)
    before = _BEFORE.setdefault(
        unchanging_broker.namespace, (_state_files(unchanging_broker), _lease_events(unchanging_broker))
    )
    try:
        result = ray.get(getattr(broker, method).remote(*args, **kwargs), timeout=60)
    except BrokerError:
        result = None
    # a valid-looking call may legitimately answer (e.g. queue_position -> None, lease not found is typed)
    assert result is None or method in ("queue_position", "withdraw"), (method, args, kwargs, result)
    files, events = before
    assert _lease_events(unchanging_broker) == events
    assert _state_files(unchanging_broker) == files


def test_missing_and_extra_arguments_are_refused_before_the_actor(unchanging_broker):
    broker = ray.get_actor("broker", namespace=unchanging_broker.namespace)
    for call in (
        lambda: broker.reserve.remote("firesim_u250"),
        lambda: broker.reserve.remote("firesim_u250", "alice", colour="red"),
        lambda: broker.release.remote(),  # noqa: PLW0108 - the call must happen inside pytest.raises
        lambda: broker.revoke.remote("firesim_u250", "why", "positional-holder"),
    ):
        with pytest.raises(TypeError):
            call()
    assert ray.get(broker.status.remote()).healthy


@pytest.mark.parametrize(
    ("args", "codes"),
    [
        (["ray", "resources", "reserve", "firesim_u250", "--holder", "x" * 5000], {3}),
        (["ray", "resources", "reserve", "firesim_u250", "--ttl", "nan"], {3}),
        (["ray", "resources", "reserve", "firesim_u250", "--ttl", "1e400"], {3}),
        (["ray", "resources", "reserve", "firesim_u250", "--priority", "99999"], {3}),
        (["ray", "resources", "reserve", "firesim_u250", "--priority", "high"], {2}),
        (["ray", "resources", "reserve", "fïrësim"], {3}),
        (["ray", "resources", "reserve", "firesim_u250", "--holder", "bad\nholder"], {3}),
        (["ray", "resources", "reserve", "firesim_u250", "--request-id", "with space"], {3}),
        (["ray", "resources", "renew", "firesim_u250." + "0" * 32, "--ttl=-1s"], {3}),
        (["ray", "resources", "maintenance", "firesim_u250", "maybe"], {2}),
        (["ray", "resources", "revoke", "firesim_u250"], {2}),
        (["ray", "jobs", "cancel", "run-<script>"], {3}),
        (["ray", "resources", "list", "--extra"], {2}),
    ],
)
def test_cli_bad_input(unchanging_broker, args, codes):
    before = _state_files(unchanging_broker)
    out = unchanging_broker.cli(*args)
    assert out.returncode in codes, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert _state_files(unchanging_broker) == before
