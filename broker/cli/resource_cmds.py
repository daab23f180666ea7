"""``merlin ray resources ...``: list, queue, show, reserve, release, renew, withdraw, keep-alive,
revoke, maintenance (and history, usage from the journal).

Leases and statuses are the Ray path's models or the HTTP API's answers
(:class:`broker.http.answers.Answer`): the code here reads only what both
have, and compares states with ``==`` (either's enum equals its value).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from broker.cli.common import (
    Context,
    admin_secret,
    admin_secret_option,
    duration_arg,
    emit_json,
    json_option,
    note,
    table,
    when,
)
from broker.cli.filters import ResourceFilter, parse_labels, pools_for
from broker.cli.interrupts import stopped
from broker.core.durations import format_duration
from broker.errors import InvalidRequest, LeaseNotFound, LeaseNotHeld, UnknownResource
from broker.holders import default_holder
from broker.http.answers import (
    Answer,
    LeaseState,
    ResourceState,
    is_group,
    is_group_lease_id,
    is_resource_key,
    resource_of_lease_id,
)

__all__ = ["register"]

RESOURCE_HELP = "resource key, e.g. firesim_u250 (`merlin ray resources list` shows them)"
LEASE_ID_HELP = "the lease id `reserve` printed (<resource>.<32 hex digits>); it is your capability"
_COLUMNS = ["resource", "state", "holder", "token", "expires", "queue", "labels"]


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    resources = sub.add_parser("resources", help="leases on lab hardware").add_subparsers(dest="verb", required=True)

    listing = resources.add_parser(
        "list",
        parents=[common],
        help="every resource: state, holder, queue (filters: --state, --labels, --holder, --mine)",
    )
    listing.add_argument(
        "--state",
        action="append",
        choices=[state.value for state in ResourceState],
        default=None,
        help="only resources in this state (repeat for several)",
    )
    listing.add_argument(
        "--labels", action="append", default=None, metavar="K=V[,K=V]", help="only resources with these labels"
    )
    listing.add_argument("--holder", default=None, help="only resources this holder holds or waits for")
    listing.add_argument("--mine", action="store_true", help="only resources you (user@host) hold or wait for")
    listing.add_argument(
        "--pools",
        action="store_true",
        help="only the catalog's pools (free/total, who waits; with filters, those with a member listed); "
        "with --json, as a JSON array (plain --json lists the keys)",
    )
    json_option(listing)
    listing.set_defaults(run=_list)

    queue = resources.add_parser("queue", parents=[common], help="who waits for a resource: place, priority, since")
    queue.add_argument("resource", help=RESOURCE_HELP)
    json_option(queue)
    queue.set_defaults(run=_queue)

    show = resources.add_parser(
        "show",
        parents=[common],
        help="a lease by id (do I still hold it? exit 0 yes, 7 no) or a resource by key (who has it?)",
    )
    show.add_argument("what", metavar="LEASE_ID_OR_RESOURCE", help="a lease id, or a resource key")
    json_option(show)
    show.set_defaults(run=_show)

    reserve = resources.add_parser(
        "reserve",
        parents=[common],
        help="take a lease on a resource, any of a pool's (--labels, --pool), or several together (KEY1,KEY2)",
        description="Take a lease. Without --wait a busy resource fails at once (exit 5); with --wait the "
        "request queues, shows its place, and gives up after --timeout (exit 9). Exit 0 means you hold it: a "
        "reused --request-id whose lease has ended exits 7 (unless --show-ended), and one that names a lease on "
        "another resource is refused (exit 3). `reserve KEY1,KEY2` holds both together; `--labels kind=fpga,"
        "board=u250` (or `--pool u250`) any one of the matching keys, `--count 2` any two: one lease id for all, "
        "granted all at once, and the answer says which keys you got. A selector matching fewer than --count "
        "keys fails at once (exit 3). While it waits, the request lives only as long as the command: "
        "stopped (SIGINT/SIGTERM/SIGHUP: exit 130/143/129) or killed, it leaves the queue within seconds. A lease "
        "it printed outlives it, to its TTL.",
    )
    reserve.add_argument("resource", nargs="?", default=None, help=RESOURCE_HELP + "; KEY1,KEY2 for several together")
    reserve.add_argument("--labels", default=None, metavar="K=V[,K=V]", help="any key whose labels match")
    reserve.add_argument("--pool", default=None, help="any key of this named pool (`list` shows pools)")
    reserve.add_argument("--count", type=int, default=None, help="how many keys (default: 1 of a pool, all of a set)")
    reserve.add_argument("--holder", default=None, help="who holds it (default: user@host)")
    reserve.add_argument(
        "--ttl",
        type=duration_arg("ttl"),
        default=3600.0,
        help="lease time, e.g. 90s, 10m, 2h (default 1h; at most 7d, and the resource's max hold)",
    )
    reserve.add_argument("--wait", action="store_true", help="queue if busy and wait for the grant")
    reserve.add_argument(
        "--timeout", type=duration_arg("timeout"), default=None, help="with --wait: give up after this long"
    )
    reserve.add_argument("--priority", type=int, default=0, help="higher is served first (default 0)")
    reserve.add_argument("--note", default="", help="why you need it (shown to others)")
    reserve.add_argument(
        "--request-id", default=None, help="idempotency key: the same id returns the same lease, on one resource only"
    )
    reserve.add_argument(
        "--show-ended",
        action="store_true",
        help="with a reused --request-id whose lease has ended: print that lease and exit 0 instead of 7",
    )
    json_option(reserve)
    reserve.set_defaults(run=_reserve)

    health = resources.add_parser(
        "health",
        parents=[common],
        help="a key's health probe: its last results, failures in a row, quarantine (--now: probe it first)",
    )
    health.add_argument("resource", help=RESOURCE_HELP)
    health.add_argument("--now", action="store_true", help="run the probe now, if nobody holds the key")
    json_option(health)
    health.set_defaults(run=_health)

    release = resources.add_parser("release", parents=[common], help="give a lease back (idempotent)")
    release.add_argument("lease_id", help=LEASE_ID_HELP)
    json_option(release)
    release.set_defaults(run=_release)

    renew = resources.add_parser("renew", parents=[common], help="extend a lease you hold")
    renew.add_argument("lease_id", help=LEASE_ID_HELP)
    renew.add_argument(
        "--ttl", type=duration_arg("ttl"), default=None, help="new time from now (default: the lease's TTL)"
    )
    json_option(renew)
    renew.set_defaults(run=_renew)

    withdraw = resources.add_parser(
        "withdraw",
        parents=[common],
        help="take a queued request out of the queue: yours (--request-id) or anyone's (--ref, admin)",
        description="With --request-id: your own queued request (the id you passed to reserve --wait). With "
        "--ref (the REF `resources queue` shows): anyone's request; an administrative act, recorded in the "
        "journal, that needs the admin secret when the catalog sets one.",
    )
    withdraw.add_argument("resource", help=RESOURCE_HELP)
    which = withdraw.add_mutually_exclusive_group(required=True)
    which.add_argument("--request-id", default=None, help="your request's id")
    which.add_argument("--ref", default=None, help="the request's public ref (admin)")
    withdraw.add_argument("--holder", default=None, help="with --request-id: whose (default: user@host)")
    withdraw.add_argument("--by", default=None, help="with --ref: who withdraws it (default: user@host)")
    withdraw.add_argument("--reason", default="", help="with --ref: why; recorded in the journal")
    admin_secret_option(withdraw)
    json_option(withdraw)
    withdraw.set_defaults(run=_withdraw)

    revoke = resources.add_parser("revoke", parents=[common], help="take a resource from its holder (admin)")
    revoke.add_argument("resource", help=RESOURCE_HELP)
    revoke.add_argument("--reason", required=True, help="why; recorded in the journal")
    revoke.add_argument("--expected-holder", default=None, help="only if this is the holder (compare-and-swap)")
    revoke.add_argument("--by", default=None, help="who is revoking (default: user@host)")
    admin_secret_option(revoke)
    json_option(revoke)
    revoke.set_defaults(run=_revoke)

    maintenance = resources.add_parser(
        "maintenance", parents=[common], help="stop (on) or resume (off) new grants; the holder keeps its lease"
    )
    maintenance.add_argument("resource", help=RESOURCE_HELP)
    maintenance.add_argument("mode", choices=["on", "off"], help="on: no new grants; off: grants resume")
    maintenance.add_argument("--reason", default="", help="shown to people who try to reserve it")
    maintenance.add_argument("--by", default=None, help="who (default: user@host)")
    admin_secret_option(maintenance)
    json_option(maintenance)
    maintenance.set_defaults(run=_maintenance)

    from broker.cli.events_cmds import register_history, register_usage
    from broker.cli.keepalive_cmds import register_keep_alive

    register_keep_alive(resources, common, LEASE_ID_HELP)
    register_history(resources, common)
    register_usage(resources, common)


# ---------------------------------------------------------------------- reads


def _statuses(ctx: Context) -> list[Any]:
    fast = ctx.read_api("resources")
    if fast is not None:
        return [Answer(item) for item in fast]
    return list(ctx.client().resources())


def _list(ctx: Context) -> int:
    args = ctx.args
    holders = {args.holder} if args.holder else set()
    if args.mine:
        holders.add(default_holder())
    chosen = ResourceFilter(
        states=frozenset(args.state or ()),
        labels=parse_labels(args.labels),
        holders=frozenset(holders),
    )
    statuses = chosen.apply(_statuses(ctx))
    if args.json and not args.pools:
        emit_json(statuses)  # the keys only: scripts read an array of resources (see --pools)
        return 0
    filtered = bool(args.state or args.labels or holders)
    pools = pools_for(_pools(ctx), (status.key for status in statuses), filtered=filtered)
    if args.json:
        emit_json(pools)
        return 0
    if not args.pools:
        print(table(_COLUMNS, [_status_row(status) for status in statuses]))
    if pools:
        if not args.pools:
            print()
        rows = [
            [
                pool["pool"],
                pool["labels"],
                f"{pool['free']}/{pool['total']}",
                str(pool["waiting_groups"]),
                str(pool["waiting_single"]),
            ]
            for pool in pools
        ]
        print(table(["pool", "labels", "free", "waiting (any-of)", "waiting (one key)"], rows))
    elif args.pools:
        note("no pools to show: the catalog names none" + (" with a member listed" if filtered else ""))
    return 0


def _statuses_or_none(ctx: Context) -> list[Any] | None:
    """The statuses from the HTTP API for a waiting command's progress line; None if it cannot say."""
    fast = ctx.read_api("resources")
    return [Answer(item) for item in fast] if fast is not None else None


def _status_of(ctx: Context, resource: str) -> Any:
    if not is_resource_key(resource):
        raise InvalidRequest(f"invalid resource={resource!r}: not a resource key", "resource")
    statuses = _statuses(ctx)
    for status in statuses:
        if status.key == resource:
            return status
    raise UnknownResource(resource, tuple(status.key for status in statuses))


def _queue(ctx: Context) -> int:
    status = _status_of(ctx, ctx.args.resource)
    if ctx.args.json:
        emit_json(list(status.queue))
        return 0
    print(_headline(status))
    if status.queue:
        rows = [
            [
                str(entry.position),
                entry.holder,
                str(entry.priority),
                f"{format_duration(max(0.0, time.time() - entry.queued_at), units=2)} ago",
                entry.ref,
                entry.note or "-",
            ]
            for entry in status.queue
        ]
        print(table(["place", "holder", "priority", "since", "ref", "note"], rows))
    return 0


def _show(ctx: Context) -> int:
    what = ctx.args.what
    if not _looks_like_lease_id(what):  # a lease id is "<key>.<32 hex>"; anything else names a resource
        status = _status_of(ctx, what)
        if ctx.args.json:
            emit_json(status)
        else:
            _print_status(status)
        return 0
    lease = ctx.client().get_lease(what)
    _out(ctx, lease)
    # Scripts and agents ask "do I still hold it?" with the exit code alone.
    return 0 if lease.state == LeaseState.GRANTED else LeaseNotHeld.exit_code


def _looks_like_lease_id(text: str) -> bool:
    if is_group_lease_id(text):
        return True
    try:
        resource_of_lease_id(text)
    except InvalidRequest:
        return False
    return True


def _headline(status: Any) -> str:
    """One line: who has it, until when, how many wait."""
    if status.state == ResourceState.DOWN:
        return f"{status.key}: down (its actor does not answer)"
    parts = []
    if status.state == ResourceState.MAINTENANCE:
        parts.append(f"in maintenance ({status.maintenance_reason or 'no reason given'})")
    if status.holder is not None:
        parts.append(
            f"held by {status.holder} (ref {status.lease_ref}, token {status.fencing_token}), "
            f"expires {when(status.expires_at)}"
        )
    elif status.state != ResourceState.MAINTENANCE:
        parts.append("free")
    waiting = len(status.queue)
    parts.append(f"{waiting} waiting" if waiting else "nobody waiting")
    return f"{status.key}: " + "; ".join(parts)


def _print_status(status: Any) -> None:
    print(_headline(status))
    for entry in status.queue:
        since = format_duration(max(0.0, time.time() - entry.queued_at), units=2)
        priority = f", priority {entry.priority}" if entry.priority else ""
        print(f"  {entry.position}. {entry.holder} (ref {entry.ref}{priority}, waiting {since})")
    if status.labels:
        print("labels: " + ", ".join(f"{name}={value}" for name, value in status.labels.items()))
    if status.description:
        print(status.description)


def _status_row(status: Any) -> list[str]:
    queue = ", ".join(f"{entry.holder}" + (f"(p{entry.priority})" if entry.priority else "") for entry in status.queue)
    labels = ",".join(f"{name}={value}" for name, value in status.labels.items())
    state = str(status.state)
    if status.maintenance_reason:
        state += f" ({status.maintenance_reason})"
    return [
        status.key,
        state,
        status.holder or "-",
        str(status.fencing_token) if status.fencing_token is not None else "-",
        when(status.expires_at) if status.expires_at else "-",
        queue or "-",
        labels,
    ]


# ---------------------------------------------------------------------- leases


def _print_lease(lease: Any, *, show_id: bool = True, asked_at: float | None = None) -> None:
    if lease.state == LeaseState.GRANTED:
        print(
            f"{lease.resource}: granted to {lease.holder}, fencing token {lease.fencing_token}, "
            f"expires {when(lease.expires_at)}"
        )
        if lease.for_holder(asked_at)["ttl_capped_by_max_hold"]:
            print(
                f"note: the TTL asked for ({format_duration(lease.ttl_s)}) runs past the resource's max hold; "
                f"the lease ends at {when(lease.must_end_by)} and renewals cannot pass it"
            )
    else:
        tail = f" ({lease.end_reason})" if lease.end_reason and lease.end_reason != lease.state else ""
        print(f"{lease.resource}: {lease.state}{tail}, holder {lease.holder}")
    if show_id:
        print(f"lease id: {lease.lease_id}  (ref {lease.ref})")


def _group_form(ctx: Context) -> dict[str, Any] | None:
    """The group request the arguments ask for (labels, pool or KEY1,KEY2), or None for one key."""
    args = ctx.args
    forms = [form for form in (args.labels, args.pool, args.resource) if form is not None]
    if len(forms) != 1:
        from broker.cli import UsageError

        raise UsageError("reserve takes one of: a resource key (or KEY1,KEY2), --labels, --pool (see --help)")
    if args.pool is not None:
        pools = {pool["pool"]: pool for pool in _pools(ctx)}
        if args.pool not in pools:
            known = ", ".join(sorted(pools)) or "none"
            raise InvalidRequest(f"no pool named {args.pool!r} in the catalog (pools: {known})", "pool")
        return {"labels": pools[args.pool]["labels"], "count": args.count}
    if args.labels is not None:
        return {"labels": args.labels, "count": args.count}
    if "," in args.resource:
        return {"keys": [key.strip() for key in args.resource.split(",")], "count": args.count}
    if args.count is not None:
        return {"keys": [args.resource], "count": args.count}
    return None


def _pools(ctx: Context) -> list[dict[str, Any]]:
    fast = ctx.read_api("pools")
    return fast if fast is not None else ctx.client().call("pools")


def _progress_line(ctx: Context, shown: str, *, key: str | None = None) -> Any:
    """What a waiting `reserve` prints when its place changes: the place, how long it has waited
    and, for one key, who holds it until when."""
    started = time.time()

    def on_position(position: int | None) -> None:
        if position is None:
            return
        waited = format_duration(time.time() - started, units=2)
        line = f"waiting for {shown}: place {position} in the queue, {waited} so far"
        status = next((s for s in (_statuses_or_none(ctx) or ()) if s.key == key), None) if key else None
        if status is not None and status.holder is not None:
            line += f"; held by {status.holder} until {when(status.expires_at)}"
        elif status is not None and status.maintenance_reason:
            line += f"; in maintenance: {status.maintenance_reason}"
        note(line)

    return on_position


def _request_options(args: Any) -> dict[str, Any]:
    """What a single-key and a group reserve ask alike (ttl, wait, priority, request id, note)."""
    return {
        "ttl_s": args.ttl,
        "wait": args.wait,
        "timeout_s": args.timeout,
        "priority": args.priority,
        "request_id": args.request_id,
        "note": args.note,
    }


def _reserve_group(ctx: Context, form: dict[str, Any], holder: str) -> int:
    args = ctx.args
    shown = form.get("labels") or ",".join(form.get("keys") or ())
    try:
        group = ctx.client().reserve_group(
            holder,
            **form,
            **_request_options(args),
            on_position=_progress_line(ctx, shown) if args.wait else None,
            bind_session=False,  # as for one key: the wait dies with the command, the lease outlives it
        )
    except KeyboardInterrupt as interrupt:
        if not args.wait:
            raise
        raise stopped(interrupt, f"the request for {shown} left every queue") from None
    if group.state != LeaseState.GRANTED and not args.show_ended:
        why = group.end_reason or str(group.state)
        raise LeaseNotHeld(
            group.lease_id, str(group.state), f"request id {args.request_id} names a group lease that is {why}"
        )
    if args.json:
        emit_json(group.for_holder())
    else:
        _print_group(group)
        if group.state == LeaseState.GRANTED:
            note(f"keep the lease id: `merlin ray resources release {group.lease_id}` gives all its keys back")
    return 0


def _print_group(group: Any, *, show_id: bool = True) -> None:
    if group.state == LeaseState.GRANTED:
        print(f"group of {len(group.members)}: granted to {group.holder}, expires {when(group.expires_at)}")
        for member in group.members:
            facts = ", ".join(f"{name}={value}" for name, value in member.properties.items())
            host = f", host {member.host}" if member.host else ""
            print(f"  {member.key}: fencing token {member.fencing_token}{host}" + (f" ({facts})" if facts else ""))
    else:
        tail = f" ({group.end_reason})" if group.end_reason and group.end_reason != group.state else ""
        wanted = group.selector or ",".join(group.candidates)
        print(f"group {wanted} x{group.count}: {group.state}{tail}, holder {group.holder}")
    if show_id:
        print(f"lease id: {group.lease_id}  (ref {group.ref})")


def _reserve(ctx: Context) -> int:
    args = ctx.args
    holder = default_holder() if args.holder is None else args.holder
    form = _group_form(ctx)
    if form is not None:
        return _reserve_group(ctx, form, holder)

    client = ctx.client()
    try:
        # Tied to this command while it waits (it leaves the queue if the command dies); once
        # granted and received, the lease outlives the command (a script reserves, works, releases).
        lease = client.reserve(
            args.resource,
            holder,
            **_request_options(args),
            on_position=_progress_line(ctx, args.resource, key=args.resource) if args.wait else None,
            bind_session=False,
        )
    except KeyboardInterrupt as interrupt:
        if not args.wait:
            raise
        raise stopped(interrupt, f"the request for {args.resource} left the queue") from None
    if lease.state != LeaseState.GRANTED and not args.show_ended:
        # Exit 0 means "you hold it": an old answer to a reused request id is not that.
        raise _not_held_answer(lease, args.request_id)
    if args.json:
        emit_json(lease.for_holder())
    else:
        _print_lease(lease)
        if lease.state == LeaseState.GRANTED:
            note(f"keep the lease id: `merlin ray resources release {lease.lease_id}` gives it back")
    return 0


def _not_held_answer(lease: Any, request_id: str | None) -> LeaseNotHeld:
    if lease.state == LeaseState.QUEUED:
        detail = f"request id {request_id} is still queued for {lease.resource}; reserve --wait waits for it"
    else:
        why = lease.end_reason or str(lease.state)
        detail = (
            f"request id {request_id} names a lease on {lease.resource} that ended ({why}); "
            "use a new request id, or --show-ended to print it"
        )
    return LeaseNotHeld(lease.lease_id, str(lease.state), detail)


def _health(ctx: Context) -> int:
    args = ctx.args
    if not is_resource_key(args.resource):
        raise InvalidRequest(f"invalid resource={args.resource!r}: not a resource key", "resource")
    report = ctx.client().call("health", args.resource, args.now)
    if args.json:
        emit_json(report)
        return 0
    if report["health_check"] is None:
        print(f"{args.resource}: no health_check in the catalog")
        return 0
    check = report["health_check"]
    state = "never probed" if report["ok"] is None else ("healthy" if report["ok"] else "FAILING")
    quarantine = ", quarantined (in maintenance until a probe passes)" if report["quarantined"] else ""
    print(f"{args.resource}: {state}{quarantine}; {report['failures_in_a_row']} failure(s) in a row, "
          f"{report['failures_total']} in all; probe `{' '.join(check['run'])}` every {format_duration(check['every'])}")  # fmt: skip
    rows = [
        [when(r["at"]), "ok" if r["ok"] else "FAILED", f"{r['duration_s']:.2f}s", r["detail"] or "-"]
        for r in report["results"][-10:]
    ]
    if rows:
        print(table(["at", "result", "took", "detail"], rows))
    return 0


def _release(ctx: Context) -> int:
    lease = ctx.client().release(ctx.args.lease_id)
    _out(ctx, lease)
    return 0


def _renew(ctx: Context) -> int:
    asked_at = time.time()
    lease = ctx.client().renew(ctx.args.lease_id, ctx.args.ttl)
    _out(ctx, lease, asked_at=asked_at)
    return 0


def _withdraw(ctx: Context) -> int:
    args = ctx.args
    client = ctx.client()
    if args.ref is not None:
        lease = client.call(
            "withdraw",
            args.resource,
            ref=args.ref,
            by=args.by or default_holder(),
            reason=args.reason,
            admin_secret=admin_secret(args),
        )
    else:
        holder = args.holder or default_holder()
        lease = client.call("withdraw", args.resource, holder, args.request_id)
        if lease is None:
            raise LeaseNotFound(args.request_id, f"no request {args.request_id!r} of {holder} on {args.resource!r}")
    if lease.state != LeaseState.CANCELLED:
        detail = "granted: release it instead" if lease.state == LeaseState.GRANTED else lease.end_reason
        raise LeaseNotHeld(lease.ref, str(lease.state), f"not queued ({lease.state}): {detail}")
    if args.json:
        emit_json(lease.public())
    else:
        print(f"{lease.resource}: the request of {lease.holder} (ref {lease.ref}) left the queue: {lease.end_reason}")
    return 0


def _revoke(ctx: Context) -> int:
    args = ctx.args
    lease = ctx.client().revoke(
        args.resource, args.reason, expected_holder=args.expected_holder, by=args.by, admin_secret=admin_secret(args)
    )
    if args.json:
        emit_json(lease.public())
    else:
        print(f"{lease.resource}: revoked from {lease.holder} (token {lease.fencing_token}): {lease.end_reason}")
    return 0


def _maintenance(ctx: Context) -> int:
    args = ctx.args
    by = args.by or default_holder()
    status = ctx.client().set_maintenance(
        args.resource, args.mode == "on", args.reason, by=by, admin_secret=admin_secret(args)
    )
    if args.json:
        emit_json(status)
        return 0
    if status.state == ResourceState.MAINTENANCE:
        why = f" ({status.maintenance_reason})" if status.maintenance_reason else ""
        line = f"{status.key}: in maintenance{why} since {when(status.maintenance_since)}, by {by}; no new grants"
        if status.holder is not None:
            line += f"; {status.holder} keeps its lease until {when(status.expires_at)}"
    else:
        line = f"{status.key}: out of maintenance, by {by}; grants resume"
        if status.holder is not None:
            line += f" (held by {status.holder})"
    if status.queue:
        line += f"; {len(status.queue)} waiting"
    print(line)
    return 0


def _out(ctx: Context, lease: Any, *, asked_at: float | None = None) -> None:
    if ctx.args.json:
        emit_json(lease.for_holder(asked_at))
    elif is_group(lease):
        _print_group(lease, show_id=False)
    else:
        _print_lease(lease, show_id=False, asked_at=asked_at)
