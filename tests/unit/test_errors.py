"""Errors survive pickling (Ray's trip back to the caller) with their type and fields."""

from __future__ import annotations

import json
import pickle

import pytest

import broker.errors as errors
from broker.errors import (
    EXIT_CODES,
    BrokerError,
    BrokerUnavailable,
    InvalidRequest,
    LeaseNotFound,
    LeaseNotHeld,
    NotAuthorized,
    ResourceBusy,
    StaleFencingToken,
    UnknownResource,
    WaitTimeout,
)

SAMPLES = [
    InvalidRequest("invalid ttl_s=-1: must be > 0", "ttl_s"),
    UnknownResource("nope", ("a", "b")),
    ResourceBusy("firesim_u250", "alice", 1_800_000_000.0, 2, None),
    ResourceBusy("firesim_u250", None, None, 0, "fan swap"),
    LeaseNotFound("firesim_u250." + "0" * 32),
    LeaseNotHeld("firesim_u250." + "0" * 32, "expired", "ttl elapsed"),
    StaleFencingToken("firesim_u250", 3, 4),
    WaitTimeout("firesim_u250", 30.0, "firesim_u250." + "1" * 32),
    BrokerUnavailable("no broker runs in namespace 'merlin'", "run `merlin broker up`"),
    NotAuthorized("revoke firesim_u250", "mallory"),
]


def test_the_contract_names_exist_and_share_one_root():
    names = ["BrokerError", "InvalidRequest", "UnknownResource", "ResourceBusy", "LeaseNotFound",
             "LeaseNotHeld", "StaleFencingToken", "WaitTimeout", "BrokerUnavailable"]  # fmt: skip
    for name in names:
        cls = getattr(errors, name)
        assert issubclass(cls, BrokerError)
    # the contract's names, plus NotAuthorized (admin secret, issue 5)
    # plus the surfaces and their hints, the JSON form of an error (issue 14), and how runs end
    # plus the HTTP API's: a missing token, and errors rebuilt from their JSON (issue 12)
    extra = ["NotAuthorized", "EXIT_CODES", "Surface", "Hint", "HINTS", "error_json", "RunEnd", "RUN_EXIT_CODES",
             "NotAuthenticated", "ERROR_TYPES", "error_from_json"]  # fmt: skip
    extra += ["SIGNAL_EXIT_CODES"]  # how a signal stops a command (issue 13)
    assert sorted(errors.__all__) == sorted(names + extra)


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_round_trips_through_pickle(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_exit_codes_are_distinct_and_documented():
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes) == 9
    assert all(code not in (0, 1, 2) for code in codes)


def test_messages_name_the_bad_value():
    assert "'nope'" in str(UnknownResource("nope", ("a",)))
    assert "alice" in str(ResourceBusy("k", "alice", None, 0, None))
    assert "maintenance: fan swap" in str(ResourceBusy("k", None, None, 0, "fan swap"))
    assert "4" in str(StaleFencingToken("k", 3, 4))


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_comes_back_from_its_json_as_the_same_error(error):
    from broker.errors import error_from_json

    again = error_from_json(json.loads(json.dumps(errors.error_json(error))))
    assert type(again) is type(error) and again.fields() == error.fields()
