"""The execution bundle: the ordered, self-contained steps of one target's verification run.

A bundle is what an executor runs and what the broker queues. It is written as
``bundle.json`` in the target dir and says everything a step needs: its
command (argv, never a shell string), environment, working dir, timeout, the
resource it must hold, an operator gate, and the artifacts it should leave.
Paths in a bundle are relative to the target dir, so a bundle never writes
outside it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from broker.core.groups import MAX_GROUP_KEYS, parse_selector
from broker.core.placement_rules import parse_memory
from broker.errors import InvalidRequest

__all__ = [
    "BUNDLE_FILE",
    "Gate",
    "BundleStep",
    "JobResources",
    "ExecutionBundle",
    "POOL_RESOURCE",
    "bound_step",
    "load_bundle",
    "write_bundle",
    "topological_order",
]

BUNDLE_FILE = "bundle.json"
# What a pool bundle's hardware step holds until its run is bound: the key(s) the run gets.
POOL_RESOURCE = "{resource}"
STEP_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _relative(path: str, field: str) -> str:
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or path.strip() == "":
        raise ValueError(f"{field} {path!r} must be a relative path inside the target dir")
    return path


class Gate(BaseModel):
    """An operator gate: the step waits until someone approves it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=512)


class BundleStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=STEP_ID_PATTERN)
    rung: str = Field(default="", max_length=64)
    description: str = Field(default="", max_length=512)
    argv: tuple[str, ...] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = "."
    timeout_s: float = Field(default=600.0, gt=0, le=7 * 86400)
    resource: str | None = None  # the catalog key this step must hold a lease on
    gate: Gate | None = None
    artifacts: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()

    @field_validator("argv")
    @classmethod
    def _argv(cls, argv: tuple[str, ...]) -> tuple[str, ...]:
        if not argv[0].strip():
            raise ValueError("a step needs a command: argv[0] is empty")
        return argv

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
        return env

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, cwd: str) -> str:
        return cwd if cwd == "." else _relative(cwd, "cwd")

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, artifacts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_relative(path, "artifact") for path in artifacts)


_RAY_RESOURCE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:/-]{0,127}$")
# Ray's built-in resources have fields of their own here (or are the broker's business: GPUs
# and accelerators are catalog keys, leased, not asked of Ray's scheduler).
_BUILTIN = frozenset({"CPU", "memory", "object_store_memory", "GPU"})


class JobResources(BaseModel):
    """What the run's Ray job needs beyond its lease (seed 003's ``ResourceConfig``).

    The Ray engine asks Ray for these for the job's entrypoint (the executor and
    its steps); the local engine ignores them. ``preemptible: false`` keeps the
    job off nodes labelled ``ray.io/market-type=spot``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    num_cpus: float = Field(default=0.0, ge=0, le=1024)
    # A spec writes ``memory: 4g``; the bundle stores bytes.
    memory_bytes: int = Field(default=0, ge=0, le=64 * 1024**4, alias="memory")
    resources: dict[str, float] = Field(default_factory=dict, max_length=16)
    preemptible: StrictBool = True

    @field_validator("memory_bytes", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        return parse_memory(value)

    @field_validator("resources")
    @classmethod
    def _resources(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in _BUILTIN:
                raise ValueError(f"resource {name!r} is Ray's own: use num_cpus / memory (GPUs are catalog keys)")
            if not _RAY_RESOURCE.match(name):
                raise ValueError(f"resource name {name!r} must match {_RAY_RESOURCE.pattern}")
            if not 0 < amount <= 1e6:
                raise ValueError(f"resource {name!r}: amount {amount!r} must be > 0 and <= 1e6")
        return resources


class ExecutionBundle(BaseModel):
    """The whole run: steps in an order that respects every ``needs``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    target: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    target_class: str
    workflow: str = "bringup"
    resource: str | None = None  # the key the bundle holds for its hardware steps
    # A pool instead (canonical selector text, e.g. "board=u250,kind=fpga"): any `count` of its
    # members, bound when the run gets them; `candidates` are its members when the bundle was made
    # (shown to people and used by --no-broker; the broker's catalog decides at run time).
    resource_labels: str | None = None
    # A set instead: every one of these keys, held together for the whole run (count = their number).
    resource_keys: tuple[str, ...] = Field(default=(), max_length=MAX_GROUP_KEYS)
    count: int = Field(default=1, ge=1, le=MAX_GROUP_KEYS)
    candidates: tuple[str, ...] = ()
    spec_sha256: str = ""
    artifact_dir: str = "artifacts"
    job: JobResources | None = None  # what its Ray job asks of the cluster (the Ray engine only)
    steps: tuple[BundleStep, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> ExecutionBundle:
        ids = [step.id for step in self.steps]
        duplicates = sorted({step_id for step_id in ids if ids.count(step_id) > 1})
        if duplicates:
            raise ValueError(f"duplicate step ids: {', '.join(duplicates)}")
        known = set(ids)
        for step in self.steps:
            unknown = [need for need in step.needs if need not in known]
            if unknown:
                raise ValueError(f"step {step.id!r} needs unknown steps: {', '.join(unknown)}")
        order = topological_order(self.steps)
        if [step.id for step in order] != ids:
            raise ValueError("steps are not in an order that respects their needs")
        resources = {step.resource for step in self.steps if step.resource}
        if self.resource_keys:
            if self.resource is not None or self.resource_labels is not None:
                raise ValueError("a bundle holds one of resource, resource_labels or resource_keys")
            if len(set(self.resource_keys)) != len(self.resource_keys):
                raise ValueError("resource_keys names a key twice")
            if self.count != len(self.resource_keys):
                raise ValueError(f"count={self.count}: a set of keys is held whole ({len(self.resource_keys)} keys)")
        if self.pool:
            if self.resource is not None:
                raise ValueError("a bundle holds a resource or runs on a pool (resource_labels), not both")
            if resources - {POOL_RESOURCE}:
                raise ValueError(
                    f"a pool bundle's hardware steps hold {POOL_RESOURCE} (bound at run time); "
                    f"its steps name {sorted(resources - {POOL_RESOURCE})}"
                )
        elif self.count != 1:
            raise ValueError(f"count={self.count} needs resource_labels (a pool to take {self.count} keys of)")
        elif POOL_RESOURCE in resources:
            raise ValueError(f"a step holds {POOL_RESOURCE} but the bundle names no pool (resource_labels)")
        if len(resources) > 1:
            raise ValueError(f"a bundle holds one resource; its steps name {sorted(resources)}")
        if not self.pool and resources and self.resource not in resources:
            raise ValueError(f"bundle resource {self.resource!r} differs from its steps' {resources.pop()!r}")
        _relative(self.artifact_dir, "artifact_dir")
        return self

    @model_validator(mode="before")
    @classmethod
    def _set_count(cls, data: Any) -> Any:
        """A set of keys is held whole: its count is its size unless written."""
        if isinstance(data, dict) and data.get("resource_keys") and "count" not in data:
            return {**data, "count": len(data["resource_keys"])}
        return data

    @field_validator("resource_labels")
    @classmethod
    def _selector(cls, labels: str | None) -> str | None:
        if labels is None:
            return None
        try:
            return parse_selector(labels).text()  # canonical: the same pool always reads the same
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None

    @property
    def pool(self) -> bool:
        """Does the bundle run on a pool's member(s) or a set of keys, bound when the run gets them?"""
        return self.resource_labels is not None or bool(self.resource_keys)

    @property
    def holds_hardware(self) -> bool:
        return self.resource is not None or self.pool

    def step(self, step_id: str) -> BundleStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise InvalidRequest(
            f"no step {step_id!r} in bundle {self.target!r} (steps: {', '.join(s.id for s in self.steps)})", "step"
        )


def bound_step(step: BundleStep, keys: tuple[str, ...] | list[str]) -> BundleStep:
    """A pool bundle's step with the run's key(s) filled in for ``{resource}`` (joined by ``,``)
    in its argv, env values and gate prompt; its ``resource`` stays :data:`POOL_RESOURCE`,
    which the fence reads as "every key the run holds". Other steps come back as they are."""
    if step.resource != POOL_RESOURCE:
        return step
    text = ",".join(keys)

    def fill(value: str) -> str:
        return value.replace(POOL_RESOURCE, text)

    gate = step.gate.model_copy(update={"prompt": fill(step.gate.prompt)}) if step.gate is not None else None
    return step.model_copy(
        update={
            "argv": tuple(fill(arg) for arg in step.argv),
            "env": {name: fill(value) for name, value in step.env.items()},
            "gate": gate,
        }
    )


def topological_order(steps: tuple[BundleStep, ...] | list[BundleStep]) -> list[BundleStep]:
    """Steps ordered so each follows its ``needs``, keeping the given order where free.

    Raises:
        ValueError: the needs form a cycle (naming the steps in it).
    """
    remaining = list(steps)
    done: set[str] = set()
    ordered: list[BundleStep] = []
    while remaining:
        ready = next((step for step in remaining if set(step.needs) <= done), None)
        if ready is None:
            raise ValueError(f"the needs of steps {', '.join(sorted(s.id for s in remaining))} form a cycle")
        ordered.append(ready)
        done.add(ready.id)
        remaining.remove(ready)
    return ordered


def _invalid(exc: ValidationError, source: str) -> InvalidRequest:
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "bundle"
    msg = err["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{source}: {where}: {msg}", where)


def parse_bundle(data: Any, source: str = "bundle") -> ExecutionBundle:
    try:
        return ExecutionBundle.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, source) from None


def load_bundle(target_dir: Path) -> ExecutionBundle:
    """Read ``bundle.json`` from a target dir; ``InvalidRequest`` names what is wrong."""
    path = Path(target_dir) / BUNDLE_FILE
    if not Path(target_dir).is_dir():
        raise InvalidRequest(f"target dir {target_dir} does not exist", "target_dir")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequest(
            f"no {BUNDLE_FILE} in {target_dir}: run `merlin targetgen bundle --from-dir {target_dir}` first", "bundle"
        ) from None
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: not valid JSON ({exc})", "bundle") from None
    return parse_bundle(data, str(path))


def write_bundle(target_dir: Path, bundle: ExecutionBundle) -> Path:
    from broker.disk.store import atomic_write

    path = Path(target_dir) / BUNDLE_FILE
    atomic_write(path, bundle.model_dump_json(indent=2).encode())
    return path
