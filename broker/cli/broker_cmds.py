"""``merlin broker up|down|status|serve``: the coordinator, its resource actors, the API on Ray Serve."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TypeVar

from broker.cli.common import Context, admin_secret, admin_secret_option, emit_json, json_option, when
from broker.errors import BrokerUnavailable
from broker.holders import default_holder

__all__ = ["register"]

DEFAULT_CATALOG = "configs/resources.yaml"
# = broker.http.metrics' defaults (a unit test keeps them equal): importing it costs prometheus_client,
# and `broker status` on the HTTP API imports only what it prints.
DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9477
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

    token = broker.add_parser("token", help="HTTP API tokens (admin)").add_subparsers(dest="token_verb", required=True)
    create = token.add_parser(
        "create",
        parents=[common],
        help="make a token for NAME; its secret is printed once (the broker keeps only a hash)",
        description="A token made for NAME is NAME on the HTTP API: it takes and releases leases as NAME and "
        "nobody else; --admin lets it revoke, set maintenance and manage tokens. Itself an admin act.",
    )
    create.add_argument("name", help="who the token is (its holder name)")
    create.add_argument("--admin", action="store_true", help="may do administrative acts")
    admin_secret_option(create)
    json_option(create)
    create.set_defaults(run=_token_create)
    listing = token.add_parser("list", parents=[common], help="every token: name, admin, made, revoked (no secrets)")
    admin_secret_option(listing)
    json_option(listing)
    listing.set_defaults(run=_token_list)
    revoke = token.add_parser("revoke", parents=[common], help="revoke NAME's token: refused at once from now on")
    revoke.add_argument("name", help="whose token")
    admin_secret_option(revoke)
    json_option(revoke)
    revoke.set_defaults(run=_token_revoke)

    served = broker.add_parser(
        "serve",
        parents=[common],
        help="run the HTTP API as a Ray Serve application too (for users off the head node)",
        description="Deploy the HTTP API v1 as a Ray Serve application on the running cluster: the same routes, "
        "tokens and errors as the coordinator's own listener, one Ray hop further. Serve's proxy listens on "
        "--host:--port (if Serve runs already, it keeps its address); the URL goes to serve.json in the state dir.",
    )
    served.add_argument("--host", default="127.0.0.1", help="address of Serve's proxy (default: 127.0.0.1)")
    served.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MERLIN_SERVE_PORT", "8000")),
        help="its port (default: $MERLIN_SERVE_PORT or 8000)",
    )
    served.add_argument("--stop", action="store_true", help="take the application down (Serve itself stays)")
    json_option(served)
    served.set_defaults(run=_serve)

    status = broker.add_parser("status", parents=[common], help="health, uptime and counts")
    json_option(status)
    status.set_defaults(run=_status)


def _up(ctx: Context) -> int:
    from broker.actors.deploy import broker_up
    from broker.core.catalog import parse_catalog, read_catalog_data

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
    statuses = {status.key: status for status in ctx.ray_client().resources()}
    status = ctx.ray_client().status()
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
    if status.http_url:
        print(f"HTTP API at {status.http_url} (token: {ctx.state.root / 'operator.token'}, or MERLIN_TOKEN)")
    return 0


def _down(ctx: Context) -> int:
    from broker.actors.deploy import broker_down

    ctx.connect_ray()
    ctx.ray_client().call("authorize_down", by=ctx.args.by or default_holder(), admin_secret=admin_secret(ctx.args))
    killed = broker_down(ctx.namespace)
    print(f"stopped {killed} broker actors in namespace {ctx.namespace!r}; state stays in {ctx.state.root}")
    return 0


def _serve(ctx: Context) -> int:
    import json

    from broker.disk.store import atomic_write
    from broker.http.serve import deploy, undeploy

    record_path = ctx.state.root / "serve.json"
    ctx.connect_ray()
    if ctx.args.stop:
        stopped = undeploy()
        record_path.unlink(missing_ok=True)
        if ctx.args.json:
            emit_json({"stopped": stopped})
        else:
            print("the Serve application is down" if stopped else "no Serve application was running")
        return 0
    ctx.ray_client().status()  # a broker must run in this namespace: say so now, not on the first request
    url = deploy(ctx.namespace, ctx.args.host, ctx.args.port)
    atomic_write(record_path, json.dumps({"namespace": ctx.namespace, "url": url}, indent=2).encode())
    if ctx.args.json:
        emit_json({"url": url, "namespace": ctx.namespace})
    else:
        print(f"HTTP API through Ray Serve at {url} (the same tokens; recorded in {record_path})")
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
    from broker.http.answers import Answer

    fast = ctx.read_api("status")
    status = Answer(fast) if fast is not None else ctx.client().status()
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
        if status.http_url:
            print(f"HTTP API at {status.http_url}")
    return 0 if status.healthy else BrokerUnavailable.exit_code


def _token_create(ctx: Context) -> int:
    made = ctx.client().call(
        "create_token", ctx.args.name, ctx.args.admin, by=default_holder(), admin_secret=admin_secret(ctx.args)
    )
    if ctx.args.json:
        emit_json(made)
        return 0
    print(f"token for {made['name']}{' (admin)' if made['admin'] else ''} — shown once, keep it (e.g. in a 0600 file):")
    print(made["token"])
    return 0


def _token_list(ctx: Context) -> int:
    from broker.cli.common import table

    tokens = ctx.client().call("list_tokens", by=default_holder(), admin_secret=admin_secret(ctx.args))
    if ctx.args.json:
        emit_json(tokens)
        return 0
    rows = [
        [
            t["name"],
            "yes" if t["admin"] else "no",
            when(t["created_at"]),
            t["created_by"],
            when(t["revoked_at"]) if t["revoked_at"] else "-",
        ]
        for t in tokens
    ]
    print(table(["name", "admin", "made", "by", "revoked"], rows))
    return 0


def _token_revoke(ctx: Context) -> int:
    record = ctx.client().call("revoke_token", ctx.args.name, by=default_holder(), admin_secret=admin_secret(ctx.args))
    if ctx.args.json:
        emit_json(record)
        return 0
    print(f"token of {record['name']} revoked")
    return 0
