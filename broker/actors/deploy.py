"""Bringing the broker actors up and down in a connected Ray cluster (used by the CLI and tests)."""

from __future__ import annotations

from typing import Any

from broker.actors.coordinator import BrokerActor
from broker.disk.store import StateDir
from broker.errors import BrokerUnavailable
from broker.seam import ActorRef, RetryPolicy, Spawn
from broker.seam.placement import COORDINATOR_NAME, RESOURCE_ACTOR_PREFIX

__all__ = ["broker_up", "broker_down"]


def broker_up(
    state: StateDir,
    namespace: str,
    catalog: dict[str, Any] | None,
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int | None = 9477,
    timeout_s: float = 300.0,
    admin_secret: str | None = None,
    by: str = "",
    replace: bool = False,
) -> list[str]:
    """Create (or find) the coordinator and apply ``catalog``; returns the resource keys.

    Needs a connected Ray driver. Idempotent: a running broker keeps its leases
    and only adopts catalog changes. ``catalog=None`` keeps the catalog the
    broker runs with (from ``catalog.json``). ``metrics_port=0`` picks a free
    port; ``None`` serves no metrics. They apply when the coordinator is
    created. ``admin_secret``, ``by`` and ``replace``: see ``apply_catalog``.
    A coordinator that dies meanwhile (kill -9) is waited for and asked again.
    """
    from broker.seam.ray_backend import RaySystem, head_node_id

    state.ensure()
    system = RaySystem(RetryPolicy(window_s=timeout_s))
    spawn = Spawn(BrokerActor, (str(state.root), namespace, metrics_host, metrics_port), head_node_id())

    def up() -> list[str]:
        coordinator = ActorRef(system, COORDINATOR_NAME, namespace, spawn)
        info = system.call_sync(coordinator, "ping", answer_within_s=timeout_s)
        if info["state_dir"] != str(state.root):
            raise BrokerUnavailable(
                f"the broker in namespace {namespace!r} uses state dir {info['state_dir']}",
                "pass that --state-dir, or run `merlin broker down` first",
            )
        if catalog is None:
            statuses = system.call_sync(coordinator, "resources", answer_within_s=timeout_s)
            return [status.key for status in statuses]
        keys: list[str] = system.call_sync(
            coordinator,
            "apply_catalog",
            catalog,
            admin_secret=admin_secret,
            by=by,
            replace=replace,
            answer_within_s=timeout_s,
        )
        return keys

    return system.retrying(up)  # idempotent: get-if-exists actors, the same catalog twice changes nothing


def broker_down(namespace: str) -> int:
    """Kill the coordinator and every resource actor in ``namespace``; state stays on disk."""
    from broker.seam.ray_backend import RaySystem

    system = RaySystem()
    names = [
        name for name in system.names(namespace) if name == COORDINATOR_NAME or name.startswith(RESOURCE_ACTOR_PREFIX)
    ]
    for name in names:
        system.kill(ActorRef(system, name, namespace))
    return len(names)
