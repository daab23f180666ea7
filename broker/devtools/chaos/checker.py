"""After a chaos run: do the records, the journal and what clients were told keep every promise? Pure.

Inputs are plain data: lease records (dicts as written to
``resources/leases/``), group records (``groups/<ref>.json``), journal records
(``events.jsonl``) and the clients' own logs of what each call answered. Each
check returns violations, one line each, naming the key and the leases involved.

Group leases: a group's keys are ordinary leases on their keys (``group`` names
the group's ref), so "one holder per key" covers single and group leases alike.
On top of it: a granted group's members are exactly the key leases that hold
for it, all held at one moment (granted together), granted no later than the
group says; when it ends, every member ends within ``group_end_bound_s`` (no
group left with some keys ended and others held); the journal's per-key grants
name the same group as the records; and a key lease held for a group that never
got it is a violation — except a take the coordinator gave back (ended
:attr:`EndReason.GROUP_GRANT_ABORTED`, its entry requeued under the same
request id: nobody was told of it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from broker.models import EndReason, lease_ref

__all__ = ["ClientOp", "ClientDeath", "Report", "check", "GROUP_END_BOUND_S"]

_END = float("inf")
_EPSILON_S = 1e-6
# How long a group's other keys may stay held after one of them ended: the coordinator ends the rest
# when the key's actor tells it, or (if it was down) on its restart; its keys' TTLs bound it anyway.
GROUP_END_BOUND_S = 30.0
_ABORTED = EndReason.GROUP_GRANT_ABORTED.value


@dataclass(frozen=True)
class ClientOp:
    """One call as a client saw it: when it asked, when it heard back, what it heard."""

    client: str
    op: str  # reserve | reserve_group | renew | release | withdraw
    key: str  # for a group request: its selector, or its keys joined by ","
    request_id: str | None
    started: float
    finished: float
    outcome: str  # granted | queued | busy | timeout | cancelled | released | renewed | lost | unavailable | error
    lease_id: str | None = None
    fencing_token: int | None = None
    members: dict[str, int] | None = None  # a granted group: each key it got, with its fencing token

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientOp:
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClientDeath:
    """A client process the runner SIGKILLed, and when."""

    client: str
    at: float


@dataclass
class Report:
    operations: int = 0
    leases: int = 0
    grants: int = 0
    events: int = 0
    groups: int = 0
    group_grants: int = 0
    violations: list[str] = field(default_factory=list)
    client_deaths: int = 0
    # the longest a dead client's request or lease outlived it (None: nothing was tied at a death):
    # the moment its key moved on (the next waiter is granted in the same step)
    slowest_let_go_s: float | None = None
    let_go_measured: int = 0  # how many tied requests and leases were active at their client's death

    def as_dict(self) -> dict[str, Any]:
        return {
            "operations": self.operations,
            "leases": self.leases,
            "grants": self.grants,
            "events": self.events,
            "groups": self.groups,
            "group_grants": self.group_grants,
            "violations": self.violations,
            "client_deaths": self.client_deaths,
            "slowest_let_go_s": None if self.slowest_let_go_s is None else round(self.slowest_let_go_s, 3),
            "let_go_measured": self.let_go_measured,
        }


def check(
    leases: Iterable[dict[str, Any]],
    journal: Iterable[dict[str, Any]],
    ops: Iterable[ClientOp],
    groups: Iterable[dict[str, Any]] = (),
    *,
    deaths: Iterable[ClientDeath] = (),
    bound_s: float = 5.0,
    group_end_bound_s: float = GROUP_END_BOUND_S,
) -> Report:
    """Every violation of the promises in ``leases``, ``journal``, ``ops``, ``groups`` and the clients'
    ``deaths`` (see the module)."""
    leases = list(leases)
    journal = list(journal)
    ops = list(ops)
    deaths = list(deaths)
    group_leases = [record["lease"] for record in groups]
    report = Report(
        operations=len(ops),
        leases=len(leases),
        events=len(journal),
        groups=len(group_leases),
        client_deaths=len(deaths),
    )
    report.group_grants = sum(1 for group in group_leases if group.get("granted_at") is not None)
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
    violations, outlived = _dead_clients_let_go(leases, deaths, bound_s)
    report.let_go_measured, report.slowest_let_go_s = len(outlived), max(outlived, default=None)
    report.violations += violations
    report.violations += _groups_hold_together(leases, group_leases, group_end_bound_s)
    report.violations += _journal_names_the_groups(leases, journal, group_leases)
    report.violations += _groups_were_told_the_truth(group_leases, ops)
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
        if lease.get("end_reason") == _ABORTED:
            continue  # a take given back: its entry was requeued under the same request id
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
        if op.op == "reserve_group":
            continue  # group requests: _groups_were_told_the_truth
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


def _dead_clients_let_go(
    leases: list[dict[str, Any]], deaths: list[ClientDeath], bound_s: float
) -> tuple[list[str], list[float]]:
    """No key stays blocked by a dead client: what was tied to its session at its death ended
    within ``bound_s`` of it. Returns the violations and how long each such request or lease outlived its client."""
    out: list[str] = []
    outlived_all: list[float] = []
    for death in deaths:
        for lease in leases:
            if lease["holder"] != death.client or lease.get("session_tie", "none") == "none":
                continue
            if lease["queued_at"] > death.at or _end(lease) <= death.at:
                continue  # not yet asked for, or over, when the client died
            outlived = _end(lease) - death.at
            outlived_all.append(outlived)
            if outlived > bound_s:
                what = "lease" if lease.get("granted_at") is not None else "request"
                late = "is still active" if _end(lease) == _END else f"ended {outlived:.2f}s after it"
                out.append(
                    f"{lease['resource']}: {death.client} died at {death.at} but its {lease['state']} {what} "
                    f"{lease['lease_id']} {late} (bound {bound_s:g}s)"
                )
    return out, outlived_all


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


def _groups_hold_together(leases: list[dict[str, Any]], groups: list[dict[str, Any]], end_bound_s: float) -> list[str]:
    """A granted group's members are key leases held for it, all at one moment; they end together."""
    by_token = {(lease["resource"], lease.get("fencing_token")): lease for lease in leases if lease.get("granted_at")}
    out: list[str] = []
    claimed: set[tuple[str, int]] = set()
    # The last moment the records know of: a key still held is judged against it, not against forever.
    horizon = max((t for lease in leases for t in (lease.get("granted_at"), lease.get("ended_at")) if t), default=0.0)
    refs = {lease_ref(group["lease_id"]) for group in groups}
    for group in groups:
        ref = lease_ref(group["lease_id"])
        if group["state"] == "queued":  # after the clients left, every wait ended (granted, timed out)
            out.append(f"group {ref} of {group['holder']} was left queued")
        if group.get("granted_at") is None:
            if group.get("members"):
                out.append(f"group {ref} names members but was never granted")
            continue
        members = group.get("members") or []
        keys = [member["key"] for member in members]
        if len(keys) != group["count"] or len(set(keys)) != len(keys) or not set(keys) <= set(group["candidates"]):
            out.append(f"group {ref}: granted keys {keys} for count {group['count']} of {group['candidates']}")
        held = []
        for member in members:
            key, token = member["key"], member.get("fencing_token")
            claimed.add((key, token))
            lease = by_token.get((key, token))
            if lease is None or lease.get("group") != ref or lease.get("end_reason") == _ABORTED:
                out.append(f"group {ref}: no lease on {key} with token {token} was held for it")
                continue
            held.append(lease)
            if lease["granted_at"] > group["granted_at"] + _EPSILON_S:
                out.append(
                    f"group {ref}: {key} was granted at {lease['granted_at']}, after the group ({group['granted_at']})"
                )
        if len(held) < len(members):
            continue
        starts, ends = [lease["granted_at"] for lease in held], [_end(lease) for lease in held]
        if max(starts) > min(ends) + _EPSILON_S:
            out.append(f"group {ref}: its keys were never all held at once (granted {starts}, ended {ends})")
        if min(ends) != _END and min(max(ends), horizon) - min(ends) > end_bound_s:
            still = "still held" if max(ends) == _END else f"{max(ends) - min(ends):.1f}s later"
            out.append(f"group {ref}: a key ended at {min(ends)} and another was {still} (bound {end_bound_s:g}s)")
    for lease in leases:
        tagged = lease.get("group")
        if tagged is None or lease.get("granted_at") is None or lease.get("end_reason") == _ABORTED:
            continue
        if (lease["resource"], lease.get("fencing_token")) not in claimed:
            known = "" if tagged in refs else " (no record of that group)"
            out.append(
                f"{lease['resource']}: {lease['lease_id']} (token {lease.get('fencing_token')}) was held for "
                f"group {tagged}, which never got it{known}"
            )
    return out


def _journal_names_the_groups(
    leases: list[dict[str, Any]], journal: list[dict[str, Any]], groups: list[dict[str, Any]]
) -> list[str]:
    """The journal's key grants name the group the records name; ``group.granted`` matches the record."""
    group_of = {
        (lease["resource"], lease.get("fencing_token")): lease.get("group")
        for lease in leases
        if lease.get("granted_at")
    }
    members = {lease_ref(group["lease_id"]): group for group in groups}
    out: list[str] = []
    for event in journal:
        name = event.get("event")
        if name == "lease.granted" and (event.get("resource"), event.get("fencing_token")) in group_of:
            recorded = group_of[(event["resource"], event["fencing_token"])]
            if event.get("group") != recorded:
                out.append(
                    f"{event['resource']}: journal grant of token {event['fencing_token']} names group "
                    f"{event.get('group')}, its record {recorded}"
                )
        elif name == "group.granted":
            group = members.get(event.get("group", ""))
            if group is None or group.get("granted_at") is None:
                out.append(f"journal: group {event.get('group')} granted, but its record was never granted")
                continue
            told = dict(zip(event.get("keys") or [], event.get("fencing_tokens") or []))
            recorded_tokens = {member["key"]: member.get("fencing_token") for member in group.get("members") or []}
            if told != recorded_tokens:
                out.append(f"journal: group {event['group']} granted {told}, its record says {recorded_tokens}")
    return out


def _groups_were_told_the_truth(groups: list[dict[str, Any]], ops: list[ClientOp]) -> list[str]:
    """Every group a client was granted was granted during that call, with those keys and tokens."""
    by_id = {group["lease_id"]: group for group in groups}
    known = {(group["holder"], group["request_id"]) for group in groups}
    out: list[str] = []
    for op in ops:
        if op.op != "reserve_group":
            continue
        if op.outcome == "granted":
            group = by_id.get(op.lease_id or "")
            if group is None:
                out.append(f"{op.key}: {op.client} was granted group {op.lease_id}, which no record has")
                continue
            granted_at = group.get("granted_at")
            if granted_at is None or granted_at > op.finished + _EPSILON_S or _end(group) + _EPSILON_S < op.started:
                out.append(
                    f"{op.key}: {op.client} was told it holds group {lease_ref(group['lease_id'])} during "
                    f"[{op.started}, {op.finished}] but the record says granted [{granted_at}, {_end(group)}]"
                )
            recorded = {member["key"]: member.get("fencing_token") for member in group.get("members") or []}
            if op.members != recorded:
                out.append(f"{op.key}: {op.client} was told keys {op.members}, the record says {recorded}")
        if op.outcome in ("granted", "timeout") and op.request_id and (op.client, op.request_id) not in known:
            out.append(f"{op.key}: {op.client}'s acknowledged group request {op.request_id} has no record (lost)")
    return out
