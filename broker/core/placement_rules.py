"""Where a key's hardware lives and where a run's job may go: pure rules over the cluster's nodes.

A catalog entry's ``host`` names the Ray node its hardware is cabled to: the
node that carries the label ``merlin-host=<host>`` (``ray start --labels
merlin-host=fpga-host-01`` on that machine, or the label in a KubeRay worker
group). A label rather than a custom resource, because a host is a fact about
a node, not a quantity: a job selecting it consumes nothing, so two keys on
one host (two U250 slots) never serialize each other's jobs in Ray's
scheduler — the broker's leases already do the exclusion.

A node is *preemptible* when Ray's own label ``ray.io/market-type`` is
``spot`` (Ray sets it from ``RAY_NODE_MARKET_TYPE`` at ``ray start``;
KubeRay from the pod). ``preemptible: false`` selects ``!spot``, which a node
without the label satisfies: a node is on-demand unless it says otherwise.

Everything here takes the alive nodes as plain values (:class:`NodeInfo`);
the seam lists them (``ActorSystem.alive_nodes``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "HOST_LABEL",
    "MARKET_TYPE_LABEL",
    "PREEMPTIBLE_MARKET",
    "HOST_PATTERN",
    "NodeInfo",
    "JobNeeds",
    "Placement",
    "host_down_reason",
    "placement",
    "unsatisfiable",
    "parse_memory",
]

HOST_LABEL = "merlin-host"
MARKET_TYPE_LABEL = "ray.io/market-type"
PREEMPTIBLE_MARKET = "spot"
# A Ray (Kubernetes-style) label value: what a host name must be to be a label.
HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"
MEMORY_BYTES = "memory"  # Ray's name for the memory resource (bytes)


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node: its id, labels and total resources (Ray's names; memory in bytes)."""

    node_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)
    is_head: bool = False

    @property
    def preemptible(self) -> bool:
        return self.labels.get(MARKET_TYPE_LABEL) == PREEMPTIBLE_MARKET


@dataclass(frozen=True)
class JobNeeds:
    """What a run's job asks for beyond its lease (the bundle's ``job``)."""

    num_cpus: float = 0.0
    memory_bytes: int = 0
    resources: Mapping[str, float] = field(default_factory=dict)
    preemptible: bool = True  # False: only on nodes that are not preemptible


@dataclass(frozen=True)
class Placement:
    """A job's entrypoint options: its needs and the node labels it must run on."""

    needs: JobNeeds
    label_selector: Mapping[str, str] = field(default_factory=dict)
    host: str | None = None


def host_down_reason(host: str | None, nodes: Iterable[NodeInfo]) -> str | None:
    """Why a key on ``host`` cannot be served now (no alive node carries its label), or None."""
    if host is None:
        return None
    if any(node.labels.get(HOST_LABEL) == host for node in nodes):
        return None
    return f"host {host!r} is not in the cluster (no alive Ray node with label {HOST_LABEL}={host})"


def placement(host: str | None, needs: JobNeeds) -> Placement:
    """Where a job for a key on ``host`` (None: anywhere) with ``needs`` must run."""
    selector: dict[str, str] = {}
    if host is not None:
        selector[HOST_LABEL] = host
    if not needs.preemptible:
        selector[MARKET_TYPE_LABEL] = f"!{PREEMPTIBLE_MARKET}"
    return Placement(needs=needs, label_selector=selector, host=host)


def _matches(node: NodeInfo, where: Placement) -> bool:
    if where.host is not None and node.labels.get(HOST_LABEL) != where.host:
        return False
    return where.needs.preemptible or not node.preemptible


def _fits(node: NodeInfo, needs: JobNeeds) -> bool:
    have = node.resources
    if needs.num_cpus > have.get("CPU", 0.0) + 1e-9:
        return False
    if needs.memory_bytes and needs.memory_bytes > have.get(MEMORY_BYTES, 0.0):
        return False
    return all(amount <= have.get(name, 0.0) + 1e-9 for name, amount in needs.resources.items())


def unsatisfiable(where: Placement, nodes: Iterable[NodeInfo]) -> str | None:
    """Why no alive node could ever run this job (one line), or None if one could.

    Totals, not what is free now: a busy node frees up, a missing CPU never appears.
    A placement on a host with no alive node is not judged here: that key is
    down, and its run waits for the host to come back.
    """
    nodes = list(nodes)
    if where.host is not None and host_down_reason(where.host, nodes) is not None:
        return None
    candidates = [node for node in nodes if _matches(node, where)]
    if not candidates:
        if where.needs.preemptible:
            return None  # no node listed at all: nothing to judge against
        on = f"host {where.host!r}" if where.host is not None else "the cluster"
        return f"preemptible: false, but every alive node of {on} is preemptible ({MARKET_TYPE_LABEL}={PREEMPTIBLE_MARKET})"
    if any(_fits(node, where.needs) for node in candidates):
        return None
    needs = where.needs
    asked = []
    if needs.num_cpus:
        asked.append(f"{needs.num_cpus:g} CPUs (most on one node: {_most(candidates, 'CPU'):g})")
    if needs.memory_bytes:
        asked.append(f"{needs.memory_bytes} bytes of memory (most: {_most(candidates, MEMORY_BYTES):.0f})")
    for name, amount in sorted(needs.resources.items()):
        asked.append(f"{amount:g} {name} (most: {_most(candidates, name):g})")
    scope = f"on host {where.host!r}" if where.host is not None else "in the cluster"
    return f"no alive node {scope} has what the job asks for: {', '.join(asked)}"


def _most(nodes: list[NodeInfo], name: str) -> float:
    return max((node.resources.get(name, 0.0) for node in nodes), default=0.0)


_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b?)$")
_MEMORY_UNIT = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(value: object) -> int:
    """Bytes in ``value``: an integer (bytes) or ``512m``, ``2g``, ``2GiB``, ``1.5Gi`` (binary units).

    Raises:
        ValueError: not a size (the message shows the forms that are).
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a memory size")
    if isinstance(value, int):
        size = float(value)
    elif isinstance(value, float):
        size = value
    elif isinstance(value, str):
        match = _MEMORY.match(value.strip().lower())
        if match is None:
            raise ValueError(f"{value!r} is not a memory size (use bytes, or e.g. 512m, 2g, 2GiB)")
        size = float(match.group(1)) * _MEMORY_UNIT[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a memory size")
    if not math.isfinite(size) or size < 0:
        raise ValueError(f"{value!r} must be a finite, non-negative size")
    return int(size)
