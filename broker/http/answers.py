"""The HTTP API's answers as its client gives them: JSON with attribute access, no pydantic.

A command on the HTTP API prints what the broker sent; building the pydantic
models (:mod:`broker.models`) would cost their import, more than the request
itself. :class:`Answer` reads like the model it was dumped from
(``lease.state``, ``status.queue[0].holder``) and gives back the same JSON
(``for_holder``, ``public``), so one formatting code serves the Ray path's
models and these. The few rules the CLI needs from :mod:`broker.models`
(states, the shapes of keys and lease ids, the max-hold cap) are restated
here; ``tests/unit/test_cli_light.py`` checks they agree with the models.
"""

from __future__ import annotations

import re
from typing import Any

from broker.core.compat import StrEnum
from broker.errors import InvalidRequest

__all__ = [
    "Answer",
    "LeaseState",
    "ResourceState",
    "is_group",
    "is_group_lease_id",
    "is_resource_key",
    "resource_of_lease_id",
    "ttl_capped_by_max_hold",
]


class LeaseState(StrEnum):
    """= :class:`broker.models.LeaseState` (equal as strings, so either compares with ``==``)."""

    QUEUED = "queued"
    GRANTED = "granted"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"
    CANCELLED = "cancelled"


class ResourceState(StrEnum):
    """= :class:`broker.models.ResourceState`."""

    FREE = "free"
    LEASED = "leased"
    MAINTENANCE = "maintenance"
    DOWN = "down"


_RESOURCE_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")  # = broker.models.RESOURCE_KEY_PATTERN
_LEASE_ID = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,63})\.([0-9a-f]{32})$")
_GROUP_LEASE_ID = re.compile(r"^group:[0-9a-f]{32}$")


def is_resource_key(value: object) -> bool:
    return isinstance(value, str) and _RESOURCE_KEY.match(value) is not None


def is_group_lease_id(lease_id: object) -> bool:
    return isinstance(lease_id, str) and _GROUP_LEASE_ID.match(lease_id) is not None


def resource_of_lease_id(lease_id: object) -> str:
    """As :func:`broker.models.resource_of_lease_id`: the key, or ``InvalidRequest``."""
    match = _LEASE_ID.match(lease_id) if isinstance(lease_id, str) else None
    if match is None:
        shown = lease_id if isinstance(lease_id, str) and len(lease_id) <= 100 else f"<{type(lease_id).__name__}>"
        raise InvalidRequest(f"not a lease id: {shown!r} (expected '<resource>.<32 hex digits>')", "lease_id")
    return match.group(1)


def is_group(lease: Any) -> bool:
    """A group lease (``GroupLease`` or its answer): it names its members, a one-key lease does not."""
    return getattr(lease, "members", None) is not None


def ttl_capped_by_max_hold(lease: Any, asked_at: float | None) -> bool:
    """As :func:`broker.models.ttl_capped_by_max_hold`, on a model or an answer."""
    if lease.state != LeaseState.GRANTED or asked_at is None:
        return False
    if lease.must_end_by is None or lease.expires_at is None:
        return False
    return bool(lease.expires_at >= lease.must_end_by - 1e-3 and asked_at + lease.ttl_s > lease.must_end_by + 1e-3)


# What the API adds to a lease's fields in a holder's answer (``Lease.for_holder``, ``GroupLease.for_holder``;
# a one-key lease has a field ``group`` of its own: the group request its queue entry belongs to).
_ADDED = ("ref", "ttl_capped_by_max_hold")
_ADDED_TO_GROUP = ("ref", "group")
_CAPABILITIES = ("lease_id", "request_id", "end_request_id")  # what ``public()`` leaves out


class Answer:
    """One JSON object of the API, read by attribute; a list of objects reads as a tuple of answers."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]):
        self._data = data

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(name) from None
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            return tuple(Answer(item) for item in value)
        return value

    def __repr__(self) -> str:
        return f"Answer({self._data!r})"

    def json_data(self) -> dict[str, Any]:
        """The object as the API sent it (what ``model_dump(mode="json")`` gave on the server)."""
        return self._data

    def for_holder(self, asked_at: float | None = None) -> dict[str, Any]:
        """As ``Lease.for_holder``: the holder's answer, the max-hold cap counted from ``asked_at``."""
        data = dict(self._data)
        if asked_at is not None and "ttl_capped_by_max_hold" in data:
            data["ttl_capped_by_max_hold"] = ttl_capped_by_max_hold(self, asked_at)
        return data

    def public(self) -> dict[str, Any]:
        """As ``Lease.public``: everything but the capability, its ``ref`` last (and ``group`` for a group)."""
        group = is_group(self)
        added = _ADDED_TO_GROUP if group else _ADDED
        data = {k: v for k, v in self._data.items() if k not in added and k not in _CAPABILITIES}
        data["ref"] = self._data["ref"]
        if group:
            data["group"] = True
        return data
