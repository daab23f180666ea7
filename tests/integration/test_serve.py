"""The HTTP API as a Ray Serve application on the real loopback cluster: deployed by `merlin broker serve`
(Serve's proxy on 127.0.0.1), and the same journey run through it and through the coordinator's own
listener — tokens, leases, a group reserve, a run, JSON errors, the OpenAPI document, a waiting reserve
whose client disconnects."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker.disk.token_store import read_operator_token
from tests.integration.conftest import BrokerEnv, make_broker
from tests.integration.test_runs import target
from tests.waiting import until

pytestmark = pytest.mark.ray

ADMIN_SECRET = "serve-test-secret"
SERVERS = ("loop", "serve")
# Keys of their own for each server's journey (one broker for the module: a failure stays local).
CATALOG: dict[str, Any] = {
    "version": 1,
    "broker": {"claim": "20s", "admin_secret_sha256": hashlib.sha256(ADMIN_SECRET.encode()).hexdigest()},
    "resources": {
        f"{kind}_{server}_{n}": {"labels": {"kind": kind, "server": server}}
        for server in SERVERS
        for kind in ("fpga", "board")
        for n in (1, 2)
    },
}


@dataclass
class Served:
    env: BrokerEnv
    urls: dict[str, str]  # server -> the API's base URL
    tokens: dict[str, str]  # name -> secret (operator, alice, bob, root: a named admin)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(
    url: str, method: str, path: str, body: Any = None, token: str | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    sent = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            raw, status, kind = answer.read(), answer.status, answer.headers.get_content_type()
    except urllib.error.HTTPError as failed:
        raw, status, kind = failed.read(), failed.code, failed.headers.get_content_type()
    return status, (json.loads(raw) if kind == "application/json" else raw.decode())


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory) -> Iterator[Served]:
    from ray import serve

    from broker.actors.deploy import broker_down

    env = make_broker(ray_cluster, tmp_path_factory.mktemp("serve") / "state", CATALOG)
    record = lambda: json.loads(env.state.broker_record_path.read_text())  # noqa: E731
    loop_url = until(lambda: record().get("http_url"), "the coordinator's API listens")
    port = _free_port()
    try:
        deployed = env.cli("broker", "serve", "--port", str(port), "--json")
        assert deployed.returncode == 0, deployed.stderr
        serve_url = json.loads(deployed.stdout)["url"]
        assert serve_url == f"http://127.0.0.1:{port}/api/v1"
        assert json.loads((env.state.root / "serve.json").read_text())["url"] == serve_url
        until(lambda: call(serve_url, "GET", "/openapi.json")[0] == 200, "Serve answers", timeout_s=120)
        operator = read_operator_token(env.state)
        assert operator
        admin = {"X-Merlin-Admin-Secret": ADMIN_SECRET}
        tokens = {"operator": operator}
        for name, is_admin in (("alice", False), ("bob", False), ("root", True)):
            status, made = call(loop_url, "POST", "/tokens", {"name": name, "admin": is_admin}, operator, admin)
            assert status == 200, made
            tokens[name] = made["token"]
        yield Served(env, {"loop": loop_url, "serve": serve_url}, tokens)
    finally:
        stopped = env.cli("broker", "serve", "--stop")
        serve.shutdown()
        broker_down(env.namespace)
    assert stopped.returncode == 0, stopped.stderr
    assert not (env.state.root / "serve.json").exists()


def test_serve_proxy_listens_on_loopback_only(served):
    port = int(served.urls["serve"].rsplit(":", 1)[1].split("/")[0])
    listening = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    local = {row[1] for row in listening if row[3] == "0A"}  # state LISTEN
    assert f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local


@pytest.mark.parametrize("server", SERVERS)
def test_a_lease_journey_with_tokens(served, server):
    url, t = served.urls[server], served.tokens
    key, other = f"fpga_{server}_1", f"board_{server}_1"
    assert call(url, "GET", "/whoami", token=t["alice"]) == (200, {"name": "alice", "admin": False, "operator": False})
    status, lease = call(url, "POST", "/reserve", {"resource": key, "ttl_s": 600}, t["alice"])
    assert status == 200 and lease["holder"] == "alice" and lease["state"] == "granted"
    status, busy = call(url, "POST", "/reserve", {"resource": key}, t["bob"])
    assert status == 409 and busy["error"]["type"] == "ResourceBusy" and busy["error"]["holder"] == "alice"
    assert call(url, "POST", f"/leases/{lease['lease_id']}/release", {}, t["bob"])[0] == 403
    status, renewed = call(url, "POST", f"/leases/{lease['lease_id']}/renew", {"ttl_s": 900}, t["alice"])
    assert status == 200 and renewed["expires_at"] > lease["expires_at"]
    assert call(url, "GET", f"/leases/{lease['lease_id']}", token=t["alice"])[1]["state"] == "granted"
    status, released = call(url, "POST", f"/leases/{lease['lease_id']}/release", {}, t["alice"])
    assert status == 200 and released["state"] == "released"
    assert call(url, "POST", f"/leases/{lease['lease_id']}/release", {}, t["alice"])[0] == 200  # idempotent
    # Admin acts: a named admin token needs no secret (checked where the token book is, on both servers);
    # the operator's token sends the catalog's secret; a plain token is refused.
    status, held = call(url, "POST", "/reserve", {"resource": other, "ttl_s": 600}, t["bob"])
    assert status == 200
    assert call(url, "POST", f"/resources/{other}/revoke", {"reason": "mine"}, t["alice"])[0] == 403
    status, refused = call(url, "POST", f"/resources/{other}/revoke", {"reason": "x"}, t["operator"])
    assert status == 403 and refused["error"]["type"] == "NotAuthorized"
    status, revoked = call(url, "POST", f"/resources/{other}/revoke", {"reason": "bench"}, t["root"])
    assert status == 200 and revoked["state"] == "revoked" and revoked["ended_by"] == "root"


@pytest.mark.parametrize("server", SERVERS)
def test_a_group_reserve_by_selector(served, server):
    url, alice = served.urls[server], served.tokens["alice"]
    status, group = call(url, "POST", "/reserve", {"labels": f"server={server}", "count": 3, "ttl_s": 600}, alice)
    keys = [member["key"] for member in group["members"]]
    assert status == 200 and group["state"] == "granted" and group["holder"] == "alice" and len(set(keys)) == 3
    assert set(keys) <= {key for key in CATALOG["resources"] if f"_{server}_" in key}
    status, busy = call(url, "POST", "/reserve", {"labels": f"server={server}", "count": 2}, served.tokens["bob"])
    assert status == 409 and busy["error"]["type"] == "ResourceBusy"
    status, released = call(url, "POST", f"/leases/{group['lease_id']}/release", {}, alice)
    assert status == 200 and released["state"] == "released"


@pytest.mark.parametrize("server", SERVERS)
def test_submit_a_run_and_read_its_status(served, server, tmp_path):
    url, alice = served.urls[server], served.tokens["alice"]
    directory = target(tmp_path, f"run-{server}", f"board_{server}_2", 0.2)
    status, run = call(url, "POST", "/runs", {"target_dir": str(directory)}, alice)
    assert status == 200 and run["holder"] == "alice" and run["resource"] == f"board_{server}_2"
    done = until(
        lambda: (r := call(url, "GET", f"/runs/{run['run_id']}", token=alice)[1])["status"] == "succeeded" and r,
        "the run succeeded",
        timeout_s=120,
    )
    assert done["target"] == f"run-{server}" and done["workdir"] == str(directory)
    assert run["run_id"] in [r["run_id"] for r in call(url, "GET", "/runs", token=alice)[1]]


def test_errors_and_openapi_are_the_same_on_both_servers(served):
    t = served.tokens
    answers: dict[str, list[tuple[int, Any]]] = {}
    for server, url in served.urls.items():
        answers[server] = [
            call(url, "GET", "/resources"),  # no token
            call(url, "GET", "/status", token="mt_" + "0" * 64),  # an unknown token
            call(url, "POST", "/reserve", {"resource": "nope"}, t["alice"]),
            call(url, "POST", "/reserve", {"resource": "fpga_loop_1", "colour": "red"}, t["alice"]),
            call(url, "POST", "/reserve", {"resource": "fpga_loop_1", "holder": "bob"}, t["alice"]),
            call(url, "POST", "/reserve", [1], t["alice"]),
            call(url, "GET", "/leases/fpga_loop_1." + "0" * 32, token=t["alice"]),
            call(url, "GET", "/runs/r" + "0" * 11, token=t["alice"]),
            call(url, "GET", "/openapi.json"),
        ]
    assert answers["serve"] == answers["loop"]
    statuses = [status for status, _ in answers["serve"]]
    assert statuses == [401, 401, 404, 422, 403, 422, 404, 422, 200]
    kinds = [answer["error"]["type"] for _, answer in answers["serve"][:-1]]
    assert kinds == [
        "NotAuthenticated",
        "NotAuthenticated",
        "UnknownResource",
        "InvalidRequest",
        "NotAuthorized",
        "InvalidRequest",
        "LeaseNotFound",
        "InvalidRequest",
    ]
    assert answers["serve"][-1][1]["paths"]  # the document itself, equal to the coordinator's
    walls = {}
    for server, url in served.urls.items():  # a figure to read, not a timed assertion
        samples = []
        for _ in range(20):
            started = time.monotonic()
            assert call(url, "GET", "/whoami", token=t["alice"])[0] == 200
            samples.append(time.monotonic() - started)
        walls[server] = statistics.median(samples) * 1000
    print("\nGET /whoami median ms: " + ", ".join(f"{server} {ms:.1f}" for server, ms in walls.items()))


def test_every_documented_route_is_served_through_serve(served):
    url, operator = served.urls["serve"], served.tokens["operator"]
    document = call(url, "GET", "/openapi.json")[1]
    samples = {"lease_id": "fpga_serve_1." + "0" * 32, "key": "fpga_serve_1", "run_id": "r" + "0" * 11, "name": "x"}
    for path, operations in document["paths"].items():
        for method in operations:
            concrete = path.removeprefix("/api/v1")
            for name, value in samples.items():
                concrete = concrete.replace("{" + name + "}", value)
            status, answer = call(url, method.upper(), concrete, {} if method != "get" else None, operator)
            assert status not in (404, 405) or isinstance(answer, dict) and "error" in answer, f"{method} {path}"
    assert call(url, "GET", "/no-such-route", token=operator)[0] == 404
    assert call(url, "DELETE", "/resources", token=operator)[0] == 405


@pytest.mark.parametrize("server", SERVERS)
def test_a_waiting_reserve_leaves_the_queue_when_its_client_disconnects(served, server):
    url, operator, env = served.urls[server], served.tokens["operator"], served.env
    key = f"fpga_{server}_2"
    status, held = call(url, "POST", "/reserve", {"resource": key, "holder": "x"}, operator)
    assert status == 200
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"resource": key, "holder": "waiter", "wait": True}).encode()
    connection.request(
        "POST",
        "/api/v1/reserve",
        body=body,
        headers={"Authorization": f"Bearer {operator}", "Content-Type": "application/json"},
    )
    queue = lambda: next(s for s in env.client.resources() if s.key == key).queue  # noqa: E731
    until(lambda: [entry.holder for entry in queue()] == ["waiter"], f"the waiter queued through {server}")
    gone = time.monotonic()
    connection.close()  # the client goes away
    until(lambda: queue() == (), "the waiter left the queue")
    print(f"\n{server}: waiter disconnect -> out of the queue: {time.monotonic() - gone:.3f} s")
    assert call(url, "POST", f"/leases/{held['lease_id']}/release", {}, operator)[0] == 200
    assert next(s for s in env.client.resources() if s.key == key).holder is None  # nobody got it


@pytest.mark.parametrize("server", SERVERS)
def test_a_waiting_group_reserve_leaves_every_queue_when_its_client_disconnects(served, server):
    url, operator, env = served.urls[server], served.tokens["operator"], served.env
    keys = [f"board_{server}_1", f"board_{server}_2"]
    status, held = call(url, "POST", "/reserve", {"resource": keys[0], "holder": "x"}, operator)
    assert status == 200
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"keys": keys, "holder": "waiter", "wait": True}).encode()
    connection.request(
        "POST",
        "/api/v1/reserve",
        body=body,
        headers={"Authorization": f"Bearer {operator}", "Content-Type": "application/json"},
    )
    waiting = lambda: [g for g in call(url, "GET", "/groups", token=operator)[1] if g["holder"] == "waiter"]  # noqa: E731
    until(lambda: [g["state"] for g in waiting()] == ["queued"], f"the group waiter queued through {server}")
    connection.close()  # the client goes away
    until(lambda: waiting() == [], "the group waiter left")
    assert call(url, "POST", f"/leases/{held['lease_id']}/release", {}, operator)[0] == 200
    statuses = {s.key: s for s in env.client.resources()}
    assert all(statuses[key].holder is None and statuses[key].queue == () for key in keys)  # nobody got them
