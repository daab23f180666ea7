"""The local engine: runs a target dir's bundle in this process, one step at a time.

It drives :mod:`executor.state` and does the I/O around it: ``run_state.json``
after every transition, one log file per step, a process group per step (so
a timeout or a cancel kills the step and everything it started), and the
fencing check with the broker before a step that touches hardware.

Exit codes of ``merlin targetgen execute --engine local`` come from the one
table for both engines, ``broker.errors.RUN_EXIT_CODES``: 0 succeeded,
20 waiting at an operator gate, 21 a step failed, 22 cancelled, 8 stale
fencing token (3 invalid bundle or target dir, as for every command).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.disk.store import atomic_write
from broker.errors import RUN_EXIT_CODES, InvalidRequest, RunEnd, StaleFencingToken
from broker.models import is_group_lease_id, resource_of_lease_id
from executor.state import (
    BundleStatus,
    Finished,
    RunState,
    RunStep,
    SkipStep,
    StepStatus,
    WaitAtGate,
    approve,
    move,
    new_state,
    next_action,
    prepare_resume,
)
from targetgen.bundle import BUNDLE_FILE, POOL_RESOURCE, BundleStep, ExecutionBundle, bound_step, load_bundle

__all__ = [
    "STATE_FILE",
    "EXIT_SUCCEEDED",
    "EXIT_AWAITING_GATE",
    "EXIT_STEP_FAILED",
    "EXIT_CANCELLED",
    "LocalEngine",
    "BrokerFence",
    "HeldFence",
    "held_leases",
    "step_keys",
    "load_state",
    "approve_step",
    "exit_code_for",
    "settle_state",
    "archive_state",
    "TERMINAL_BUNDLE_STATUSES",
]

STATE_FILE = "run_state.json"
EXIT_SUCCEEDED = RUN_EXIT_CODES[RunEnd.SUCCEEDED]
EXIT_AWAITING_GATE = RUN_EXIT_CODES[RunEnd.AWAITING_GATE]
EXIT_STEP_FAILED = RUN_EXIT_CODES[RunEnd.STEP_FAILED]
EXIT_CANCELLED = RUN_EXIT_CODES[RunEnd.CANCELLED]
KILL_GRACE_S = 5.0
# While a hardware step runs, its lease is checked this often; a lost lease stops the step.
FENCE_RECHECK_S = float(os.environ.get("MERLIN_FENCE_RECHECK_S", "2"))

FenceCheck = Callable[[BundleStep], None]


_END_OF_BUNDLE = {
    BundleStatus.SUCCEEDED: RunEnd.SUCCEEDED,
    BundleStatus.AWAITING_GATE: RunEnd.AWAITING_GATE,
    BundleStatus.CANCELLED: RunEnd.CANCELLED,
}


def run_end_of(state: RunState) -> RunEnd:
    return _END_OF_BUNDLE.get(state.status, RunEnd.STEP_FAILED)


def exit_code_for(state: RunState) -> int:
    """The exit code of ``merlin targetgen execute`` for a run that ended in ``state`` (broker.errors)."""
    return RUN_EXIT_CODES[run_end_of(state)]


def _bundle_sha256(target_dir: Path) -> str:
    return hashlib.sha256((target_dir / BUNDLE_FILE).read_bytes()).hexdigest()


def load_state(target_dir: Path) -> RunState | None:
    try:
        return RunState.model_validate(json.loads((target_dir / STATE_FILE).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{target_dir / STATE_FILE} is unreadable ({exc}); use --restart", "run_state") from None


def _save(target_dir: Path, state: RunState) -> None:
    atomic_write(target_dir / STATE_FILE, state.model_dump_json(indent=2).encode())


@contextmanager
def _exclusive(target_dir: Path) -> Iterator[None]:
    """One executor per target dir at a time."""
    with open(target_dir / ".executor.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidRequest(f"another executor is running {target_dir}", "target_dir") from None
        yield


def approve_step(target_dir: Path, step_id: str, by: str, *, skip: bool = False) -> RunState:
    """Record an operator's approval (or skip) of a gated step; works before the run reaches it."""
    target_dir = Path(target_dir)
    bundle = load_bundle(target_dir)
    with _exclusive(target_dir):
        sha = _bundle_sha256(target_dir)
        state = load_state(target_dir)
        if state is None or state.bundle_sha256 != sha:
            state = new_state(bundle, sha)
        state = approve(bundle, state, step_id, by, time.time(), skip=skip)
        _save(target_dir, state)
    return state


TERMINAL_BUNDLE_STATUSES = frozenset({BundleStatus.SUCCEEDED, BundleStatus.FAILED, BundleStatus.CANCELLED})


def settle_state(target_dir: Path, status: BundleStatus, message: str, now: float | None = None) -> RunState | None:
    """Record a run's end in its target dir when its executor could not (killed by Ray, lease lost).

    A step left ``running`` becomes ``failed`` with ``message``; the bundle takes ``status``.
    Does nothing while an executor still holds the dir, or when the state already ended.
    """
    target_dir = Path(target_dir)
    now = time.time() if now is None else now
    try:
        with _exclusive(target_dir):
            state = load_state(target_dir)
            if state is None or state.status not in (BundleStatus.RUNNING, BundleStatus.PENDING):
                return state  # the executor recorded its own end
            for step in state.steps:
                if step.status is StepStatus.RUNNING:
                    state = move(state, step.id, StepStatus.FAILED, now, ended_at=now, message=message)
            state = state.model_copy(update={"status": status, "message": message, "ended_at": now, "updated_at": now})
            _save(target_dir, state)
            return state
    except InvalidRequest:  # another executor runs there: it records its own end
        return None


def archive_state(target_dir: Path, now: float | None = None) -> Path | None:
    """Start the next run of ``target_dir`` afresh: its old ``run_state.json`` is kept beside, renamed."""
    path = Path(target_dir) / STATE_FILE
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    archived = path.with_name(f"run_state.{stamp}.json")
    with _exclusive(Path(target_dir)):
        path.replace(archived)
    return archived


def step_keys(step: BundleStep, held: tuple[str, ...]) -> tuple[str, ...]:
    """The keys whose leases a hardware step needs: its own, or, for a pool bundle's step
    (:data:`POOL_RESOURCE`), every key the run was bound to."""
    if step.resource is None:
        return ()
    return held if step.resource == POOL_RESOURCE else (step.resource,)


class BrokerFence:
    """Checks the run's lease(s) with the broker before a hardware step.

    ``leases`` maps each key the run holds to ``(lease_id, fencing_token)``: one key for a
    bundle that names its resource, the bound key(s) for a pool bundle's run.
    """

    def __init__(self, leases: dict[str, tuple[str, int]]):
        self.leases = dict(leases)
        self._client: Any = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.leases)

    @classmethod
    def from_env(cls) -> BrokerFence | None:
        """The run's lease(s): from the 0600 file ``MERLIN_LEASE_FILE`` names (the Ray engine:
        ``leases`` has every key, with its token), or ``MERLIN_LEASE_ID`` (a caller that holds a
        lease itself) with ``MERLIN_FENCING_TOKEN``."""
        lease_id, token = os.environ.get("MERLIN_LEASE_ID"), os.environ.get("MERLIN_FENCING_TOKEN")
        lease_file = os.environ.get("MERLIN_LEASE_FILE")
        if lease_file:
            try:
                with open(lease_file, encoding="utf-8") as handle:
                    body = json.load(handle)
                if "leases" in body:
                    leases = {
                        str(key): (str(held["lease_id"]), int(held["fencing_token"]))
                        for key, held in body["leases"].items()
                    }
                    return cls(leases) if leases else None
                lease_id = body["lease_id"]  # a file written before pool runs: one key
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InvalidRequest(f"cannot read the run's lease from {lease_file}: {exc}", "lease_file") from None
        if not lease_id or not token:
            return None
        try:
            return cls({resource_of_lease_id(lease_id): (lease_id, int(token))})
        except ValueError:
            raise InvalidRequest(f"MERLIN_FENCING_TOKEN={token!r} is not an integer", "fencing_token") from None

    def __call__(self, step: BundleStep) -> None:
        if self._client is None:
            from broker.client import connect

            self._client = connect()
        for key in step_keys(step, self.keys):
            if key not in self.leases:  # a step on a key this run does not hold
                raise StaleFencingToken(key, 0, None)
            lease_id, token = self.leases[key]
            lease = self._client.check_fence(lease_id, token)
            if lease.resource != key:
                raise StaleFencingToken(key, token, None)


class HeldFence:
    """The fence for a run that took its own leases (``--engine local`` with a broker)."""

    def __init__(self, client: Any, held: dict[str, Any]):
        self._client = client
        self._held = held  # resource -> broker.client.HeldLease (a pool: each key -> the group's)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self._held)

    def __call__(self, step: BundleStep) -> None:
        for key in step_keys(step, self.keys):
            held = self._held.get(key)
            if held is None:
                raise StaleFencingToken(key, 0, None)
            lease = held.check()  # raises LeaseNotHeld once the heartbeat saw the loss
            if is_group_lease_id(lease.lease_id):  # a group lease: fenced with every key's token at once
                self._client.check_fence(lease.lease_id, held.fencing_tokens)
            else:
                self._client.check_fence(lease.lease_id, lease.fencing_token or 0)


@contextmanager
def held_leases(
    client: Any,
    resources: list[str],
    holder: str,
    *,
    report: Callable[[str], None],
    pool: tuple[str, int, tuple[str, ...]] | None = None,
) -> Iterator[HeldFence]:
    """Hold every resource the bundle's steps need for the whole run (taken in key order, so two
    runs that need overlapping keys never deadlock), renewed in the background, released at the end.

    ``pool`` (labels, count, keys) holds a pool bundle's keys instead, as one group lease: any
    ``count`` members of ``labels``, or those ``keys`` all together (a set bundle's, or the ones a
    resumed run was bound to).
    """
    with contextlib.ExitStack() as stack:
        held = {}
        if pool is not None:
            labels, count, keys = pool
            asked = f"all of {', '.join(keys)}" if keys else f"any {count} of {labels}"
            report(f"waiting for {asked} (as {holder})")
            where: dict[str, Any] = {"keys": list(keys)} if keys else {"labels": labels, "count": count}
            group = stack.enter_context(
                client.lease(holder=holder, ttl_s=60.0, note="merlin targetgen execute --engine local", **where)
            )
            held = {key: group for key in group.keys}
            report(f"leased {', '.join(f'{k} (fencing token {t})' for k, t in group.fencing_tokens.items())}")
        for resource in resources:
            report(f"waiting for the lease on {resource} (as {holder})")
            held[resource] = stack.enter_context(
                client.lease(resource, holder, ttl_s=60.0, note="merlin targetgen execute --engine local")
            )
            report(f"leased {resource}: fencing token {held[resource].fencing_token}")
        yield HeldFence(client, held)


class LocalEngine:
    """Runs one target dir. ``stop`` (a threading.Event) cancels between and during steps."""

    def __init__(
        self,
        target_dir: Path,
        *,
        fence: FenceCheck | None = None,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
        report: Callable[[str], None] = lambda line: None,
        bound: tuple[str, ...] = (),
    ):
        self.target_dir = Path(target_dir).resolve()
        self.fence = fence
        self.bound = tuple(sorted(bound))  # a pool bundle's key(s) for {resource}: the ones its run holds
        self.stop = stop or threading.Event()
        self.clock = clock
        self.report = report  # progress lines (the CLI prints them; a Ray job's log keeps them)

    def run(self, *, resume: bool = False, restart: bool = False) -> RunState:
        """Run until done, failed, cancelled or at a gate; returns the saved state.

        Raises:
            InvalidRequest: no such dir, a bad bundle, or a run already in progress.
            StaleFencingToken: a hardware step's lease is no longer current (after saving).
        """
        if not self.target_dir.is_dir():
            raise InvalidRequest(f"target dir {self.target_dir} does not exist", "target_dir")
        bundle = load_bundle(self.target_dir)
        if bundle.job is not None and not os.environ.get("MERLIN_RUN_ID"):
            # Outside a broker run's Ray job nobody placed this process: the steps run right here.
            self.report("note: the bundle's job resources (CPUs, memory, custom resources, preemptible) "
                        "apply to --engine ray; the local engine ignores them")  # fmt: skip
        if bundle.pool and len(self.bound) != bundle.count:
            raise InvalidRequest(
                f"the bundle runs on {bundle.count} of the pool {bundle.resource_labels}; "
                f"its run is bound to {len(self.bound)} key(s) ({', '.join(self.bound) or 'none'})",
                "resource_labels",
            )
        with _exclusive(self.target_dir):
            state = self._initial_state(bundle, resume=resume, restart=restart)
            return self._drive(bundle, state)

    def _initial_state(self, bundle: ExecutionBundle, *, resume: bool, restart: bool) -> RunState:
        sha = _bundle_sha256(self.target_dir)
        now = self.clock()
        state = None if restart else load_state(self.target_dir)
        if state is not None and state.bundle_sha256 != sha:
            if resume:
                raise InvalidRequest(
                    f"the bundle in {self.target_dir} changed since its run began; use --restart", "bundle"
                )
            state = None
        if state is not None:
            started = any(step.status is not StepStatus.PENDING for step in state.steps)
            if resume:
                state = prepare_resume(state, now)
            elif started:
                raise InvalidRequest(
                    f"{self.target_dir} already has a run ({state.status.value}): "
                    "use --resume to continue it or --restart to start over",
                    "target_dir",
                )
        if state is None:
            state = new_state(bundle, sha)
        if bundle.pool and state.resources and state.resources != self.bound:
            raise InvalidRequest(
                f"this run began on {', '.join(state.resources)}; it resumes only there, not on "
                f"{', '.join(self.bound)} (use --restart to start over on other keys)",
                "resource_labels",
            )
        token = os.environ.get("MERLIN_FENCING_TOKEN")
        return state.model_copy(
            update={
                "status": BundleStatus.RUNNING,
                "started_at": state.started_at or now,
                "updated_at": now,
                "fencing_token": int(token) if token and token.isdigit() else state.fencing_token,
                "resources": self.bound if bundle.pool else state.resources,
            }
        )

    def _drive(self, bundle: ExecutionBundle, state: RunState) -> RunState:
        _save(self.target_dir, state)
        while True:
            now = self.clock()
            if self.stop.is_set():
                return self._finish(state, BundleStatus.CANCELLED, "cancelled")
            action = next_action(bundle, state)
            if isinstance(action, (WaitAtGate, RunStep)):  # a pool bundle's step: its key(s) filled in
                action = type(action)(bound_step(action.step, self.bound))
            if isinstance(action, Finished):
                return self._finish(state, action.status, action.message)
            if isinstance(action, SkipStep):
                state = move(state, action.step.id, StepStatus.SKIPPED, now, message="skipped by an operator")
                self.report(f"step {action.step.id}: skipped (operator decision)")
            elif isinstance(action, WaitAtGate):
                step = action.step
                if state.step(step.id).status is StepStatus.PENDING:
                    state = move(state, step.id, StepStatus.AWAITING_GATE, now)
                hint = f"merlin targetgen approve {self.target_dir} {step.id}"
                prompt = step.gate.prompt if step.gate else ""
                state = state.model_copy(
                    update={
                        "status": BundleStatus.AWAITING_GATE,
                        "message": f"waiting at {step.id!r}: {prompt} ({hint})",
                    }
                )
                _save(self.target_dir, state)
                self.report(state.message)
                return state
            else:
                state = self._run_step(action.step, state)
            _save(self.target_dir, state)

    def _finish(self, state: RunState, status: BundleStatus, message: str) -> RunState:
        now = self.clock()
        state = state.model_copy(update={"status": status, "message": message, "ended_at": now, "updated_at": now})
        _save(self.target_dir, state)
        self.report(f"bundle {state.target}: {status.value}" + (f" ({message})" if message else ""))
        return state

    def _run_step(self, step: BundleStep, state: RunState) -> RunState:
        if step.resource is not None and self.fence is not None:
            try:
                self.fence(step)
            except StaleFencingToken as stale:
                refused = state.with_step(
                    state.step(step.id).model_copy(update={"message": f"refused: {stale}"}), self.clock()
                )
                self._finish(refused, BundleStatus.FAILED, f"step {step.id!r} refused: {stale}")
                raise
        attempt = state.step(step.id).attempts + 1
        state = move(state, step.id, StepStatus.RUNNING, self.clock(), attempts=attempt, started_at=self.clock(),
                     ended_at=None, exit_code=None, message="")  # fmt: skip
        _save(self.target_dir, state)
        self.report(f"step {step.id}: running (attempt {attempt})")
        started = time.monotonic()
        code, message = self._execute(step, attempt)
        if isinstance(message, StaleFencingToken):
            lost = message
            state = move(state, step.id, StepStatus.FAILED, self.clock(), ended_at=self.clock(), exit_code=code,
                         message=f"stopped: the lease was lost ({lost})")  # fmt: skip
            self._finish(state, BundleStatus.FAILED, f"step {step.id!r} stopped: the lease was lost ({lost})")
            raise lost
        if code == 0:
            missing = [path for path in step.artifacts if not (self.target_dir / path).exists()]
            if missing:
                code, message = None, f"finished but left no {', '.join(missing)}"
        status = StepStatus.SUCCEEDED if code == 0 else StepStatus.FAILED
        tail = f" ({message})" if message else ""
        self.report(f"step {step.id}: {status.value} in {time.monotonic() - started:.1f}s{tail}")
        return move(state, step.id, status, self.clock(), ended_at=self.clock(), exit_code=code, message=message)

    def _execute(self, step: BundleStep, attempt: int) -> tuple[int | None, str | StaleFencingToken]:
        """Run the step's process group; returns (exit code, message), or the fencing refusal
        that stopped it (its lease was lost while it ran)."""
        cwd = (self.target_dir / step.cwd).resolve()
        if not cwd.is_relative_to(self.target_dir):
            return None, f"cwd {step.cwd!r} leaves the target dir"
        cwd.mkdir(parents=True, exist_ok=True)
        log_path = self.target_dir / "logs" / f"{step.id}.log"
        log_path.parent.mkdir(exist_ok=True)
        env = {**os.environ, **step.env, "MERLIN_TARGET_DIR": str(self.target_dir), "MERLIN_STEP_ID": step.id}
        with open(log_path, "ab") as log:
            log.write(
                f"--- attempt {attempt} at {time.strftime('%Y-%m-%dT%H:%M:%S')}: {' '.join(step.argv)}\n".encode()
            )
            log.flush()
            try:
                proc = subprocess.Popen(
                    list(step.argv), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                return None, f"cannot start {step.argv[0]!r}: {exc.strerror or exc}"
            deadline = time.monotonic() + step.timeout_s
            next_fence = time.monotonic() + FENCE_RECHECK_S
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(timeout=0.1)
                    break
                if step.resource is not None and self.fence is not None and time.monotonic() >= next_fence:
                    next_fence = time.monotonic() + FENCE_RECHECK_S
                    lost = self._lease_lost(step)
                    if lost is not None:
                        _kill_group(proc)
                        log.write(f"--- the lease was lost ({lost}); process group killed\n".encode())
                        return proc.returncode, lost
                if self.stop.is_set():
                    _kill_group(proc)
                    return proc.returncode, "stopped: the run was cancelled"
                if time.monotonic() >= deadline:
                    _kill_group(proc)
                    log.write(f"--- timed out after {step.timeout_s:g}s; process group killed\n".encode())
                    return None, f"timed out after {step.timeout_s:g}s"
        if code != 0:
            return code, f"exited with code {code} (see {log_path.relative_to(self.target_dir)})"
        return 0, ""

    def _lease_lost(self, step: BundleStep) -> StaleFencingToken | None:
        """Is the step's lease gone? A broker that does not answer is not a loss (the step goes on)."""
        from broker.errors import BrokerUnavailable, LeaseNotFound, LeaseNotHeld

        assert self.fence is not None
        try:
            self.fence(step)
        except StaleFencingToken as stale:
            return stale
        except (LeaseNotHeld, LeaseNotFound):
            shown = ",".join(self.bound) if step.resource == POOL_RESOURCE else step.resource
            return StaleFencingToken(shown or "-", self._token(), None)
        except BrokerUnavailable:
            return None
        return None

    @staticmethod
    def _token() -> int:
        token = os.environ.get("MERLIN_FENCING_TOKEN", "")
        return int(token) if token.isdigit() else 0


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the step's whole process group, then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # the leader is gone; make sure its children are too
            os.killpg(proc.pid, signal.SIGKILL)
        return
