"""Merlin hardware broker: leases on scarce lab hardware, held by detached Ray actors.

Start here: :func:`connect` returns a client; ``client.lease("firesim_u250")``
holds a key for a ``with`` block. Errors are in :mod:`broker.errors`, values
in :mod:`broker.models`. Importing this package does not import Ray.
"""

from typing import TYPE_CHECKING, Any

# What each public name is, imported on first use (PEP 562): `merlin` on the HTTP API then never
# loads the shim and its seam, and `import broker` stays cheap.
_LAZY = {
    "connect": "broker.client",
    "BrokerClient": "broker.client",
    "HeldLease": "broker.client",
    "default_holder": "broker.holders",
    "BrokerError": "broker.errors",
    "BrokerUnavailable": "broker.errors",
    "InvalidRequest": "broker.errors",
    "LeaseNotFound": "broker.errors",
    "LeaseNotHeld": "broker.errors",
    "ResourceBusy": "broker.errors",
    "StaleFencingToken": "broker.errors",
    "UnknownResource": "broker.errors",
    "WaitTimeout": "broker.errors",
    "BrokerStatus": "broker.models",
    "Lease": "broker.models",
    "LeaseState": "broker.models",
    "QueueEntry": "broker.models",
    "ResourceState": "broker.models",
    "ResourceStatus": "broker.models",
}

if TYPE_CHECKING:
    from broker.client import BrokerClient, HeldLease, connect
    from broker.errors import (
        BrokerError,
        BrokerUnavailable,
        InvalidRequest,
        LeaseNotFound,
        LeaseNotHeld,
        ResourceBusy,
        StaleFencingToken,
        UnknownResource,
        WaitTimeout,
    )
    from broker.holders import default_holder
    from broker.models import BrokerStatus, Lease, LeaseState, QueueEntry, ResourceState, ResourceStatus


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "connect",
    "BrokerClient",
    "HeldLease",
    "default_holder",
    "Lease",
    "LeaseState",
    "QueueEntry",
    "ResourceState",
    "ResourceStatus",
    "BrokerStatus",
    "BrokerError",
    "InvalidRequest",
    "UnknownResource",
    "ResourceBusy",
    "LeaseNotFound",
    "LeaseNotHeld",
    "StaleFencingToken",
    "WaitTimeout",
    "BrokerUnavailable",
]
