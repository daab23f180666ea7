"""Actor names, the namespace, and the Ray options every broker actor is created with.

Pure functions: the options are a plain dict, tested without a cluster.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "COORDINATOR_NAME",
    "RESOURCE_ACTOR_PREFIX",
    "DEFAULT_NAMESPACE",
    "namespace_from_env",
    "resource_actor_name",
    "actor_options",
    "MAX_CONCURRENCY",
]

COORDINATOR_NAME = "broker"
RESOURCE_ACTOR_PREFIX = "resource:"
DEFAULT_NAMESPACE = "merlin"
# Every waiting reserve occupies one concurrent call slot for as long as it waits.
MAX_CONCURRENCY = 10_000


def namespace_from_env() -> str:
    return os.environ.get("MERLIN_RAY_NAMESPACE") or DEFAULT_NAMESPACE


def resource_actor_name(key: str) -> str:
    return f"{RESOURCE_ACTOR_PREFIX}{key}"


def actor_options(name: str, namespace: str, head_node_id: str | None) -> dict[str, Any]:
    """Options for a broker actor: detached, restarted forever, no CPU, on the head node.

    ``max_task_retries`` stays 0 on purpose: Ray would replay in-flight calls on
    the restarted actor in any order. Callers retry with the same request_id.
    """
    options: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,
        "get_if_exists": True,
        "max_concurrency": MAX_CONCURRENCY,
    }
    if head_node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # The ledger lives on the head node's disk; the actors must live there too.
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=head_node_id, soft=False)
    return options
