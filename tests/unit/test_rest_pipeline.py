"""The HTTP API's shared pipeline, without a server: route matching (the Serve app's router), bodies,
authentication and its refusals, and how the Serve app's coordinator proxy sends admin acts."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from broker.core.tokens import Identity, TokenBook
from broker.errors import InvalidRequest, NotAuthenticated, NotAuthorized
from broker.http.rest import ADMIN_ACTS, API_PREFIX, ROUTES, authenticate, match, openapi_document, parse_body, route_of
from broker.http.serve import RemoteBroker
from broker.seam import ActorRef, Spawn
from broker.seam.fake import FakeSystem

SAMPLES = {"lease_id": "firesim_u250." + "a" * 32, "key": "firesim_u250", "run_id": "r" + "0" * 11, "name": "bob"}


def _concrete(template: str) -> str:
    for name, value in SAMPLES.items():
        template = template.replace("{" + name + "}", value)
    return API_PREFIX + template


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.act)
def test_every_route_matches_its_own_path_and_yields_its_parameters(route):
    found = match(route.method, _concrete(route.path))
    assert not isinstance(found, int) and found[0] is route
    assert found[1] == {name: SAMPLES[name] for name in found[1]} and set(found[1]) == {
        part[1:-1] for part in route.path.split("/") if part.startswith("{")
    }
    assert route_of(route.method, route.path) is route


def test_the_matcher_and_the_openapi_document_list_the_same_routes():
    documented = {(method.upper(), path) for path, ops in openapi_document()["paths"].items() for method in ops}
    assert documented == {(route.method, API_PREFIX + route.path) for route in ROUTES}


def test_unknown_paths_are_404_and_known_paths_with_another_method_405():
    assert match("GET", API_PREFIX + "/nope") == 404
    assert match("GET", "/resources") == 404  # outside the prefix
    assert match("GET", API_PREFIX + "/leases//renew") == 404  # an empty parameter
    assert match("DELETE", API_PREFIX + "/resources") == 405
    assert match("GET", API_PREFIX + "/leases/x/release") == 405  # POST only
    with pytest.raises(InvalidRequest):
        route_of("GET", "/nope")


def test_bodies_are_json_objects_with_only_the_routes_fields():
    reserve = route_of("POST", "/reserve")
    assert parse_body(reserve, b"") == {}
    assert parse_body(reserve, b'{"resource": "k", "wait": true}') == {"resource": "k", "wait": True}
    assert parse_body(route_of("GET", "/status"), b"not json") == {}  # a GET's body is ignored
    for raw, field in ((b"{", "body"), (b"[1]", "body"), (b'{"colour": 1}', "colour"), (b"\xff", "body")):
        with pytest.raises(InvalidRequest) as refused:
            parse_body(reserve, raw)
        assert refused.value.fields()["field"] == field


def test_authentication_names_the_route_template_never_the_token_or_a_lease_id():
    book = TokenBook([], None)
    secret, _ = book.create("alice", False, 0.0, "test")
    admin_secret, _ = book.create("root", True, 0.0, "test")
    refusals: list[tuple[str, str]] = []
    report = lambda name, act: refusals.append((name, act))  # noqa: E731
    release = route_of("POST", "/leases/{lease_id}/release")
    assert authenticate(book, f"Bearer {secret}", release, report) == Identity("alice")
    assert authenticate(book, f"bearer  {admin_secret}", release, report) == Identity("root", admin=True)
    for header in ("", f"Basic {secret}", "Bearer mt_" + "0" * 64, secret):
        with pytest.raises(NotAuthenticated):
            authenticate(book, header, release, report)
    with pytest.raises(NotAuthorized):
        authenticate(book, f"Bearer {secret}", route_of("POST", "/resources/{key}/revoke"), report)
    assert refusals == [("?", "POST /leases/{lease_id}/release")] * 4 + [("alice", "POST /resources/{key}/revoke")]
    assert secret not in repr(refusals)


class _Coordinator:
    """Answers as the coordinator would, and records how each call came."""

    def __init__(self, system: Any = None) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def lease(self, lease_id: str) -> str:
        self.calls.append(("lease", lease_id))
        return "leased"

    async def revoke(self, key: str, reason: str, **kwargs: Any) -> str:
        self.calls.append(("revoke", key))
        return "revoked"

    async def as_token(self, authorization: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        self.calls.append(("as_token", (authorization, method)))
        return await getattr(self, method)(*args, **kwargs)

    async def seen(self) -> list[tuple[str, Any]]:
        return list(self.calls)


def test_the_serve_proxy_sends_admin_acts_of_a_named_admin_token_through_as_token():
    assert {"revoke", "set_maintenance", "create_token"} <= ADMIN_ACTS and "lease" not in ADMIN_ACTS

    async def scenario() -> list[tuple[str, Any]]:
        system = FakeSystem()
        ref = ActorRef(system, "broker", "unit", Spawn(_Coordinator, ()))
        plain, admin = RemoteBroker(system, ref), RemoteBroker(system, ref, "Bearer mt_x")
        assert await plain.revoke("k", "r") == "revoked" and await plain.lease("k.1") == "leased"
        assert await admin.revoke("k", "r", by="root") == "revoked" and await admin.lease("k.2") == "leased"
        return await RemoteBroker(system, ref).seen()

    assert asyncio.run(scenario()) == [
        ("revoke", "k"),
        ("lease", "k.1"),
        ("as_token", ("Bearer mt_x", "revoke")),
        ("revoke", "k"),
        ("lease", "k.2"),
    ]


class _Reading(dict):  # type: ignore[type-arg]
    """A request's body or query that notes every field the handler reads."""

    def __init__(self, data: dict[str, Any], read: set[str]):
        super().__init__(data)
        self.read = read

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)


class _AnyAnswer:
    holder = "x"
    state = None

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return {}

    def __iter__(self) -> Any:
        return iter(())


class _AnyBroker:
    """A coordinator that accepts every call (the handler's reads are what is checked)."""

    def __getattr__(self, method: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return "" if method == "logs" else _AnyAnswer()

        return call


_SAMPLE_VALUES: dict[str, Any] = {
    "keys": ["a", "b"],
    "count": 2,
    "ttl_s": 60.0,
    "timeout_s": 1.0,
    "priority": 1,
    "fencing_token": 3,
    "wait": True,
    "one_host": True,
    "on": True,
    "admin": True,
    "restart": True,
    "now": "1",
    "active": "1",
    "limit": "5",
}


@pytest.mark.parametrize("route", ROUTES, ids=lambda route: route.act)
def test_each_route_documents_exactly_the_body_and_query_fields_its_handler_reads(route):
    """The route table (so the OpenAPI document, and the body check that refuses unknown fields) names
    every field the handler reads, and no field it ignores."""
    from broker.http.rest import Call

    who = Identity("op", admin=True, operator=True)
    params = {name[1:-1]: SAMPLES[name[1:-1]] for name in route.path.split("/") if name.startswith("{")}
    read_body: set[str] = set()
    read_query: set[str] = set()
    sample = lambda names: {name: _SAMPLE_VALUES.get(name, "x") for name in names}  # noqa: E731
    variants = [{}, sample(route.body), *({name: sample([name])[name]} for name in route.body)]
    for variant in variants:
        for query in ({}, sample(route.query), *({name: sample([name])[name]} for name in route.query)):
            call = Call(who, params, _Reading(query, read_query), _Reading(variant, read_body))
            with contextlib.suppress(Exception):  # a refused sample still shows what the handler read first
                asyncio.run(route.handler(_AnyBroker(), call))
    assert read_body == set(route.body), route.act
    assert read_query == set(route.query), route.act
    document = openapi_document()["paths"][API_PREFIX + route.path][route.method.lower()]
    documented = document.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    assert set(documented.get("properties", {})) == set(route.body)
    assert {p["name"] for p in document.get("parameters", []) if p["in"] == "query"} == set(route.query)
