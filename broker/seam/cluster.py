"""The local Ray cluster on loopback: start, stop, status, and how clients reach it.

Ray facts this module exists for (README "Running on loopback"): on Linux Ray 2.60
rewrites ``--node-ip-address=127.0.0.1`` to the external address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set for the head *and every client*;
token auth turns itself on when ``~/.ray/auth_token`` exists unless
``RAY_AUTH_MODE`` is set; ``ray stop`` kills every Ray process of the user.
So ``start-local`` records the exact environment, ports, process group and
temp dir in ``cluster/bootstrap.json``; clients connect with that
environment; ``stop`` kills only the processes it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from broker.disk.store import FILE_MODE, StateDir, atomic_write, read_json
from broker.errors import BrokerUnavailable, InvalidRequest

__all__ = [
    "Bootstrap",
    "read_bootstrap",
    "start_local",
    "stop_local",
    "cluster_alive",
    "client_env",
    "connect_ray",
    "LOOPBACK",
]

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90.0
# Ray daemons often ignore SIGTERM for long; our state is on disk, so a short grace is enough.
STOP_GRACE_S = 3.0
CONNECT_PROBE_S = 2.0


class Bootstrap(BaseModel):
    """``cluster/bootstrap.json``: everything a client needs to reach the cluster the same way."""

    model_config = ConfigDict(extra="ignore")

    version: int = 1
    gcs_address: str
    dashboard_url: str
    host: str = LOOPBACK
    ports: dict[str, int] = Field(default_factory=dict)
    temp_dir: str
    state_dir: str
    env: dict[str, str] = Field(default_factory=dict)
    auth_mode: str = "token"
    token_path: str | None = None
    pgid: int
    python: str
    ray_version: str = ""
    started_at: float


def read_bootstrap(state: StateDir) -> Bootstrap | None:
    try:
        return Bootstrap.model_validate(read_json(state.bootstrap_path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BrokerUnavailable(
            f"cannot read {state.bootstrap_path}: {exc}", "run `merlin ray cluster start-local` again"
        ) from None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _probe(address: str, timeout_s: float = CONNECT_PROBE_S) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or LOOPBACK, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _group_pids(pgid: int) -> list[int]:
    """Processes in process group ``pgid`` plus all their descendants (Ray workers have their own group)."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        groups[pid] = int(fields[2])
    members = {pid for pid, group in groups.items() if group == pgid}
    frontier = set(members)
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier and pid not in members}
        members |= children
        frontier = children
    return sorted(members)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def cluster_alive(bootstrap: Bootstrap) -> bool:
    """Our head still runs: its processes exist and its GCS answers."""
    pids = _group_pids(bootstrap.pgid)
    ours = any(bootstrap.temp_dir in _cmdline(pid) for pid in pids)
    return ours and _probe(bootstrap.gcs_address)


def _temp_dir_for(state: StateDir) -> Path:
    # Ray puts unix sockets under its temp dir; keep the path short (108-byte limit).
    # Ray makes its temp dir world-writable (and again whenever a process of it starts), and its
    # session logs hold job environments: it lives inside a 0700 dir of ours that Ray leaves alone.
    digest = hashlib.sha256(str(state.root).encode()).hexdigest()[:10]
    return Path("/tmp") / f"merlin-ray-{os.getuid()}-{digest}" / "r"


def start_local(
    state: StateDir,
    *,
    host: str = LOOPBACK,
    num_cpus: int | None = None,
    auth: bool = True,
    object_store_mb: int = 256,
    resources: dict[str, float] | None = None,
) -> tuple[Bootstrap, bool]:
    """Start a Ray head for this state dir, or return the one already running.

    Returns:
        the bootstrap record and whether a new head was started.
    Raises:
        BrokerUnavailable: ``ray start`` failed (its log path is in the message).
    """
    state.ensure()
    existing = read_bootstrap(state)
    if existing is not None and cluster_alive(existing):
        return existing, False
    if num_cpus is not None and num_cpus < 0:
        raise InvalidRequest(f"invalid num_cpus={num_cpus}: must be >= 0", "num_cpus")
    temp_dir = _temp_dir_for(state)
    temp_dir.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(temp_dir.parent, 0o700)  # mkdir's mode is masked by the umask, and an old dir keeps its own
    temp_dir.mkdir(mode=0o700, exist_ok=True)
    # A stale pointer from a cluster that died (or a plain `ray stop`) would
    # make Ray think one still runs here.
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)
    token_path = state.cluster_dir / "auth_token"
    if auth and not token_path.exists():
        atomic_write(token_path, secrets.token_hex(32).encode())
    if auth:
        os.chmod(token_path, FILE_MODE)
    ports = {
        "gcs": _free_port(host),
        "dashboard": _free_port(host),
        "client_server": _free_port(host),
        "dashboard_agent": _free_port(host),
    }
    env_overrides = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token" if auth else "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    if auth:
        env_overrides["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env = {**os.environ, **env_overrides}
    env.pop("RAY_ADDRESS", None)
    if not auth:
        env.pop("RAY_AUTH_TOKEN_PATH", None)
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        f"--node-ip-address={host}",
        f"--port={ports['gcs']}",
        f"--dashboard-host={host}",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client_server']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent']}",
        f"--temp-dir={temp_dir}",
        f"--object-store-memory={object_store_mb * 1024 * 1024}",
        "--include-dashboard=true",
        "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if resources:
        argv.append(f"--resources={json.dumps(resources)}")
    log_path = state.cluster_dir / "ray-start.log"
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(log_fd, FILE_MODE)  # an older log may have been made with the umask's mode
    with open(log_fd, "wb") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            code = proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            raise BrokerUnavailable(f"`ray start` did not finish in {START_TIMEOUT_S:g}s", f"see {log_path}") from None
    if code != 0:
        _kill_group(proc.pid)
        last = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise BrokerUnavailable(f"`ray start` failed (exit {code}): {last[0][:200]}", f"see {log_path}")
    bootstrap = Bootstrap(
        gcs_address=f"{host}:{ports['gcs']}",
        dashboard_url=f"http://{host}:{ports['dashboard']}",
        host=host,
        ports=ports,
        temp_dir=str(temp_dir),
        state_dir=str(state.root),
        env={k: v for k, v in env_overrides.items() if k != "RAY_USAGE_STATS_ENABLED"},
        auth_mode=env_overrides["RAY_AUTH_MODE"],
        token_path=str(token_path) if auth else None,
        pgid=proc.pid,  # `ray start` led a new session: every head process is in its group
        python=sys.executable,
        ray_version=importlib.metadata.version("ray"),
        started_at=time.time(),
    )
    atomic_write(state.bootstrap_path, bootstrap.model_dump_json(indent=2).encode())
    return bootstrap, True


def _kill_group(pgid: int, grace_s: float = STOP_GRACE_S) -> list[int]:
    pids = _group_pids(pgid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            pids = [pid for pid in pids if _exists(pid)]
            if not pids:
                return []
            time.sleep(0.1)
    return pids


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except OSError:
        return False


def stop_local(state: StateDir) -> dict[str, Any]:
    """Stop the head this state dir started — only its processes, never another cluster."""
    bootstrap = read_bootstrap(state)
    if bootstrap is None:
        return {"stopped": False, "reason": "no cluster recorded in this state dir"}
    pids = _group_pids(bootstrap.pgid)
    ours = [pid for pid in pids if bootstrap.temp_dir in _cmdline(pid)]
    survivors: list[int] = []
    if ours:
        survivors = _kill_group(bootstrap.pgid)
    (Path(bootstrap.temp_dir) / "ray_current_cluster").unlink(missing_ok=True)
    state.bootstrap_path.unlink(missing_ok=True)
    return {"stopped": bool(ours), "processes": len(pids) if ours else 0, "survivors": survivors}


def client_env(bootstrap: Bootstrap | None, address: str) -> dict[str, str]:
    """Environment a client needs: loopback pinning, and the auth the cluster was started with."""
    env: dict[str, str] = {}
    host = address.rpartition(":")[0]
    if bootstrap is not None:
        env.update(bootstrap.env)
    if host in (LOOPBACK, "localhost"):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def connect_ray(state: StateDir, *, address: str | None = None, namespace: str) -> Bootstrap | None:
    """Connect this process to the cluster as a driver, or raise ``BrokerUnavailable`` quickly.

    The address comes from ``address``, then ``RAY_ADDRESS``, then
    ``cluster/bootstrap.json``. A TCP probe runs first, because a Ray client
    pointed at a dead address retries forever.
    """
    bootstrap = read_bootstrap(state)
    target = address or os.environ.get("RAY_ADDRESS") or (bootstrap.gcs_address if bootstrap else None)
    if not target:
        raise BrokerUnavailable(
            f"no Ray cluster is recorded in {state.root}", "run `merlin ray cluster start-local` (or set RAY_ADDRESS)"
        )
    if bootstrap is not None and target != bootstrap.gcs_address:
        bootstrap = None  # another cluster: do not borrow this one's auth
    env = client_env(bootstrap, target)
    imported_before = "ray._raylet" in sys.modules
    for name, value in env.items():
        if name.startswith("RAY_AUTH") and name in os.environ:
            continue  # an explicit auth setting wins
        os.environ[name] = value
    # Ray reads the loopback switch and the auth mode when it is imported: the
    # environment is set first, and refreshed below if Ray came in before us.
    try:
        import ray
    except ImportError:
        raise BrokerUnavailable(
            "Ray is not installed in this Python", "install the project: `make setup` (or pip install -e .)"
        ) from None
    from broker.seam.ray_private import refresh_imported_ray, route_ray_messages_to_stderr

    if ray.is_initialized():
        return bootstrap
    if imported_before:
        refresh_imported_ray(env)
    if ":" in target and not target.startswith(("ray://", "auto")) and not _probe(target):
        raise BrokerUnavailable(f"no Ray cluster answers at {target}", "run `merlin ray cluster start-local`")
    route_ray_messages_to_stderr()
    try:
        ray.init(address=target, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - ray raises many types here (auth, version, connection)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BrokerUnavailable(
            f"cannot connect to Ray at {target}: {first}", "check `merlin ray cluster status`"
        ) from None
    return bootstrap
