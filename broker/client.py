"""The Python shim: ``broker.connect()`` and a client that retries safely.

Retries happen here, not in Ray: a call that died with its actor is sent
again to the restarted one with the *same* ``request_id``, so it never takes
a second lease. ``client.lease(...)`` holds a lease for a ``with`` block,
renewing it from a background thread, and raises if the lease was lost.

The fast path: single-key lease calls on a lease or a queued request
(``release``, ``renew``, ``lease``, ``check_fence``, ``queue_position``, and
``withdraw`` of one's own request) go straight to
``resource:<key>`` through a cached handle, skipping the coordinator's hop
(a forwarded Ray call costs more than twice a direct one). The key comes from
the call itself (a lease id is ``<key>.<32 hex>``). Anything the fast path
cannot route — a bad key or lease id, a key with no actor (not in the
catalog, or dropped from it) — goes to the coordinator, so errors stay those
of the coordinator's API. ``reserve`` takes the fast path only with a request
id the shim made itself (random: it can name no other key); a caller's own
``request_id`` goes through the coordinator, which keeps the rule that one
request id names one key (no single key can check it).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from broker.disk.store import StateDir
from broker.errors import BrokerError, BrokerUnavailable, InvalidRequest, LeaseNotFound, LeaseNotHeld
from broker.holders import admin_secret_from_env, default_holder
from broker.models import (
    BrokerStatus,
    GroupLease,
    Lease,
    LeaseState,
    ResourceStatus,
    ResourceTable,
    SessionTie,
    is_resource_key,
    resource_of_lease_id,
)
from broker.seam.actors import ActorRef
from broker.seam.placement import COORDINATOR_NAME, namespace_from_env, resource_actor_name
from broker.seam.retry import RetryPolicy

__all__ = ["connect", "BrokerClient", "HeldLease", "default_holder"]

DEFAULT_RETRY_S = 30.0
# The fast path's routing table. The resource actor takes the coordinator method's
# arguments minus the leading resource (first set), or the same ones (second set).
# `reserve` is routed by `BrokerClient.reserve` itself, and only with a request id it made: the
# coordinator holds the rule that one *caller's* request id names one key (a CI retry that lands on
# another key must never hold two boards), which no single key can check.
_KEYED_BY_RESOURCE = frozenset({"queue_position", "withdraw"})
_KEYED_BY_LEASE_ID = frozenset({"release", "renew", "lease", "check_fence"})
_NOT_ROUTED = object()  # the fast path could not take the call: the coordinator answers it


def connect(
    address: str | None = None,
    *,
    namespace: str | None = None,
    state_dir: str | None = None,
    retry_s: float = DEFAULT_RETRY_S,
) -> BrokerClient:
    """Connect to the running broker.

    Args:
        address: a Ray address; default ``RAY_ADDRESS``, then the state dir's
            ``cluster/bootstrap.json``.
        namespace: default ``MERLIN_RAY_NAMESPACE``, then ``merlin``.
        state_dir: default ``MERLIN_STATE_DIR``, then ``build/generated/ray``.
        retry_s: how long a call keeps retrying while the broker restarts.
    Raises:
        BrokerUnavailable: no cluster answers, or no broker runs in it (the
            message names the command to run). Never hangs.
    """
    from broker.seam.cluster import connect_ray

    namespace = namespace or namespace_from_env()
    connect_ray(StateDir.from_env(state_dir), address=address, namespace=namespace)
    client = BrokerClient(namespace, retry_s=retry_s)
    client.ping()
    return client


class BrokerClient:
    """Calls on the ``broker`` actor with retries; see the coordinator for each method's rules."""

    def __init__(self, namespace: str, *, retry_s: float = DEFAULT_RETRY_S):
        self.namespace = namespace
        self.retry_s = retry_s
        self._ray: Any = None  # the Ray-backed seam, made on first call (importing the shim imports no Ray)
        self._ref: ActorRef | None = None
        self._resources: dict[str, ActorRef] = {}  # the fast path's handles, looked up once per key

    # ------------------------------------------------------------------ API

    def reserve(
        self,
        resource: str,
        holder: str | None = None,
        *,
        ttl_s: float = 3600.0,
        wait: bool = False,
        timeout_s: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        note: str = "",
        on_position: Callable[[int | None], None] | None = None,
        bind_session: bool = True,
    ) -> Lease:
        """Reserve ``resource``; a retried call reuses one ``request_id``, so it never gets two leases.

        ``on_position`` (with ``wait=True``) is called with the request's place in
        the queue whenever it changes. The request and its lease are tied to this
        process (its Ray job, as ZooKeeper's ephemeral nodes are to their client): if
        the process dies, the request leaves the queue, or the lease ends (``holder
        gone``), within seconds, whatever its TTL. ``bind_session=False`` ties only the
        wait: the lease, once received here, lives to its TTL, for a process that hands
        it on and exits (the CLI's ``reserve``).
        """
        holder = default_holder() if holder is None else holder
        # An id made here names nothing else: the call may go straight to the key (module docstring).
        direct = request_id is None
        request_id = uuid.uuid4().hex if request_id is None else request_id
        kwargs: dict[str, Any] = dict(
            ttl_s=ttl_s,
            wait=wait,
            timeout_s=timeout_s,
            priority=priority,
            request_id=request_id,
            note=note,
            session=self._system().session_id(),
            bind_session=bind_session,
        )
        progress = self._position_reporter(
            on_position if wait else None, "queue_position", resource, holder, request_id
        )

        def ask(progress: Callable[[], None] | None = None) -> Lease:
            if direct and is_resource_key(resource):
                answer = self._direct(resource, "reserve", (holder,), kwargs, progress=progress)
                if answer is not _NOT_ROUTED:
                    return answer
            return self.call("reserve", resource, holder, progress=progress, **kwargs)

        try:
            lease = ask(progress)
            if lease.state is LeaseState.GRANTED and lease.session_tie is SessionTie.UNTIL_ACKNOWLEDGED:
                # Granted from the queue: say we have it (the same request again), or it is taken
                # back when this process ends, as a grant nobody received would be.
                lease = ask()
            return lease
        except KeyboardInterrupt:
            if wait:  # leave the queue rather than be granted a lease nobody will use
                with contextlib.suppress(BrokerError):
                    self.call("withdraw", resource, holder, request_id, answer_within_s=5.0)
            raise

    def reserve_group(
        self,
        holder: str | None = None,
        *,
        labels: str | None = None,
        keys: list[str] | tuple[str, ...] | None = None,
        count: int | None = None,
        ttl_s: float = 3600.0,
        wait: bool = False,
        timeout_s: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        note: str = "",
        on_position: Callable[[int | None], None] | None = None,
        bind_session: bool = True,
    ) -> GroupLease:
        """One lease on several keys: any ``count`` (default 1) of the keys matching ``labels``
        (``"kind=fpga,board=u250"``), or all of ``keys`` together (or any ``count`` of them).

        The answer names the keys it got (``.members``: key, fencing token, host,
        labels, properties). ``release``/``renew``/``get_lease`` take its ``lease_id``.
        Tied to this process like ``reserve``: if it dies, the wait and the group lease
        end within seconds (``bind_session=False``: nothing is tied, the TTL applies).
        """
        holder = default_holder() if holder is None else holder
        request_id = uuid.uuid4().hex if request_id is None else request_id
        progress = self._position_reporter(on_position if wait else None, "group_position", holder, request_id)

        try:
            return self.call(
                "reserve_group",
                holder,
                labels=labels,
                keys=list(keys) if keys is not None else None,
                count=count,
                ttl_s=ttl_s,
                wait=wait,
                timeout_s=timeout_s,
                priority=priority,
                request_id=request_id,
                note=note,
                session=self._system().session_id() if bind_session else None,
                progress=progress,
            )
        except KeyboardInterrupt:
            if wait:  # leave every queue rather than be granted keys nobody will use
                with contextlib.suppress(BrokerError):
                    self.call("withdraw_group", holder, request_id, answer_within_s=5.0)
            raise

    def _position_reporter(
        self, on_position: Callable[[int | None], None] | None, method: str, *args: Any
    ) -> Callable[[], None] | None:
        """A ``progress`` callback that asks ``method(*args)`` for a waiting request's place and tells
        ``on_position`` when it changes (None without ``on_position``)."""
        if on_position is None:
            return None
        last: list[int | None | str] = ["-"]

        def progress() -> None:
            try:
                position = self.call(method, *args, answer_within_s=2.0)
            except BrokerError:
                return
            if position != last[0]:
                last[0] = position
                on_position(position)

        return progress

    def groups(self) -> list[dict[str, Any]]:
        """Every waiting or granted group lease (public view, no lease ids)."""
        return self.call("groups")

    def release(self, lease_id: str) -> Lease:
        return self.call("release", lease_id)

    def renew(self, lease_id: str, ttl_s: float | None = None) -> Lease:
        return self.call("renew", lease_id, ttl_s)

    def get_lease(self, lease_id: str) -> Lease:
        return self.call("lease", lease_id)

    def revoke(
        self,
        resource: str,
        reason: str,
        *,
        expected_holder: str | None = None,
        by: str | None = None,
        admin_secret: str | None = None,
    ) -> Lease:
        """Administrative: take ``resource`` from its holder (one request id: a retry revokes once)."""
        return self.call(
            "revoke",
            resource,
            reason,
            expected_holder=expected_holder,
            by=by or default_holder(),
            request_id=uuid.uuid4().hex,
            admin_secret=admin_secret if admin_secret is not None else admin_secret_from_env(),
        )

    def set_maintenance(
        self, resource: str, on: bool, reason: str = "", *, by: str | None = None, admin_secret: str | None = None
    ) -> ResourceStatus:
        return self.call(
            "set_maintenance",
            resource,
            on,
            reason,
            by=by or default_holder(),
            admin_secret=admin_secret if admin_secret is not None else admin_secret_from_env(),
        )

    def check_fence(self, lease_id: str, fencing_token: int) -> Lease:
        return self.call("check_fence", lease_id, fencing_token)

    def queue_position(self, resource: str, holder: str, request_id: str) -> int | None:
        return self.call("queue_position", resource, holder, request_id)

    def resources(self) -> ResourceTable:
        """Every resource's status; renders as a table in a notebook."""
        return ResourceTable(self.call("resources"))

    def status(self) -> BrokerStatus:
        return self.call("status")

    def ping(self) -> dict[str, Any]:
        return self.call("ping", answer_within_s=10.0)

    def lease(
        self,
        resource: str | None = None,
        holder: str | None = None,
        *,
        labels: str | None = None,
        keys: list[str] | tuple[str, ...] | None = None,
        count: int | None = None,
        ttl_s: float = 60.0,
        wait: bool = True,
        timeout_s: float | None = None,
        priority: int = 0,
        note: str = "",
        heartbeat_s: float | None = None,
        on_lost: Callable[[HeldLease], None] | None = None,
        on_expiring: Callable[[HeldLease], None] | None = None,
        bind_session: bool = True,
    ) -> HeldLease:
        """Hold ``resource`` for a ``with`` block, renewing every ``heartbeat_s`` (default ttl/3).

        The lease (and the wait for it) is tied to this process: if it dies, the key
        moves on within seconds, not at the TTL (``bind_session=False``: at the TTL).

        ``with client.lease("firesim_u250") as held:`` waits for the grant,
        renews in the background, releases on exit, and raises ``LeaseNotHeld``
        on exit if the lease was lost meanwhile (expired, revoked). ``on_lost``
        is called from the heartbeat thread the moment the loss is seen;
        ``held.check()`` raises at once inside the block. If the resource has
        a maximum hold time, ``on_expiring`` is called once when the lease
        reaches its ``warn_at`` (renewals cannot pass ``must_end_by``).

        ``labels=``/``keys=``/``count=`` instead of ``resource`` hold a group lease
        (see :meth:`reserve_group`): ``held.keys`` and ``held.fencing_tokens`` say
        which keys it got.
        """
        group = labels is not None or keys is not None or count is not None
        if group == (resource is not None):
            raise InvalidRequest("lease() takes a resource key, or labels=/keys= (with count=), not both", "resource")
        where: dict[str, Any] = dict(labels=labels, keys=keys, count=count) if group else dict(resource=resource)
        return HeldLease(
            self,
            dict(
                **where,
                holder=holder,
                ttl_s=ttl_s,
                wait=wait,
                timeout_s=timeout_s,
                priority=priority,
                note=note,
                bind_session=bind_session,
            ),
            heartbeat_s=heartbeat_s if heartbeat_s is not None else max(0.05, ttl_s / 3.0),
            on_lost=on_lost,
            on_expiring=on_expiring,
        )

    # ------------------------------------------------------------------ plumbing

    def call(
        self,
        method: str,
        /,
        *args: Any,
        answer_within_s: float | None = None,
        progress: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call ``broker.<method>``; retry with the same arguments while its actor restarts.

        Single-key lease calls take the fast path (see the module docstring);
        the answer and the errors are the coordinator's either way.
        ``progress`` is called about twice a second while the call is pending
        (the CLI uses it to show a waiter its place in the queue).
        """
        route = _route(method, args) if not kwargs or method not in _KEYED_BY_RESOURCE else None
        if route is not None:
            answer = self._direct(
                route[0], method, route[1], kwargs, answer_within_s=answer_within_s, progress=progress
            )
            if answer is not _NOT_ROUTED:
                return answer
        return self._system().call_sync(
            self._coordinator(), method, *args, answer_within_s=answer_within_s, progress=progress, **kwargs
        )

    def _direct(
        self,
        key: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        answer_within_s: float | None = None,
        progress: Callable[[], None] | None = None,
    ) -> Any:
        """``resource:<key>.<method>`` through its cached handle, or ``_NOT_ROUTED`` if it has no actor."""
        ref = self._resource(key)
        if ref is None:
            return _NOT_ROUTED
        try:
            return self._system().call_sync(
                ref, method, *args, answer_within_s=answer_within_s, progress=progress, **kwargs
            )
        except BrokerUnavailable:
            if self._system().lookup(ref.name, ref.namespace) is not None:
                raise
            # The actor is gone for good (its key left the catalog, or the broker went
            # down): the coordinator says which, as it would have said without the fast path.
            self._resources.pop(key, None)
            return _NOT_ROUTED

    def _system(self) -> Any:
        if self._ray is None:
            from broker.seam.ray_backend import RaySystem

            self._ray = RaySystem(RetryPolicy(window_s=self.retry_s))
        return self._ray

    def _coordinator(self) -> ActorRef:
        if self._ref is None:
            self._ref = ActorRef(self._system(), COORDINATOR_NAME, self.namespace)
        return self._ref

    def _resource(self, key: str) -> ActorRef | None:
        """The cached handle of ``resource:<key>``; None if no such actor runs (a lookup, never a spawn)."""
        ref = self._resources.get(key)
        if ref is None:
            ref = ActorRef(self._system(), resource_actor_name(key), self.namespace)
            try:
                ref.handle()
            except BrokerUnavailable:
                return None
            self._resources[key] = ref
        return ref


def _route(method: str, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]] | None:
    """``(key, the resource actor's arguments)`` for a single-key lease call, else None (the coordinator)."""
    if not args:
        return None
    if method in _KEYED_BY_RESOURCE:
        return (args[0], args[1:]) if is_resource_key(args[0]) else None
    if method in _KEYED_BY_LEASE_ID:
        try:
            return resource_of_lease_id(args[0]), args
        except BrokerError:
            return None
    return None


class HeldLease:
    """A lease held for a ``with`` block; see :meth:`BrokerClient.lease`."""

    def __init__(
        self,
        client: BrokerClient,
        request: dict[str, Any],
        *,
        heartbeat_s: float,
        on_lost: Callable[[HeldLease], None] | None,
        on_expiring: Callable[[HeldLease], None] | None = None,
    ):
        self._client = client
        self._request = request
        self._heartbeat_s = heartbeat_s
        self._on_lost = on_lost
        self._on_expiring = on_expiring
        self.expiring = False  # set once the max hold's warning time has passed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease: Lease | GroupLease | None = None
        self.lost: BrokerError | None = None

    @property
    def lease_id(self) -> str:
        return self._current().lease_id

    @property
    def fencing_token(self) -> int:
        """The key's token (single-key lease); a group lease has one per key: ``fencing_tokens``."""
        lease = self._current()
        if isinstance(lease, GroupLease):
            raise InvalidRequest("a group lease has one fencing token per key: use fencing_tokens", "fencing_token")
        return lease.fencing_token or 0

    def check(self) -> Lease | GroupLease:
        """The current lease; raises ``LeaseNotHeld`` if it was lost."""
        if self.lost is not None:
            raise self.lost
        return self._current()

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys held: one for a single-key lease, the group's for a group lease."""
        lease = self._current()
        return lease.keys if isinstance(lease, GroupLease) else (lease.resource,)

    @property
    def fencing_tokens(self) -> dict[str, int]:
        lease = self._current()
        return lease.fencing_tokens if isinstance(lease, GroupLease) else {lease.resource: lease.fencing_token or 0}

    def __enter__(self) -> HeldLease:
        request = dict(self._request)
        if "resource" in request:
            self.lease = self._client.reserve(**request)
        else:
            self.lease = self._client.reserve_group(**request)
        if self.lease.state is not LeaseState.GRANTED:
            raise LeaseNotHeld(self.lease.lease_id, self.lease.state.value, "not granted")
        self._thread = threading.Thread(target=self._beat, name=f"merlin-heartbeat-{','.join(self.keys)}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._heartbeat_s + 5.0)
        if self.lost is None:
            try:
                self.lease = self._client.release(self._current().lease_id)
            except (LeaseNotHeld, LeaseNotFound) as err:
                self.lost = err
        if self.lost is not None and exc_type is None:
            raise self.lost

    def _current(self) -> Lease | GroupLease:
        if self.lease is None:
            raise LeaseNotHeld("-", "queued", "the with block has not been entered")
        return self.lease

    def _beat(self) -> None:
        lease_id = self._current().lease_id
        while not self._stop.wait(self._heartbeat_s):
            try:
                self.lease = self._client.call("renew", lease_id, None, answer_within_s=max(self._heartbeat_s, 1.0))
                warn_at = getattr(self.lease, "warn_at", None)  # a group lease has no max-hold warning
                if warn_at is not None and time.time() >= warn_at and not self.expiring:
                    self.expiring = True
                    if self._on_expiring is not None:
                        self._on_expiring(self)
            except (LeaseNotHeld, LeaseNotFound) as err:
                self._lose(err)
                return
            except BrokerUnavailable:
                expires_at = self._current().expires_at or 0.0
                if time.time() >= expires_at:
                    self._lose(LeaseNotHeld(lease_id, "expired", "no heartbeat reached the broker before expiry"))
                    return

    def _lose(self, err: BrokerError) -> None:
        self.lost = err
        if self._on_lost is not None:
            self._on_lost(self)
