"""The HTTP API v1 as a Ray Serve application: the same routes and handlers, the coordinator one Ray hop away.

For labs whose users are not on the head node: Serve's proxy takes the HTTP
requests (on any node it runs on) and one replica answers them with
:mod:`broker.http.rest`'s own pipeline — :data:`~broker.http.rest.ROUTES`,
:func:`~broker.http.rest.parse_body`, the handlers, the JSON errors — over
:class:`RemoteBroker`, which calls the named ``broker`` actor. What differs
from the coordinator's own listener: one more hop through Ray per coordinator
call (the token check is one of them: the token book stays in the coordinator,
which answers with the caller's :class:`~broker.core.tokens.Identity` only).

A waiting reserve stays one open request: when its client disconnects, Serve
cancels the handler — a recursive ``ray.cancel``, so the coordinator's call is
cancelled too, at whatever step it is in, and leaves the queue itself — and the
handler withdraws the request as well (as in the loop), outside the cancelled
call (:meth:`~broker.seam.actors.ActorSystem.aftercare`).

Deploy with ``merlin broker serve`` (or ``serve run broker.http.serve:app`` with
``MERLIN_RAY_NAMESPACE`` set); the proxy listens on 127.0.0.1 unless told.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from broker.errors import BrokerError
from broker.http.rest import (
    ADMIN_ACTS,
    ADMIN_SECRET_HEADER,
    API_PREFIX,
    MAX_BODY_BYTES,
    Answer,
    Call,
    match,
    openapi_document,
    parse_body,
    perform,
    render,
    render_error,
)
from broker.seam import ActorRef, ActorSystem, RetryPolicy, ray_system
from broker.seam.placement import namespace_from_env

__all__ = ["APP_NAME", "BrokerApi", "RemoteBroker", "deploy", "undeploy", "DEFAULT_SERVE_PORT"]

APP_NAME = "merlin-broker"
DEFAULT_SERVE_PORT = 8000
# Calls wait this long for a restarting coordinator (its own default for resource actors).
RETRY_S = float(os.environ.get("MERLIN_ACTOR_RETRY_S", "30"))


class RemoteBroker:
    """The coordinator as the handlers see it from a Serve replica: ``await broker.reserve(...)`` is
    one call on the named actor, through the seam (retried while it restarts; a ``BrokerError`` keeps
    its type). Carrying a named admin token, the admin acts go through the coordinator's ``as_token``."""

    def __init__(self, system: ActorSystem, ref: ActorRef, admin_authorization: str | None = None):
        self._system = system
        self._ref = ref
        self._admin = admin_authorization

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            if self._admin is not None and method in ADMIN_ACTS:
                return await self._system.call(self._ref, "as_token", self._admin, method, args, kwargs)
            return await self._system.call(self._ref, method, *args, **kwargs)

        return call


class BrokerApi:
    """The Serve deployment: one request in, :mod:`broker.http.rest`'s pipeline, one response out."""

    def __init__(self, namespace: str):
        self._system = ray_system(RetryPolicy(window_s=RETRY_S))
        self._ref = ActorRef(self._system, "broker", namespace)

    async def __call__(self, request: Request) -> Response:
        return _response(await self.answer(request))

    async def answer(self, request: Request) -> Answer:
        path = request.url.path
        if request.method == "GET" and path == API_PREFIX + "/openapi.json":
            return render(openapi_document())
        found = match(request.method, path)
        if isinstance(found, int):
            return found, "text/plain", f"{found}: {'Not Found' if found == 404 else 'Method Not Allowed'}".encode()
        route, params = found
        try:
            authorization = request.headers.get("authorization", "")
            who = await self._system.call(self._ref, "http_identity", authorization, route.method, route.path)
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                return 413, "text/plain", b"413: Request Entity Too Large"
            body = parse_body(route, raw)
        except BrokerError as err:
            return render_error(err)
        admin = authorization if who.admin and not who.operator else None
        broker = RemoteBroker(self._system, self._ref, admin)
        call = Call(
            who,
            params,
            dict(request.query_params),
            body,
            request.headers.get(ADMIN_SECRET_HEADER),
            aftercare=self._system.aftercare,
        )
        return await perform(route, broker, call)


def _response(answer: Answer) -> Response:
    status, kind, body = answer
    return Response(content=body, status_code=status, media_type=kind)


def deploy(namespace: str, host: str = "127.0.0.1", port: int = DEFAULT_SERVE_PORT) -> str:
    """Deploy the app over the broker of ``namespace``, Serve's proxy on ``host:port``; its base URL."""
    from broker.seam.ray_serve import deploy_application

    deploy_application(BrokerApi, namespace, name=APP_NAME, host=host, port=port)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{API_PREFIX}"


def undeploy() -> bool:
    """Take the app down (Serve's proxy stays for other apps); False if it was not deployed."""
    from broker.seam.ray_serve import delete_application

    return delete_application(APP_NAME)


def __getattr__(name: str) -> Any:
    # `serve run broker.http.serve:app`: made on first use (with MERLIN_RAY_NAMESPACE), so importing
    # this module (the replica does) builds nothing.
    if name == "app":
        from broker.seam.ray_serve import application

        return application(BrokerApi, namespace_from_env())
    raise AttributeError(name)
