"""``merlin ray cluster start-local|status|stop|env``: the local Ray head on loopback."""

from __future__ import annotations

import argparse
import shlex

from broker.cli.common import Context, emit_json, json_option, note, when
from broker.errors import BrokerUnavailable
from broker.seam.cluster import cluster_alive, read_bootstrap, start_local, stop_local

__all__ = ["register"]


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    cluster = sub.add_parser("cluster", help="the local Ray cluster").add_subparsers(dest="verb", required=True)

    start = cluster.add_parser(
        "start-local",
        parents=[common],
        help="start a Ray head on 127.0.0.1 for this state dir (idempotent)",
        description="Start a Ray head whose every listener binds to 127.0.0.1, with token auth, "
        "and record how to reach it in <state-dir>/cluster/bootstrap.json.",
    )
    start.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    start.add_argument("--no-auth", action="store_true", help="run without Ray token auth (not recommended)")
    json_option(start)
    start.set_defaults(run=_start)

    status = cluster.add_parser("status", parents=[common], help="is the recorded cluster running?")
    json_option(status)
    status.set_defaults(run=_status)

    stop = cluster.add_parser(
        "stop",
        parents=[common],
        help="stop the cluster this state dir started (only its processes)",
    )
    json_option(stop)
    stop.set_defaults(run=_stop)

    env = cluster.add_parser(
        "env",
        parents=[common],
        help="print shell exports that let plain `ray`/notebooks reach the cluster",
    )
    env.set_defaults(run=_env)


def _start(ctx: Context) -> int:
    bootstrap, started = start_local(ctx.state, num_cpus=ctx.args.num_cpus, auth=not ctx.args.no_auth)
    if ctx.args.json:
        emit_json({"started": started, **bootstrap.model_dump(mode="json")})
        return 0
    verb = "started" if started else "already running"
    print(
        f"Ray head {verb} at {bootstrap.gcs_address} (dashboard {bootstrap.dashboard_url}, auth {bootstrap.auth_mode})"
    )
    print(f"recorded in {ctx.state.bootstrap_path}")
    if started:
        note("next: merlin broker up")
    return 0


def _status(ctx: Context) -> int:
    bootstrap = read_bootstrap(ctx.state)
    alive = bootstrap is not None and cluster_alive(bootstrap)
    if ctx.args.json:
        emit_json({"running": alive, "bootstrap": bootstrap.model_dump(mode="json") if bootstrap else None})
    elif bootstrap is None:
        print(f"no cluster recorded in {ctx.state.root}")
    else:
        state = "running" if alive else "NOT running (stale record)"
        print(f"Ray head {state} at {bootstrap.gcs_address}, started {when(bootstrap.started_at)}")
        print(f"dashboard {bootstrap.dashboard_url}  auth {bootstrap.auth_mode}  temp {bootstrap.temp_dir}")
    if not alive:
        raise BrokerUnavailable("the local cluster is not running", "run `merlin ray cluster start-local`")
    return 0


def _stop(ctx: Context) -> int:
    result = stop_local(ctx.state)
    if ctx.args.json:
        emit_json(result)
    elif result["stopped"]:
        tail = f"; {len(result['survivors'])} would not die" if result["survivors"] else ""
        print(f"stopped the local Ray cluster ({result['processes']} processes){tail}")
    else:
        print(f"nothing to stop: {result.get('reason', 'its processes are gone')}")
    return 0


def _env(ctx: Context) -> int:
    bootstrap = read_bootstrap(ctx.state)
    if bootstrap is None:
        raise BrokerUnavailable(f"no cluster recorded in {ctx.state.root}", "run `merlin ray cluster start-local`")
    exports = {
        "RAY_ADDRESS": bootstrap.gcs_address,
        "MERLIN_STATE_DIR": str(ctx.state.root),
        "MERLIN_RAY_NAMESPACE": ctx.namespace,
        **bootstrap.env,
    }
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0
