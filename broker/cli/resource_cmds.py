"""``merlin ray resources ...``: list, reserve, release, renew, revoke, maintenance, show."""

from __future__ import annotations

import argparse
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
from broker.client import default_holder
from broker.errors import LeaseNotHeld
from broker.models import Lease, LeaseState, ResourceStatus

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    resources = sub.add_parser("resources", help="leases on lab hardware").add_subparsers(dest="verb", required=True)

    listing = resources.add_parser("list", parents=[common], help="every resource: state, holder, queue")
    json_option(listing)
    listing.set_defaults(run=_list)

    reserve = resources.add_parser(
        "reserve",
        parents=[common],
        help="take a lease on a resource",
        description="Take a lease. Without --wait a busy resource fails at once (exit 5); with --wait the "
        "request queues, shows its place, and gives up after --timeout (exit 9).",
    )
    reserve.add_argument("resource", help="resource key, e.g. firesim_u250")
    reserve.add_argument("--holder", default=None, help="who holds it (default: user@host)")
    reserve.add_argument(
        "--ttl", type=duration_arg("ttl"), default=3600.0, help="lease time, e.g. 90s, 10m, 2h (default 1h)"
    )
    reserve.add_argument("--wait", action="store_true", help="queue if busy and wait for the grant")
    reserve.add_argument(
        "--timeout", type=duration_arg("timeout"), default=None, help="with --wait: give up after this long"
    )
    reserve.add_argument("--priority", type=int, default=0, help="higher is served first (default 0)")
    reserve.add_argument("--note", default="", help="why you need it (shown to others)")
    reserve.add_argument("--request-id", default=None, help="idempotency key: the same id returns the same lease")
    json_option(reserve)
    reserve.set_defaults(run=_reserve)

    release = resources.add_parser("release", parents=[common], help="give a lease back (idempotent)")
    release.add_argument("lease_id")
    json_option(release)
    release.set_defaults(run=_release)

    renew = resources.add_parser("renew", parents=[common], help="extend a lease you hold")
    renew.add_argument("lease_id")
    renew.add_argument(
        "--ttl", type=duration_arg("ttl"), default=None, help="new time from now (default: the lease's TTL)"
    )
    json_option(renew)
    renew.set_defaults(run=_renew)

    show = resources.add_parser("show", parents=[common], help="one lease by id: do I still hold it?")
    show.add_argument("lease_id")
    json_option(show)
    show.set_defaults(run=_show)

    revoke = resources.add_parser("revoke", parents=[common], help="take a resource from its holder (admin)")
    revoke.add_argument("resource")
    revoke.add_argument("--reason", required=True, help="why; recorded in the journal")
    revoke.add_argument("--expected-holder", default=None, help="only if this is the holder (compare-and-swap)")
    revoke.add_argument("--by", default=None, help="who is revoking (default: user@host)")
    admin_secret_option(revoke)
    json_option(revoke)
    revoke.set_defaults(run=_revoke)

    maintenance = resources.add_parser(
        "maintenance", parents=[common], help="stop (on) or resume (off) new grants; the holder keeps its lease"
    )
    maintenance.add_argument("resource")
    maintenance.add_argument("mode", choices=["on", "off"])
    maintenance.add_argument("--reason", default="", help="shown to people who try to reserve it")
    maintenance.add_argument("--by", default=None, help="who (default: user@host)")
    admin_secret_option(maintenance)
    json_option(maintenance)
    maintenance.set_defaults(run=_maintenance)

    from broker.cli.events_cmds import register_history

    register_history(resources, common)


def _list(ctx: Context) -> int:
    fast = ctx.read_api("resources")
    if fast is not None:
        statuses = [ResourceStatus.model_validate(item) for item in fast]
    else:
        statuses = ctx.client().resources()
    if ctx.args.json:
        emit_json(statuses)
        return 0
    rows = [_status_row(status) for status in statuses]
    print(table(["resource", "state", "holder", "token", "expires", "queue", "labels"], rows))
    return 0


def _status_row(status: ResourceStatus) -> list[str]:
    queue = ", ".join(f"{entry.holder}" + (f"(p{entry.priority})" if entry.priority else "") for entry in status.queue)
    labels = ",".join(f"{name}={value}" for name, value in status.labels.items())
    state = status.state.value
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


def _print_lease(lease: Lease, *, show_id: bool = True) -> None:
    if lease.state is LeaseState.GRANTED:
        print(
            f"{lease.resource}: granted to {lease.holder}, fencing token {lease.fencing_token}, "
            f"expires {when(lease.expires_at)}"
        )
    else:
        tail = f" ({lease.end_reason})" if lease.end_reason and lease.end_reason != lease.state.value else ""
        print(f"{lease.resource}: {lease.state.value}{tail}, holder {lease.holder}")
    if show_id:
        print(f"lease id: {lease.lease_id}")


def _reserve(ctx: Context) -> int:
    args = ctx.args
    holder = default_holder() if args.holder is None else args.holder

    def on_position(position: int | None) -> None:
        if position is not None:
            note(f"waiting for {args.resource}: place {position} in the queue")

    lease = ctx.client().reserve(
        args.resource,
        holder,
        ttl_s=args.ttl,
        wait=args.wait,
        timeout_s=args.timeout,
        priority=args.priority,
        request_id=args.request_id,
        note=args.note,
        on_position=on_position if args.wait else None,
    )
    if args.json:
        emit_json(lease)
    else:
        _print_lease(lease)
        if lease.state is LeaseState.GRANTED:
            note(f"keep the lease id: `merlin ray resources release {lease.lease_id}` gives it back")
    return 0


def _release(ctx: Context) -> int:
    lease = ctx.client().release(ctx.args.lease_id)
    _out(ctx, lease)
    return 0


def _renew(ctx: Context) -> int:
    lease = ctx.client().renew(ctx.args.lease_id, ctx.args.ttl)
    _out(ctx, lease)
    return 0


def _show(ctx: Context) -> int:
    lease = ctx.client().get_lease(ctx.args.lease_id)
    _out(ctx, lease)
    # Scripts and agents ask "do I still hold it?" with the exit code alone.
    return 0 if lease.state is LeaseState.GRANTED else LeaseNotHeld.exit_code


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
    status = ctx.client().set_maintenance(
        args.resource, args.mode == "on", args.reason, by=args.by, admin_secret=admin_secret(args)
    )
    if args.json:
        emit_json(status)
    else:
        print(table(["resource", "state", "holder", "token", "expires", "queue", "labels"], [_status_row(status)]))
    return 0


def _out(ctx: Context, lease: Any) -> None:
    if ctx.args.json:
        emit_json(lease)
    else:
        _print_lease(lease, show_id=False)
