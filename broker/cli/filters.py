"""``resources list`` filters, pure: ``--state``, ``--labels k=v``, ``--holder``/``--mine``; and which
pools a filtered listing shows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from broker.errors import InvalidRequest

__all__ = ["ResourceFilter", "parse_labels", "pools_for"]


def parse_labels(values: Sequence[str] | None) -> dict[str, str]:
    """``["kind=fpga", "site=a,rack=2"]`` -> ``{"kind": "fpga", "site": "a", "rack": "2"}``.

    Raises:
        InvalidRequest: a part without ``=``, an empty name, or one name given two values.
    """
    labels: dict[str, str] = {}
    for value in values or ():
        for part in value.split(","):
            name, sep, wanted = part.partition("=")
            name, wanted = name.strip(), wanted.strip()
            if not sep or not name:
                raise InvalidRequest(f"invalid --labels {value!r}: expected name=value[,name=value]", "labels")
            if labels.get(name, wanted) != wanted:
                raise InvalidRequest(f"invalid --labels: {name} given twice ({labels[name]}, {wanted})", "labels")
            labels[name] = wanted
    return labels


class ResourceFilter:
    """Which resources a listing shows; every criterion given must hold.

    ``holders``: the resource is held by, or has a waiting request of, one of them. ``states`` are
    state names (a ``ResourceState`` is its name as a string); a status is a ``ResourceStatus`` or its
    HTTP answer. A plain class, not a dataclass: ``resources list`` on the HTTP API then never imports
    ``dataclasses`` (and ``inspect``, ~20 ms).
    """

    __slots__ = ("states", "labels", "holders")

    def __init__(
        self,
        *,
        states: frozenset[str] = frozenset(),
        labels: dict[str, str] | None = None,
        holders: frozenset[str] = frozenset(),
    ):
        self.states = states
        self.labels = dict(labels or {})
        self.holders = holders

    def matches(self, status: Any) -> bool:
        if self.states and status.state not in self.states:
            return False
        if any(status.labels.get(name) != value for name, value in self.labels.items()):
            return False
        if self.holders:
            involved = {status.holder} | {entry.holder for entry in status.queue}
            if not involved & self.holders:
                return False
        return True

    def apply(self, statuses: Iterable[Any]) -> list[Any]:
        return [status for status in statuses if self.matches(status)]


def pools_for(pools: Iterable[dict[str, Any]], shown_keys: Iterable[str], *, filtered: bool) -> list[dict[str, Any]]:
    """The pools a listing shows: every one without filters, else those with a member among the keys shown.

    A pool's figures (free/total, who waits) stay its own, over all its members: a filter chooses
    which pools are relevant, never what they count.
    """
    if not filtered:
        return list(pools)
    shown = set(shown_keys)
    return [pool for pool in pools if shown & set(pool.get("members", ()))]
