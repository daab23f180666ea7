"""The CLI on the HTTP API stays light: no pydantic, no Ray, and answers that read like the models.

A write on the HTTP API costs a Python start-up and one request only while
its command imports neither; these tests fail the day a module on that path
imports one again (at import time or in what a command runs to print).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from broker import models
from broker.cli import _AREAS, _RAY_GROUPS, build_parser, resource_cmds
from broker.cli import common as cli_common
from broker.errors import InvalidRequest
from broker.http import answers
from broker.http.answers import Answer

ROOT = Path(__file__).resolve().parents[2]

# What a command on the HTTP API runs: its parse, its client, its printing of the API's answers.
_HTTP_PATH = textwrap.dedent(
    """
    import contextlib, io, json, sys, time
    from broker.cli import build_parser, main
    from broker.cli.common import Context, emit_json
    from broker.http.answers import Answer

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for argv in (["--help"], ["ray", "--help"], ["ray", "resources", "--help"], ["broker", "--help"]):
            with contextlib.suppress(SystemExit):
                main(argv)
    lease_id = "fpga." + "a" * 32
    for argv in (
        ["ray", "resources", "list", "--state", "free", "--json"],
        ["ray", "resources", "show", "fpga"],
        ["ray", "resources", "reserve", "fpga", "--ttl", "10m", "--wait", "--timeout", "90s", "--json"],
        ["ray", "resources", "renew", lease_id, "--ttl", "2h"],
        ["ray", "resources", "release", lease_id],
        ["ray", "resources", "queue", "fpga"],
        ["broker", "status", "--json"],
    ):
        ctx = Context(build_parser(argv).parse_args(argv))
    assert type(ctx.client()).__name__ == "HttpClient", ctx.client()  # the state dir names an API
    from broker.cli import resource_cmds as rc

    now = time.time()
    lease = Answer(json.loads(sys.argv[1]))
    status = Answer(json.loads(sys.argv[2]))
    with contextlib.redirect_stdout(out):
        rc._print_lease(lease, asked_at=now)
        rc._print_status(status)
        print(rc._status_row(status), rc._looks_like_lease_id(lease_id))
        emit_json(lease.for_holder(now))
        emit_json(status)
    print(json.dumps(sorted(sys.modules)))
    """
)


def _lease_model(**changes: object) -> models.Lease:
    now = time.time()
    fields: dict[str, object] = {
        "lease_id": "fpga." + "b" * 32,
        "resource": "fpga",
        "holder": "alice",
        "state": models.LeaseState.GRANTED,
        "fencing_token": 3,
        "ttl_s": 7200.0,
        "queued_at": now - 5,
        "granted_at": now - 4,
        "expires_at": now + 3600,
        "must_end_by": now + 3600,
        "request_id": "r1",
        "note": "bring-up",
    }
    fields.update(changes)
    return models.Lease(**fields)  # type: ignore[arg-type]


def _status_model() -> models.ResourceStatus:
    now = time.time()
    entry = models.QueueEntry(position=1, holder="bob", priority=2, queued_at=now - 30, ref="c" * 12, note="soon")
    return models.ResourceStatus(
        key="fpga",
        state=models.ResourceState.LEASED,
        holder="alice",
        lease_ref="d" * 12,
        fencing_token=3,
        expires_at=now + 3600,
        queue=(entry,),
        labels={"kind": "fpga", "site": "a"},
        description="an FPGA slot",
    )


def _over_the_wire(data: object) -> object:
    """What the HTTP API sends and its client reads back."""
    return json.loads(json.dumps(data, default=str))


def test_http_path_commands_import_neither_pydantic_nor_ray(tmp_path: Path) -> None:
    (tmp_path / "broker.json").write_text(json.dumps({"namespace": "lighttest", "http_url": "http://127.0.0.1:9/x"}))
    (tmp_path / "operator.token").write_text("secret")
    env = {
        **os.environ,
        "MERLIN_STATE_DIR": str(tmp_path),
        "MERLIN_RAY_NAMESPACE": "lighttest",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("MERLIN_CLI_TRANSPORT", None)
    env.pop("RAY_ADDRESS", None)
    lease = json.dumps(_lease_model().for_holder())
    status = json.dumps(_status_model().model_dump(mode="json"))
    done = subprocess.run(
        [sys.executable, "-c", _HTTP_PATH, lease, status], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    heavy = sorted(
        name
        for name in loaded
        if name.split(".")[0]
        in ("pydantic", "pydantic_core", "ray", "structlog", "prometheus_client", "yaml", "inspect")
        or name in ("broker.models", "broker.disk.store", "broker.core.book", "broker.core.catalog", "broker.seam")
    )
    assert heavy == []
    assert "broker.http.client" in loaded  # the check ran the HTTP path, not some other one


def test_ray_path_stays_the_default_without_an_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broker.json").write_text(json.dumps({"namespace": "lighttest", "http_url": "http://127.0.0.1:9/x"}))
    (tmp_path / "operator.token").write_text("secret")
    monkeypatch.setenv("MERLIN_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MERLIN_RAY_NAMESPACE", "lighttest")
    argv = ["ray", "resources", "show", "fpga"]
    monkeypatch.setenv("MERLIN_CLI_TRANSPORT", "ray")
    assert cli_common.Context(build_parser(argv).parse_args(argv))._http_client() is None
    monkeypatch.delenv("MERLIN_CLI_TRANSPORT")
    assert cli_common.Context(build_parser(argv).parse_args(argv))._http_client() is not None
    other = ["ray", "resources", "show", "fpga", "--namespace", "elsewhere"]
    assert cli_common.Context(build_parser(other).parse_args(other))._http_client() is None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"must_end_by": None},
        {"state": models.LeaseState.RELEASED, "end_reason": "released", "ended_at": 1.0},
        {"state": models.LeaseState.QUEUED, "fencing_token": None, "granted_at": None, "expires_at": None},
    ],
)
def test_a_lease_answer_gives_what_its_model_gives(
    changes: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    model = _lease_model(**changes)
    answer = Answer(_over_the_wire(model.for_holder()))  # type: ignore[arg-type]
    for asked_at in (None, time.time(), time.time() - 7000):
        assert answer.for_holder(asked_at) == model.for_holder(asked_at)
    assert answer.public() == model.public()
    assert list(answer.public()) == list(model.public())  # the same order: --json output is the same text
    assert answer.ref == model.ref
    printed = []
    for lease in (model, answer):
        resource_cmds._print_lease(lease, asked_at=time.time() - 7000)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0]


def test_a_group_answer_and_a_status_answer_give_what_their_models_give(capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    member = models.GroupMember(key="fpga", fencing_token=4, host="h1", properties={"slot": 1})
    group = models.GroupLease(
        lease_id="group:" + "e" * 32,
        holder="alice",
        request_id="r2",
        state=models.LeaseState.GRANTED,
        count=1,
        candidates=("fpga", "fpga2"),
        selector="kind=fpga",
        ttl_s=60.0,
        queued_at=now,
        granted_at=now,
        expires_at=now + 60,
        members=(member,),
    )
    answer = Answer(_over_the_wire(group.for_holder()))  # type: ignore[arg-type]
    assert answer.for_holder(now) == group.for_holder(now)
    assert list(answer.public().items()) == list(group.public().items())
    assert answers.is_group(answer) and answers.is_group(group) and not answers.is_group(_lease_model())
    status = _status_model()
    read = Answer(_over_the_wire(status.model_dump(mode="json")))  # type: ignore[arg-type]
    printed = []
    for lease, shown in ((group, status), (answer, read)):
        resource_cmds._print_group(lease)
        resource_cmds._print_status(shown)
        print(resource_cmds._status_row(shown), resource_cmds._headline(shown))
        cli_common.emit_json(shown)
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1]


def test_what_the_cli_restates_agrees_with_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.cli import broker_cmds, events_cmds
    from broker.core.accounting import UsageBy
    from broker.disk.store import DEFAULT_STATE_DIR, StateDir
    from broker.disk.token_store import operator_token_path
    from broker.http import metrics
    from broker.seam.placement import DEFAULT_NAMESPACE

    assert [(s.name, s.value) for s in answers.LeaseState] == [(s.name, s.value) for s in models.LeaseState]
    assert [(s.name, s.value) for s in answers.ResourceState] == [(s.name, s.value) for s in models.ResourceState]
    samples = ["fpga", "fpga." + "a" * 32, "group:" + "a" * 32, "Fpga", "a" * 65, "x.y_z-1", "", "fpga.ABC", "a:b"]
    for text in samples:
        assert answers.is_resource_key(text) == models.is_resource_key(text), text
        assert answers.is_group_lease_id(text) == models.is_group_lease_id(text), text
        try:
            expected: object = models.resource_of_lease_id(text)
        except InvalidRequest as err:
            expected = str(err)
        try:
            got: object = answers.resource_of_lease_id(text)
        except InvalidRequest as err:
            got = str(err)
        assert got == expected, text
    for asked_at in (None, time.time(), time.time() - 7000):
        lease = _lease_model()
        assert answers.ttl_capped_by_max_hold(lease, asked_at) == models.ttl_capped_by_max_hold(lease, asked_at)
    assert list(events_cmds.USAGE_BY) == [by.value for by in UsageBy]
    assert (cli_common.DEFAULT_STATE_DIR, cli_common.DEFAULT_NAMESPACE) == (DEFAULT_STATE_DIR, DEFAULT_NAMESPACE)
    assert (broker_cmds.DEFAULT_METRICS_HOST, broker_cmds.DEFAULT_METRICS_PORT) == (
        metrics.DEFAULT_METRICS_HOST,
        metrics.DEFAULT_METRICS_PORT,
    )
    monkeypatch.chdir(tmp_path)
    for override in (None, str(tmp_path / "here"), "~/x"):
        for env in (None, str(tmp_path / "env")):
            if env is None:
                monkeypatch.delenv("MERLIN_STATE_DIR", raising=False)
            else:
                monkeypatch.setenv("MERLIN_STATE_DIR", env)
            assert cli_common.state_root(override) == StateDir.from_env(override).root
    state = StateDir(tmp_path)
    assert operator_token_path(state) == tmp_path / cli_common.OPERATOR_TOKEN_FILE


def _listing(parser: argparse.ArgumentParser, *path: str) -> str:
    """The --help text of ``merlin <path>``."""
    node = parser
    for word in path:
        sub = next(a for a in node._actions if isinstance(a, argparse._SubParsersAction))
        node = sub.choices[word]
    return node.format_help()


def test_a_command_registers_only_its_area_yet_every_listing_is_the_whole_one() -> None:
    full = build_parser()
    assert _listing(build_parser(["--help"])) == _listing(full)
    assert _listing(build_parser(["ray", "--help"]), "ray") == _listing(full, "ray")
    for area in _AREAS:
        if area != "ray":
            assert _listing(build_parser([area, "--help"]), area) == _listing(full, area), area
    for group in _RAY_GROUPS:
        assert _listing(build_parser(["ray", group, "--help"]), "ray", group) == _listing(full, "ray", group), group
    lazy = build_parser(["ray", "resources", "list"])
    ray = next(a for a in lazy._actions if isinstance(a, argparse._SubParsersAction)).choices["ray"]
    groups = next(a for a in ray._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert groups["jobs"]._actions[1:] == []  # listed by name only: its module was not needed
