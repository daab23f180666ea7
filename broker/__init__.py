"""Merlin hardware broker: leases on scarce lab hardware, held by detached Ray actors.

Start here: :func:`connect` returns a client; ``client.lease("firesim_u250")``
holds a key for a ``with`` block. Errors are in :mod:`broker.errors`, values
in :mod:`broker.models`. Importing this package does not import Ray.
"""

from broker.client import BrokerClient, HeldLease, connect, default_holder
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
from broker.models import BrokerStatus, Lease, LeaseState, QueueEntry, ResourceState, ResourceStatus

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
