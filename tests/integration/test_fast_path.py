"""The shim's fast path: single-key lease calls go straight to resource:<key>, with the coordinator's
retries, idempotency and errors."""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid

import pytest
import ray

from broker.errors import BrokerError
from broker.models import LeaseState
from tests.integration.conftest import TEST_CATALOG
from tests.waiting import until

pytestmark = pytest.mark.ray

KEY = "firesim_u250"


def _records(broker_env, request_id: str) -> list[dict]:
    """Every lease record on disk that answers ``request_id``."""
    leases = broker_env.state.root / "resources" / "leases"
    found = [json.loads(path.read_text()) for path in leases.glob("*.json")]
    return [record for record in found if record.get("request_id") == request_id]


def test_lease_calls_reach_their_key_while_the_coordinator_is_gone(broker_env):
    client = broker_env.client
    ray.kill(ray.get_actor("broker", namespace=broker_env.namespace), no_restart=True)
    # With a request id the shim made (random: it names no other key), reserve goes straight to the key.
    lease = client.reserve(KEY, "alice", ttl_s=60)
    assert lease.state is LeaseState.GRANTED
    assert client.get_lease(lease.lease_id).state is LeaseState.GRANTED
    assert client.renew(lease.lease_id, 120).expires_at > lease.expires_at
    assert client.check_fence(lease.lease_id, lease.fencing_token).lease_id == lease.lease_id
    assert client.release(lease.lease_id).state is LeaseState.RELEASED


def test_a_request_id_retried_after_kill_9_of_its_key_returns_the_same_lease(broker_env):
    client = broker_env.client
    request_id = uuid.uuid4().hex
    first = client.reserve(KEY, "alice", ttl_s=60, request_id=request_id)
    os.kill(broker_env.actor_pid(f"resource:{KEY}"), signal.SIGKILL)
    again = client.reserve(KEY, "alice", ttl_s=60, request_id=request_id)  # the cached handle's actor died
    assert (again.lease_id, again.fencing_token, again.state) == (first.lease_id, first.fencing_token, first.state)
    assert len(_records(broker_env, request_id)) == 1
    client.release(first.lease_id)


def test_a_waiter_in_flight_through_a_kill_9_is_queued_once_and_granted(broker_env):
    client = broker_env.client
    alice = client.reserve(KEY, "alice", ttl_s=60)
    request_id = uuid.uuid4().hex
    got: dict[str, object] = {}

    def wait() -> None:
        try:
            got["lease"] = client.reserve(KEY, "bob", wait=True, timeout_s=120, request_id=request_id)
        except BrokerError as err:
            got["error"] = err

    waiter = threading.Thread(target=wait)
    waiter.start()
    until(lambda: client.queue_position(KEY, "bob", request_id) == 1, "bob queued")
    os.kill(broker_env.actor_pid(f"resource:{KEY}"), signal.SIGKILL)
    # The restarted actor has bob's request from disk; the shim's retry finds it, not a second one.
    until(lambda: client.queue_position(KEY, "bob", request_id) == 1, "bob queued after the restart")
    client.release(alice.lease_id)
    waiter.join(timeout=120)
    assert "error" not in got, got
    bob = got["lease"]
    assert bob.state is LeaseState.GRANTED and bob.fencing_token == alice.fencing_token + 1
    assert [record["lease_id"] for record in _records(broker_env, request_id)] == [bob.lease_id]
    assert not client.resources()[0].queue
    client.release(bob.lease_id)


def test_the_fast_path_raises_what_the_coordinator_raises(broker_env):
    client = broker_env.client
    broker = ray.get_actor("broker", namespace=broker_env.namespace)
    alice = client.reserve(KEY, "alice", ttl_s=60)
    unknown_lease = f"{KEY}.{'0' * 32}"
    cases = {
        "unknown key": ("reserve", ("no_such_board", "bob"), {"request_id": "r-1"}),
        "not a key": ("reserve", ("Not A Key!", "bob"), {"request_id": "r-1"}),
        "bad ttl": ("reserve", (KEY, "bob"), {"ttl_s": -1, "request_id": "r-1"}),
        "busy": ("reserve", (KEY, "bob"), {"request_id": "r-1"}),
        "lease of no catalog key": ("release", (f"no_such_board.{'0' * 32}",), {}),
        "not a lease id": ("release", ("garbage",), {}),
        "unknown lease": ("renew", (unknown_lease, 60), {}),
        "unknown lease read": ("lease", (unknown_lease,), {}),
        "stale token": ("check_fence", (alice.lease_id, alice.fencing_token + 1), {}),
        "bad token": ("check_fence", (alice.lease_id, "one"), {}),
    }
    direct_reserves = {  # the shim's own reserve (no caller request id) takes the fast path
        "unknown key, direct": ("reserve", ("no_such_board", "bob"), {}),
        "bad ttl, direct": ("reserve", (KEY, "bob"), {"ttl_s": -1}),
        "bad holder, direct": ("reserve", (KEY, ""), {}),
        "busy, direct": ("reserve", (KEY, "bob"), {}),
    }
    for case, (method, args, kwargs) in {**cases, **direct_reserves}.items():
        with pytest.raises(BrokerError) as via_shim:
            if case.endswith(", direct"):
                client.reserve(*args, **kwargs)
            else:
                client.call(method, *args, **kwargs)
        with pytest.raises(BrokerError) as via_broker:
            ray.get(getattr(broker, method).remote(*args, **kwargs))
        expected = via_broker.value.cause  # Ray wraps it: RayTaskError(UnknownResource) is both
        assert type(via_shim.value) is type(expected), case
        assert str(via_shim.value) == str(expected), case
    client.release(alice.lease_id)


def test_a_key_dropped_from_the_catalog_is_unknown_to_a_client_that_used_it(broker_env):
    from broker.actors.deploy import broker_up
    from broker.errors import UnknownResource

    client = broker_env.client
    dropped = "radiance_sim_lane_a"
    client.release(client.reserve(dropped, "alice").lease_id)  # cached handle
    smaller = {**TEST_CATALOG, "resources": {k: v for k, v in TEST_CATALOG["resources"].items() if k != dropped}}
    broker_up(
        broker_env.state, broker_env.namespace, smaller, metrics_port=0, replace=True
    )  # dropping keys is explicit
    with pytest.raises(UnknownResource):
        client.reserve(dropped, "alice")
    with pytest.raises(UnknownResource):
        client.queue_position(dropped, "alice", "r-1")
