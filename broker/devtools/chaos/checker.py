"""After a chaos run: do the records, the journal and what clients were told keep every promise? Pure.

Inputs are plain data: lease records (dicts as written to
``resources/leases/``), journal records (``events.jsonl``) and the clients'
own logs of what each call answered. Each check returns violations, one
line each, naming the key and the leases involved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClientOp", "Report", "check"]

_END = float("inf")
_EPSILON_S = 1e-6


@dataclass(frozen=True)
class ClientOp:
    """One call as a client saw it: when it asked, when it heard back, what it heard."""

    client: str
    op: str  # reserve | renew | release | withdraw
    key: str
    request_id: str | None
    started: float
    finished: float
    outcome: str  # granted | queued | busy | timeout | cancelled | released | renewed | lost | unavailable | error
    lease_id: str | None = None
    fencing_token: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientOp:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


@dataclass
class Report:
    operations: int = 0
    leases: int = 0
    grants: int = 0
    events: int = 0
    violations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "operations": self.operations,
            "leases": self.leases,
            "grants": self.grants,
            "events": self.events,
            "violations": self.violations,
        }


def check(leases: Iterable[dict[str, Any]], journal: Iterable[dict[str, Any]], ops: Iterable[ClientOp]) -> Report:
    leases = list(leases)
    journal = list(journal)
    ops = list(ops)
    report = Report(operations=len(ops), leases=len(leases), events=len(journal))
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for lease in leases:
        by_key[lease["resource"]].append(lease)
    for key, records in sorted(by_key.items()):
        granted = sorted((r for r in records if r.get("granted_at") is not None), key=lambda r: r["granted_at"])
        report.grants += len(granted)
        report.violations += _one_holder_at_a_time(key, granted)
        report.violations += _tokens_increase(key, granted)
        report.violations += _nothing_left_queued(key, records)
    report.violations += _one_lease_per_request(leases)
    report.violations += _clients_were_told_the_truth(leases, ops)
    report.violations += _journal_in_order(journal)
    return report


def _end(lease: dict[str, Any]) -> float:
    return lease["ended_at"] if lease.get("ended_at") is not None else _END


def _one_holder_at_a_time(key: str, granted: list[dict[str, Any]]) -> list[str]:
    out = []
    for before, after in zip(granted, granted[1:]):
        if after["granted_at"] + _EPSILON_S < _end(before):
            out.append(
                f"{key}: two holders at once: {before['lease_id']} (token {before['fencing_token']}, until "
                f"{_end(before)}) and {after['lease_id']} (token {after['fencing_token']}, from {after['granted_at']})"
            )
    return out


def _tokens_increase(key: str, granted: list[dict[str, Any]]) -> list[str]:
    out = []
    seen: dict[int, str] = {}
    last = 0
    for lease in granted:
        token = lease.get("fencing_token")
        if token is None:
            out.append(f"{key}: granted lease {lease['lease_id']} has no fencing token")
            continue
        if token in seen:
            out.append(f"{key}: fencing token {token} reused by {seen[token]} and {lease['lease_id']}")
        if token <= last:
            out.append(f"{key}: fencing token went from {last} to {token} at {lease['lease_id']}")
        seen[token] = lease["lease_id"]
        last = max(last, token)
    return out


def _nothing_left_queued(key: str, records: list[dict[str, Any]]) -> list[str]:
    """After the clients have left, every request ended: granted and over, cancelled, timed out."""
    return [
        f"{key}: request {lease['lease_id']} of {lease['holder']} was left {lease['state']}"
        for lease in records
        if lease["state"] in ("queued",)
    ]


def _one_lease_per_request(leases: list[dict[str, Any]]) -> list[str]:
    made: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for lease in leases:
        made[(lease["resource"], lease["holder"], lease["request_id"])].append(lease["lease_id"])
    return [
        f"{key}: request {request_id} of {holder} produced {len(ids)} leases: {', '.join(sorted(ids))}"
        for (key, holder, request_id), ids in made.items()
        if len(ids) > 1
    ]


def _clients_were_told_the_truth(leases: list[dict[str, Any]], ops: list[ClientOp]) -> list[str]:
    """Every "you hold it" a client heard matches a record granted at some moment of that call."""
    by_id = {lease["lease_id"]: lease for lease in leases}
    known_requests = {(lease["holder"], lease["request_id"]) for lease in leases}
    out = []
    for op in ops:
        if op.outcome == "granted":
            lease = by_id.get(op.lease_id or "")
            if lease is None:
                out.append(f"{op.key}: {op.client} was granted {op.lease_id}, which no record has")
                continue
            granted_at = lease.get("granted_at")
            if granted_at is None or granted_at > op.finished + _EPSILON_S or _end(lease) + _EPSILON_S < op.started:
                out.append(
                    f"{op.key}: {op.client} was told it holds {op.lease_id} during [{op.started}, {op.finished}] "
                    f"but the record says granted [{granted_at}, {_end(lease)}]"
                )
            if lease.get("fencing_token") != op.fencing_token:
                out.append(
                    f"{op.key}: {op.client} got token {op.fencing_token} for {op.lease_id}, record has {lease.get('fencing_token')}"
                )
        if op.outcome in ("granted", "queued", "timeout", "cancelled") and op.op == "reserve" and op.request_id:
            holder = op.client
            if (holder, op.request_id) not in known_requests:
                out.append(f"{op.key}: {op.client}'s acknowledged request {op.request_id} has no record (lost)")
    return out


def _journal_in_order(journal: list[dict[str, Any]]) -> list[str]:
    out = []
    last = 0
    seen: set[int] = set()
    for record in journal:
        seq = record.get("seq")
        if not isinstance(seq, int):
            out.append(f"journal: a record without a sequence number: {str(record)[:120]}")
            continue
        if seq in seen:
            out.append(f"journal: sequence number {seq} appears twice")
        elif seq <= last:
            out.append(f"journal: sequence number {seq} after {last}")
        seen.add(seq)
        last = max(last, seq)
    return out
