"""The target dir: the files a target's plan, bundle and run live in (a contract with the executor).

::

    <target dir>/
      target.yaml        the spec, copied in by prepare_target_dir
      plan.json          the support plan (write_plan)
      bundle.json        the execution bundle (targetgen.bundle.write_bundle)
      run_state.json     the executor's progress
      logs/<step>.log    each step's output (the executor's)
      artifacts/...      what the steps leave

Every function here validates before it writes: a bad spec or a missing dir
leaves the disk as it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import ValidationError

from broker.disk.store import atomic_write
from broker.errors import InvalidRequest
from targetgen.plan import SupportPlan
from targetgen.spec import TargetSpec, load_spec

__all__ = ["TARGET_FILE", "PLAN_FILE", "prepare_target_dir", "load_target_spec", "write_plan", "load_plan"]

TARGET_FILE = "target.yaml"
PLAN_FILE = "plan.json"


def _existing(target_dir: Path) -> Path:
    target_dir = Path(target_dir)
    if not target_dir.is_dir():
        raise InvalidRequest(f"target dir {target_dir} does not exist", "target_dir")
    return target_dir


def prepare_target_dir(spec_path: Path, target_dir: Path) -> Path:
    """Copy a spec into a target dir as ``target.yaml``, creating the dir.

    An existing ``target.yaml`` is replaced: editing the spec and preparing
    again is the normal loop (the bundle's ``spec_sha256`` then tells old runs
    from new ones).

    Args:
        spec_path: the spec file; it is validated first.
        target_dir: the dir to create or reuse.

    Returns:
        The path of the written ``target.yaml``.

    Raises:
        InvalidRequest: the spec is invalid (nothing is written), or the dir
            cannot be created.
    """
    spec = load_spec(spec_path)
    raw = Path(spec_path).read_bytes()
    if hashlib.sha256(raw).hexdigest() != spec.spec_sha256:
        raise InvalidRequest(f"{spec_path} changed while it was read: try again", "spec")
    target_dir = Path(target_dir)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidRequest(f"cannot create target dir {target_dir}: {exc.strerror}", "target_dir") from None
    path = target_dir / TARGET_FILE
    atomic_write(path, raw)
    return path


def load_target_spec(target_dir: Path) -> TargetSpec:
    """Read ``<target_dir>/target.yaml``.

    Raises:
        InvalidRequest: the dir does not exist, has no ``target.yaml``, or the spec is invalid.
    """
    target_dir = _existing(target_dir)
    path = target_dir / TARGET_FILE
    if not path.is_file():
        raise InvalidRequest(f"no {TARGET_FILE} in {target_dir}: prepare the dir from a spec first", "target_dir")
    return load_spec(path)


def write_plan(target_dir: Path, plan: SupportPlan) -> Path:
    """Write ``plan.json`` into an existing target dir; returns its path.

    Raises:
        InvalidRequest: the dir does not exist.
    """
    path = _existing(target_dir) / PLAN_FILE
    atomic_write(path, plan.to_json().encode())
    return path


def load_plan(target_dir: Path) -> SupportPlan:
    """Read ``plan.json`` back.

    Raises:
        InvalidRequest: the dir or the file does not exist, or it is not a plan.
    """
    path = _existing(target_dir) / PLAN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequest(f"no {PLAN_FILE} in {target_dir}: make the plan first", "plan") from None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: not valid JSON ({exc})", "plan") from None
    try:
        return SupportPlan.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "plan"
        raise InvalidRequest(f"{path}: {where}: {err['msg'].removeprefix('Value error, ')}", where) from None
