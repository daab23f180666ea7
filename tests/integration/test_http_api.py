"""The authenticated HTTP API on the real loopback cluster: tokens as identities, JSON errors with
their statuses, a waiting reserve that leaves the queue when its client goes, every documented route
served, and the CLI on HTTP without importing Ray."""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from broker.disk.token_store import read_operator_token
from tests.integration.conftest import ROOT
from tests.integration.test_runs import target
from tests.waiting import until

pytestmark = pytest.mark.ray


def _url(env) -> str:
    return json.loads(env.state.broker_record_path.read_text())["http_url"]


def call(env, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(_url(env) + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            raw, status, kind = answer.read(), answer.status, answer.headers.get_content_type()
    except urllib.error.HTTPError as failed:
        raw, status, kind = failed.read(), failed.code, failed.headers.get_content_type()
    return status, (json.loads(raw) if kind == "application/json" else raw.decode())


@pytest.fixture
def api(broker_env):
    until(lambda: json.loads(broker_env.state.broker_record_path.read_text()).get("http_url"), "the API listens")
    return broker_env


def test_tokens_are_identities_and_errors_are_json_with_statuses(api):
    operator = read_operator_token(api.state)
    assert operator and (api.state.root / "operator.token").stat().st_mode & 0o777 == 0o600
    status, body = call(api, "GET", "/resources")
    assert status == 401 and body["error"]["type"] == "NotAuthenticated"
    assert call(api, "GET", "/resources", token="mt_" + "0" * 64)[0] == 401

    made = api.cli("broker", "token", "create", "alice", "--json")
    assert made.returncode == 0, made.stderr
    alice = json.loads(made.stdout)["token"]
    bob = json.loads(api.cli("broker", "token", "create", "bob", "--json").stdout)["token"]
    tokens = json.loads((api.state.root / "tokens.json").read_text())
    assert alice not in json.dumps(tokens) and {t["name"] for t in tokens} == {"alice", "bob"}  # hashes only

    status, lease = call(api, "POST", "/reserve", {"resource": "firesim_u250", "ttl_s": 600}, alice)
    assert status == 200 and lease["holder"] == "alice" and lease["state"] == "granted"
    status, busy = call(api, "POST", "/reserve", {"resource": "firesim_u250"}, bob)
    assert status == 409 and busy["error"]["type"] == "ResourceBusy" and busy["error"]["holder"] == "alice"
    assert call(api, "POST", "/reserve", {"resource": "nope"}, bob)[1]["error"]["type"] == "UnknownResource"
    status, bad = call(api, "POST", "/reserve", {"resource": "firesim_u250", "ttl_s": -1}, bob)
    assert status == 422 and bad["error"]["type"] == "InvalidRequest"
    assert call(api, "POST", "/reserve", {"resource": "firesim_u250", "colour": "red"}, bob)[0] == 422
    # Nobody acts as someone else: bob can neither take a lease as alice nor release hers.
    status, refused = call(api, "POST", "/reserve", {"resource": "radiance_sim_lane_a", "holder": "alice"}, bob)
    assert status == 403 and refused["error"]["type"] == "NotAuthorized"
    assert call(api, "POST", f"/leases/{lease['lease_id']}/release", {}, bob)[0] == 403
    assert call(api, "POST", "/resources/firesim_u250/revoke", {"reason": "mine now"}, bob)[0] == 403
    assert call(api, "GET", f"/leases/{lease['lease_id']}", token=alice)[1]["state"] == "granted"
    assert call(api, "POST", f"/leases/{lease['lease_id']}/renew", {"ttl_s": 900}, alice)[0] == 200
    # The operator (the state dir's own token) is the local admin: it may revoke, and act for anyone.
    status, revoked = call(api, "POST", "/resources/firesim_u250/revoke", {"reason": "bench"}, operator)
    assert status == 200 and revoked["state"] == "revoked" and revoked["ended_by"] == "operator"
    assert call(api, "POST", "/reserve", {"resource": "radiance_sim_lane_a", "holder": "carol"}, operator)[0] == 200
    # A revoked token is refused from then on.
    assert api.cli("broker", "token", "revoke", "bob").returncode == 0
    assert call(api, "GET", "/status", token=bob)[0] == 401
    journal = api.state.events_path.read_text()
    assert '"auth.refused"' in journal and alice not in journal and bob not in journal


def test_a_waiting_reserve_leaves_the_queue_when_its_client_disconnects(api):
    operator = read_operator_token(api.state)
    status, held = call(api, "POST", "/reserve", {"resource": "spacemit_x60_board_01", "holder": "x"}, operator)
    assert status == 200
    host, port = _url(api).split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"resource": "spacemit_x60_board_01", "holder": "waiter", "wait": True}).encode()
    headers = {"Authorization": f"Bearer {operator}", "Content-Type": "application/json"}
    connection.request("POST", "/api/v1/reserve", body=body, headers=headers)
    board = lambda: next(s for s in api.client.resources() if s.key == "spacemit_x60_board_01")  # noqa: E731
    until(lambda: [e.holder for e in board().queue] == ["waiter"], "the HTTP waiter queued")
    gone = time.monotonic()
    connection.close()  # the client goes away
    until(lambda: board().queue == (), "the waiter left the queue")
    print(f"\nHTTP waiter disconnect -> out of the queue: {time.monotonic() - gone:.3f} s")
    call(api, "POST", f"/leases/{held['lease_id']}/release", {}, operator)
    assert board().holder is None  # nobody was granted a lease nobody waits for


def test_every_documented_route_is_served(api):
    operator = read_operator_token(api.state)
    status, document = call(api, "GET", "/openapi.json")
    assert status == 200 and document["openapi"].startswith("3.")
    samples = {
        "lease_id": "firesim_u250." + "0" * 32,
        "key": "firesim_u250",
        "run_id": "r" + "0" * 11,
        "name": "nobody",
    }
    for path, operations in document["paths"].items():
        for method in operations:
            concrete = path.removeprefix("/api/v1")
            for name, value in samples.items():
                concrete = concrete.replace("{" + name + "}", value)
            status, _ = call(api, method.upper(), concrete, {} if method != "get" else None, operator)
            assert status not in (404, 405) or isinstance(_, dict) and "error" in _, f"{method} {path}: {status}"


def test_cli_writes_go_over_http_without_importing_ray(api, tmp_path):
    env = api.env()
    probe = (
        "import sys, runpy; sys.argv = ['merlin'] + sys.argv[1:]\n"
        "from broker.cli import main\n"
        "code = main()\n"
        "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )

    def merlin(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", probe, *args],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    reserved = merlin("ray", "resources", "reserve", "radiance_sim_lane_a", "--ttl", "10m", "--json")
    assert reserved.returncode == 0, reserved.stderr
    assert "NO_RAY" in reserved.stderr
    lease_id = json.loads(reserved.stdout)["lease_id"]
    walls = {}
    for verb, args in (("show", (lease_id,)), ("renew", (lease_id, "--ttl", "5m")), ("release", (lease_id,))):
        samples = []
        for _ in range(3 if verb == "show" else 1):
            started = time.monotonic()
            out = merlin("ray", "resources", verb, *args)
            samples.append(time.monotonic() - started)
            assert out.returncode == 0 and "NO_RAY" in out.stderr, out.stderr
        walls[verb] = statistics.median(samples)
    print("\nCLI over HTTP, wall s: " + ", ".join(f"{verb} {wall:.3f}" for verb, wall in walls.items()))
    again = merlin("ray", "resources", "show", lease_id)
    assert again.returncode == 7  # released: not held
    busy = merlin("ray", "resources", "reserve", "nope", "--json")
    assert busy.returncode == 4 and json.loads(busy.stdout)["error"]["type"] == "UnknownResource"

    # Reads, and a run from submit to cancel: none of them imports Ray either (the run's own life over
    # HTTP, logs included, is test_fences_queues_timeouts_events_and_runs_over_http's).
    listed = merlin("ray", "resources", "list", "--json")
    assert listed.returncode == 0 and "NO_RAY" in listed.stderr, listed.stderr
    assert {s["key"] for s in json.loads(listed.stdout)} == {
        "firesim_u250",
        "spacemit_x60_board_01",
        "radiance_sim_lane_a",
    }
    status = merlin("broker", "status", "--json")
    assert status.returncode == 0 and "NO_RAY" in status.stderr and json.loads(status.stdout)["healthy"] is True
    held = merlin("ray", "resources", "reserve", "firesim_u250", "--holder", "x", "--json")  # the run waits for it
    directory = target(tmp_path, "cli-run", "firesim_u250", 0.2)
    submitted = merlin("ray", "jobs", "submit", str(directory), "--json")
    assert submitted.returncode == 0 and "NO_RAY" in submitted.stderr, submitted.stderr
    run = json.loads(submitted.stdout)
    assert run["status"] == "pending" and run["source"] == "http" and run["workdir"] == str(directory)
    executed = merlin(
        "targetgen",
        "execute",
        "--engine",
        "ray",
        "--from-dir",
        str(target(tmp_path, "cli-exec", "firesim_u250")),
        "--json",
    )
    assert executed.returncode == 0 and "NO_RAY" in executed.stderr, executed.stderr
    second = json.loads(executed.stdout)
    assert second["status"] == "pending" and second["source"] == "http"
    for verb in ("status", "logs", "cancel"):
        shown = merlin("ray", "jobs", verb, run["run_id"])
        assert shown.returncode == 0 and "NO_RAY" in shown.stderr, shown.stderr
        assert verb == "logs" or run["run_id"] in shown.stdout
    assert merlin("ray", "jobs", "cancel", second["run_id"]).returncode == 0
    listing = merlin("ray", "jobs", "list", "--json")
    assert listing.returncode == 0 and "NO_RAY" in listing.stderr
    runs = {(r["run_id"], r["status"]) for r in json.loads(listing.stdout)}
    assert runs == {(run["run_id"], "stopped"), (second["run_id"], "stopped")}
    assert merlin("ray", "resources", "release", json.loads(held.stdout)["lease_id"]).returncode == 0

    # A bad token (unknown, or revoked) is one line and exit 11, and the broker journals the refusal.
    made = merlin("broker", "token", "create", "dave", "--json")
    dave = json.loads(made.stdout)["token"]
    assert merlin("ray", "resources", "list", MERLIN_TOKEN=dave).returncode == 0
    assert merlin("broker", "token", "revoke", "dave").returncode == 0
    unknown = "mt_" + "2" * 64
    for token, argv in (
        (unknown, ("ray", "resources", "list")),
        (unknown, ("broker", "status")),
        (unknown, ("ray", "resources", "reserve", "firesim_u250")),
        (dave, ("ray", "resources", "reserve", "firesim_u250")),
    ):
        refused = merlin(*argv, MERLIN_TOKEN=token)
        said = refused.stderr.strip().splitlines()
        assert refused.returncode == 11 and len(said) == 2 and said[-1] == "NO_RAY", (argv, refused.stderr)
        assert said[0].startswith("merlin: NotAuthenticated: ") and "valid API token" in said[0]
    journal = api.state.events_path.read_text()
    assert journal.count('"auth.refused"') == 4 and dave not in journal and unknown not in journal


def test_fences_queues_timeouts_events_and_runs_over_http(api, tmp_path):
    """The routes past reserve/release, each for what it promises (one broker for all of them)."""
    operator = read_operator_token(api.state)
    alice, bob = (call(api, "POST", "/tokens", {"name": name}, operator)[1]["token"] for name in ("alice", "bob"))
    key = "radiance_sim_lane_a"

    # check_fence: the holder's token while it holds; after a revoke and a new grant, stale (409).
    status, lease = call(api, "POST", "/reserve", {"resource": key, "ttl_s": 600}, alice)
    assert status == 200
    fence = f"/leases/{lease['lease_id']}/check_fence"
    status, fenced = call(api, "POST", fence, {"fencing_token": lease["fencing_token"]}, alice)
    assert status == 200 and fenced["state"] == "granted" and fenced["fencing_token"] == lease["fencing_token"]
    assert call(api, "POST", "/resources/" + key + "/revoke", {"reason": "bench"}, operator)[0] == 200
    status, bobs = call(api, "POST", "/reserve", {"resource": key, "holder": "bob", "ttl_s": 600}, operator)
    assert status == 200 and bobs["fencing_token"] > lease["fencing_token"]
    status, stale = call(api, "POST", fence, {"fencing_token": lease["fencing_token"]}, alice)
    assert status == 409 and stale["error"]["type"] == "StaleFencingToken"
    assert (
        stale["error"]["token"] == lease["fencing_token"] and stale["error"]["current_token"] == bobs["fencing_token"]
    )
    assert call(api, "POST", fence, {"fencing_token": "1"}, alice)[0] == 422

    # A waiting reserve that runs out of time: 408 WaitTimeout, and it left the queue.
    status, timed_out = call(api, "POST", "/reserve", {"resource": key, "wait": True, "timeout_s": 0.3}, alice)
    assert status == 408 and timed_out["error"]["type"] == "WaitTimeout" and timed_out["error"]["resource"] == key
    lane = lambda: next(s for s in call(api, "GET", "/resources", token=alice)[1] if s["key"] == key)  # noqa: E731
    assert lane()["queue"] == [] and lane()["holder"] == "bob"

    # queue_position while two wait (each asks for its own; the operator for anyone); then the grant.
    waits = {}

    def wait_for(name: str, token: str, body: dict[str, Any]) -> None:
        waits[name] = call(api, "POST", "/reserve", {"resource": key, "wait": True, **body}, token)

    first = threading.Thread(target=wait_for, args=("alice", alice, {"request_id": "q1"}))
    first.start()
    place = lambda holder, rid, token: call(  # noqa: E731
        api, "GET", f"/queue_position?resource={key}&holder={holder}&request_id={rid}", token=token
    )
    until(lambda: place("alice", "q1", alice) == (200, {"position": 1}), "alice waits first")
    second = threading.Thread(target=wait_for, args=("carol", operator, {"request_id": "q2", "holder": "carol"}))
    second.start()
    until(lambda: place("carol", "q2", operator) == (200, {"position": 2}), "carol waits behind her")
    assert place("carol", "q2", alice)[0] == 403  # alice may not ask for carol's request
    assert call(api, "POST", f"/leases/{bobs['lease_id']}/release", {}, operator)[0] == 200
    first.join(30)
    assert waits["alice"][0] == 200 and waits["alice"][1]["holder"] == "alice"
    assert place("alice", "q1", alice)[1] == {"position": None}
    assert place("carol", "q2", operator)[1] == {"position": 1}
    status, withdrawn = call(
        api, "POST", "/withdraw", {"resource": key, "holder": "carol", "request_id": "q2"}, operator
    )
    assert status == 200 and withdrawn["state"] == "cancelled"
    second.join(30)
    assert waits["carol"][0] == 409 and waits["carol"][1]["error"]["type"] == "LeaseNotHeld"

    # events: the journal's latest, filtered by name; a refused token is journaled, never the token.
    assert call(api, "GET", "/status", token="mt_" + "1" * 64)[0] == 401
    status, events = call(api, "GET", "/events?event=lease.&limit=3", token=alice)
    assert status == 200 and len(events) == 3 and all(e["event"].startswith("lease.") for e in events)
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)  # oldest first
    refused = call(api, "GET", "/events?event=auth.refused", token=alice)[1]
    assert refused and refused[-1]["act"] == "GET /status" and "mt_" not in json.dumps(refused)
    assert call(api, "GET", "/events?limit=x", token=alice)[0] == 422
    # Paging with after=<the last seq seen>: every event once, in order, none skipped.
    first = events[0]["seq"]
    page_1 = call(api, "GET", f"/events?event=lease.&limit=2&after={first - 1}", token=alice)[1]
    page_2 = call(api, "GET", f"/events?event=lease.&limit=2&after={page_1[-1]['seq']}", token=alice)[1]
    assert [e["seq"] for e in page_1 + page_2][:3] == [e["seq"] for e in events]
    assert call(api, "GET", "/events?after=-1", token=alice)[0] == 422

    # runs: submit over HTTP (the token is the holder), read, logs; cancel a queued one (not another's).
    quick = target(tmp_path, "quick", "firesim_u250", 0.2)
    status, run = call(api, "POST", "/runs", {"target_dir": str(quick)}, alice)
    assert status == 200 and run["holder"] == "alice" and run["source"] == "http"
    status, board = call(api, "POST", "/reserve", {"resource": "spacemit_x60_board_01", "ttl_s": 600}, bob)
    assert status == 200  # the next run waits for bob's board
    queued = target(tmp_path, "queued", "spacemit_x60_board_01", 0.2)
    status, waiting = call(api, "POST", "/runs", {"target_dir": str(queued), "request_id": "w-1"}, alice)
    assert status == 200 and waiting["status"] == "pending"
    again = call(api, "POST", "/runs", {"target_dir": str(queued), "request_id": "w-1"}, alice)[1]
    assert again["run_id"] == waiting["run_id"]  # the same request id: the same run
    active = {r["run_id"] for r in call(api, "GET", "/runs?active=1", token=alice)[1]}
    assert waiting["run_id"] in active
    assert call(api, "POST", f"/runs/{waiting['run_id']}/cancel", {}, bob)[0] == 403
    status, cancelled = call(api, "POST", f"/runs/{waiting['run_id']}/cancel", {}, alice)
    assert status == 200 and cancelled["status"] == "stopped"
    done = until(
        lambda: (r := call(api, "GET", f"/runs/{run['run_id']}", token=alice)[1])["status"] == "succeeded" and r,
        "the quick run succeeded",
    )
    assert done["fencing_token"] is not None and done["ended_at"] is not None
    status, logs = call(api, "GET", f"/runs/{run['run_id']}/logs", token=alice)
    assert status == 200 and isinstance(logs, str) and "hold" in logs
    assert call(api, "GET", "/runs?active=1", token=alice)[1] == []
    assert call(api, "POST", f"/leases/{board['lease_id']}/release", {}, bob)[0] == 200
