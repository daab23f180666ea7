"""Bringing the broker actors up and down in a connected Ray cluster (used by the CLI and tests)."""

from __future__ import annotations

from typing import Any

from broker.disk.store import StateDir
from broker.errors import BrokerUnavailable

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
    """
    import ray

    from broker.actors.coordinator import RemoteBrokerActor
    from broker.seam.placement import COORDINATOR_NAME, actor_options, head_node_id

    state.ensure()
    options = actor_options(COORDINATOR_NAME, namespace, head_node_id())
    handle = RemoteBrokerActor.options(**options).remote(str(state.root), namespace, metrics_host, metrics_port)
    info = ray.get(handle.ping.remote(), timeout=timeout_s)
    if info["state_dir"] != str(state.root):
        raise BrokerUnavailable(
            f"the broker in namespace {namespace!r} uses state dir {info['state_dir']}",
            "pass that --state-dir, or run `merlin broker down` first",
        )
    if catalog is None:
        return [status.key for status in ray.get(handle.resources.remote(), timeout=timeout_s)]
    call = handle.apply_catalog.remote(catalog, admin_secret=admin_secret, by=by, replace=replace)
    return ray.get(call, timeout=timeout_s)


def broker_down(namespace: str) -> int:
    """Kill the coordinator and every resource actor in ``namespace``; state stays on disk."""
    import ray

    from broker.seam.placement import COORDINATOR_NAME

    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == namespace
        and (actor["name"] == COORDINATOR_NAME or actor["name"].startswith("resource:"))
    ]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            continue
    return len(names)
