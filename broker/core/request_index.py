"""Which resource key each ``(holder, request_id)`` names, across keys. Pure.

A lease book answers a repeated ``(holder, request_id)`` with the same lease,
but each key has its own book: a CI retry that lands on another key would
take a second board. The coordinator keeps this index so the same request id
on another key is refused instead.

Rules:

* :meth:`RequestIndex.claim` binds a request id to a key, or raises
  ``InvalidRequest`` naming the key it already names; claiming it again for
  the same key is a retry and is allowed.
* :meth:`RequestIndex.forget` unbinds it when the call created nothing (the key
  was busy, the request was invalid), so the id may be used elsewhere.
* A group request (``reserve_group``) claims its id too, bound to
  :data:`GROUP_REQUEST` instead of a key: one request id names one request,
  a single key's or a group's, never both.
* Entries live as long as the books keep ended leases for retries
  (``retention_s``, the catalog's ``retention``): past that, the same key too
  answers a reused request id with a new lease.

The index is derived, never the authority: the coordinator rebuilds it at
start from the lease records on disk (:meth:`RequestIndex.learn`).
"""

from __future__ import annotations

from collections import OrderedDict

from broker.errors import InvalidRequest

__all__ = ["RequestIndex", "GROUP_REQUEST"]

# What a group request's id is bound to: no resource key can be spelled so (keys are lower-case names).
GROUP_REQUEST = "<group>"


class RequestIndex:
    """``(holder, request_id) -> key``, oldest first, forgotten after ``retention_s``."""

    def __init__(self, retention_s: float = 24 * 3600.0):
        self.retention_s = retention_s
        self._keys: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def key_of(self, holder: str, request_id: str) -> str | None:
        entry = self._keys.get((holder, request_id))
        return entry[0] if entry is not None else None

    def claim(self, holder: str, request_id: str, key: str, now: float) -> None:
        """Bind ``request_id`` to ``key`` for ``holder``; refuse if it names a lease on another key."""
        self._evict(now)
        bound = self.key_of(holder, request_id)
        if bound is not None and bound != key:
            named = "a group request" if bound == GROUP_REQUEST else f"a lease on {bound}"
            wanted = "a group request" if key == GROUP_REQUEST else key
            raise InvalidRequest(
                f"request id {request_id} already names {named} (holder {holder}); use a new request id for {wanted}",
                "request_id",
            )
        self._keys[(holder, request_id)] = (key, now)
        self._keys.move_to_end((holder, request_id))

    def forget(self, holder: str, request_id: str, key: str) -> None:
        """Unbind, if still bound to ``key``: the call that claimed it created no lease."""
        if self.key_of(holder, request_id) == key:
            del self._keys[(holder, request_id)]

    def learn(self, holder: str, request_id: str, key: str, at: float) -> None:
        """Record a binding found on disk, ``at`` its last activity (records arrive in any order)."""
        current = self._keys.get((holder, request_id))
        if current is None or current[1] < at:
            self._keys[(holder, request_id)] = (key, at)

    def settle(self, now: float) -> None:
        """After :meth:`learn` calls: order by activity and drop what is past retention."""
        self._keys = OrderedDict(sorted(self._keys.items(), key=lambda item: item[1][1]))
        self._evict(now)

    def _evict(self, now: float) -> None:
        horizon = now - self.retention_s
        while self._keys:
            request, (_, at) = next(iter(self._keys.items()))
            if at >= horizon:
                break
            del self._keys[request]
