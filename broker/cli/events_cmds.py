"""``merlin ray events`` and ``merlin ray resources history``: the audit journal, read from disk."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from broker.cli.common import Context, duration_arg, emit_json, json_option, table, when
from broker.core.durations import format_duration
from broker.errors import InvalidRequest
from broker.http.answers import is_resource_key

__all__ = ["register_events", "register_history", "register_usage"]

# = the values of broker.core.accounting.UsageBy (a unit test keeps them equal): every `merlin ray
# resources` command registers `usage`, and importing accounting brings dataclasses and inspect.
USAGE_BY = ("holder", "resource")
_SHOWN = ("holder", "lease", "fencing_token", "priority", "reason", "by", "wait_s", "hold_s", "run_id", "status", "on")


def register_events(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    events = sub.add_parser(
        "events",
        parents=[common],
        help="the audit journal: every state change, in order",
        description="Read <state-dir>/events.jsonl. Works without a running cluster.",
    )
    events.add_argument("--resource", default=None, help="only this resource key")
    events.add_argument("--since", type=duration_arg("since"), default=None, help="only the last DURATION, e.g. 2h")
    events.add_argument("--event", default=None, help="only events starting with this, e.g. lease.")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    json_option(events)
    events.set_defaults(run=_events)


def register_history(resources: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    history = resources.add_parser(
        "history",
        parents=[common],
        help="how one resource was used: how often, by whom, for how long",
    )
    history.add_argument("resource", help="resource key, e.g. firesim_u250")
    history.add_argument("--since", type=duration_arg("since"), default=7 * 86400.0, help="window (default 7d)")
    json_option(history)
    history.set_defaults(run=_history)


def register_usage(resources: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    usage = resources.add_parser(
        "usage",
        parents=[common],
        help="totals per holder or per resource: hours held, leases, mean wait (like sacct)",
        description="Read <state-dir>/events.jsonl and total each holder's (or each resource's) leases over "
        "the window: hours held (clipped to the window), leases granted, mean wait, how they ended. "
        "Works without a running cluster.",
    )
    usage.add_argument("--since", type=duration_arg("since"), default=7 * 86400.0, help="window (default 7d)")
    usage.add_argument("--by", choices=list(USAGE_BY), default=USAGE_BY[0], help="group by (default holder)")
    usage.add_argument("--resource", default=None, help="only this resource key")
    json_option(usage)
    usage.set_defaults(run=_usage)


def _line(event: dict[str, Any]) -> str:
    fields = []
    for name in _SHOWN:
        if name in event and event[name] is not None:
            value = event[name]
            if name.endswith("_s") and isinstance(value, (int, float)):
                value = format_duration(float(value))
            fields.append(f"{name}={value}")
    target = event.get("resource") or event.get("source", "")
    return f"{when(event.get('ts'), relative=False)}  #{event.get('seq', '?'):<6} {event.get('event', '?'):<22} {target:<24} {' '.join(fields)}"


def _events(ctx: Context) -> int:
    # Imported here: the journal's reader brings structlog and the models (pydantic), and every
    # `merlin ray resources` command registers `history` and `usage` beside this module's readers.
    from broker.core.history import select_events
    from broker.disk.journal import read_journal

    args = ctx.args
    if args.resource is not None and not is_resource_key(args.resource):
        raise InvalidRequest(f"invalid --resource={args.resource!r}: not a resource key", "resource")
    since = time.time() - args.since if args.since is not None else None
    path = ctx.state.events_path

    def show(records: Any) -> int:
        count = 0
        for event in select_events(records, resource=args.resource, since=since, prefix=args.event):
            print(json.dumps(event) if args.json else _line(event), flush=True)
            count += 1
        return count

    if not args.follow:
        show(read_journal(path))
        return 0
    offset = 0
    while True:  # tail -f: the journal is a plain file, append-only
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        complete = chunk[: chunk.rfind(b"\n") + 1]
        offset += len(complete)
        records = []
        for raw in complete.splitlines():
            try:
                records.append(json.loads(raw))
            except ValueError:
                continue
        show(records)
        time.sleep(0.25)


def _history(ctx: Context) -> int:
    from broker.core.history import summarize_usage
    from broker.disk.journal import read_journal

    args = ctx.args
    if not is_resource_key(args.resource):
        raise InvalidRequest(f"invalid resource={args.resource!r}: not a resource key", "resource")
    now = time.time()
    history = summarize_usage(read_journal(ctx.state.events_path), args.resource, now - args.since, now)
    if args.json:
        emit_json(history.as_dict())
        return 0
    print(
        f"{args.resource} over the last {format_duration(args.since)}: {history.grants} leases, "
        f"held {format_duration(history.held_s)} ({history.utilization:.1%} utilization); "
        f"{history.expired} expired, {history.revoked} revoked, {history.wait_timeouts} waits timed out, "
        f"{history.maintenance_periods} maintenance periods"
    )
    if history.current_holder:
        print(f"held now by {history.current_holder}")
    rows = [
        [
            usage["holder"],
            str(usage["leases"]),
            format_duration(usage["held_s"]),
            format_duration(usage["mean_hold_s"]),
            format_duration(usage["mean_wait_s"]),
            str(usage["expired"]),
            when(usage["last_granted_at"]) if usage["last_granted_at"] else "-",
        ]
        for usage in history.as_dict()["holders"]
    ]
    if rows:
        print(table(["holder", "leases", "held", "mean hold", "mean wait", "expired", "last granted"], rows))
    return 0


def _usage(ctx: Context) -> int:
    from broker.core.accounting import UsageBy, account
    from broker.disk.journal import read_journal

    args = ctx.args
    if args.resource is not None and not is_resource_key(args.resource):
        raise InvalidRequest(f"invalid --resource={args.resource!r}: not a resource key", "resource")
    by = UsageBy(args.by)
    until = time.time()
    since = until - args.since
    rows = account(read_journal(ctx.state.events_path), since=since, until=until, by=by, resource=args.resource)
    if args.json:
        emit_json({"since": since, "until": until, "by": by.value, "rows": [row.as_dict(by) for row in rows]})
        return 0
    print(f"usage over the last {format_duration(args.since)}, by {by.value}")
    body = [
        [
            row.name,
            str(row.leases),
            f"{row.held_hours:.2f}",
            format_duration(row.mean_wait_s),
            str(row.released),
            str(row.expired),
            str(row.revoked),
        ]
        for row in rows
    ]
    total_leases = sum(row.leases for row in rows)
    total_wait = sum(row.waited_s for row in rows)
    body.append(
        [
            "TOTAL",
            str(total_leases),
            f"{sum(row.held_hours for row in rows):.2f}",
            format_duration(total_wait / total_leases if total_leases else 0.0),
            str(sum(row.released for row in rows)),
            str(sum(row.expired for row in rows)),
            str(sum(row.revoked for row in rows)),
        ]
    )
    print(table([by.value, "leases", "hours held", "mean wait", "released", "expired", "revoked"], body))
    return 0
