"""The HTTP API, v1: every coordinator method over HTTP, authenticated, in the coordinator's own loop.

Built on aiohttp (already in the image through ``ray[default]``; a request
calls the coordinator's coroutine directly, with no Ray hop). Every route
but ``GET /api/v1/openapi.json`` needs ``Authorization: Bearer <token>``
(:mod:`broker.core.tokens`): the token's name is the caller's holder name,
and admin acts need an admin token (or the operator's). Errors are
``{"error": {"type", "message", "exit_code", <fields>}}`` with the status of
:data:`HTTP_STATUS`. A waiting ``reserve`` is one request that stays open;
when its client disconnects, the request leaves the queue (the handler is
cancelled, which is the coordinator's "the waiter went away").

One table of routes (:data:`ROUTES`) makes the router and the OpenAPI
document, so neither can list a route the other lacks. A handler's core takes
the coordinator and a :class:`Call` (identity, path parameters, query, body),
and the steps around it (:func:`authenticate`, :func:`parse_body`,
:func:`perform`, :func:`render_error`) are plain functions: the same API runs
as a Ray Serve application (:mod:`broker.http.serve`) with a proxy of the
coordinator in its place and :func:`match` as its router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from broker.core.tokens import Identity, TokenBook, trusted_admin
from broker.errors import (
    BrokerError,
    BrokerUnavailable,
    InvalidRequest,
    LeaseNotFound,
    LeaseNotHeld,
    NotAuthenticated,
    NotAuthorized,
    ResourceBusy,
    StaleFencingToken,
    Surface,
    UnknownResource,
    WaitTimeout,
    error_json,
)
from broker.models import LeaseState

__all__ = [
    "ROUTES",
    "HTTP_STATUS",
    "ADMIN_ACTS",
    "API_PREFIX",
    "Call",
    "Route",
    "Text",
    "RestApi",
    "authenticate",
    "match",
    "openapi_document",
    "parse_body",
    "perform",
    "render",
    "render_error",
    "route_of",
]

API_PREFIX = "/api/v1"
ADMIN_SECRET_HEADER = "X-Merlin-Admin-Secret"  # with the operator's token, when the catalog sets a secret
MAX_BODY_BYTES = 256 * 1024
# A connection must send its request line and headers, and then its body, within this; a connection
# idle between requests is closed after it. Half-sent requests cannot pile up in the coordinator
# (the metrics listener has the same bound, broker.http.api). A waiting reserve's open response is
# not idle: it stays open for as long as it waits.
REQUEST_TIMEOUT_S = 10.0
# What each error is on HTTP (meaning lives here, not in messages).
HTTP_STATUS: dict[type[BrokerError], int] = {
    InvalidRequest: 422,
    UnknownResource: 404,
    LeaseNotFound: 404,
    ResourceBusy: 409,
    LeaseNotHeld: 409,
    StaleFencingToken: 409,
    WaitTimeout: 408,
    NotAuthenticated: 401,
    NotAuthorized: 403,
    BrokerUnavailable: 503,
}

# The coordinator methods that check the admin secret. Through Ray Serve, a named admin token's call of
# one of these goes through the coordinator's ``as_token`` (it checks the token where the book is, and
# trusts it there as the in-loop API does): a context variable does not cross processes.
ADMIN_ACTS = frozenset({"revoke", "set_maintenance", "withdraw", "create_token", "list_tokens", "revoke_token"})


async def _shielded(work: Awaitable[Any]) -> Any:
    return await asyncio.shield(asyncio.ensure_future(work))


@dataclass(frozen=True)
class Call:
    """One request as a handler sees it, whichever server took it (aiohttp here, or Ray Serve)."""

    who: Identity
    params: Mapping[str, str]  # the path's parameters
    query: Mapping[str, str]
    body: dict[str, Any]
    admin_secret: str | None = None  # the X-Merlin-Admin-Secret header
    # Runs the clean-up of a cancelled request to its end. Under Ray Serve, ActorSystem.aftercare: Serve
    # cancels a disconnected client's request with a recursive ray.cancel, which would cancel the
    # clean-up's calls on the coordinator too.
    aftercare: Callable[[Awaitable[Any]], Awaitable[Any]] = _shielded


@dataclass(frozen=True)
class Text:
    """A plain-text answer (a run's logs)."""

    text: str


# A handler's core: the coordinator (here itself; under Ray Serve a proxy of the named actor) and the call.
Handler = Callable[[Any, Call], Awaitable[Any]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # under API_PREFIX; {name} is a path parameter
    handler: Handler
    summary: str
    admin: bool = False
    body: tuple[str, ...] = ()  # the JSON body's fields (documented; unknown ones are refused)
    query: tuple[str, ...] = ()

    @property
    def act(self) -> str:
        """The route as refusals name it (its template: a concrete path may hold a lease id)."""
        return f"{self.method} {self.path}"


def _status_of(err: BaseException) -> int:
    for cls in type(err).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def _dump(value: Any) -> Any:
    """A model as its holder sees it (lease ids only in their holder's own answers)."""
    if isinstance(value, list):
        return [_dump(item) for item in value]
    for method in ("for_holder", "public", "model_dump"):
        fn = getattr(value, method, None)
        if fn is not None:
            return fn() if method != "model_dump" else fn(mode="json")
    return value


# ---------------------------------------------------------------------- the pipeline both servers share

Answer = tuple[int, str, bytes]  # status, content type, body


def render(result: Any) -> Answer:
    if isinstance(result, Text):
        return 200, "text/plain", result.text.encode()
    return 200, "application/json", json.dumps(_dump(result), default=str).encode()


def render_error(err: BrokerError) -> Answer:
    return _status_of(err), "application/json", json.dumps(error_json(err, Surface.HTTP), default=str).encode()


def authenticate(book: TokenBook, authorization: str, route: Route, on_refused: Callable[[str, str], None]) -> Identity:
    """Who ``Authorization: Bearer <token>`` is, allowed on ``route`` (refusals reported, never the token)."""
    scheme, _, secret = authorization.partition(" ")
    identity = book.identify(secret.strip()) if scheme.lower() == "bearer" else None
    if identity is None:
        on_refused("?", route.act)
        raise NotAuthenticated(route.act)
    if route.admin and not identity.admin:
        on_refused(identity.name, route.act)
        raise NotAuthorized(route.act, identity.name)
    return identity


def parse_body(route: Route, raw: bytes) -> dict[str, Any]:
    """The JSON object a request sent (empty for none), with only the route's fields."""
    if route.method == "GET" or not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not JSON", "body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", "body")
    unknown = sorted(set(body) - set(route.body))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {', '.join(unknown)[:200]} (known: {', '.join(route.body)})", unknown[0]
        )
    return body


async def perform(route: Route, broker: Any, call: Call) -> Answer:
    """Run ``route``'s handler for an authenticated call; the answer, or the error, as HTTP."""
    # A named admin token stands for the admin secret (it was made by an act that needed it); the
    # operator's token does not: with a secret in the catalog, it sends the secret too. (In the
    # coordinator's own process; under Ray Serve, ADMIN_ACTS go through ``as_token`` instead.)
    who = call.who
    token = trusted_admin.set(who.name if who.admin and not who.operator else None)
    try:
        return render(await route.handler(broker, call))
    except BrokerError as err:
        return render_error(err)
    finally:
        trusted_admin.reset(token)


def match(method: str, path: str) -> tuple[Route, dict[str, str]] | int:
    """The route for ``method path`` and its path parameters, or 404 / 405 (for servers without a router)."""
    parts = path.removeprefix(API_PREFIX).strip("/").split("/") if path.startswith(API_PREFIX + "/") else None
    if parts is None:
        return 404
    allowed = False
    for route in ROUTES:
        params = _params(route.path, parts)
        if params is not None:
            if route.method == method.upper():
                return route, params
            allowed = True
    return 405 if allowed else 404


def route_of(method: str, template: str) -> Route:
    """The route of ``method`` on a path template (as a server names it to the coordinator)."""
    for route in ROUTES:
        if route.method == method and route.path == template:
            return route
    raise InvalidRequest(f"no route {method[:10]} {template[:100]}", "path")


def _params(template: str, parts: list[str]) -> dict[str, str] | None:
    pattern = template.strip("/").split("/")
    if len(pattern) != len(parts):
        return None
    params = {}
    for want, got in zip(pattern, parts):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


# ---------------------------------------------------------------------- who may act for whom


def acting_holder(identity: Identity, asked: Any) -> str:
    """The holder a request acts as: the token's name, or (operator only) the one it names."""
    if asked is None or asked == identity.name:
        return identity.name
    if not isinstance(asked, str) or not identity.may_act_as(asked):
        raise NotAuthorized(f"act as holder {str(asked)[:80]!r}", identity.name)
    return asked


async def own_lease(broker: Any, identity: Identity, lease_id: str) -> Any:
    """The lease, if the caller is its holder (a lease id is a capability, and so is the token)."""
    lease = await broker.lease(lease_id)
    if not identity.may_act_as(lease.holder):
        raise NotAuthorized("use another holder's lease", identity.name)
    return lease


# ---------------------------------------------------------------------- the coordinator's own server


class RestApi:
    """The aiohttp application over one coordinator, in its event loop (no Ray hop)."""

    def __init__(self, broker: Any, tokens: Callable[[], TokenBook], on_refused: Callable[[str, str], None]):
        self.broker = broker
        self._tokens = tokens
        self._on_refused = on_refused
        self.app = web.Application(client_max_size=MAX_BODY_BYTES)
        for route in ROUTES:
            self.app.router.add_route(route.method, API_PREFIX + route.path, self._bind(route))
        self.app.router.add_get(API_PREFIX + "/openapi.json", self._openapi)

    async def _openapi(self, request: web.Request) -> web.Response:
        return _response(render(openapi_document()))

    def _bind(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            try:
                who = authenticate(self._tokens(), request.headers.get("Authorization", ""), route, self._on_refused)
                raw = await _read_body(request) if request.can_read_body else b""
                body = parse_body(route, raw)
            except BrokerError as err:
                return _response(render_error(err))
            secret = request.headers.get(ADMIN_SECRET_HEADER)
            call = Call(who, dict(request.match_info), dict(request.query), body, secret)
            return _response(await perform(route, self.broker, call))

        return handle


async def _read_body(request: web.Request) -> bytes:
    try:
        return await asyncio.wait_for(request.read(), REQUEST_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise InvalidRequest(f"the request body did not arrive within {REQUEST_TIMEOUT_S:g} s", "body") from None


def _response(answer: Answer) -> web.Response:
    status, kind, body = answer
    return web.Response(body=body, status=status, content_type=kind)


# ---------------------------------------------------------------------- handlers


async def _resources(broker: Any, call: Call) -> Any:
    return [status.model_dump(mode="json") for status in await broker.resources()]


async def _status(broker: Any, call: Call) -> Any:
    return (await broker.status()).model_dump(mode="json")


async def _pools(broker: Any, call: Call) -> Any:
    return await broker.pools()


async def _groups(broker: Any, call: Call) -> Any:
    return await broker.groups()


async def _health(broker: Any, call: Call) -> Any:
    return await broker.health(call.params["key"], call.query.get("now", "") in ("1", "true"))


async def _whoami(broker: Any, call: Call) -> Any:
    return {"name": call.who.name, "admin": call.who.admin, "operator": call.who.operator}


_RESERVE_FIELDS = (
    "resource",
    "keys",
    "labels",
    "count",
    "one_host",
    "holder",
    "ttl_s",
    "wait",
    "timeout_s",
    "priority",
    "request_id",
    "note",
)


async def _reserve(broker: Any, call: Call) -> Any:
    body = call.body
    holder = acting_holder(call.who, body.get("holder"))
    options = {
        name: body[name] for name in ("ttl_s", "wait", "timeout_s", "priority", "request_id", "note") if name in body
    }
    group = any(body.get(name) is not None for name in ("keys", "labels", "count"))
    if group and body.get("resource") is not None:
        raise InvalidRequest("a reserve names a resource, or keys/labels (with count), not both", "resource")
    if not group and body.get("resource") is None:
        raise InvalidRequest("a reserve names a resource, or keys/labels (with count)", "resource")
    options.setdefault("request_id", f"http-{secrets.token_hex(12)}")  # to find it again if the client goes
    try:
        if group:
            return await broker.reserve_group(
                holder,
                keys=body.get("keys"),
                labels=body.get("labels"),
                count=body.get("count"),
                one_host=body.get("one_host", False),
                **options,
            )
        return await broker.reserve(body["resource"], holder, **options)
    except asyncio.CancelledError:
        # The client went away while it waited. The cancelled coordinator call leaves the queue itself
        # (in the coordinator's loop it is this call; through Ray Serve, Ray's recursive cancel reaches
        # it), yet wherever the cancel lands, the request is withdrawn here too, and a grant that raced
        # its going (it would hold the keys for nobody until its TTL) is given back.
        if options.get("wait") is True:
            with contextlib.suppress(BrokerError):
                await call.aftercare(_give_back(broker, holder, options["request_id"], body.get("resource")))
        raise


async def _give_back(broker: Any, holder: str, request_id: str, resource: str | None) -> None:
    """Withdraw a request whose client went away; a grant that raced its going is released."""
    if resource is None:
        await broker.withdraw_group(holder, request_id)  # a granted group: released
        return
    lease = await broker.withdraw(resource, holder, request_id)
    if lease is not None and lease.state is LeaseState.GRANTED:
        await broker.release(lease.lease_id)


async def _lease(broker: Any, call: Call) -> Any:
    return await own_lease(broker, call.who, call.params["lease_id"])


async def _release(broker: Any, call: Call) -> Any:
    lease_id = call.params["lease_id"]
    await own_lease(broker, call.who, lease_id)
    return await broker.release(lease_id)


async def _renew(broker: Any, call: Call) -> Any:
    lease_id = call.params["lease_id"]
    await own_lease(broker, call.who, lease_id)
    return await broker.renew(lease_id, call.body.get("ttl_s"))


async def _check_fence(broker: Any, call: Call) -> Any:
    lease_id = call.params["lease_id"]
    await own_lease(broker, call.who, lease_id)
    return await broker.check_fence(lease_id, call.body.get("fencing_token"))


async def _queue_position(broker: Any, call: Call) -> Any:
    query = call.query
    holder = acting_holder(call.who, query.get("holder"))
    request_id = query.get("request_id", "")
    if query.get("resource"):
        return {"position": await broker.queue_position(query["resource"], holder, request_id)}
    return {"position": await broker.group_position(holder, request_id)}


async def _withdraw(broker: Any, call: Call) -> Any:
    if call.body.get("ref") is not None:  # someone else's request, by its public ref: an admin act
        if not call.who.admin:
            raise NotAuthorized("withdraw another holder's request", call.who.name)
        return await broker.withdraw(
            call.body.get("resource"),
            ref=call.body["ref"],
            by=_by(call),
            reason=call.body.get("reason", ""),
            admin_secret=call.admin_secret,
        )
    holder = acting_holder(call.who, call.body.get("holder"))
    if call.body.get("resource") is None:
        return await broker.withdraw_group(holder, call.body.get("request_id"))
    return await broker.withdraw(call.body["resource"], holder, call.body.get("request_id"))


def _by(call: Call) -> str:
    """Who an admin act is recorded as: the token's name; the operator's token may name the person."""
    named = call.body.get("by")
    return named if call.who.operator and isinstance(named, str) and named else call.who.name


async def _revoke(broker: Any, call: Call) -> Any:
    return await broker.revoke(
        call.params["key"],
        call.body.get("reason", ""),
        expected_holder=call.body.get("expected_holder"),
        by=_by(call),
        request_id=call.body.get("request_id"),
        admin_secret=call.admin_secret,
    )


async def _maintenance(broker: Any, call: Call) -> Any:
    status = await broker.set_maintenance(
        call.params["key"],
        call.body.get("on"),
        call.body.get("reason", ""),
        by=_by(call),
        admin_secret=call.admin_secret,
    )
    return status.model_dump(mode="json")


async def _submit(broker: Any, call: Call) -> Any:
    holder = acting_holder(call.who, call.body.get("holder"))
    record = await broker.submit(
        call.body.get("target_dir"),
        holder=holder,
        priority=call.body.get("priority", 0),
        request_id=call.body.get("request_id"),
        source="http",
        restart=call.body.get("restart", False) is True,
    )
    return record.model_dump(mode="json")


async def _runs(broker: Any, call: Call) -> Any:
    active = call.query.get("active", "") in ("1", "true")
    return [record.model_dump(mode="json") for record in await broker.runs(active)]


async def _run(broker: Any, call: Call) -> Any:
    return (await broker.run(call.params["run_id"])).model_dump(mode="json")


async def _own_run(broker: Any, who: Identity, run_id: str) -> Any:
    record = await broker.run(run_id)
    if not who.may_act_as(record.holder):
        raise NotAuthorized("cancel another holder's run", who.name)
    return record


async def _cancel(broker: Any, call: Call) -> Any:
    run_id = call.params["run_id"]
    await _own_run(broker, call.who, run_id)
    return (await broker.cancel(run_id)).model_dump(mode="json")


async def _logs(broker: Any, call: Call) -> Any:
    return Text(await broker.logs(call.params["run_id"]))


async def _events(broker: Any, call: Call) -> Any:
    try:
        limit = max(1, min(1000, int(call.query.get("limit", "100"))))
    except ValueError:
        raise InvalidRequest("invalid limit: expected a whole number", "limit") from None
    prefix = call.query.get("event", "")
    after = call.query.get("after")
    if after is not None and not (after.isascii() and after.isdigit()):
        raise InvalidRequest("invalid after: expected the seq of an event (a whole number)", "after")
    return await broker.recent_events(limit, prefix, int(after) if after is not None else None)


async def _token_create(broker: Any, call: Call) -> Any:
    return await broker.create_token(
        call.body.get("name"), call.body.get("admin", False) is True, by=call.who.name, admin_secret=call.admin_secret
    )


async def _token_list(broker: Any, call: Call) -> Any:
    return await broker.list_tokens(by=call.who.name, admin_secret=call.admin_secret)


async def _token_revoke(broker: Any, call: Call) -> Any:
    return await broker.revoke_token(call.params["name"], by=call.who.name, admin_secret=call.admin_secret)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/resources", _resources, "every key's status (never a lease id)"),
    Route("GET", "/status", _status, "broker health and counts"),
    Route("GET", "/pools", _pools, "the catalog's named pools: free/total, who waits"),
    Route("GET", "/groups", _groups, "waiting and granted group leases (no lease ids)"),
    Route("GET", "/whoami", _whoami, "the identity of this token"),
    Route(
        "GET",
        "/health/{key}",
        _health,
        "a key's health probe and its latest results (now=1: probe first)",
        query=("now",),
    ),
    Route(
        "POST",
        "/reserve",
        _reserve,
        "take a lease: a key, or labels/keys with count (a group lease); "
        "wait=true keeps the request open until granted; closing it leaves the queue",
        body=_RESERVE_FIELDS,
    ),
    Route("GET", "/leases/{lease_id}", _lease, "a lease you hold (do I still hold it?)"),
    Route("POST", "/leases/{lease_id}/release", _release, "give a lease back (idempotent)"),
    Route("POST", "/leases/{lease_id}/renew", _renew, "extend a lease", body=("ttl_s",)),
    Route(
        "POST",
        "/leases/{lease_id}/check_fence",
        _check_fence,
        "does this token still hold the key?",
        body=("fencing_token",),
    ),
    Route(
        "GET",
        "/queue_position",
        _queue_position,
        "a waiting request's place (1 = next)",
        query=("resource", "holder", "request_id"),
    ),
    Route(
        "POST",
        "/withdraw",
        _withdraw,
        "take a waiting request out of the queue (ref=: admin)",
        body=("resource", "holder", "request_id", "ref", "reason", "by"),
    ),
    Route(
        "POST",
        "/resources/{key}/revoke",
        _revoke,
        "take a key from its holder",
        admin=True,
        body=("reason", "expected_holder", "request_id", "by"),
    ),
    Route(
        "POST",
        "/resources/{key}/maintenance",
        _maintenance,
        "stop or resume grants on a key",
        admin=True,
        body=("on", "reason", "by"),
    ),
    Route(
        "POST",
        "/runs",
        _submit,
        "run a bundle (a target dir) under a lease",
        body=("target_dir", "holder", "priority", "request_id", "restart"),
    ),
    Route("GET", "/runs", _runs, "every run (active=1: only queued or running)", query=("active",)),
    Route("GET", "/runs/{run_id}", _run, "one run's record"),
    Route("POST", "/runs/{run_id}/cancel", _cancel, "stop a run"),
    Route("GET", "/runs/{run_id}/logs", _logs, "a run's job logs (text)"),
    Route(
        "GET",
        "/events",
        _events,
        "the journal's latest events (oldest first); with after=SEQ the first ones after that seq, to page",
        query=("limit", "event", "after"),
    ),
    Route("POST", "/tokens", _token_create, "make a token (shown once)", admin=True, body=("name", "admin")),
    Route("GET", "/tokens", _token_list, "every token (no secrets)", admin=True),
    Route("DELETE", "/tokens/{name}", _token_revoke, "revoke a token", admin=True),
)


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for :data:`ROUTES` (made from the same table the router is)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "security": [{"bearer": []}],
            "responses": {
                "200": {"description": "ok"},
                **{
                    str(code): {"description": cls.__name__, "content": {"application/json": {}}}
                    for cls, code in sorted(HTTP_STATUS.items(), key=lambda item: item[1])
                },
            },
        }
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_names(route.path)
        ] + [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}} for name in route.query]
        if parameters:
            operation["parameters"] = parameters
        if route.body:
            operation["requestBody"] = {
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {name: {} for name in route.body},
                        }
                    }
                }
            }
        if route.admin:
            operation["x-merlin-admin"] = True
        paths.setdefault(API_PREFIX + route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Merlin hardware broker", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


async def start(api: RestApi, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve ``api`` on ``host:port`` in the running loop; returns the runner and the API's base URL."""
    runner = web.AppRunner(api.app, handler_cancellation=True, access_log=None, keepalive_timeout=REQUEST_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []  # the bound port (port 0: the one the OS gave)
    bound = sockets[0].getsockname()[1] if sockets else port
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}{API_PREFIX}"
