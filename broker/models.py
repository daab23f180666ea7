"""Values that cross the broker's edges: leases, requests, resource and broker status.

Pydantic models, frozen, so a notebook gets typed objects back from
``ray.get(broker.reserve.remote(...))`` and the state files are plain JSON.
Times are wall-clock seconds since the epoch (they are written to disk and
must mean the same after a restart).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
)

from broker.core.compat import StrEnum
from broker.errors import InvalidRequest, LeaseNotHeld

__all__ = [
    "RESOURCE_KEY_PATTERN",
    "LeaseState",
    "EndReason",
    "SessionTie",
    "LeaseEvent",
    "EVENT_OF_STATE",
    "END_EVENTS",
    "LeaseEnded",
    "LEASE_TRANSITIONS",
    "ACTIVE_STATES",
    "check_transition",
    "LeaseTransition",
    "Lease",
    "lease_ref",
    "ttl_capped_by_max_hold",
    "resource_of_lease_id",
    "is_group_lease_id",
    "GroupMember",
    "GroupLease",
    "ResourceState",
    "QueueEntry",
    "ResourceStatus",
    "BrokerStatus",
    "ResourceTable",
    "ReserveRequest",
    "validated",
    "checked",
    "Holder",
    "TtlSeconds",
    "RequestId",
    "Reason",
    "SessionId",
    "MAX_TTL_S",
    "MIN_TTL_S",
]

RESOURCE_KEY_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_RESOURCE_KEY = re.compile(RESOURCE_KEY_PATTERN)
# A lease id is "<key>.<32 hex>": the key routes it without a lookup table, the
# 128 random bits make it a capability nobody can guess.
_LEASE_ID = re.compile(r"^([a-z0-9][a-z0-9_.-]{0,63})\.([0-9a-f]{32})$")
REQUEST_ID_PATTERN = r"^[A-Za-z0-9_.:@/+=-]{1,128}$"

MAX_TTL_S = 7 * 24 * 3600.0
# A grant shorter than this would be over before its holder hears of it (a round trip through
# Ray and the ledger's sync take milliseconds; 1e-300 s was once "granted", already expired).
MIN_TTL_S = 1.0
MAX_PRIORITY = 1000


class LeaseState(StrEnum):
    QUEUED = "queued"
    GRANTED = "granted"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"
    CANCELLED = "cancelled"


class EndReason(StrEnum):
    """Why the book ended a lease; written as its value to ``end_reason`` and the journal's ``reason``.

    A revoke's reason is the admin's own text instead (the state, ``revoked``,
    says what happened). The values are the texts records have always carried,
    so old records load as these members.
    """

    RELEASED = "released"
    RELEASED_WHILE_QUEUED = "released while queued"
    CANCELLED = "cancelled"
    WAIT_TIMED_OUT = "wait timed out"
    WAITER_WENT_AWAY = "waiter went away"
    WITHDRAWN = "withdrawn by its holder"
    TTL_ELAPSED = "ttl elapsed"
    SUPERSEDED = "superseded by a later grant on recovery"
    GROUP_MEMBER_ENDED = "another key of its group lease ended"  # a group lease ends as a whole
    GROUP_GRANT_ABORTED = "its group's grant could not take every key"  # granted to nobody; requeued
    HOLDER_GONE = "holder gone"  # the caller's session (its Ray driver) ended: its request or bound lease too

    @classmethod
    def of(cls, text: object) -> EndReason | None:
        """The member whose value is ``text`` (a record's or the journal's), or None for free text."""
        if isinstance(text, cls):
            return text
        try:
            return cls(text) if isinstance(text, str) else None
        except ValueError:
            return None


class SessionTie(StrEnum):
    """What of a request ends when the session (the caller's Ray job) it came from ends.

    The book ends what is tied when it is told the session is gone
    (:meth:`broker.core.book.LeaseBook.end_session`): a queued request is cancelled and a
    tied grant expires, both with reason ``holder gone``.
    """

    NONE = "none"  # nothing: no session given, or a grant its holder acknowledged (UNTIL_ACKNOWLEDGED)
    LEASE = "lease"  # the request and its lease, for its whole life (the shim's lease(), opted-in notebooks)
    # The request, and its grant until the holder acknowledges it (reserve again with the same
    # request_id): a grant its caller never received is taken back; one it received outlives it (the CLI).
    UNTIL_ACKNOWLEDGED = "until acknowledged"


class LeaseEvent(StrEnum):
    """The events one key's book reports (``Change.event``) and the journal records by value."""

    QUEUED = "lease.queued"
    GRANTED = "lease.granted"
    CLAIMED = "lease.claimed"  # a request granted while its holder was away was taken up: full TTL
    RENEWED = "lease.renewed"
    EXPIRING = "lease.expiring"  # the max hold is near (the actor's warning, not a book change)
    RELEASED = "lease.released"
    EXPIRED = "lease.expired"
    REVOKED = "lease.revoked"
    CANCELLED = "lease.cancelled"
    MAINTENANCE = "resource.maintenance"  # the key's maintenance flag, kept by the same book
    DOWN = "resource.down"  # the key's host has no alive Ray node: no grants (the coordinator sees it)
    UP = "resource.up"  # the host is back

    @classmethod
    def of(cls, name: object) -> LeaseEvent | None:
        """The member named ``name`` in a journal record, or None for any other event."""
        if isinstance(name, cls):
            return name
        try:
            return cls(name) if isinstance(name, str) else None
        except ValueError:
            return None


# The one table of legal moves; every state change in the book goes through it.
LEASE_TRANSITIONS: Mapping[LeaseState, frozenset[LeaseState]] = {
    LeaseState.QUEUED: frozenset({LeaseState.GRANTED, LeaseState.CANCELLED}),
    LeaseState.GRANTED: frozenset({LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED}),
    LeaseState.RELEASED: frozenset(),
    LeaseState.EXPIRED: frozenset(),
    LeaseState.REVOKED: frozenset(),
    LeaseState.CANCELLED: frozenset(),
}
ACTIVE_STATES = frozenset({LeaseState.QUEUED, LeaseState.GRANTED})
# The event that reports a lease reaching each state.
EVENT_OF_STATE: Mapping[LeaseState, LeaseEvent] = {
    LeaseState.QUEUED: LeaseEvent.QUEUED,
    LeaseState.GRANTED: LeaseEvent.GRANTED,
    LeaseState.RELEASED: LeaseEvent.RELEASED,
    LeaseState.EXPIRED: LeaseEvent.EXPIRED,
    LeaseState.REVOKED: LeaseEvent.REVOKED,
    LeaseState.CANCELLED: LeaseEvent.CANCELLED,
}
END_EVENTS = frozenset(EVENT_OF_STATE[state] for state in LeaseState if state not in ACTIVE_STATES)


def check_transition(lease_id: str, current: LeaseState, target: LeaseState) -> None:
    """Raise ``LeaseNotHeld`` naming both states when the table forbids the move."""
    if target not in LEASE_TRANSITIONS[current]:
        raise LeaseNotHeld(lease_id, current.value, f"cannot move from {current.value} to {target.value}")


def ttl_capped_by_max_hold(lease: Lease, asked_at: float | None) -> bool:
    """Whether ``lease``'s TTL counted from ``asked_at`` (its grant, or a renewal) runs past its max hold."""
    if lease.state is not LeaseState.GRANTED or asked_at is None:
        return False
    if lease.must_end_by is None or lease.expires_at is None:
        return False
    # 1 ms of slack: the broker's clock read and ours differ by the call's latency.
    return lease.expires_at >= lease.must_end_by - 1e-3 and asked_at + lease.ttl_s > lease.must_end_by + 1e-3


def lease_ref(lease_id: str) -> str:
    """A public name for a lease: safe to log, list and journal, useless as a capability."""
    return hashlib.sha256(lease_id.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class LeaseEnded:
    """A granted lease ended: what a resource actor tells the coordinator (a ref, never the id)."""

    ref: str
    state: LeaseState
    reason: str = ""
    by: str = ""


_GROUP_LEASE_ID = re.compile(r"^group:[0-9a-f]{32}$")


def is_group_lease_id(lease_id: object) -> bool:
    """A group lease's id (``group:<32 hex digits>``; no resource key has a colon)."""
    return isinstance(lease_id, str) and _GROUP_LEASE_ID.match(lease_id) is not None


def resource_of_lease_id(lease_id: object) -> str:
    """The resource key a lease id belongs to; ``InvalidRequest`` if it is not a lease id."""
    match = _LEASE_ID.match(lease_id) if isinstance(lease_id, str) else None
    if match is None:
        shown = lease_id if isinstance(lease_id, str) and len(lease_id) <= 100 else f"<{type(lease_id).__name__}>"
        raise InvalidRequest(f"not a lease id: {shown!r} (expected '<resource>.<32 hex digits>')", "lease_id")
    return match.group(1)


def is_resource_key(value: object) -> bool:
    return isinstance(value, str) and _RESOURCE_KEY.match(value) is not None


def _end_reason(value: Any) -> Any:
    member = EndReason.of(value)
    return value if member is None else member


# An end reason as the book wrote it, read back as its member; an admin's text stays text.
EndReasonText = Annotated[EndReason | str, BeforeValidator(_end_reason)]


class LeaseTransition(BaseModel):
    """One entry of a lease's history: the state it entered, when, why and by whom."""

    model_config = ConfigDict(frozen=True)

    state: LeaseState
    at: float
    reason: EndReasonText = ""
    by: str = ""


class Lease(BaseModel):
    """A holder's claim on one resource key, from queueing to its end.

    ``lease_id`` is the holder's capability: only it renews or releases.
    ``fencing_token`` is set at grant, strictly increasing per key.
    """

    model_config = ConfigDict(frozen=True)

    lease_id: str
    resource: str
    holder: str
    state: LeaseState
    fencing_token: int | None = None
    priority: int = 0
    seq: int = 0  # arrival order on its key: FIFO among equal priorities
    ttl_s: float
    queued_at: float
    granted_at: float | None = None
    expires_at: float | None = None
    wait_deadline: float | None = None
    note: str = ""
    request_id: str
    ended_at: float | None = None
    end_reason: EndReasonText = ""
    ended_by: str = ""
    end_request_id: str | None = None  # the request_id of the revoke that ended it
    renewals: int = 0
    must_end_by: float | None = None  # granted_at + the resource's max hold: no renewal goes past it
    warn_at: float | None = None  # when the holder is warned that must_end_by approaches
    # Granted while its holder was away (queued before a restart, nobody awaiting it): its expiry is
    # capped at the catalog's claim window until the holder comes back with its request_id or renews.
    unclaimed: bool = False
    history: tuple[LeaseTransition, ...] = ()
    # The public ref of the group request this entry belongs to: a queued entry with a group is never
    # granted by its book on its own; the coordinator takes it when all the group's keys can be had.
    group: str | None = None
    session: str | None = None  # the caller's session (Ray job id) the request came from, if it said
    session_tie: SessionTie = SessionTie.NONE  # what of it ends with that session

    @property
    def ref(self) -> str:
        return lease_ref(self.lease_id)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def ttl_capped_by_max_hold(self) -> bool:
        """Granted for less than its TTL because the resource's max hold ends it sooner."""
        return ttl_capped_by_max_hold(self, self.granted_at)

    def for_holder(self, asked_at: float | None = None) -> dict[str, Any]:
        """The lease as its holder sees it (CLI ``--json``): with its public ``ref`` and whether the
        TTL asked for at ``asked_at`` (default: the grant) was cut by the resource's max hold."""
        data = self.model_dump(mode="json")
        data["ref"] = self.ref
        data["ttl_capped_by_max_hold"] = ttl_capped_by_max_hold(self, self.granted_at if asked_at is None else asked_at)
        return data

    def public(self) -> dict[str, Any]:
        """The lease as others may see it: everything but the capability."""
        data = self.model_dump(mode="json", exclude={"lease_id", "request_id", "end_request_id"})
        data["ref"] = self.ref
        return data


class ResourceState(StrEnum):
    FREE = "free"
    LEASED = "leased"
    MAINTENANCE = "maintenance"
    DOWN = "down"  # its actor does not answer, or its host has no alive Ray node (``down_reason``)


class QueueEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    position: int  # 1 = next to be granted
    holder: str
    priority: int
    queued_at: float
    note: str = ""
    ref: str  # lease_ref of the queued lease, so a waiter can find itself
    group: str | None = None  # the ref of the group request this entry belongs to


class ResourceStatus(BaseModel):
    """One resource key as anyone may see it. Never carries a lease id."""

    model_config = ConfigDict(frozen=True)

    key: str
    state: ResourceState
    holder: str | None = None
    lease_ref: str | None = None
    fencing_token: int | None = None
    granted_at: float | None = None
    expires_at: float | None = None
    queue: tuple[QueueEntry, ...] = ()
    maintenance_reason: str | None = None
    maintenance_since: float | None = None
    maintenance_by: str | None = None  # who put it in maintenance ("merlin-health": a health probe's quarantine)
    down_reason: str | None = None  # why it is down, when its actor says so (its host is absent)
    free_since: float | None = None  # when it last became free (any-of placement prefers the longest free)
    ready_for_group: str | None = None  # the group whose entry heads the queue of this free key, if any
    labels: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


class ResourceTable(list[Any]):
    """What ``client.resources()`` returns: a plain list that renders as a table in Jupyter."""

    def _repr_html_(self) -> str:
        import html
        import time

        from broker.core.durations import format_duration

        def cell(value: object) -> str:
            return f"<td>{html.escape(str(value))}</td>"

        rows = []
        for status in self:
            expires = "-"
            if status.expires_at is not None:
                expires = f"in {format_duration(max(0.0, status.expires_at - time.time()), units=2)}"
            queue = ", ".join(entry.holder for entry in status.queue) or "-"
            labels = ", ".join(f"{k}={v}" for k, v in status.labels.items())
            rows.append(
                "<tr>"
                + "".join(
                    cell(v)
                    for v in (
                        status.key,
                        status.state.value,
                        status.holder or "-",
                        status.fencing_token or "-",
                        expires,
                        queue,
                        labels,
                    )
                )
                + "</tr>"
            )
        head = "".join(
            f"<th>{name}</th>" for name in ("resource", "state", "holder", "token", "expires", "queue", "labels")
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


class GroupMember(BaseModel):
    """One key of a group lease: which board the holder got, and its own fencing token."""

    model_config = ConfigDict(frozen=True)

    key: str
    fencing_token: int | None = None
    host: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, Any] = Field(default_factory=dict)


class GroupLease(BaseModel):
    """A lease on ``count`` keys at once, taken by one request: any of a pool's members, or a set together.

    ``lease_id`` (``group:<32 hex>``) is the holder's one capability for all
    its keys: renewed, released, expired and revoked as a whole. While it
    waits, ``members`` is empty; once granted, it names each key with its
    fencing token and the catalog's host, labels and properties.
    """

    model_config = ConfigDict(frozen=True)

    lease_id: str
    holder: str
    request_id: str
    state: LeaseState
    count: int
    candidates: tuple[str, ...]  # the keys it may get (a set asked for all of them: count == len)
    selector: str = ""  # the label selector it asked by, canonical text ("" for a set of keys)
    priority: int = 0
    seq: int = 0  # arrival order among group requests (the coordinator's)
    ttl_s: float
    queued_at: float
    wait_deadline: float | None = None
    granted_at: float | None = None
    expires_at: float | None = None
    ended_at: float | None = None
    end_reason: str = ""
    ended_by: str = ""
    note: str = ""
    members: tuple[GroupMember, ...] = ()
    session: str | None = None  # the caller's session (Ray job id) its entries and keys are tied to
    one_host: bool = False  # its keys must share one host (a run's one job reaches them all)

    @property
    def ref(self) -> str:
        return lease_ref(self.lease_id)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(member.key for member in self.members)

    @property
    def fencing_tokens(self) -> dict[str, int]:
        return {member.key: member.fencing_token or 0 for member in self.members}

    def for_holder(self, asked_at: float | None = None) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["ref"] = self.ref
        data["group"] = True
        return data

    def public(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"lease_id", "request_id"})
        data["ref"] = self.ref
        data["group"] = True
        return data


class BrokerStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    healthy: bool
    namespace: str
    state_dir: str
    started_at: float
    uptime_s: float
    resources: int
    leased: int
    queued: int
    in_maintenance: int
    down: tuple[str, ...] = ()
    metrics_url: str | None = None
    http_url: str | None = None  # the HTTP API's base (``…/api/v1``), when it listens
    version: str = ""


def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _printable(value: str) -> str:
    if value != value.strip() or not value.isprintable():
        raise ValueError("must be printable with no surrounding whitespace")
    return value


def _printable_text(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must be printable text")
    return value


# The argument types every edge validates, shared by the request models and
# the single-argument checks (renew's ttl_s, revoke's expected_holder, ...).
Holder = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]
TtlSeconds = Annotated[float, Field(ge=MIN_TTL_S, le=MAX_TTL_S, strict=True), AfterValidator(_finite)]
WaitSeconds = Annotated[float, Field(ge=0, le=MAX_TTL_S, strict=True), AfterValidator(_finite)]
Priority = Annotated[StrictInt, Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]
RequestId = Annotated[str, Field(pattern=REQUEST_ID_PATTERN)]
Note = Annotated[str, Field(max_length=1024), AfterValidator(_printable_text)]
Reason = Annotated[str, Field(max_length=512), AfterValidator(_printable_text)]
# A caller's session: its Ray job id (`ray.get_runtime_context().get_job_id()`, 4 bytes in hex).
SessionId = Annotated[str, Field(pattern=r"^[0-9a-f]{8}$")]


class ReserveRequest(BaseModel):
    """A validated ``reserve`` call; built at every edge that takes one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resource: str = Field(pattern=RESOURCE_KEY_PATTERN)
    holder: Holder
    ttl_s: TtlSeconds = 3600.0
    wait: StrictBool = False
    timeout_s: WaitSeconds | None = None
    priority: Priority = 0
    request_id: RequestId
    note: Note = ""
    group: Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")] | None = None  # a group request's entry (its ref)
    session: SessionId | None = None  # the caller's Ray job: its waiting request ends with it
    bind_session: StrictBool = True  # and so does its lease (False: only until the holder acknowledges it)


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def checked(kind: Any, value: Any, field: str) -> Any:
    """Validate one argument against one of the types above; ``InvalidRequest`` names it."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest(_invalid(field, value, exc.errors()[0]), field) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validated(model: type[BaseModel], **fields: Any) -> Any:
    """Build ``model`` or raise one ``InvalidRequest`` naming the first bad field and value."""
    try:
        return model(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or model.__name__
        raise InvalidRequest(_invalid(where, err.get("input"), err), where) from None


# Bounds on a duration (a field ending in _s), said as a duration: "at most 7d", not "604800".
_BOUND_WORDS = {"less_than_equal": ("le", "at most"), "less_than": ("lt", "less than"),
                "greater_than": ("gt", "more than"), "greater_than_equal": ("ge", "at least")}  # fmt: skip


def _invalid(where: str, value: Any, err: Any) -> str:
    """``invalid <field>=<value>: <why>``; durations in ``90s``/``2h``/``7d``, not seconds."""
    bound = _BOUND_WORDS.get(err.get("type", ""))
    limit = (err.get("ctx") or {}).get(bound[0]) if bound else None
    if where.endswith("_s") and isinstance(value, (int, float)) and isinstance(limit, (int, float)):
        from broker.core.durations import format_duration

        shown = format_duration(float(value)) if math.isfinite(value) and value >= 0 else _shown(value)
        return f"invalid {where}={shown}: must be {bound[1]} {format_duration(float(limit))}"  # type: ignore[index]
    return f"invalid {where}={_shown(value)}: {err['msg']}"
