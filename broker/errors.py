"""The broker's error tree: what callers catch, and the CLI's exit codes.

::

    BrokerError                 root; never raised itself
    ├── InvalidRequest          a bad argument (names the field and the value); exit 3
    ├── UnknownResource         the key is not in the catalog; exit 4
    ├── ResourceBusy            wait=False on a held key, or the key is in maintenance; exit 5
    ├── LeaseNotFound           no lease has this id; exit 6
    ├── LeaseNotHeld            the lease exists but is not granted (ended, queued, or another
    │                           holder); exit 7
    ├── StaleFencingToken       a job presented a token that no longer holds the key; exit 8
    ├── WaitTimeout             a waiting reserve ran out of time and left the queue; exit 9
    ├── BrokerUnavailable       no cluster, no broker, an actor that does not answer, or a
    │                           state dir that cannot be written; exit 10
    └── NotAuthorized           an administrative act without the catalog's admin secret; exit 11

Every class passes all of its constructor arguments to ``Exception.__init__``
and formats its message in ``__str__``: Ray pickles an error raised in an
actor and re-raises it on the caller, so ``except ResourceBusy:`` works in a
notebook and the fields survive the trip.
"""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "BrokerError",
    "InvalidRequest",
    "UnknownResource",
    "ResourceBusy",
    "LeaseNotFound",
    "LeaseNotHeld",
    "StaleFencingToken",
    "WaitTimeout",
    "BrokerUnavailable",
    "NotAuthorized",
    "EXIT_CODES",
]


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidRequest(BrokerError):
    """An argument is wrong; nothing was changed.

    Args:
        message: what is wrong, naming the field and the bad value.
        field: the argument or config field at fault, when one is.
    """

    exit_code = 3

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, field)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class UnknownResource(BrokerError):
    """The resource key is not in the broker's catalog."""

    exit_code = 4

    def __init__(self, resource: str, known: tuple[str, ...] = ()):
        super().__init__(resource, tuple(known))
        self.resource = resource
        self.known = tuple(known)

    def __str__(self) -> str:
        hint = f" (known: {', '.join(self.known)})" if self.known else ""
        return f"unknown resource {self.resource!r}{hint}"


class ResourceBusy(BrokerError):
    """``reserve(wait=False)`` found the key held, queued for, or in maintenance."""

    exit_code = 5

    def __init__(
        self,
        resource: str,
        holder: str | None = None,
        expires_at: float | None = None,
        queue_length: int = 0,
        maintenance_reason: str | None = None,
    ):
        super().__init__(resource, holder, expires_at, queue_length, maintenance_reason)
        self.resource = resource
        self.holder = holder
        self.expires_at = expires_at
        self.queue_length = queue_length
        self.maintenance_reason = maintenance_reason

    def __str__(self) -> str:
        if self.maintenance_reason is not None:
            why = f": {self.maintenance_reason}" if self.maintenance_reason else ""
            return f"resource {self.resource!r} is in maintenance{why}"
        parts = [f"resource {self.resource!r} is busy"]
        if self.holder is not None:
            parts.append(f"held by {self.holder}")
        if self.expires_at is not None:
            from datetime import datetime, timezone

            until = datetime.fromtimestamp(self.expires_at, tz=timezone.utc)
            parts.append(f"until {until:%Y-%m-%dT%H:%M:%SZ}")
        if self.queue_length:
            parts.append(f"{self.queue_length} waiting")
        return ", ".join(parts) + " (use wait=True / --wait to queue)"


_LEASE_ID_SHAPE = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,63})\.[0-9a-f]{32}$")


def _named(lease_id: object) -> str:
    """How a message names a lease: its key and public ref, never the id (messages reach logs and records)."""
    if not isinstance(lease_id, str):
        return f"<{type(lease_id).__name__}>"
    ref = hashlib.sha256(lease_id.encode()).hexdigest()[:12]  # = broker.models.lease_ref
    match = _LEASE_ID_SHAPE.match(lease_id)
    return f"{match.group(1)} lease ref {ref}" if match else f"lease ref {ref}"


class LeaseNotFound(BrokerError):
    """No lease with this id exists (never did, or not on this broker)."""

    exit_code = 6

    def __init__(self, lease_id: str):
        super().__init__(lease_id)
        self.lease_id = lease_id

    def __str__(self) -> str:
        return f"no such lease ({_named(self.lease_id)})"


class LeaseNotHeld(BrokerError):
    """The lease exists but does not hold its key now, or the caller is not its holder.

    Args:
        lease_id: the lease asked about.
        state: the state it is in (``expired``, ``revoked``, ``queued``, ...).
        detail: why the action was refused, e.g. who holds the key instead.
    """

    exit_code = 7

    def __init__(self, lease_id: str, state: str, detail: str = ""):
        super().__init__(lease_id, state, detail)
        self.lease_id = lease_id
        self.state = state
        self.detail = detail

    def __str__(self) -> str:
        tail = f": {self.detail}" if self.detail else ""
        return f"the lease ({_named(self.lease_id)}) is not held (state {self.state}){tail}"


class StaleFencingToken(BrokerError):
    """A fencing token that no longer matches the key's current grant."""

    exit_code = 8

    def __init__(self, resource: str, token: int, current_token: int | None):
        super().__init__(resource, token, current_token)
        self.resource = resource
        self.token = token
        self.current_token = current_token

    def __str__(self) -> str:
        now = "nobody holds it" if self.current_token is None else f"current token is {self.current_token}"
        return f"stale fencing token {self.token} for {self.resource!r}: {now}"


class WaitTimeout(BrokerError):
    """A waiting reserve was not granted in time; its request left the queue."""

    exit_code = 9

    def __init__(self, resource: str, timeout_s: float, lease_id: str | None = None):
        super().__init__(resource, timeout_s, lease_id)
        self.resource = resource
        self.timeout_s = timeout_s
        self.lease_id = lease_id

    def __str__(self) -> str:
        return f"timed out after {self.timeout_s:g}s waiting for {self.resource!r}"


class BrokerUnavailable(BrokerError):
    """The broker cannot serve the call now; ``hint`` names what to run."""

    exit_code = 10

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message, hint)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class NotAuthorized(BrokerError):
    """``revoke``, ``set_maintenance`` or ``broker down`` without the admin secret the catalog requires."""

    exit_code = 11

    def __init__(self, act: str, by: str = ""):
        super().__init__(act, by)
        self.act = act
        self.by = by

    def __str__(self) -> str:
        return f"{self.act} needs the admin secret (MERLIN_ADMIN_SECRET or --admin-secret-file); refused and journaled"


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        InvalidRequest,
        UnknownResource,
        ResourceBusy,
        LeaseNotFound,
        LeaseNotHeld,
        StaleFencingToken,
        WaitTimeout,
        BrokerUnavailable,
        NotAuthorized,
    )
}
