"""The Ray seam: every use of Ray's API is in this package.

- :mod:`broker.seam.actors` — the :class:`ActorSystem` the shells hold, :class:`ActorRef`, the one retrying call
- :mod:`broker.seam.retry` — the retry policy (pure)
- :mod:`broker.seam.jobs` — the :class:`JobRunner` protocol and an in-process fake
- :mod:`broker.seam.ray_backend` — the Ray implementation of both (imports Ray)
- :mod:`broker.seam.fake` — an in-process actor system for unit tests of the shells
- :mod:`broker.seam.ray_private` — the private Ray APIs we cannot avoid, one function each
- :mod:`broker.seam.placement` — actor names and the options every broker actor is created with
- :mod:`broker.seam.cluster` — the local loopback cluster: start, stop, connect a driver

Importing this package does not import Ray; :func:`ray_system` does.
"""

from __future__ import annotations

from broker.seam.actors import ActorRef, ActorSystem, CallFailed, Spawn
from broker.seam.jobs import JobInfo, JobRunner, JobSpec
from broker.seam.retry import Failure, RetryPolicy

__all__ = [
    "ActorRef",
    "ActorSystem",
    "CallFailed",
    "Failure",
    "JobInfo",
    "JobRunner",
    "JobSpec",
    "RetryPolicy",
    "Spawn",
    "ray_system",
]


def ray_system(policy: RetryPolicy | None = None) -> ActorSystem:
    """The Ray-backed system for this process (a connected driver, or an actor on the cluster)."""
    from broker.seam.ray_backend import RaySystem

    return RaySystem(policy)
