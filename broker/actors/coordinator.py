"""``broker``: the coordinator actor notebooks, the CLI and the shim talk to.

What it owns: the resource catalog (persisted as ``catalog.json`` in the state
dir), one handle per resource actor, routing, the run queue of execution
bundles with their records (:mod:`broker.actors.run_manager`), and the metrics
endpoint (:mod:`broker.http.metrics`). It holds no lease state: every lease call
is forwarded to ``resource:<key>``, which owns that key.

Guarantees:

* Every call is safe to retry. ``reserve`` and ``revoke`` get a
  ``request_id`` here when the caller gave none, so a forwarded call that died
  with its resource actor is retried with the same id and never takes a
  second lease or revokes twice; ``release``, ``renew``, ``cancel`` and
  ``set_maintenance`` are idempotent.
* Detached actors do not share fate: if the coordinator dies, resource
  actors keep their leases and timers; Ray restarts the coordinator, which
  reloads the catalog, finds its actors by name and re-attaches to every
  unfinished run from its record. If a resource actor dies,
  only calls for that key wait (bounded) for its restart.
* With ``admin_secret_sha256`` in the running catalog, every administrative
  act needs the secret — revoke, maintenance, ``broker down`` and applying a
  different catalog (which could otherwise replace the hash). A catalog that
  drops keys or removes the secret is refused, naming the change, unless
  ``replace``.
* Sessions: a request made with ``session=<the caller's Ray job id>`` is tied to that
  caller. The coordinator learns from the resource actors' snapshots which sessions
  their keys hold something for, and watches the cluster's job table (woken by the
  GCS job channel, through the seam's ``dead_sessions``); when a session's driver
  dies (exit, crash, kill -9) each key is told ``session_gone`` and ends what is tied
  (``holder gone``) — measured at about 0.1 s from the kill to the next grant. A
  restarted coordinator relearns the sessions from the next snapshots.
* An error a caller made is raised as the matching ``broker.errors`` class;
  an actor that does not come back within the retry window is
  ``BrokerUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

from broker.actors.groups import GroupManager
from broker.actors.health import HealthProber
from broker.actors.resource import ResourceActor
from broker.actors.run_manager import RunManager
from broker.core.catalog import Catalog, parse_catalog
from broker.core.groups import open_to_new
from broker.core.placement_rules import JobNeeds, NodeInfo, Placement, host_down_reason, placement, unsatisfiable
from broker.core.request_index import GROUP_REQUEST, RequestIndex
from broker.core.runs import RunRecord, new_run_id
from broker.core.tokens import Identity, TokenBook, trusted_admin
from broker.core.usage import ResourceSnapshot
from broker.disk.journal import EventSink
from broker.disk.store import StateDir, atomic_write, read_json
from broker.disk.token_store import TokenStore
from broker.errors import (
    BrokerError,
    BrokerUnavailable,
    InvalidRequest,
    LeaseNotFound,
    NotAuthorized,
    ResourceBusy,
    UnknownResource,
)
from broker.http.api import serve
from broker.http.metrics import DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT, MetricsBoard
from broker.http.rest import ADMIN_ACTS, RestApi, authenticate, route_of
from broker.http.rest import start as start_rest
from broker.models import (
    BrokerStatus,
    GroupLease,
    Holder,
    Lease,
    LeaseEnded,
    Priority,
    RequestId,
    ResourceState,
    ResourceStatus,
    checked,
    is_group_lease_id,
    is_resource_key,
    lease_ref,
    resource_of_lease_id,
)
from broker.seam import ActorRef, ActorSystem, RetryPolicy, Spawn, ray_system
from broker.seam.placement import resource_actor_name

__all__ = ["BrokerActor", "VERSION"]

VERSION = "0.1.0"
# How long a call waits for a restarting resource actor before BrokerUnavailable.
ACTOR_RETRY_S = float(os.environ.get("MERLIN_ACTOR_RETRY_S", "30"))
STATUS_TIMEOUT_S = 2.0
# How often the coordinator checks each resource actor answers (resource_up) and
# pulls its snapshot, in case a push was lost while the coordinator was down.
HEALTH_INTERVAL_S = float(os.environ.get("MERLIN_HEALTH_INTERVAL_S", "5"))
_UNKNOWN = object()  # the cluster did not list its nodes: leave every key's host flag as it is
# The sessions watch reads the job table at least this often even when the job channel is quiet.
SESSION_RECHECK_S = 2.0


class BrokerActor:
    """The coordinator. See the module docstring for what it owns and promises."""

    def __init__(
        self,
        state_dir: str,
        namespace: str,
        metrics_host: str = DEFAULT_METRICS_HOST,
        metrics_port: int | None = DEFAULT_METRICS_PORT,
        http_port: int | None = None,
        *,
        system: ActorSystem | None = None,
    ):
        self._system = system or ray_system(RetryPolicy(window_s=ACTOR_RETRY_S))
        self._state = StateDir.from_env(state_dir).ensure()
        self._namespace = namespace
        self._started_at = time.time()
        self._events = EventSink(self._state.events_path, "broker", self._state.logs_dir)
        self._node_id = self._system.current_node_id()
        self._actors: dict[str, ActorRef] = {}
        self._catalog: Catalog | None = None
        self._board = MetricsBoard()
        self._pushes_received = 0
        self._metrics_url: str | None = None
        self._loop = asyncio.get_running_loop()
        if metrics_port is not None:
            try:
                self._http, base = serve(
                    self._board,
                    {},  # only /metrics: every read is on the authenticated HTTP API (issue 12)
                    metrics_host,
                    metrics_port,
                )
                self._metrics_url = f"{base}/metrics"
            except OSError as exc:  # a busy port must not crash-loop the coordinator
                self._events.emit(
                    "metrics.unavailable", level="error", host=metrics_host, port=metrics_port, error=str(exc)
                )
        self._tokens_store = TokenStore(self._state)
        self._tokens = self._load_tokens()
        self._http_url: str | None = None
        self._rest_runner: Any = None
        if metrics_port is not None:
            # The HTTP API beside the metrics listener: the next port (an ephemeral one with port 0).
            port = http_port if http_port is not None else (metrics_port + 1 if metrics_port else 0)
            self._rest_started = self._loop.create_task(self._start_rest(metrics_host, port))
        self._record_endpoints()
        catalog = self._load_catalog()
        if catalog is not None:
            self._adopt(catalog)
        # (holder, request_id) -> key across keys, rebuilt from the lease records off the event loop.
        self._requests: RequestIndex | None = None
        self._requests_loading = self._loop.run_in_executor(None, self._load_request_index)
        self._groups = GroupManager(
            self._state,
            self._events,
            self._call,
            self._status_for_decision,
            lambda: self._catalog,
            self._board.observe_group_wait,
            self._system.aftercare,
        )
        self._groups.load()
        self._groups_recovered = self._loop.create_task(self._groups.recover())
        self._runs = RunManager(
            self._state,
            self._events,
            self._call,
            self._board.set_runs,
            self._system.job_runner(),
            namespace=namespace,
            place=self._run_placement,
            groups=self._ready_groups,  # pool runs wait on their pool through group leases
        )
        self._runs.load()  # re-attaches to every unfinished run
        self._prober = HealthProber(
            self._state,
            self._events,
            self._call,
            self._status_of,
            self._system.job_runner(),
            lambda key: self._placement(key, None),
            lambda: self._catalog,
            self._grants_of,
            lambda key, record: self._board.set_health(key, record.ok, record.failures_total),
        )
        self._prober.publish_all()
        self._watcher = self._loop.create_task(self._watch())
        self._sessions: dict[str, dict[str, float]] = {}  # key -> {caller session: earliest arrival}
        self._sessions_grew = asyncio.Event()
        self._session_watcher = self._loop.create_task(self._watch_sessions())
        self._events.emit(
            "broker.started",
            pid=os.getpid(),
            namespace=namespace,
            resources=len(self._catalog.resources) if self._catalog else 0,
            metrics_url=self._metrics_url,
        )

    # ------------------------------------------------------------------ catalog

    def _load_catalog(self) -> Catalog | None:
        """The persisted catalog; a corrupt one is moved aside (never a crash loop) until `broker up`."""
        path = self._state.catalog_path
        if not path.exists():
            return None
        try:
            return Catalog.model_validate(read_json(path))
        except (OSError, ValueError) as exc:
            moved = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            try:
                path.replace(moved)
            except OSError:
                moved = path
            self._events.emit("broker.catalog_corrupt", level="error", moved_to=str(moved), error=str(exc)[:200])
            return None

    async def apply_catalog(
        self,
        catalog: dict[str, Any],
        *,
        admin_secret: str | None = None,
        by: str = "",
        replace: bool = False,
    ) -> list[str]:
        """Adopt ``catalog`` (the parsed YAML): create new keys' actors, refuse to drop busy keys.

        Changing the catalog of a broker whose catalog sets an admin secret needs
        that secret (the catalog holds the hash that guards every admin act).
        A catalog that drops keys or removes the secret is refused, naming what
        it would change, unless ``replace``. Applying the running catalog again
        changes nothing and needs nothing.

        Raises:
            NotAuthorized: the running catalog has an admin secret and this call does not.
            InvalidRequest: a bad catalog; or it drops keys / the secret without ``replace``;
                or a dropped key is leased or has waiters.
        """
        new = parse_catalog(catalog, "catalog")
        old = self._catalog
        if old is not None and new == old:
            self._adopt(new)
            return sorted(new.resources)
        if old is not None:
            self._authorize("apply catalog", by, admin_secret)
        old_keys = set(old.resources) if old else set()
        dropped = sorted(old_keys - set(new.resources))
        changes = _catalog_drops(old, new, dropped)
        if changes and not replace:
            raise InvalidRequest(
                f"the catalog would {' and '.join(changes)}; apply it with --replace (replace=True) if that is meant",
                "catalog",
            )
        for key in dropped:
            status = await self._status_for_decision(key)  # a slow answer must not read as "nobody holds it"
            if status.holder is not None or status.queue:
                raise InvalidRequest(f"cannot drop {key!r} from the catalog: it is leased or has waiters", "catalog")
        atomic_write(self._state.catalog_path, new.model_dump_json(by_alias=True, indent=2).encode())
        self._adopt(new)
        for key in dropped:
            ref = self._actors.pop(key, None)
            if ref is not None:
                self._system.kill(ref)
        # The shim's fast path finds a key by its actor: gone means not in the catalog.
        await self._until_gone([resource_actor_name(key) for key in dropped])
        # Every key answers before `broker up` returns; new actors are still starting (in
        # parallel: Ray starts their processes at once), existing ones re-read their settings.
        await asyncio.gather(*(self._call(key, "reconfigure") for key in new.resources))
        self._events.emit(
            "broker.catalog_applied",
            resources=len(new.resources),
            dropped=dropped or None,
            by=_shown_by(by),
            secret_removed=bool(old and old.broker.admin_secret_sha256 and not new.broker.admin_secret_sha256) or None,
        )
        return sorted(new.resources)

    # ------------------------------------------------------------------ leases

    async def reserve(
        self,
        resource: str,
        holder: str,
        *,
        ttl_s: float = 3600.0,
        wait: bool = False,
        timeout_s: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        note: str = "",
        session: str | None = None,
        bind_session: bool = True,
    ) -> Lease:
        """Grant ``resource`` to ``holder`` now, or queue (``wait=True``), or raise ``ResourceBusy``.

        A ``request_id`` that already names a lease on another key, or a group request, is
        refused (``InvalidRequest``): a retry that lands elsewhere never takes a second key.
        ``session`` (the caller's Ray job id, ``ray.get_runtime_context().get_job_id()``)
        ties the request to the caller: it leaves the queue within seconds of the caller's
        death, and so does its lease unless ``bind_session=False`` (then only a grant the
        caller never acknowledged is taken back; see ``broker.models.SessionTie``).
        """
        self._known(resource)
        request_id = request_id if request_id is not None else f"broker-{secrets.token_hex(12)}"
        requests = await self._request_index()
        claimed = isinstance(holder, str) and isinstance(request_id, str)
        if claimed:  # no await between this check and the forward's start: concurrent calls see it
            requests.claim(holder, request_id, resource, time.time())
        try:
            return await self._call(
                resource,
                "reserve",
                holder,
                ttl_s=ttl_s,
                wait=wait,
                timeout_s=timeout_s,
                priority=priority,
                request_id=request_id,
                note=note,
                session=session,
                bind_session=bind_session,
            )
        except (ResourceBusy, InvalidRequest):
            if claimed:  # refused before any lease existed: the id is free for another key
                requests.forget(holder, request_id, resource)
            raise
        except asyncio.CancelledError:
            # The caller cancelled its wait (ray.cancel; Ray Serve's when an HTTP client disconnects): take
            # the request out of the queue — outside the cancelled call, which Ray cancels with the calls
            # it makes (see ActorSystem.aftercare).
            if wait and isinstance(holder, str):
                with contextlib.suppress(BrokerError):
                    await self._system.aftercare(self._call(resource, "withdraw", holder, request_id))
            raise

    async def reserve_group(
        self,
        holder: str,
        *,
        keys: list[str] | None = None,
        labels: str | None = None,
        count: int | None = None,
        ttl_s: float = 3600.0,
        wait: bool = False,
        timeout_s: float | None = None,
        priority: int = 0,
        request_id: str | None = None,
        note: str = "",
        session: str | None = None,
        one_host: bool = False,
    ) -> GroupLease:
        """One lease on ``count`` keys: any of the keys whose labels match ``labels`` (one by
        default), or all of ``keys`` together (or any ``count`` of them).

        Granted all at once or not at all, in priority-then-arrival order
        consistent with single-key requests on every key; one ``lease_id`` for
        the whole group (``release``, ``renew``, ``lease`` take it as they take
        a key's). A selector matching fewer than ``count`` keys is
        ``InvalidRequest`` at once. See :mod:`broker.core.groups` for the rules.
        With ``session`` (the caller's Ray job id) the wait and the group lease end
        with the caller, as a single key's bound lease does. ``one_host``: the keys
        must share one host (keys bound to no host go with any); a request no host
        could satisfy is ``InvalidRequest`` at once.
        """
        await self._groups_ready()
        requests = await self._request_index()
        # One request id names one request: a single key's lease or a group, never both. Claimed
        # before the group's first await, so a concurrent single reserve with the id sees it.
        claimed = request_id if isinstance(holder, str) and isinstance(request_id, str) else None
        if claimed is not None:
            requests.claim(holder, claimed, GROUP_REQUEST, time.time())
        try:
            return await self._groups.reserve(
                holder,
                keys=keys,
                labels=labels,
                count=count,
                ttl_s=ttl_s,
                wait=wait,
                timeout_s=timeout_s,
                priority=priority,
                request_id=request_id,
                note=note,
                session=session,
                one_host=one_host,
            )
        except (ResourceBusy, InvalidRequest, UnknownResource):
            if claimed is not None and not self._groups.names_request(holder, claimed):  # refused before it existed
                requests.forget(holder, claimed, GROUP_REQUEST)
            raise

    async def withdraw_group(self, holder: str, request_id: str) -> GroupLease | None:
        """Take the caller's own group request out of every queue (granted already: released)."""
        await self._groups_ready()
        return await self._groups.withdraw(holder, request_id)

    async def group_position(self, holder: str, request_id: str) -> int | None:
        """A waiting group request's place in line (1 = next), or None: the one that gates its grant,
        the ``count``-th best place over the queues of the keys it may use."""
        await self._groups_ready()
        return await self._groups.position(holder, request_id)

    async def groups(self) -> list[dict[str, Any]]:
        """Every waiting or granted group lease, as anyone may see it (no lease ids)."""
        await self._groups_ready()
        return self._groups.listing()

    async def pools(self) -> list[dict[str, Any]]:
        """The catalog's named pools: members, how many are free, who waits (groups and single keys)."""
        catalog = self._catalog
        if catalog is None or not catalog.pools:
            return []
        statuses = {status.key: status for status in await self.resources()}
        answer = []
        for name, selector in catalog.pools.items():
            members = catalog.pool_members(name)
            answer.append(
                {
                    "pool": name,
                    "labels": selector,
                    "members": list(members),
                    "total": len(members),
                    # Free for a new request: a free member kept for a waiting group is not.
                    "free": sum(1 for key in members if open_to_new(statuses[key].state, len(statuses[key].queue))),
                    "waiting_groups": self._groups.waiting_within(members),
                    "waiting_single": sum(1 for key in members for entry in statuses[key].queue if entry.group is None),
                }
            )
        return answer

    def group_key_ready(self, key: str, group: str) -> None:
        """A key's actor: free, with ``group``'s entry heading its queue (fire and forget)."""
        self._groups.key_ready(key, group)

    async def release(self, lease_id: str) -> Lease | GroupLease:
        if is_group_lease_id(lease_id):
            await self._groups_ready()
            return await self._groups.release(lease_id)
        return await self._call(self._key_of(lease_id), "release", lease_id)

    async def renew(self, lease_id: str, ttl_s: float | None = None) -> Lease | GroupLease:
        if is_group_lease_id(lease_id):
            await self._groups_ready()
            return await self._groups.renew(lease_id, ttl_s)
        return await self._call(self._key_of(lease_id), "renew", lease_id, ttl_s)

    async def lease(self, lease_id: str) -> Lease | GroupLease:
        if is_group_lease_id(lease_id):
            await self._groups_ready()
            return self._groups.get(lease_id)
        return await self._call(self._key_of(lease_id), "lease", lease_id)

    async def withdraw(
        self,
        resource: str,
        holder: str | None = None,
        request_id: str | None = None,
        *,
        ref: str | None = None,
        by: str = "",
        reason: str = "",
        admin_secret: str | None = None,
    ) -> Lease | None:
        """Take a queued request out of ``resource``'s queue.

        By ``(holder, request_id)``: the waiter's own act (it knows its request
        id); None if there is no such request. By ``ref`` (the public name in
        ``resources()``): an administrative act on anyone's request, checked
        against the admin secret when the catalog sets one and recorded with
        ``by`` and ``reason``.
        """
        self._known(resource)
        if ref is None:
            return await self._call(resource, "withdraw", holder, request_id)
        self._authorize(f"withdraw from {resource}", by, admin_secret, resource=resource)
        lease_id = self._lease_id_of_ref(resource, ref)
        why = f"withdrawn by {_shown_by(by)}" + (f": {reason}" if reason else "")
        lease = await self._call(resource, "cancel", lease_id, why[:512], _shown_by(by))
        self._events.emit("admin.withdrew", resource=resource, lease=ref, holder=lease.holder, by=_shown_by(by))
        return lease

    async def check_fence(self, lease_id: str, fencing_token: int) -> Lease:
        """The lease if it still holds its key with this token, else ``StaleFencingToken``.

        A group lease is checked with ``{key: token}`` for its keys."""
        if is_group_lease_id(lease_id):
            await self._groups_ready()
            return await self._groups.check_fence(lease_id, fencing_token)  # type: ignore[return-value]
        return await self._call(self._key_of(lease_id), "check_fence", lease_id, fencing_token)

    async def queue_position(self, resource: str, holder: str, request_id: str) -> int | None:
        """Where ``holder``'s request ``request_id`` stands in the queue (1 = next), or None."""
        self._known(resource)
        return await self._call(resource, "queue_position", holder, request_id)

    async def revoke(
        self,
        resource: str,
        reason: str,
        *,
        expected_holder: str | None = None,
        by: str = "",
        request_id: str | None = None,
        admin_secret: str | None = None,
    ) -> Lease:
        """Take ``resource`` from its holder (administrative; recorded with reason and by)."""
        self._known(resource)
        self._authorize(f"revoke {resource}", by, admin_secret, resource=resource)
        return await self._call(
            resource,
            "revoke",
            reason,
            expected_holder=expected_holder,
            by=by,
            request_id=request_id if request_id is not None else f"broker-{secrets.token_hex(12)}",
        )

    async def set_maintenance(
        self, resource: str, on: bool, reason: str = "", *, by: str = "", admin_secret: str | None = None
    ) -> ResourceStatus:
        """Stop (or resume) new grants on ``resource``; its holder keeps the lease."""
        self._known(resource)
        self._authorize(f"maintenance {resource}", by, admin_secret, resource=resource)
        status = await self._call(resource, "set_maintenance", on, reason, by)
        return self._with_catalog(status)

    # ------------------------------------------------------------------ runs

    async def submit(
        self,
        bundle_dir_or_bundle: Any,
        *,
        holder: str,
        priority: int = 0,
        request_id: str | None = None,
        source: str = "api",
        restart: bool = False,
    ) -> RunRecord:
        """Queue a bundle (a target dir's absolute path, or the bundle itself) to run on its resource.

        A pool bundle (``resource_labels``, ``count``) waits on the pool and is bound to the
        member(s) that free first; a pool with fewer than ``count`` members is ``InvalidRequest``.
        A set bundle (``resource_keys``) holds all its keys together for the whole run.
        The run waits for the bundle's resource lease, then runs as a Ray Job
        (the local executor with ``--resume``); the lease is renewed while the
        job runs and released when it ends. The same ``request_id`` returns
        the same run. A target dir that already ran to success is refused unless
        ``restart=True``, which runs it again from its first step.
        """
        from targetgen.bundle import ExecutionBundle, load_bundle, parse_bundle, write_bundle

        holder = checked(Holder, holder, "holder")
        priority = checked(Priority, priority, "priority")
        request_id = (
            checked(RequestId, request_id, "request_id")
            if request_id is not None
            else f"broker-{secrets.token_hex(12)}"
        )
        source = checked(Holder, source, "source")
        run_id = None
        if isinstance(bundle_dir_or_bundle, (str, os.PathLike)):
            target_dir = Path(bundle_dir_or_bundle)
            if not target_dir.is_absolute():
                raise InvalidRequest(f"target dir {str(target_dir)!r} must be an absolute path", "bundle")
            bundle = load_bundle(target_dir)
        elif isinstance(bundle_dir_or_bundle, (ExecutionBundle, dict)):
            data = (
                bundle_dir_or_bundle.model_dump()
                if isinstance(bundle_dir_or_bundle, ExecutionBundle)
                else bundle_dir_or_bundle
            )
            bundle = parse_bundle(data, "bundle")
            run_id = new_run_id()
            target_dir = self._state.runs_dir / run_id / "target"
        else:
            raise InvalidRequest(
                f"invalid bundle: expected a target dir path or an execution bundle, got {type(bundle_dir_or_bundle).__name__}",
                "bundle",
            )
        if bundle.resource is not None:
            self._known(bundle.resource)
        if bundle.pool:  # a pool with too few members, or a set with a key not in the catalog: refused now
            self._pool_members(bundle.resource_labels, bundle.resource_keys, bundle.count)
        await self._check_placement(bundle.resource, bundle.job)
        if run_id is not None:
            target_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_bundle(target_dir, bundle)
        record = await self._runs.submit(
            target_dir,
            bundle,
            holder=holder,
            priority=priority,
            request_id=request_id,
            source=source,
            run_id=run_id,
            restart=restart is True,
        )
        return record.public()

    async def run(self, run_id: str) -> RunRecord:
        return self._runs.get(run_id).public()

    async def runs(self, active_only: bool = False) -> list[RunRecord]:
        return [record.public() for record in self._runs.list(bool(active_only))]

    async def cancel(self, run_id: str) -> RunRecord:
        """Stop a run: leave the queue, or stop its Ray job; its lease is released either way."""
        return (await self._runs.cancel(run_id)).public()

    async def logs(self, run_id: str) -> str:
        return await self._runs.logs(run_id)

    # ------------------------------------------------------------------ reads

    async def resources(self) -> list[ResourceStatus]:
        """Every key's status, in catalog order; a key whose actor does not answer is ``down``."""
        keys = list(self._catalog.resources) if self._catalog else []
        return list(await asyncio.gather(*(self._status_of(key) for key in keys)))

    async def status(self) -> BrokerStatus:
        statuses = await self.resources()
        down = tuple(s.key for s in statuses if s.state is ResourceState.DOWN)
        return BrokerStatus(
            healthy=self._catalog is not None and not down,
            namespace=self._namespace,
            state_dir=str(self._state.root),
            started_at=self._started_at,
            uptime_s=round(time.time() - self._started_at, 3),
            resources=len(statuses),
            leased=sum(1 for s in statuses if s.holder is not None),
            queued=sum(len(s.queue) for s in statuses),
            in_maintenance=sum(1 for s in statuses if s.state is ResourceState.MAINTENANCE),
            down=down,
            metrics_url=self._metrics_url,
            http_url=self._http_url,
            version=VERSION,
        )

    def authorize_down(self, *, by: str = "", admin_secret: str | None = None) -> None:
        """`merlin broker down` asks first: refused (and journaled) without the admin secret."""
        self._authorize("broker down", by, admin_secret)
        self._events.emit("broker.down", by=_shown_by(by))

    def push_snapshot(self, snapshot: ResourceSnapshot, started_at: float, ended: tuple[LeaseEnded, ...] = ()) -> None:
        """A resource actor reports its state (metrics) and the granted leases that ended since
        its last push (a run holding one stops at once). Fire and forget."""
        if self._catalog is not None and snapshot.key in self._catalog.resources:
            self._pushes_received += 1
            self._board.put(snapshot, started_at)
            self._learn_sessions(snapshot)
        for lease_end in ended:
            self._runs.lease_ended(lease_end)
        self._groups.leases_ended(ended)

    async def ping(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self._started_at,
            "namespace": self._namespace,
            "state_dir": str(self._state.root),
        }

    # ------------------------------------------------------------------ plumbing

    # ------------------------------------------------------------------ the HTTP API and its tokens

    async def _start_rest(self, host: str, port: int) -> None:
        api = RestApi(self, lambda: self._tokens, self._auth_refused)
        try:
            self._rest_runner, self._http_url = await start_rest(api, host, port)
        except OSError as exc:  # a busy port must not crash-loop the coordinator
            self._events.emit("http.unavailable", level="error", host=host, port=port, error=str(exc))
            return
        self._record_endpoints()
        self._events.emit("http.started", url=self._http_url)

    async def http_identity(self, authorization: str, method: str, path: str) -> Identity:
        """Who a bearer token is on route ``method path`` (the API served through Ray Serve): checked
        here, where the token book is, with the in-loop API's rules and refusal events."""
        return authenticate(self._tokens, authorization, route_of(method, path), self._auth_refused)

    async def as_token(self, authorization: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """An admin act by a named admin token through Ray Serve: trusted as the in-loop API trusts it
        (the token is checked here; a Ray caller without it gains nothing)."""
        if not isinstance(method, str) or method not in ADMIN_ACTS:
            raise InvalidRequest(f"{str(method)[:40]!r} is not an admin act", "method")
        secret = authorization.partition(" ")[2].strip() if isinstance(authorization, str) else None
        who = self._tokens.identify(secret)
        if who is None or not who.admin:
            self._auth_refused(who.name if who else "?", method)
            raise NotAuthorized(method, who.name if who else "?")
        token = trusted_admin.set(who.name if not who.operator else None)
        try:
            return await getattr(self, method)(*args, **kwargs)
        finally:
            trusted_admin.reset(token)

    def _auth_refused(self, name: str, act: str) -> None:
        self._events.emit("auth.refused", level="warning", name=_shown_by(name), act=act[:200])

    def _load_tokens(self) -> TokenBook:
        try:
            return self._tokens_store.load()
        except (OSError, ValueError) as exc:  # no tokens (every HTTP call refused) beats a crash loop
            self._events.emit("tokens.unreadable", level="error", error=str(exc)[:200])
            return TokenBook([], None)

    async def create_token(
        self, name: str, admin: bool = False, *, by: str = "", admin_secret: str | None = None
    ) -> dict[str, Any]:
        """A new HTTP API token for ``name`` (an admin act); its secret is in this answer only."""
        self._authorize("token create", by, admin_secret)
        before = self._tokens.records()
        secret, record = self._tokens.create(name, admin is True, time.time(), _shown_by(by))
        try:
            self._tokens_store.save(self._tokens)
        except OSError as exc:
            self._tokens = TokenBook(before, self._tokens_operator_digest())
            raise BrokerUnavailable(f"cannot write tokens.json ({exc.strerror or exc}); no token was made") from None
        self._events.emit("token.created", name=record.name, admin=record.admin, by=_shown_by(by))
        return {"token": secret, **record.public()}

    async def list_tokens(self, *, by: str = "", admin_secret: str | None = None) -> list[dict[str, Any]]:
        self._authorize("token list", by, admin_secret)
        return [record.public() for record in self._tokens.records()]

    async def revoke_token(self, name: str, *, by: str = "", admin_secret: str | None = None) -> dict[str, Any]:
        self._authorize("token revoke", by, admin_secret)
        before = self._tokens.records()
        record = self._tokens.revoke(name, time.time(), _shown_by(by))
        try:
            self._tokens_store.save(self._tokens)
        except OSError as exc:
            self._tokens = TokenBook(before, self._tokens_operator_digest())
            raise BrokerUnavailable(f"cannot write tokens.json ({exc.strerror or exc}); nothing was revoked") from None
        self._events.emit("token.revoked", name=record.name, by=_shown_by(by))
        return record.public()

    def _tokens_operator_digest(self) -> str | None:
        from broker.core.tokens import token_digest
        from broker.disk.token_store import read_operator_token

        secret = read_operator_token(self._state)
        return token_digest(secret) if secret else None

    async def recent_events(self, limit: int = 100, prefix: str = "", after: int | None = None) -> list[dict[str, Any]]:
        """The journal's latest ``limit`` events (whose name starts with ``prefix``), oldest first.

        ``after`` (a ``seq``): the first ``limit`` events after it instead, so a reader that pages
        with the last ``seq`` it saw misses none and sees none twice."""
        return await asyncio.to_thread(_tail_events, self._state.events_path, limit, prefix, after)

    def _record_endpoints(self) -> None:
        """``broker.json``: where this coordinator listens, so the CLI can read without Ray."""
        record = {
            "namespace": self._namespace,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "metrics_url": self._metrics_url,
            "api_url": self._http_url,  # the same API; the name older CLIs read
            "http_url": self._http_url,
        }
        try:
            atomic_write(self._state.broker_record_path, json.dumps(record, indent=2).encode())
        except OSError as exc:
            self._events.emit("broker.record_failed", level="error", error=str(exc))

    def _adopt(self, catalog: Catalog) -> None:
        """Take ``catalog`` as the current one; every key's actor is created (or found), all at once."""
        self._catalog = catalog
        self._board.set_keys(
            list(catalog.resources), VERSION, {name: catalog.pool_members(name) for name in catalog.pools}
        )
        # Created now, so their restart-from-disk starts before the first call.
        self._system.create_all([self._actor(key, create=False) for key in catalog.resources])

    async def _until_gone(self, names: list[str], timeout_s: float = 10.0) -> None:
        """Wait (bounded) until the killed actors ``names`` no longer answer to their names."""
        deadline = time.monotonic() + timeout_s
        while names and time.monotonic() < deadline:
            names = [name for name in names if self._system.lookup(name, self._namespace) is not None]
            if names:
                await asyncio.sleep(0.05)

    async def _watch(self) -> None:
        """Every HEALTH_INTERVAL_S: is each key's host in the cluster, does each resource actor
        answer? Tell it the first, pull its snapshot."""
        while True:
            await self._health_pass()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _ready_groups(self) -> GroupManager:
        """The group leases, once the restart's recovery pass has run (for the run manager)."""
        await self._groups_ready()
        return self._groups

    async def _groups_ready(self) -> None:
        """Group calls wait for the restart's recovery pass (it gives back half-taken keys first)."""
        if not self._groups_recovered.done():
            await asyncio.shield(self._groups_recovered)

    async def health(self, resource: str, now: bool = False) -> dict[str, Any]:
        """A key's health probe: its settings and its latest results (``now``: probe it first, if free)."""
        self._known(resource)
        spec = self._catalog.resources[resource] if self._catalog else None
        check = spec.health_check if spec is not None else None
        record = await self._prober.probe_now(resource) if now is True else self._prober.record(resource)
        return {
            "resource": resource,
            "health_check": check.model_dump(mode="json", by_alias=True) if check is not None else None,
            **record.model_dump(mode="json"),
            "ok": record.ok,
        }

    def _grants_of(self, key: str) -> int:
        snapshot = self._board.snapshot(key)
        return snapshot.counters.grants if snapshot is not None else 0

    async def _health_pass(self) -> None:
        if self._catalog is not None:
            self._prober.tick()
        if self._groups_recovered.done():
            try:
                await self._groups.tick()
            except BrokerUnavailable as exc:
                self._events.emit("group.pass_deferred", level="warning", error=str(exc)[:200])
        catalog = self._catalog
        keys = list(catalog.resources) if catalog else []
        hosts = {key: catalog.resources[key].host for key in keys} if catalog else {}
        nodes = await self._nodes() if any(hosts.values()) else []
        await asyncio.gather(
            *(self._probe(key, host_down_reason(hosts[key], nodes) if nodes is not None else _UNKNOWN) for key in keys)
        )

    async def _nodes(self) -> list[NodeInfo] | None:
        """The cluster's alive nodes, or None if the cluster does not say (then nothing changes)."""
        try:
            return await asyncio.to_thread(self._system.alive_nodes)
        except Exception as exc:  # noqa: BLE001 - a GCS hiccup must not end the health loop
            self._events.emit("broker.nodes_unknown", level="warning", error=str(exc)[:200])
            return None

    async def _probe(self, key: str, down_reason: str | None | object = None) -> None:
        spec = self._catalog.resources.get(key) if self._catalog else None
        try:
            if spec is not None and spec.host is not None and down_reason is not _UNKNOWN:
                await self._system.call(
                    self._actor(key), "set_host_down", down_reason, answer_within_s=STATUS_TIMEOUT_S, retry=False
                )
            snapshot, started_at = await self._system.call(
                self._actor(key), "snapshot", answer_within_s=STATUS_TIMEOUT_S, retry=False
            )
        except BrokerUnavailable:
            self._board.set_up(key, False)
            return
        self._board.put(snapshot, started_at)
        self._learn_sessions(snapshot)
        self._board.set_up(key, True)

    def _learn_sessions(self, snapshot: ResourceSnapshot) -> None:
        """Which callers' sessions ``snapshot.key`` has something tied to; wake the watch on a new one.

        New to the coordinator, not to the key: a client moving between keys is watched already.
        """
        known = {session for sessions in self._sessions.values() for session in sessions}
        now = dict(snapshot.sessions)
        self._sessions[snapshot.key] = now
        if any(session not in known for session in now):
            self._sessions_grew.set()

    async def _watch_sessions(self) -> None:
        """End what is tied to a caller's session as soon as the cluster says the session ended.

        Event-driven: the seam waits on the cluster's job changes (Ray's GCS job channel),
        re-reading the job table at least every SESSION_RECHECK_S; a session newly seen in a
        snapshot restarts the wait so it is checked at once.
        """
        while True:
            self._sessions_grew.clear()
            seen: dict[str, float] = {}
            for sessions in self._sessions.values():
                for session, since in sessions.items():
                    seen[session] = min(since, seen.get(session, since))
            if not seen:
                await self._sessions_grew.wait()
                continue
            checking = asyncio.ensure_future(self._system.dead_sessions(seen, SESSION_RECHECK_S))
            grew = asyncio.ensure_future(self._sessions_grew.wait())
            try:
                await asyncio.wait({checking, grew}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                grew.cancel()
            if not checking.done():
                checking.cancel()
                continue
            try:
                dead = checking.result()
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup must not end the watch
                self._events.emit("broker.sessions_unknown", level="warning", error=str(exc)[:200])
                await asyncio.sleep(1.0)
                continue
            await asyncio.gather(*(self._end_session(session) for session in sorted(dead)))

    async def _end_session(self, session: str) -> None:
        keys = [key for key, sessions in self._sessions.items() if session in sessions]
        if not keys:
            return  # told already, from an older snapshot
        for key in keys:
            self._sessions[key].pop(session, None)  # a later snapshot that still has it brings it back
        ended = await asyncio.gather(
            *(self._call(key, "session_gone", session) for key in keys), return_exceptions=True
        )
        for key, result in zip(keys, ended):
            if isinstance(result, BaseException):
                self._events.emit(
                    "broker.session_end_failed", level="warning", resource=key, session=session, error=str(result)[:200]
                )
        self._events.emit("broker.session_ended", session=session, resources=keys)

    def _placement(self, resource: str | None, job: Any) -> Placement:
        """Where a run's job goes: on its key's host, with the bundle's job needs (``job``, may be None)."""
        spec = self._catalog.resources.get(resource) if (self._catalog and resource) else None
        needs = (
            JobNeeds(job.num_cpus, job.memory_bytes, dict(job.resources), job.preemptible)
            if job is not None
            else JobNeeds()
        )
        return placement(spec.host if spec is not None else None, needs)

    def _run_placement(self, resource: str | None, job: Any) -> Placement:
        """The placement of a run's job as it is submitted (in a thread: it lists the nodes).

        Checked again here because a run accepted while its host was down is judged only
        now that the host is back: a job no node can run ends the run instead of pending.
        """
        where = self._placement(resource, job)
        if where.needs == JobNeeds() and not where.label_selector:
            return where
        try:
            nodes = self._system.alive_nodes()
        except Exception:  # noqa: BLE001 - no node list now: submit, Ray places or holds it
            return where
        why = unsatisfiable(where, nodes)
        if why is not None:
            raise InvalidRequest(f"the bundle's job cannot run: {why}", "job")
        return where

    async def _check_placement(self, resource: str | None, job: Any) -> None:
        """Refuse a run no alive node could ever run (``InvalidRequest``), rather than leave it pending."""
        where = self._placement(resource, job)
        if not where.label_selector and where.needs == JobNeeds():
            return
        nodes = await self._nodes()
        why = unsatisfiable(where, nodes) if nodes is not None else None
        if why is not None:
            raise InvalidRequest(f"the bundle's job cannot run: {why}", "job")

    async def _status_for_decision(self, key: str) -> ResourceStatus:
        """``key``'s status for a scheduling decision: waited for (retried while its actor starts or
        restarts), never the display's stand-in DOWN of a slow answer, which would refuse a free key."""
        return self._with_catalog(await self._call(key, "status"))

    async def _status_of(self, key: str) -> ResourceStatus:
        """``key``'s status for a display: DOWN if its actor does not answer within STATUS_TIMEOUT_S."""
        try:
            status = await self._system.call(self._actor(key), "status", answer_within_s=STATUS_TIMEOUT_S, retry=False)
        except BrokerUnavailable:
            status = ResourceStatus(key=key, state=ResourceState.DOWN)
        return self._with_catalog(status)

    def _with_catalog(self, status: ResourceStatus) -> ResourceStatus:
        spec = self._catalog.resources.get(status.key) if self._catalog else None
        if spec is None:
            return status
        return status.model_copy(
            update={"labels": dict(spec.labels), "properties": dict(spec.properties), "description": spec.description}
        )

    async def _call(self, key: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``resource:<key>`` through the seam: retried (same arguments) while it restarts."""
        return await self._system.call(self._actor(key), method, *args, **kwargs)

    def _actor(self, key: str, *, create: bool = True) -> ActorRef:
        ref = self._actors.get(key)
        if ref is None:
            spawn = Spawn(ResourceActor, (key, str(self._state.root), self._namespace), self._node_id)
            ref = self._actors[key] = ActorRef(self._system, resource_actor_name(key), self._namespace, spawn)
            if create:
                ref.handle()  # created now, so its restart-from-disk starts before the first call
        return ref

    def close(self) -> None:
        """Stop the background tasks (an in-process host stopping it; on Ray the process just dies)."""
        self._watcher.cancel()
        self._session_watcher.cancel()
        self._runs.close()
        self._groups.close()
        self._prober.close()

    def _authorize(self, act: str, by: Any, admin_secret: Any, *, resource: str | None = None) -> None:
        """Check the admin secret when the catalog sets one; a refusal is journaled with who tried, on what.

        An admin token on the HTTP API (in this process, for that one request) stands for the secret."""
        expected = self._catalog.broker.admin_secret_sha256 if self._catalog else None
        if expected is None or trusted_admin.get() is not None:
            return
        given = admin_secret.encode() if isinstance(admin_secret, str) else b""
        if not hmac.compare_digest(hashlib.sha256(given).hexdigest(), expected):
            self._events.emit("admin.refused", level="warning", act=act, resource=resource, by=_shown_by(by))
            raise NotAuthorized(act, _shown_by(by))

    def _lease_id_of_ref(self, resource: str, ref: Any) -> str:
        """The lease id behind a public ``ref`` on ``resource``, from the record file names (never listed)."""
        if not isinstance(ref, str) or len(ref) != 12 or any(c not in "0123456789abcdef" for c in ref):
            raise InvalidRequest(f"invalid ref={str(ref)[:40]!r}: expected the 12 hex digits a listing shows", "ref")
        prefix = f"{resource}."
        with os.scandir(self._state.leases_dir) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(prefix) and name.endswith(".json") and lease_ref(name[:-5]) == ref:
                    return name[:-5]
        raise LeaseNotFound(ref, f"no lease with ref {ref} on {resource!r}")

    async def _request_index(self) -> RequestIndex:
        if self._requests is None:
            requests = await self._requests_loading
            # Group requests' ids are in their records, not the lease records the index is built from.
            now = time.time()
            for holder, request_id, at in self._groups.request_ids(now):
                requests.learn(holder, request_id, GROUP_REQUEST, at)
            requests.settle(now)
            self._requests = requests
        if self._catalog is not None:  # `broker up` may have changed it since
            self._requests.retention_s = self._catalog.broker.retention_s
        return self._requests

    def _load_request_index(self) -> RequestIndex:
        """Every request id a book still answers for (active, or ended within retention), from disk.

        The lease records are the authority; this is derived from them, so it
        survives a coordinator restart without a file of its own.
        """
        retention_s = self._catalog.broker.retention_s if self._catalog else 24 * 3600.0
        index = RequestIndex(retention_s)
        now = time.time()
        try:
            with os.scandir(self._state.leases_dir) as entries:
                paths = [entry.path for entry in entries if entry.name.endswith(".json")]
        except OSError:
            paths = []
        for path in paths:
            try:
                record: Any = read_json(Path(path))
                holder, request_id, key = record["holder"], record["request_id"], record["resource"]
                at = now if record.get("ended_at") is None else float(record["ended_at"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # the resource actor moves corrupt records aside
            if isinstance(holder, str) and isinstance(request_id, str) and isinstance(key, str):
                index.learn(holder, request_id, key, at)
        index.settle(now)
        return index

    def _pool_members(self, labels: str | None, keys: tuple[str, ...], count: int) -> tuple[str, ...]:
        """The catalog keys a pool (or set) bundle may run on; ``InvalidRequest`` if fewer than
        ``count`` (on one host), ``UnknownResource`` for a key of a set that is not in the catalog."""
        from broker.core.groups import resolve_ask

        specs = self._catalog.resources if self._catalog else {}
        catalog_labels = {key: spec.labels for key, spec in specs.items()}
        hosts = {key: spec.host for key, spec in specs.items()}  # one job reaches every key it holds
        if keys:
            return resolve_ask(catalog_labels, keys=list(keys), count=count, one_host=hosts).candidates
        return resolve_ask(catalog_labels, labels=labels, count=count, one_host=hosts).candidates

    def _known(self, resource: Any) -> None:
        if not isinstance(resource, str) or self._catalog is None or resource not in self._catalog.resources:
            known = tuple(self._catalog.resources) if self._catalog else ()
            if not is_resource_key(resource):
                shown = repr(resource) if len(repr(resource)) <= 80 else repr(resource)[:77] + "..."
                raise InvalidRequest(f"invalid resource={shown}: not a resource key", "resource")
            raise UnknownResource(resource, known)

    def _key_of(self, lease_id: Any) -> str:
        key = resource_of_lease_id(lease_id)
        if self._catalog is None or key not in self._catalog.resources:
            raise LeaseNotFound(lease_id)
        return key


def _catalog_drops(old: Catalog | None, new: Catalog, dropped: list[str]) -> list[str]:
    """What applying ``new`` over ``old`` would take away (each needs ``replace``), in words."""
    changes = []
    if dropped:
        shown = ", ".join(dropped[:10]) + (f" and {len(dropped) - 10} more" if len(dropped) > 10 else "")
        changes.append(f"drop {len(dropped)} of {len(old.resources) if old else 0} keys ({shown})")
    if old is not None and old.broker.admin_secret_sha256 and not new.broker.admin_secret_sha256:
        changes.append("remove the admin secret")
    return changes


def _tail_events(path: Path, limit: int, prefix: str, after: int | None = None) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4 * 1024 * 1024))  # the last 4 MiB hold far more than 1000 events
            lines = handle.read().splitlines()
    except OSError:
        return []
    events: list[dict[str, Any]] = []
    for line in reversed(lines):
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn first line of the window
        if not isinstance(event, dict):
            continue
        if after is not None and _seq_of(event) <= after:
            break  # seq is the file's order: everything before is older still
        if str(event.get("event", "")).startswith(prefix):
            events.append(event)
            if after is None and len(events) >= limit:
                break
    events.reverse()
    return events[:limit]


def _seq_of(event: dict[str, Any]) -> int:
    seq = event.get("seq")
    return seq if isinstance(seq, int) else 0


def _shown_by(by: Any) -> str:
    return by[:128] if isinstance(by, str) and by.isprintable() else "?"
