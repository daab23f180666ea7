"""What people see, without Ray: one-line messages, hints per surface, JSON errors, listing filters,
durations, the parser's help and completion, usage totals, the cross-key request index."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.cli import build_parser
from broker.cli.common import state_dir_error
from broker.cli.completion import bash_script, catalog_keys, command_tree, held_lease_ids
from broker.cli.filters import ResourceFilter, parse_labels, pools_for
from broker.core.accounting import UsageBy, account
from broker.core.durations import format_duration
from broker.core.request_index import GROUP_REQUEST, RequestIndex
from broker.errors import (
    EXIT_CODES,
    BrokerUnavailable,
    InvalidRequest,
    LeaseNotHeld,
    NotAuthorized,
    ResourceBusy,
    Surface,
    WaitTimeout,
    error_json,
)
from broker.models import (
    Lease,
    LeaseState,
    QueueEntry,
    ReserveRequest,
    ResourceState,
    ResourceStatus,
    ResourceTable,
    validated,
)
from tests.unit.test_errors import SAMPLES

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------- messages


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("surface", list(Surface))
def test_every_message_is_one_line_on_every_surface(error, surface):
    text = error.describe(surface)
    assert text and "\n" not in text
    assert error.summary() in text


def test_each_surface_spells_its_own_hint_and_never_the_others():
    busy = ResourceBusy("firesim_u250", "alice", 1_800_000_000.0, 0, None)
    refused = NotAuthorized("revoke firesim_u250", "mallory")
    timeout = WaitTimeout("firesim_u250", 30.0)
    for error, python, cli in (
        (busy, "wait=True", "--wait"),
        (refused, "admin_secret=", "--admin-secret-file"),
        (timeout, "timeout_s", "--timeout"),
    ):
        assert python in str(error) and cli not in str(error)
        assert cli in error.describe(Surface.CLI) and python not in error.describe(Surface.CLI)
        assert cli not in error.describe(Surface.HTTP)  # HTTP names JSON fields, never flags


def test_busy_names_holder_expiry_and_queue_length_even_when_nobody_waits():
    empty = str(ResourceBusy("k", "alice", 1_800_000_000.0, 0, None))
    assert "alice" in empty and "2027-01-15T08:00:00Z" in empty and "nobody waiting" in empty
    assert "3 waiting" in str(ResourceBusy("k", "alice", None, 3, None))
    assert "2 waiting" in str(ResourceBusy("k", None, None, 2, "fan swap"))


def test_a_revoke_for_the_wrong_holder_names_the_holder_found():
    error = LeaseNotHeld("abc123", "granted", "'k' is held by 'alice', not 'bob': nothing was revoked", holder="alice")
    assert str(error) == "'k' is held by 'alice', not 'bob': nothing was revoked"
    assert "not held" not in str(error)
    assert vars(pickle.loads(pickle.dumps(error))) == vars(error)


def test_a_wait_timeout_says_its_duration_as_a_duration():
    assert "timed out after 1h30m" in str(WaitTimeout("k", 5400.0))


def test_rays_wrapper_of_our_error_prints_our_one_line():
    from ray.exceptions import RayTaskError

    busy = ResourceBusy("firesim_u250", "alice", 1_800_000_000.0, 2, None)
    remote = 'Traceback (most recent call last):\n  File "resource.py", line 1\nResourceBusy: ...\n'
    wrapped = RayTaskError("reserve", remote, busy, "ray::ResourceActor.reserve", 42, "127.0.0.1")
    raised = wrapped.as_instanceof_cause()  # what `ray.get` raises in a notebook
    assert isinstance(raised, ResourceBusy) and type(raised).__name__ == "RayTaskError(ResourceBusy)"
    assert str(raised) == str(busy) and "\n" not in str(raised)
    assert raised.holder == "alice" and raised.queue_length == 2
    assert "resource.py" in raised.remote_traceback()  # the remote frames are still there for debugging
    assert error_json(raised)["error"]["type"] == "ResourceBusy"


# ---------------------------------------------------------------------- JSON errors


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_json_errors_carry_type_message_exit_code_and_fields(error):
    body = json.loads(json.dumps(error_json(error)))["error"]
    assert body["type"] == type(error).__name__
    assert body["exit_code"] == EXIT_CODES[type(error).__name__] == error.exit_code
    assert body["message"] == error.describe(Surface.CLI)
    for name, value in error.fields().items():
        if name != "message":
            assert body[name] == (list(value) if isinstance(value, tuple) else value)


def test_json_error_of_a_busy_resource_has_what_a_script_needs():
    body = error_json(ResourceBusy("firesim_u250", "alice", 1_800_000_000.0, 2, None))["error"]
    assert (body["holder"], body["expires_at"], body["queue_length"]) == ("alice", 1_800_000_000.0, 2)


def test_json_error_of_an_internal_error_is_exit_1():
    body = error_json(RuntimeError("boom\nsecond line"))["error"]
    assert body == {"type": "RuntimeError", "message": "boom", "exit_code": 1}


def merlin(tmp_path: Path, *args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MERLIN_"))}
    env["MERLIN_STATE_DIR"] = str(state if state is not None else tmp_path / "state")
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("args", "kind", "code"),
    [
        (["ray", "resources", "reserve", "firesim_u250", "--ttl", "soon", "--json"], "InvalidRequest", 3),
        (["ray", "resources", "list", "--json"], "BrokerUnavailable", 10),
        (["ray", "resources", "list", "--json", "--colour"], "UsageError", 2),
    ],
)
def test_under_json_an_error_is_an_object_on_stdout_and_one_line_on_stderr(tmp_path, args, kind, code):
    out = merlin(tmp_path, *args)
    assert out.returncode == code
    body = json.loads(out.stdout)["error"]
    assert body["type"] == kind and body["exit_code"] == code and body["message"]
    assert out.stderr.count("\n") == 1 and body["message"] in out.stderr


def test_without_json_an_error_leaves_stdout_empty(tmp_path):
    out = merlin(tmp_path, "ray", "resources", "reserve", "firesim_u250", "--ttl", "soon")
    assert out.returncode == 3 and out.stdout == "" and out.stderr.count("\n") == 1


@pytest.mark.parametrize("command", [["ray", "cluster", "start-local"], ["ray", "events"], ["broker", "up"]])
def test_a_state_dir_under_a_file_is_exit_10_naming_the_dir(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = merlin(tmp_path, *command, state=blocker / "state")
    assert out.returncode == 10, out.stderr
    assert f"state dir {blocker / 'state'} cannot be used" in out.stderr and out.stderr.count("\n") == 1


def test_state_dir_error_only_claims_errors_about_the_state_dir(tmp_path):
    root = tmp_path / "state"
    inside = state_dir_error(NotADirectoryError(20, "Not a directory", str(root / "events.jsonl")), root)
    assert isinstance(inside, BrokerUnavailable) and inside.exit_code == 10 and "Not a directory" in str(inside)
    assert state_dir_error(FileNotFoundError(2, "No such file", "/etc/other"), root) is None
    assert state_dir_error(OSError(5, "I/O error"), root) is None


# ---------------------------------------------------------------------- durations and display


def test_durations_at_a_glance_keep_two_units():
    assert format_duration(6934, units=2) == "1h55m"
    assert format_duration(6934) == "1h55m34s"
    assert format_duration(90061, units=2) == "1d1h"
    assert format_duration(45.5, units=2) == "45.5s"


def test_the_notebook_table_shows_expiry_as_a_duration():
    status = ResourceStatus(key="firesim_u250", state=ResourceState.LEASED, holder="alice",
                            fencing_token=3, expires_at=time.time() + 6934.6)  # fmt: skip
    html = ResourceTable([status])._repr_html_()
    assert "in 1h55m<" in html and "6934" not in html


def test_ttl_limits_are_said_as_durations():
    with pytest.raises(InvalidRequest) as refused:
        validated(ReserveRequest, resource="k", holder="h", ttl_s=30 * 86400.0, request_id="r")
    assert str(refused.value) == "invalid ttl_s=30d: must be at most 7d"
    with pytest.raises(InvalidRequest) as refused:
        validated(ReserveRequest, resource="k", holder="h", ttl_s="2h", request_id="r")
    assert "'2h'" in str(refused.value)  # not a number: said as given


def _granted(ttl_s: float, max_hold_s: float | None, granted_at: float = 1_000.0) -> Lease:
    must_end_by = None if max_hold_s is None else granted_at + max_hold_s
    expires_at = granted_at + ttl_s if must_end_by is None else min(granted_at + ttl_s, must_end_by)
    return Lease(lease_id="firesim_u250." + "a" * 32, resource="firesim_u250", holder="alice",
                 state=LeaseState.GRANTED, ttl_s=ttl_s, queued_at=granted_at, granted_at=granted_at,
                 expires_at=expires_at, must_end_by=must_end_by, request_id="r1", fencing_token=1)  # fmt: skip


@pytest.mark.parametrize(
    ("ttl_h", "max_hold_h", "capped"),
    [(13, 12, True), (12, 12, False), (1, 12, False), (13, None, False)],
)
def test_a_ttl_cut_by_the_max_hold_is_said(ttl_h, max_hold_h, capped):
    lease = _granted(ttl_h * 3600.0, None if max_hold_h is None else max_hold_h * 3600.0)
    assert lease.ttl_capped_by_max_hold is capped
    answer = lease.for_holder()
    assert answer["ttl_capped_by_max_hold"] is capped
    assert answer["ref"] == lease.ref and answer["lease_id"] == lease.lease_id


def test_a_renewal_cut_by_the_max_hold_is_said_from_when_it_was_asked():
    lease = _granted(3600.0, 12 * 3600.0).model_copy(update={"expires_at": 1_000.0 + 12 * 3600.0})
    assert lease.for_holder(asked_at=1_000.0 + 11.5 * 3600.0)["ttl_capped_by_max_hold"] is True
    assert lease.for_holder(asked_at=1_000.0 + 10 * 3600.0)["ttl_capped_by_max_hold"] is False


# ---------------------------------------------------------------------- listing filters


def _status(key: str, state: ResourceState, holder: str | None = None, waiting: tuple[str, ...] = (),
            **labels: str) -> ResourceStatus:  # fmt: skip
    queue = tuple(QueueEntry(position=i + 1, holder=h, priority=0, queued_at=0.0, ref=f"{i:012x}")
                  for i, h in enumerate(waiting))  # fmt: skip
    return ResourceStatus(key=key, state=state, holder=holder, queue=queue, labels=labels)


STATUSES = [
    _status("fpga_a", ResourceState.LEASED, "alice", ("bob",), kind="fpga", site="a"),
    _status("fpga_b", ResourceState.FREE, kind="fpga", site="b"),
    _status("board", ResourceState.MAINTENANCE, kind="board", site="a"),
    _status("sim", ResourceState.LEASED, "carol", kind="sim"),
]


@pytest.mark.parametrize(
    ("chosen", "keys"),
    [
        (ResourceFilter(), ["fpga_a", "fpga_b", "board", "sim"]),
        (ResourceFilter(states=frozenset({ResourceState.LEASED})), ["fpga_a", "sim"]),
        (ResourceFilter(labels={"kind": "fpga"}), ["fpga_a", "fpga_b"]),
        (ResourceFilter(labels={"kind": "fpga", "site": "a"}), ["fpga_a"]),
        (ResourceFilter(labels={"colour": "red"}), []),
        (ResourceFilter(holders=frozenset({"bob"})), ["fpga_a"]),  # waiting counts as involved
        (ResourceFilter(holders=frozenset({"carol", "alice"})), ["fpga_a", "sim"]),
        (ResourceFilter(states=frozenset({ResourceState.FREE}), holders=frozenset({"alice"})), []),
    ],
)
def test_resource_filters(chosen, keys):
    assert [status.key for status in chosen.apply(STATUSES)] == keys
    assert [status.key for status in chosen.apply(reversed(STATUSES))] == list(reversed(keys))


def test_a_filtered_listing_shows_the_pools_with_a_member_listed_and_their_own_figures():
    pools = [
        {"pool": "fpgas", "members": ["fpga_a", "fpga_b"], "free": 1, "total": 2},
        {"pool": "sims", "members": ["sim"], "free": 0, "total": 1},
        {"pool": "none", "members": [], "free": 0, "total": 0},
    ]
    assert pools_for(pools, ["board"], filtered=False) == pools  # no filter: every pool
    shown = ResourceFilter(states=frozenset({ResourceState.LEASED})).apply(STATUSES)  # fpga_a and sim
    assert pools_for(pools, [s.key for s in shown], filtered=True) == pools[:2]  # figures unchanged
    shown = ResourceFilter(labels={"kind": "sim"}).apply(STATUSES)
    assert [p["pool"] for p in pools_for(pools, [s.key for s in shown], filtered=True)] == ["sims"]
    assert pools_for(pools, [], filtered=True) == []


def test_labels_parse_from_repeated_and_comma_separated_options():
    assert parse_labels(["kind=fpga", "site=a, rack=2"]) == {"kind": "fpga", "site": "a", "rack": "2"}
    assert parse_labels(None) == {}
    for bad in (["kind"], ["=fpga"], ["kind=fpga,kind=board"]):
        with pytest.raises(InvalidRequest):
            parse_labels(bad)


# ---------------------------------------------------------------------- usage totals


def _journal() -> list[dict]:
    def ev(ts, event, resource, holder, lease, **fields):
        return {"ts": ts, "event": event, "resource": resource, "holder": holder, "lease": lease, **fields}

    return [
        ev(100.0, "lease.granted", "fpga", "alice", "r1", wait_s=0.0),  # before the window, ends inside
        ev(1_100.0, "lease.released", "fpga", "alice", "r1"),
        ev(1_200.0, "lease.granted", "fpga", "bob", "r2", wait_s=60.0),
        ev(4_800.0, "lease.expired", "fpga", "bob", "r2"),
        ev(2_000.0, "lease.granted", "sim", "alice", "r3", wait_s=20.0),
        ev(2_500.0, "lease.revoked", "sim", "alice", "r3", by="admin"),
        ev(9_000.0, "lease.granted", "sim", "bob", "r4", wait_s=0.0),  # still held at the end
        ev(9_100.0, "resource.maintenance", "sim", None, None),
    ]


def test_usage_by_holder_totals_hours_leases_and_mean_wait():
    rows = {row.name: row for row in account(_journal(), since=1_000.0, until=10_000.0, by=UsageBy.HOLDER)}
    assert set(rows) == {"alice", "bob"}
    assert rows["alice"].held_s == pytest.approx(100.0 + 500.0)  # clipped at the window's start
    assert rows["alice"].leases == 1 and rows["alice"].revoked == 1 and rows["alice"].released == 1
    assert rows["bob"].held_s == pytest.approx(3_600.0 + 1_000.0)
    assert rows["bob"].leases == 2 and rows["bob"].mean_wait_s == pytest.approx(30.0) and rows["bob"].expired == 1
    assert rows["bob"].as_dict(UsageBy.HOLDER)["held_hours"] == pytest.approx(4_600.0 / 3600.0, abs=1e-4)


def test_usage_by_resource_adds_up_to_the_same_hours():
    by_holder = account(_journal(), since=1_000.0, until=10_000.0, by=UsageBy.HOLDER)
    by_resource = account(_journal(), since=1_000.0, until=10_000.0, by=UsageBy.RESOURCE)
    assert [row.name for row in by_resource] == ["fpga", "sim"]  # most hours first
    assert sum(r.held_s for r in by_resource) == pytest.approx(sum(r.held_s for r in by_holder))
    assert sum(r.leases for r in by_resource) == sum(r.leases for r in by_holder) == 3
    only_sim = account(_journal(), since=1_000.0, until=10_000.0, by=UsageBy.HOLDER, resource="sim")
    assert {row.name: row.held_s for row in only_sim} == {"alice": 500.0, "bob": 1_000.0}


# ---------------------------------------------------------------------- one request id, one key


def test_a_request_id_names_one_key():
    index = RequestIndex(retention_s=3600.0)
    index.claim("ci", "R1", "lane_b", now=0.0)
    index.claim("ci", "R1", "lane_b", now=1.0)  # a retry on the same key
    with pytest.raises(InvalidRequest) as refused:
        index.claim("ci", "R1", "lane_a", now=2.0)
    assert "R1 already names a lease on lane_b" in str(refused.value) and refused.value.field == "request_id"
    index.claim("other", "R1", "lane_a", now=2.0)  # another holder's R1 is another request
    assert index.key_of("ci", "R1") == "lane_b"


def test_a_request_id_names_a_key_or_a_group_request_never_both():
    index = RequestIndex()
    index.claim("ci", "G1", GROUP_REQUEST, now=0.0)
    index.claim("ci", "G1", GROUP_REQUEST, now=1.0)  # the group request's retry
    with pytest.raises(InvalidRequest) as refused:
        index.claim("ci", "G1", "lane_a", now=2.0)
    assert "G1 already names a group request" in str(refused.value) and refused.value.field == "request_id"
    index.claim("ci", "S1", "lane_a", now=3.0)
    with pytest.raises(InvalidRequest) as refused:
        index.claim("ci", "S1", GROUP_REQUEST, now=4.0)
    assert "S1 already names a lease on lane_a" in str(refused.value) and "for a group request" in str(refused.value)
    assert index.key_of("ci", "G1") == GROUP_REQUEST and index.key_of("ci", "S1") == "lane_a"


def test_a_request_that_created_nothing_frees_its_id():
    index = RequestIndex()
    index.claim("ci", "R2", "fpga_a", now=0.0)
    index.forget("ci", "R2", "fpga_a")  # fpga_a was busy
    index.claim("ci", "R2", "fpga_b", now=1.0)
    index.forget("ci", "R2", "fpga_a")  # a late forget for the old key does not unbind the new one
    assert index.key_of("ci", "R2") == "fpga_b"


def test_request_ids_are_forgotten_after_retention_like_the_books_forget_them():
    index = RequestIndex(retention_s=100.0)
    index.learn("ci", "old", "a", at=0.0)
    index.learn("ci", "new", "a", at=950.0)
    index.learn("ci", "new", "a", at=900.0)  # records arrive in any order: the latest activity wins
    index.settle(now=1_000.0)
    assert index.key_of("ci", "old") is None and index.key_of("ci", "new") == "a"
    index.claim("ci", "old", "b", now=1_000.0)  # free again
    index.claim("ci", "x", "b", now=1_051.0)
    assert index.key_of("ci", "new") is None and len(index) == 2


# ---------------------------------------------------------------------- the parser


def _leaves(parser: argparse.ArgumentParser, path: str = "merlin"):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaves(child, f"{path} {name}")


def test_every_argument_and_option_has_help():
    missing = [
        (path, action.dest)
        for path, leaf in _leaves(build_parser())
        for action in leaf._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


READS = ["list", "queue", "show", "history", "usage", "reserve", "release", "renew", "withdraw", "revoke",
         "maintenance"]  # fmt: skip


def test_every_read_command_has_json():
    leaves = dict(_leaves(build_parser()))
    for verb in READS:
        options = {o for action in leaves[f"merlin ray resources {verb}"]._actions for o in action.option_strings}
        assert "--json" in options, verb
    for path in ("merlin broker status", "merlin ray events", "merlin ray jobs status", "merlin ray jobs list"):
        assert "--json" in {o for action in leaves[path]._actions for o in action.option_strings}, path


# ---------------------------------------------------------------------- completion


def _complete(script: str, words: list[str], merlin_words: str = "firesim_u250 radiance_sim_lane_a") -> list[str]:
    """Run the generated bash function as bash would on TAB; `merlin completion ...` is stubbed."""
    program = (
        f"{script}\nmerlin() {{ echo {merlin_words}; }}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; _merlin; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True)
    assert out.stderr == ""
    return [line for line in out.stdout.splitlines() if line]


@pytest.fixture(scope="module")
def script() -> str:
    return bash_script(command_tree(build_parser()))


def test_completion_of_subcommands(script):
    assert _complete(script, ["merlin", ""]) == ["broker", "targetgen", "mcp", "bench", "chaos", "ray", "completion"]
    assert _complete(script, ["merlin", "ray", "resources", "re"]) == ["reserve", "release", "renew", "revoke"]


def test_completion_of_options_skips_their_values(script):
    assert "--request-id" in _complete(script, ["merlin", "ray", "resources", "reserve", "--"])
    assert _complete(script, ["merlin", "ray", "resources", "reserve", "--holder", "ci", "fire"]) == ["firesim_u250"]


def test_completion_of_keys_lease_ids_and_choices(script):
    lease_id = "firesim_u250." + "b" * 32
    assert _complete(script, ["merlin", "ray", "resources", "release", "f"], lease_id) == [lease_id]
    assert _complete(script, ["merlin", "ray", "resources", "maintenance", "firesim_u250", "o"]) == ["on", "off"]
    assert _complete(script, ["merlin", "ray", "resources", "queue", "rad"]) == ["radiance_sim_lane_a"]


def test_completion_offers_only_the_lease_ids_you_hold(tmp_path):
    def record(lease_id: str, holder: str, state: str) -> None:
        data = {"lease_id": lease_id, "holder": holder, "state": state, "queued_at": 1.0}
        (tmp_path / f"{lease_id}.json").write_text(json.dumps(data))

    mine, queued = "k." + "1" * 32, "k." + "2" * 32
    record(mine, "me@host", "granted")
    record(queued, "me@host", "queued")
    record("k." + "3" * 32, "me@host", "released")
    record("k." + "4" * 32, "someone@else", "granted")
    (tmp_path / "k.broken.json").write_text("{not json")
    assert sorted(held_lease_ids(tmp_path, "me@host")) == sorted([mine, queued])
    assert held_lease_ids(tmp_path / "missing", "me@host") == []


def test_completion_keys_come_from_the_catalog_file(tmp_path):
    (tmp_path / "catalog.json").write_text(json.dumps({"resources": {"a": {}, "b": {}}}))
    assert catalog_keys(tmp_path / "catalog.json") == ["a", "b"]
    assert catalog_keys(tmp_path / "none.json") == []


def test_merlin_completion_bash_prints_a_script_bash_accepts(tmp_path):
    out = merlin(tmp_path, "completion", "bash")
    assert out.returncode == 0 and "complete -o default -F _merlin merlin" in out.stdout
    checked = subprocess.run(["bash", "-n"], input=out.stdout, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr


# ---------------------------------------------------------------------- broker up retries


def test_broker_up_retries_while_the_coordinator_restarts():
    from ray.exceptions import ActorUnavailableError

    from broker.seam import RetryPolicy
    from broker.seam.ray_backend import RaySystem

    system = RaySystem(RetryPolicy(window_s=30.0, first_delay_s=0.01))
    failures = [ActorUnavailableError("restarting", b"\0" * 16), ActorUnavailableError("restarting", b"\0" * 16)]

    def flaky() -> list[str]:
        if failures:
            raise failures.pop()
        return ["firesim_u250"]

    assert system.retrying(flaky) == ["firesim_u250"] and not failures

    def dead() -> list[str]:
        raise ActorUnavailableError("gone", b"\0" * 16)

    with pytest.raises(BrokerUnavailable):
        RaySystem(RetryPolicy(window_s=0.0)).retrying(dead)
