"""Pool and group requests, pure: which keys a request may get, how many, and which it gets now.

A request names one key (``reserve``, unchanged), a label selector
(``kind=fpga,board=u250``: any ``count`` of its members, one by default) or
a set of keys (all of them together, unless ``count`` asks for fewer). It is
one *group* request; once granted, it is one lease on ``count`` keys.

How the scheduling rules hold across keys (README "Pools and group leases"):

* **One holder per key.** Each key's book still grants at most one lease; a
  group's keys are ordinary leases on their books, taken for the group.
* **Order across keys.** A group request puts an *entry* in the queue of every
  key it may use, in the books' usual order (priority, then arrival). A book
  never grants a group entry by itself and grants nothing queued behind it:
  a free key whose queue is headed by a group's entry is *ready* for that
  group and waits for it. So a later request of the same or lower priority
  never overtakes the group on any key it could use.
* **All or nothing, no deadlock.** The coordinator takes a group's keys only
  when ``count`` of them are ready for it at once (:func:`choose_members`),
  serially, one group at a time. Nobody holds one key while waiting for
  another, so there is no hold-and-wait and no deadlock; group entries are
  enqueued one group after another, so any two groups stand in the same
  order on every key they share, and no two groups wait for each other.
* **No starvation.** A group at the head of its keys' queues keeps them
  once they come free, whatever single-key requests of its priority arrive
  after it; it gets them when their current holders end.
* **Maintenance and down keys** are never ready (their books grant nothing).
* **Any-of placement prefers the member free longest** (wear spreads over
  the pool); a key never granted counts as free the longest.
* **One host, for runs.** A request that must share one host (a run's one
  job touches every key it holds) gets keys of a single host, plus keys bound
  to no host; one that no host could ever satisfy is refused at once.
* **No backfill.** A key ready for a waiting group stays idle until the group
  starts: lending it to a later request whose hold ends "in time" needs the
  start time of the group, which depends on the other keys' holders ending
  early or renewing — guesses, which would make the ordering rule false.
* **Ended groups are forgotten** after the catalog's ``retention``
  (:func:`past_retention`), their records too: the keys' own lease records
  keep each member's history, and nothing grows without bound.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from broker.errors import InvalidRequest, UnknownResource
from broker.models import RESOURCE_KEY_PATTERN, GroupLease, ResourceState

__all__ = [
    "SelectorTerm",
    "Selector",
    "parse_selector",
    "GroupAsk",
    "resolve_ask",
    "check_same_ask",
    "KeyView",
    "choose_members",
    "open_to_new",
    "gating_place",
    "most_on_one_host",
    "MAX_GROUP_KEYS",
    "GroupRecord",
    "entry_request_id",
    "group_order",
    "past_retention",
]

MAX_GROUP_KEYS = 64  # keys one request may name or ask for: one entry per key it may use
_LABEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9_.\-/:]{0,128}$")
_KEY = re.compile(RESOURCE_KEY_PATTERN)


@dataclass(frozen=True)
class SelectorTerm:
    """``name=value`` (or ``name=a|b``: any of the values), or ``name!=value`` (none of them)."""

    name: str
    values: frozenset[str]
    negated: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = labels.get(self.name) in self.values
        return not present if self.negated else present

    def text(self) -> str:
        return f"{self.name}{'!=' if self.negated else '='}{'|'.join(sorted(self.values))}"


@dataclass(frozen=True)
class Selector:
    """Every term must match (AND); a key's labels come from the catalog."""

    terms: tuple[SelectorTerm, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(term.matches(labels) for term in self.terms)

    def text(self) -> str:
        """Canonical text: the same selector always reads the same (terms sorted)."""
        return ",".join(sorted(term.text() for term in self.terms))


def parse_selector(text: object) -> Selector:
    """``kind=fpga,board=u250`` / ``board!=vcu118`` / ``board=u250|u280``; ``InvalidRequest`` names the bad term."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("invalid labels: expected name=value[,name=value...]", "labels")
    if len(text) > 1024:
        raise InvalidRequest("invalid labels: longer than 1024 characters", "labels")
    terms: dict[str, SelectorTerm] = {}
    for raw in text.split(","):
        part = raw.strip()
        negated = "!=" in part
        name, sep, value = part.partition("!=" if negated else "=")
        name = name.strip()
        values = frozenset(v.strip() for v in value.split("|"))
        if not sep or not _LABEL_NAME.match(name) or not all(_LABEL_VALUE.match(v) for v in values):
            raise InvalidRequest(
                f"invalid labels term {part[:80]!r}: expected name=value, name!=value or name=a|b", "labels"
            )
        if name in terms:
            raise InvalidRequest(f"invalid labels: {name!r} appears twice", "labels")
        terms[name] = SelectorTerm(name, values, negated)
    return Selector(tuple(terms.values()))


@dataclass(frozen=True)
class GroupAsk:
    """A resolved group request: the keys it may get (catalog order) and how many it needs."""

    candidates: tuple[str, ...]
    count: int
    selector: str = ""  # canonical selector text; "" for a set of keys


def most_on_one_host(keys: Sequence[str], hosts: Mapping[str, str | None]) -> int:
    """How many of ``keys`` one host could offer at once: its own keys plus those bound to no host."""
    anywhere = sum(1 for key in keys if hosts.get(key) is None)
    per_host: dict[str, int] = {}
    for key in keys:
        host = hosts.get(key)
        if host is not None:
            per_host[host] = per_host.get(host, 0) + 1
    return anywhere + max(per_host.values(), default=0)


def resolve_ask(
    catalog_labels: Mapping[str, Mapping[str, str]],
    *,
    keys: Sequence[str] | None = None,
    labels: str | None = None,
    count: int | None = None,
    one_host: Mapping[str, str | None] | None = None,
) -> GroupAsk:
    """Which keys a request may use and how many it needs, or an error at once (never a wait forever).

    ``catalog_labels`` maps every key of the catalog to its labels, in catalog order.
    ``one_host`` (each key's host, ``None`` for a key bound to no host): the keys
    must share one host, so the request needs ``count`` candidates on one host.

    Raises:
        InvalidRequest: neither or both of ``keys`` and ``labels``; a bad selector, key list or count;
            a selector that matches fewer than ``count`` keys; fewer than ``count`` on any one
            host, for a ``one_host`` request.
        UnknownResource: a named key is not in the catalog.
    """
    ask = _resolve(catalog_labels, keys=keys, labels=labels, count=count)
    if one_host is not None and ask.count > 1:
        most = most_on_one_host(ask.candidates, one_host)
        if most < ask.count:
            raise InvalidRequest(
                f"{ask.count} keys must share one host, and at most {most} of "
                f"{ask.selector or ', '.join(ask.candidates)} do: one job cannot reach keys on different hosts",
                "count" if ask.selector else "keys",
            )
    return ask


def _resolve(
    catalog_labels: Mapping[str, Mapping[str, str]],
    *,
    keys: Sequence[str] | None,
    labels: str | None,
    count: int | None,
) -> GroupAsk:
    if (keys is None) == (labels is None):
        raise InvalidRequest("a group request names either keys or labels (exactly one of them)", "keys")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise InvalidRequest(f"invalid count={count!r}: must be a whole number of keys, at least 1", "count")
    if keys is not None:
        if isinstance(keys, str) or not isinstance(keys, Sequence) or not keys:
            raise InvalidRequest("invalid keys: expected a non-empty list of resource keys", "keys")
        if len(keys) > MAX_GROUP_KEYS:
            raise InvalidRequest(f"invalid keys: {len(keys)} keys; at most {MAX_GROUP_KEYS}", "keys")
        for key in keys:
            if not isinstance(key, str) or not _KEY.match(key):
                raise InvalidRequest(f"invalid key {str(key)[:80]!r}: not a resource key", "keys")
            if key not in catalog_labels:
                raise UnknownResource(key, tuple(catalog_labels))
        if len(set(keys)) != len(keys):
            raise InvalidRequest("invalid keys: a key is named twice", "keys")
        wanted = set(keys)
        candidates = tuple(key for key in catalog_labels if key in wanted)
        need = len(candidates) if count is None else count
        if need > len(candidates):
            raise InvalidRequest(f"invalid count={need}: only {len(candidates)} keys are named", "count")
        return GroupAsk(candidates, need)
    selector = parse_selector(labels)
    candidates = tuple(key for key, key_labels in catalog_labels.items() if selector.matches(key_labels))
    need = 1 if count is None else count
    if len(candidates) < need:
        raise InvalidRequest(
            f"labels {selector.text()!r} match {len(candidates)} key(s) of the catalog; {need} needed",
            "labels",
        )
    if len(candidates) > MAX_GROUP_KEYS:
        raise InvalidRequest(
            f"labels {selector.text()!r} match {len(candidates)} keys; at most {MAX_GROUP_KEYS} per request", "labels"
        )
    return GroupAsk(candidates, need, selector.text())


def check_same_ask(lease: GroupLease, ask: GroupAsk, *, one_host: bool = False) -> None:
    """A ``request_id`` reused for a group request must ask what it asked before (a retry).

    The same id asking for other keys, another selector, another count or another
    placement is a new request under an old name: ``InvalidRequest`` naming the field,
    never the old group as its answer (as ``reserve`` refuses an id reused on another key).
    A selector is compared by its canonical text, so a retry after the catalog changed
    the selector's members is still the same request.
    """
    asked = ask.selector or ",".join(ask.candidates)
    before = lease.selector or ",".join(lease.candidates)
    field = ""
    if ask.selector != lease.selector:
        field = "labels" if ask.selector else "keys"
    elif not ask.selector and set(ask.candidates) != set(lease.candidates):
        field = "keys"
    elif ask.count != lease.count:
        field = "count"
    elif (one_host and ask.count > 1) != lease.one_host:
        field = "one_host"
    if field:
        raise InvalidRequest(
            f"request id {lease.request_id} already names a group request for {lease.count} of {before} "
            f"(holder {lease.holder}{', one host' if lease.one_host else ''}); this one asks another {field} "
            f"({ask.count} of {asked}{', one host' if one_host and ask.count > 1 else ''}): use a new request id",
            field,
        )


@dataclass(frozen=True)
class KeyView:
    """What the scheduler needs of one key: is it free with this group's entry at the head, since when."""

    key: str
    ready_for: str | None  # the group ref heading this free key's queue, else None
    free_since: float | None = None  # None: never granted (counts as free the longest)
    host: str | None = None  # the host its hardware hangs off (None: reachable from anywhere)


def open_to_new(state: ResourceState, queued: int) -> bool:
    """Could a new request take this key now: free, and nobody queued for it.

    A free key with a queue is kept for the group whose entry heads it (a book
    grants a single-key head at once): idle, but no new request of the group's
    priority or lower can have it, so a pool's free count leaves it out.
    """
    return state is ResourceState.FREE and queued == 0


def gating_place(places: Sequence[int], count: int) -> int | None:
    """A waiting group's place in line: the one that gates its grant, from its entries' places.

    The group needs ``count`` keys at once, so it is granted when its ``count``-th best
    place comes to the head: the k-th smallest of its places (all of a set's keys: the
    worst of them; any one of a pool: the best). None when it is queued nowhere; with
    fewer entries than ``count`` (some being queued again), the worst of those it has.
    """
    if not places:
        return None
    ordered = sorted(places)
    return ordered[min(count, len(ordered)) - 1]


def _longest_free(view: KeyView) -> tuple[bool, float, str]:
    return (view.free_since is not None, view.free_since or 0.0, view.key)


def choose_members(
    group: str, count: int, views: Sequence[KeyView], *, one_host: bool = False
) -> tuple[str, ...] | None:
    """The ``count`` keys to take for ``group`` now, or None if fewer are ready for it.

    Ready keys are taken longest-free first (never-granted keys first), then by key,
    so a pool's wear spreads and the choice is deterministic. ``one_host``: the keys
    of one host (plus keys bound to none); of the hosts that can offer ``count`` ready
    keys, the one whose pick is free the longest.
    """
    ready = sorted((view for view in views if view.ready_for == group), key=_longest_free)
    if len(ready) < count:
        return None
    if not one_host:
        return tuple(view.key for view in ready[:count])
    picks = []
    for host in {view.host for view in ready}:
        usable = [view for view in ready if view.host in (host, None)]
        if len(usable) >= count:
            picks.append(usable[:count])
    if not picks:
        return None
    best = min(picks, key=lambda pick: [_longest_free(view) for view in pick])
    return tuple(view.key for view in best)


class GroupRecord(BaseModel):
    """What the coordinator keeps of a group request (``groups/<ref>.json``): the lease and its entries.

    ``entries`` maps each key the group may use to the lease id of its entry
    there (queued, or granted once the group holds the key). The record is
    written after the keys change, so a crash between them is found on restart
    by asking the keys (see :class:`broker.actors.groups.GroupManager`).
    """

    model_config = ConfigDict(frozen=True)

    lease: GroupLease
    entries: dict[str, str] = Field(default_factory=dict)
    # Mixed into its entries' request ids (the group's ref; "" in records written before ended groups
    # were forgotten): a later group reusing the request id never meets this one's entry on a key.
    entry_salt: str = ""

    @property
    def ref(self) -> str:
        return self.lease.ref

    def entry_id(self, key: str) -> str:
        """The request id of this group's entry on ``key``."""
        return entry_request_id(self.lease.request_id, key, self.entry_salt)


def entry_request_id(group_request_id: str, key: str, salt: str = "") -> str:
    """The request id of a group's entry on ``key``: fixed, so enqueueing it again is a retry.

    ``salt`` (:attr:`GroupRecord.entry_salt`) makes it the group's own: a key's book remembers an
    ended entry for its retention, so a later group with the same request id must not ask for it."""
    text = f"{group_request_id}\0{key}" + (f"\0{salt}" if salt else "")
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return f"group.{digest}"


def past_retention(lease: GroupLease, now: float, retention_s: float) -> bool:
    """Has this group ended more than ``retention_s`` ago? Then it is forgotten, record and all, as a
    book forgets its ended leases: a retry of its request id past that asks anew. Active groups never are."""
    return not lease.active and lease.ended_at is not None and lease.ended_at < now - retention_s


def group_order(lease: GroupLease) -> tuple[int, int]:
    """The order the coordinator considers waiting groups in: the books' own (priority, then arrival)."""
    return (-lease.priority, lease.seq)
