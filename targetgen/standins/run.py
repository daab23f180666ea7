"""The stand-in program: print progress, wait, fail on demand, write the action's artifact.

Paths are relative to the target dir: ``MERLIN_TARGET_DIR`` when the executor
sets it, else the working dir. Output is
written to a temp file and renamed, so a killed stand-in leaves no half
artifact behind (the executor may look for it to decide a step succeeded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from targetgen.standins import ACTIONS, EXIT_INJECTED_FAILURE, EXIT_MISSING_INPUT, EXIT_USAGE, StandinAction

__all__ = ["main", "blob"]

_DEFAULT_SECONDS = 0.2


def blob(kind: str, target: str, size: int = 16384) -> bytes:
    """Deterministic bytes standing in for a binary: the same kind and target give the same file."""
    out = bytearray(f"MERLIN STAND-IN {kind} for {target}\n".encode())
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{kind}:{target}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m targetgen.standins", description=__doc__)
    parser.add_argument("action", choices=sorted(ACTIONS))
    parser.add_argument(
        "--step", help="the step id (for FAIL_<step> and the records); default: $MERLIN_STEP_ID, else the action"
    )
    parser.add_argument("--target", default="target", help="the canonical target name, recorded in artifacts")
    parser.add_argument("--resource", default=None, help="the catalog key the step runs on")
    parser.add_argument("--out", default=None, help="artifact path under artifacts/ (default: the action's)")
    return parser


def _lease() -> dict[str, object]:
    """The lease the step runs under, as far as the executor told us; never the lease id itself."""
    token = os.environ.get("MERLIN_FENCING_TOKEN")
    lease_id = os.environ.get("MERLIN_LEASE_ID")
    ref = None
    if lease_id:
        from broker.models import lease_ref  # the lease id is a capability: record its public ref only

        ref = lease_ref(lease_id)
    return {"fencing_token": int(token) if token and token.isdigit() else token, "lease_ref": ref}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(args: argparse.Namespace, step: str, **fields: object) -> bytes:
    record = {"standin": True, "action": args.action, "step": step, "target": args.target, "resource": args.resource}
    record.update(_lease())
    record.update(fields)
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def _text(args: argparse.Namespace, step: str, lines: list[str]) -> bytes:
    lease = _lease()
    head = [
        f"# stand-in {args.action} (step {step}) for {args.target} on {args.resource or 'no resource'}",
        f"# fencing token: {lease['fencing_token']}",
    ]
    return ("\n".join(head + lines) + "\n").encode()


def _content(action: StandinAction, args: argparse.Namespace, step: str, input_path: Path | None) -> bytes:
    """The bytes of the action's artifact; inputs are fingerprinted, as a real tool's log would."""
    input_sha = _sha256(input_path) if input_path is not None else None
    makers: dict[str, Callable[[], bytes]] = {
        "build-bitstream": lambda: blob("bitstream", args.target),
        "build-image": lambda: blob("image", args.target),
        "verilate": lambda: blob("simulator", args.target),
        "flash-fpga": lambda: _record(args, step, input=action.needs_input, input_sha256=input_sha),
        "flash-board": lambda: _record(args, step, input=action.needs_input, input_sha256=input_sha),
        "boot": lambda: _text(
            args,
            step,
            [
                "[    0.000000] Linux version 6.6.0-standin (merlin@standin)",
                f"[    0.000000] Machine model: {args.target}",
                f"[    0.100000] boot media from flash record sha256 {input_sha}",
                "[    2.500000] Run /sbin/init as init process",
                f"{args.target} login:",
            ],
        ),
        "smoke-test": lambda: _record(
            args,
            step,
            tests=[{"name": name, "status": "passed"} for name in ("hello", "memtest", "ifconfig")],
            passed=3,
            failed=0,
        ),
        "simulate": lambda: _text(
            args,
            step,
            [f"loaded model sha256 {input_sha}", "test rv64ui-p-add: PASS", "test rv64ui-p-ld: PASS", "cycles: 123456"],
        ),
        "check-results": lambda: _record(args, step, checked=action.needs_input, log_sha256=input_sha, mismatches=0),
    }
    return makers[action.name]()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one action in the target dir; returns the exit code (0, 2 usage, 3 injected, 4 missing input)."""
    args = _parser().parse_args(argv)
    action = ACTIONS[args.action]
    step = args.step or os.environ.get("MERLIN_STEP_ID") or action.name
    root = Path(os.environ.get("MERLIN_TARGET_DIR") or ".")
    out = args.out or action.output
    pure = PurePosixPath(out)
    if pure.is_absolute() or ".." in pure.parts or pure.parts[:1] != ("artifacts",) or len(pure.parts) < 2:
        return _fail(f"--out {out!r} must be a relative path under artifacts/", EXIT_USAGE)
    try:
        seconds = float(os.environ.get("MERLIN_STANDIN_SECONDS", _DEFAULT_SECONDS))
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        shown = os.environ["MERLIN_STANDIN_SECONDS"]
        return _fail(f"MERLIN_STANDIN_SECONDS={shown!r} is not a number of seconds", EXIT_USAGE)

    print(f"[{step}] stand-in for: {action.summary} ({args.target} on {args.resource or 'no resource'})", flush=True)
    # Checked after the first line, so a failed step's log shows it started, as a real tool's would.
    failing = {name.strip() for name in os.environ.get("MERLIN_STANDIN_FAIL", "").split(",") if name.strip()}
    if (root / f"FAIL_{step}").exists() or step in failing:
        fix = f"remove FAIL_{step} / unset MERLIN_STANDIN_FAIL to fix"
        return _fail(f"[{step}] injected failure ({fix})", EXIT_INJECTED_FAILURE)
    input_path = root / action.needs_input if action.needs_input else None
    if input_path is not None and not input_path.is_file():
        missing = f"{action.needs_input} is missing: an earlier step should have made it"
        return _fail(f"[{step}] {missing}", EXIT_MISSING_INPUT)

    for line in action.progress:
        print(f"[{step}] {line} ...", flush=True)
        time.sleep(seconds / len(action.progress))
    data = _content(action, args, step, input_path)
    _write(root / out, data)
    print(f"[{step}] wrote {out} ({len(data)} bytes)", flush=True)
    return 0
