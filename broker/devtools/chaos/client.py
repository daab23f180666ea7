"""A chaos client process: ``python -m broker.devtools.chaos.client '<json spec>'``.

Does random reserve / wait / renew / release / withdraw through the shim
(``BrokerClient``: retries reuse one ``request_id``, never Ray's blind
replays), and writes every answer it got to a JSON-lines log for the checker.
Beside single keys it asks for group leases: any one key of the pool's
selector, any two of it, or two named keys together; a group lease is renewed
and released by its one lease id like a single key's.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import threading
import time
import uuid
from typing import Any

from broker.errors import BrokerError, BrokerUnavailable, LeaseNotFound, LeaseNotHeld, ResourceBusy, WaitTimeout


def main(raw: str) -> None:
    from broker.client import BrokerClient
    from broker.disk.store import StateDir
    from broker.seam.cluster import connect_ray

    spec = json.loads(raw)
    connect_ray(StateDir.from_env(spec["state_dir"]), namespace=spec["namespace"])
    client = BrokerClient(spec["namespace"], retry_s=60.0)
    name = spec["name"]
    rng = random.Random(spec["seed"])
    keys = spec["keys"]
    selector = spec.get("selector")  # every key matches it; None: no group requests
    log = open(spec["log"], "a", buffering=1, encoding="utf-8")
    held: dict[str, Any] = {}  # lease_id -> Lease
    counts = {"ops": 0}

    def record(op: str, key: str, request_id: str | None, started: float, outcome: str, lease: Any = None) -> None:
        counts["ops"] += 1
        members = getattr(lease, "members", None)
        entry = {
            "client": name,
            "op": op,
            "key": key,
            "request_id": request_id,
            "started": started,
            "finished": time.time(),
            "outcome": outcome,
            "lease_id": getattr(lease, "lease_id", None),
            "fencing_token": getattr(lease, "fencing_token", None),
            "members": {m.key: m.fencing_token for m in members} if op == "reserve_group" and members else None,
        }
        log.write(json.dumps(entry) + "\n")

    def reserve(wait: bool) -> None:
        key = rng.choice(keys)
        request_id = uuid.uuid4().hex
        started = time.time()
        try:
            lease = client.reserve(
                key, name, ttl_s=rng.choice([1.0, 2.0, 4.0]), wait=wait,
                timeout_s=rng.uniform(0.2, 3.0) if wait else None, request_id=request_id,
            )  # fmt: skip
        except ResourceBusy:
            record("reserve", key, request_id, started, "busy")
            return
        except WaitTimeout:
            record("reserve", key, request_id, started, "timeout")
            return
        except BrokerUnavailable:
            record("reserve", key, request_id, started, "unavailable")
            return
        record("reserve", key, request_id, started, "granted", lease)
        held[lease.lease_id] = lease

    def reserve_group(wait: bool) -> None:
        """Any one of the pool, any two of it, or two named keys together."""
        # A group waiting for every key holds back each key's later requests (no backfill): mostly any-of.
        form = rng.choice(["any", "any", "two", "set"] if len(keys) >= 2 else ["any"])
        ask: dict[str, Any] = {"labels": selector}
        if form == "two":
            ask["count"] = 2
        elif form == "set":
            ask = {"keys": sorted(rng.sample(keys, 2))}
        shown = ",".join(ask["keys"]) if "keys" in ask else f"{selector} x{ask.get('count', 1)}"
        request_id = uuid.uuid4().hex
        started = time.time()
        try:
            lease = client.reserve_group(
                name, ttl_s=rng.choice([1.0, 2.0, 4.0]), wait=wait,
                timeout_s=rng.uniform(0.3, 2.0) if wait else None, request_id=request_id, **ask,
            )  # fmt: skip
        except ResourceBusy:
            record("reserve_group", shown, request_id, started, "busy")
            return
        except WaitTimeout:
            record("reserve_group", shown, request_id, started, "timeout")
            return
        except LeaseNotHeld:  # ended without a grant (a retry after a kill found it cancelled)
            record("reserve_group", shown, request_id, started, "cancelled")
            return
        except BrokerUnavailable:
            record("reserve_group", shown, request_id, started, "unavailable")
            return
        record("reserve_group", shown, request_id, started, "granted", lease)
        held[lease.lease_id] = lease

    def withdraw_while_waiting() -> None:
        """Queue with a raw call, then take the request back: the cancel path."""
        key = rng.choice(keys)
        request_id = uuid.uuid4().hex
        started = time.time()
        outcome: dict[str, Any] = {}

        def wait_for_it() -> None:
            try:
                outcome["lease"] = client.reserve(
                    key, name, ttl_s=2.0, wait=True, timeout_s=10.0, request_id=request_id
                )
            except BrokerError as exc:
                outcome["error"] = exc

        waiter = threading.Thread(target=wait_for_it, daemon=True)
        waiter.start()
        time.sleep(rng.uniform(0.05, 0.5))
        with contextlib.suppress(BrokerError):  # too late, or the broker restarting: the wait tells
            client.call("withdraw", key, name, request_id)
        waiter.join(70)
        lease = outcome.get("lease")
        if lease is not None:
            record("reserve", key, request_id, started, "granted", lease)
            held[lease.lease_id] = lease
        elif isinstance(outcome.get("error"), LeaseNotHeld):
            record("reserve", key, request_id, started, "cancelled")
        elif isinstance(outcome.get("error"), WaitTimeout):
            record("reserve", key, request_id, started, "timeout")
        else:
            record("reserve", key, request_id, started, "unavailable")

    def renew_or_release(release: bool) -> None:
        if not held:
            return
        lease_id = rng.choice(sorted(held))
        key = _shown(held[lease_id])
        started = time.time()
        try:
            if release:
                client.release(lease_id)
                record("release", key, None, started, "released", held.pop(lease_id))
            else:
                held[lease_id] = client.renew(lease_id)
                record("renew", key, None, started, "renewed", held[lease_id])
        except (LeaseNotHeld, LeaseNotFound):
            record("release" if release else "renew", key, None, started, "lost", held.pop(lease_id))
        except BrokerUnavailable:
            record("release" if release else "renew", key, None, started, "unavailable")

    deadline = spec["deadline"]
    actions = [
        (lambda: reserve(False), 3),
        (lambda: reserve(True), 3),
        (lambda: renew_or_release(False), 2),
        (lambda: renew_or_release(True), 3),
        (withdraw_while_waiting, 1),
        (lambda: time.sleep(rng.uniform(0.0, 0.3)), 1),
    ]
    if selector:
        actions += [(lambda: reserve_group(False), 1), (lambda: reserve_group(True), 2)]
    choices, weights = zip(*actions)
    while time.time() < deadline:
        rng.choices(choices, weights)[0]()
    for lease_id in sorted(held):  # leave nothing held
        started = time.time()
        try:
            client.release(lease_id)
            record("release", _shown(held[lease_id]), None, started, "released", held[lease_id])
        except BrokerError:
            record("release", _shown(held[lease_id]), None, started, "lost", held[lease_id])
    log.close()
    print(json.dumps({"client": name, "ops": counts["ops"]}), flush=True)


def _shown(lease: Any) -> str:
    """A single lease's key, or a group lease's keys joined by ","."""
    return lease.resource if hasattr(lease, "resource") else ",".join(lease.keys)


if __name__ == "__main__":
    main(sys.argv[1])
