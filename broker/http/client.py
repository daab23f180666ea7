"""A client of the HTTP API (:mod:`broker.http.rest`) with the shim's methods: the CLI's fast path.

No Ray and no pydantic are imported: a command that reserves, renews or
releases costs a Python start-up and one request. Answers are
:class:`broker.http.answers.Answer` (the JSON, read like the model it was
dumped from), except a run's record (``call("run")``). Errors come back as the same
``broker.errors`` classes (:func:`broker.errors.error_from_json`). Methods
the HTTP API does not carry (``authorize_down``) go to ``fallback``, the Ray
shim, made only when needed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from broker.errors import BrokerError, BrokerUnavailable, error_from_json
from broker.http.answers import Answer

__all__ = ["HttpClient"]


class _Unreachable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


POLL_S = 0.5  # how often a waiting reserve asks for its place in the queue


def _lease(data: Any) -> Answer:
    if not isinstance(data, dict):
        raise BrokerUnavailable(f"the broker's HTTP API answered with no lease: {str(data)[:200]}", "")
    return Answer(data)


class HttpClient:
    """The broker over HTTP with a bearer token (the operator's may act for any holder)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        acts_for_anyone: bool,
        fallback: Callable[[], Any] | None = None,
        timeout_s: float = 30.0,
        retry_s: float = 30.0,
        find_url: Callable[[], str | None] | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._retry_s = retry_s
        self._find_url = find_url  # where the broker listens now (a restarted coordinator may move)
        self._token = token
        self._acts_for_anyone = acts_for_anyone
        self._fallback = fallback
        self._timeout_s = timeout_s

    # ------------------------------------------------------------------ plumbing

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        admin_secret: str | None = None,
    ) -> Any:
        """One call; while the coordinator does not answer (it restarts), the same call again — every
        call is safe to repeat (a reserve carries its request id) — until ``retry_s`` has passed."""
        deadline = time.monotonic() + self._retry_s
        delay = 0.05
        while True:
            try:
                return self._request_once(method, path, body, timeout_s, admin_secret)
            except _Unreachable as unreachable:
                if time.monotonic() + delay > deadline:
                    raise BrokerUnavailable(
                        f"the broker's HTTP API at {self.base_url} did not answer ({unreachable.reason})",
                        "`merlin broker status` says whether it runs",
                    ) from None
                time.sleep(delay)
                delay = min(1.0, delay * 2)
                url = self._find_url() if self._find_url is not None else None
                if url:
                    self.base_url = url.rstrip("/")

    def _request_once(
        self, method: str, path: str, body: dict[str, Any] | None, timeout_s: float | None, admin_secret: str | None
    ) -> Any:
        data = json.dumps({k: v for k, v in body.items() if v is not None}).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        if admin_secret:
            headers["X-Merlin-Admin-Secret"] = admin_secret
        request = urllib.request.Request(self.base_url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(
                request, timeout=timeout_s if timeout_s is not None else self._timeout_s
            ) as answer:
                raw = answer.read()
                kind = answer.headers.get_content_type()
        except urllib.error.HTTPError as failed:
            raw = failed.read()
            try:
                raise error_from_json(json.loads(raw)) from None
            except ValueError:
                raise BrokerUnavailable(f"the broker's HTTP API answered {failed.code}", "") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, or cut mid-answer
            raise _Unreachable(str(getattr(exc, "reason", exc))[:200]) from None
        return json.loads(raw) if kind == "application/json" else raw.decode()

    def _holder(self, holder: str | None) -> str | None:
        """A named token is its holder: it sends none (the server uses the token's name)."""
        return holder if self._acts_for_anyone else None

    def _waiting(
        self,
        method: str,
        path: str,
        body: dict[str, Any],
        position: Callable[[], int | None] | None,
        on_position: Callable[[int | None], None] | None,
    ) -> Any:
        """A request that may stay open (a waiting reserve): sent from a thread, its place polled here."""
        if on_position is None or not body.get("wait"):
            return self.request(method, path, body, timeout_s=None if body.get("wait") else self._timeout_s)
        result: dict[str, Any] = {}

        def send() -> None:
            try:
                result["value"] = self.request(method, path, body, timeout_s=None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread below
                result["error"] = exc

        sender = threading.Thread(target=send, name="merlin-http-wait", daemon=True)
        sender.start()
        last: int | None | str = "-"
        while sender.is_alive():
            sender.join(POLL_S)
            if sender.is_alive() and position is not None:
                with contextlib.suppress(BrokerError):
                    place = position()
                    if place != last:
                        last = place
                        on_position(place)
        if "error" in result:
            raise result["error"]
        return result["value"]

    # ------------------------------------------------------------------ the shim's methods

    def reserve(
        self,
        resource: str,
        holder: str | None = None,
        *,
        on_position: Callable[[int | None], None] | None = None,
        request_id: str | None = None,
        bind_session: bool = False,
        **options: Any,
    ) -> Answer:
        import uuid

        # Over HTTP a waiting request is tied to its connection (it leaves the queue when the
        # client goes); a lease is TTL-bound, as the CLI wants: ``bind_session`` has nothing to bind.
        del bind_session

        request_id = request_id or uuid.uuid4().hex
        body = {"resource": resource, "holder": self._holder(holder), "request_id": request_id, **options}
        query = urllib.parse.urlencode(
            {"resource": resource, "request_id": request_id, **({"holder": holder} if self._holder(holder) else {})}
        )
        try:
            data = self._waiting(
                "POST",
                "/reserve",
                body,
                lambda: self.request("GET", f"/queue_position?{query}")["position"],
                on_position,
            )
        except KeyboardInterrupt:
            with contextlib.suppress(BrokerError):  # leave the queue rather than be granted a lease nobody uses
                self.request(
                    "POST",
                    "/withdraw",
                    {"resource": resource, "holder": self._holder(holder), "request_id": request_id},
                    timeout_s=5,
                )
            raise
        return _lease(data)

    def reserve_group(
        self,
        holder: str | None = None,
        *,
        on_position: Callable[[int | None], None] | None = None,
        request_id: str | None = None,
        bind_session: bool = False,
        **options: Any,
    ) -> Answer:
        import uuid

        # Over HTTP a waiting request is tied to its connection (it leaves the queue when the
        # client goes); a lease is TTL-bound, as the CLI wants: ``bind_session`` has nothing to bind.
        del bind_session

        request_id = request_id or uuid.uuid4().hex
        body = {"holder": self._holder(holder), "request_id": request_id, **options}
        query = urllib.parse.urlencode(
            {"request_id": request_id, **({"holder": holder} if self._holder(holder) else {})}
        )
        try:
            data = self._waiting(
                "POST",
                "/reserve",
                body,
                lambda: self.request("GET", f"/queue_position?{query}")["position"],
                on_position,
            )
        except KeyboardInterrupt:
            with contextlib.suppress(BrokerError):
                self.request(
                    "POST", "/withdraw", {"holder": self._holder(holder), "request_id": request_id}, timeout_s=5
                )
            raise
        return _lease(data)

    def release(self, lease_id: str) -> Answer:
        return _lease(self.request("POST", f"/leases/{urllib.parse.quote(lease_id, safe='')}/release", {}))

    def renew(self, lease_id: str, ttl_s: float | None = None, **_: Any) -> Answer:
        return _lease(self.request("POST", f"/leases/{urllib.parse.quote(lease_id, safe='')}/renew", {"ttl_s": ttl_s}))

    def get_lease(self, lease_id: str) -> Answer:
        return _lease(self.request("GET", f"/leases/{urllib.parse.quote(lease_id, safe='')}"))

    def check_fence(self, lease_id: str, fencing_token: Any) -> Answer:
        path = f"/leases/{urllib.parse.quote(lease_id, safe='')}/check_fence"
        return _lease(self.request("POST", path, {"fencing_token": fencing_token}))

    def revoke(
        self,
        resource: str,
        reason: str,
        *,
        expected_holder: str | None = None,
        admin_secret: str | None = None,
        by: str | None = None,
        **_: Any,
    ) -> Answer:
        path = f"/resources/{urllib.parse.quote(resource, safe='')}/revoke"
        body = {"reason": reason, "expected_holder": expected_holder, "by": self._holder(by)}
        return _lease(self.request("POST", path, body, admin_secret=admin_secret))

    def set_maintenance(
        self,
        resource: str,
        on: bool,
        reason: str = "",
        *,
        admin_secret: str | None = None,
        by: str | None = None,
        **_: Any,
    ) -> Answer:
        path = f"/resources/{urllib.parse.quote(resource, safe='')}/maintenance"
        body = {"on": on, "reason": reason, "by": self._holder(by)}
        return Answer(self.request("POST", path, body, admin_secret=admin_secret))

    def resources(self) -> list[Answer]:
        return [Answer(item) for item in self.request("GET", "/resources")]

    def status(self) -> Answer:
        return Answer(self.request("GET", "/status"))

    def call(self, method: str, /, *args: Any, answer_within_s: float | None = None, **kwargs: Any) -> Any:
        """The shim's generic call: the methods the CLI calls by name, over HTTP; others via ``fallback``."""
        from broker.core.runs import RunRecord

        quoted = [urllib.parse.quote(str(arg), safe="") for arg in args]
        if method == "pools":
            return self.request("GET", "/pools")
        if method == "renew":
            return self.renew(args[0], args[1] if len(args) > 1 else kwargs.get("ttl_s"))
        if method == "submit":  # the run's source is recorded as "http" (the token names who)
            body = {
                "target_dir": args[0],
                "holder": self._holder(kwargs.get("holder")),
                "priority": kwargs.get("priority", 0),
                "request_id": kwargs.get("request_id"),
                "restart": kwargs.get("restart", False),
            }
            return RunRecord.model_validate(self.request("POST", "/runs", body))
        if method == "run":
            return RunRecord.model_validate(self.request("GET", f"/runs/{quoted[0]}"))
        if method == "cancel":
            return RunRecord.model_validate(self.request("POST", f"/runs/{quoted[0]}/cancel", {}))
        if method == "logs":
            return self.request("GET", f"/runs/{quoted[0]}/logs")
        if method == "withdraw":
            if "ref" in kwargs:
                body = {
                    "resource": args[0],
                    "ref": kwargs["ref"],
                    "reason": kwargs.get("reason", ""),
                    "by": self._holder(kwargs.get("by")),
                }
            else:
                body = {"resource": args[0], "holder": self._holder(args[1]), "request_id": args[2]}
            data = self.request("POST", "/withdraw", body, admin_secret=kwargs.get("admin_secret"))
            return _lease(data) if data else None
        if method == "health":
            now = "?now=1" if len(args) > 1 and args[1] else ""
            return self.request("GET", f"/health/{quoted[0]}{now}", timeout_s=None)
        if method == "create_token":
            body = {"name": args[0], "admin": args[1] if len(args) > 1 else False}
            return self.request("POST", "/tokens", body, admin_secret=kwargs.get("admin_secret"))
        if method == "list_tokens":
            return self.request("GET", "/tokens", admin_secret=kwargs.get("admin_secret"))
        if method == "revoke_token":
            return self.request("DELETE", f"/tokens/{quoted[0]}", admin_secret=kwargs.get("admin_secret"))
        if self._fallback is None:
            raise BrokerUnavailable(f"{method} is not on the HTTP API", "")
        return self._fallback().call(method, *args, answer_within_s=answer_within_s, **kwargs)
