"""``merlin broker up|down|status``: the coordinator and its resource actors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeVar

from broker.cli.common import Context, admin_secret, admin_secret_option, emit_json, json_option, when
from broker.client import default_holder
from broker.core.catalog import parse_catalog, read_catalog_data
from broker.errors import BrokerUnavailable
from broker.http.metrics import DEFAULT_METRICS_HOST, DEFAULT_METRICS_PORT

__all__ = ["register"]

DEFAULT_CATALOG = "configs/resources.yaml"
T = TypeVar("T")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    broker = sub.add_parser("broker", help="the broker actors").add_subparsers(dest="verb", required=True)

    up = broker.add_parser(
        "up",
        parents=[common],
        help="create (or update) the broker and one actor per catalog key; idempotent",
        description="Create the detached `broker` coordinator and one `resource:<key>` actor per key of "
        "the catalog. Running it again with --catalog applies catalog changes; existing leases are "
        "untouched. Without --catalog a broker that has a catalog keeps it.",
    )
    up.add_argument(
        "--catalog",
        default=None,
        help=f"catalog YAML to apply (default: keep the running catalog; on a new broker {DEFAULT_CATALOG})",
    )
    up.add_argument(
        "--replace",
        action="store_true",
        help="allow a catalog that drops keys or removes the admin secret (otherwise refused, naming the change)",
    )
    up.add_argument("--by", default=None, help="who (default: user@host); journaled")
    admin_secret_option(up)
    up.add_argument(
        "--metrics-host",
        default=os.environ.get("MERLIN_METRICS_HOST", DEFAULT_METRICS_HOST),
        help="address of the Prometheus endpoint (default: $MERLIN_METRICS_HOST or 127.0.0.1)",
    )
    up.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("MERLIN_METRICS_PORT", DEFAULT_METRICS_PORT)),
        help="its port; 0 picks a free one (default: $MERLIN_METRICS_PORT or 9477)",
    )
    json_option(up)
    up.set_defaults(run=_up)

    down = broker.add_parser(
        "down",
        parents=[common],
        help="stop the broker actors; leases and queues stay on disk for the next `up`",
    )
    down.add_argument("--by", default=None, help="who (default: user@host); journaled")
    admin_secret_option(down)
    down.set_defaults(run=_down)

    secret = broker.add_parser(
        "admin-secret",
        parents=[common],
        help="make a new admin secret: the file to keep, and the hash to put in the catalog",
    )
    secret.add_argument("--to", required=True, help="file to write the secret to (mode 0600)")
    secret.set_defaults(run=_admin_secret)

    status = broker.add_parser("status", parents=[common], help="health, uptime and counts")
    json_option(status)
    status.set_defaults(run=_status)


def _up(ctx: Context) -> int:
    from broker.actors.deploy import broker_up

    keep = ctx.args.catalog is None and ctx.state.catalog_path.exists()
    catalog_path = Path(ctx.args.catalog or DEFAULT_CATALOG)
    raw = None if keep else read_catalog_data(catalog_path)
    if raw is not None:
        parse_catalog(raw, str(catalog_path))  # fail on a bad catalog before touching the cluster
    ctx.connect_ray()
    options = {
        "metrics_host": ctx.args.metrics_host,
        "metrics_port": ctx.args.metrics_port,
        "admin_secret": admin_secret(ctx.args),
        "by": ctx.args.by or default_holder(),
        "replace": ctx.args.replace,
    }
    keys = broker_up(ctx.state, ctx.namespace, raw, **options)
    if raw is None and not keys:  # catalog.json was unreadable (moved aside): start from the default
        raw = read_catalog_data(catalog_path)
        keys = broker_up(ctx.state, ctx.namespace, raw, **options)
    source = str(catalog_path) if raw is not None else f"the running catalog ({ctx.state.catalog_path})"
    statuses = {status.key: status for status in ctx.client().resources()}
    status = ctx.client().status()
    if ctx.args.json:
        emit_json({"resources": keys, "status": status})
        return 0
    print(f"broker up in namespace {ctx.namespace!r}: {len(keys)} resources from {source}")
    for key in keys:
        described = statuses[key].description if key in statuses else ""
        print(f"  resource:{key}  ({described or 'no description'})")
    print(f"state dir {status.state_dir}")
    if status.metrics_url:
        print(f"metrics at {status.metrics_url}")
    return 0


def _down(ctx: Context) -> int:
    from broker.actors.deploy import broker_down

    ctx.connect_ray()
    ctx.client().call("authorize_down", by=ctx.args.by or default_holder(), admin_secret=admin_secret(ctx.args))
    killed = broker_down(ctx.namespace)
    print(f"stopped {killed} broker actors in namespace {ctx.namespace!r}; state stays in {ctx.state.root}")
    return 0


def _admin_secret(ctx: Context) -> int:
    import hashlib
    import secrets

    from broker.disk.store import atomic_write

    secret = secrets.token_urlsafe(32)
    atomic_write(Path(ctx.args.to), secret.encode())
    print(f"wrote a new admin secret to {ctx.args.to} (mode 0600); add to the catalog's `broker:` section:")
    print(f"  admin_secret_sha256: {hashlib.sha256(secret.encode()).hexdigest()}")
    print("then `merlin broker up`; admins pass --admin-secret-file or set MERLIN_ADMIN_SECRET")
    return 0


def _status(ctx: Context) -> int:
    from broker.models import BrokerStatus

    fast = ctx.read_api("status")
    status = BrokerStatus.model_validate(fast) if fast is not None else ctx.client().status()
    if ctx.args.json:
        emit_json(status)
    else:
        health = "healthy" if status.healthy else "DEGRADED"
        print(f"broker {health}, up since {when(status.started_at)}, namespace {status.namespace!r}")
        print(
            f"{status.resources} resources: {status.leased} leased, {status.queued} waiting, "
            f"{status.in_maintenance} in maintenance, {len(status.down)} down"
        )
        if status.down:
            print(f"down: {', '.join(status.down)}")
        print(f"state dir {status.state_dir}")
        if status.metrics_url:
            print(f"metrics at {status.metrics_url}")
    return 0 if status.healthy else BrokerUnavailable.exit_code
