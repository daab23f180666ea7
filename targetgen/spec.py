"""Capability specs: one YAML file describes one hardware target, validated at the edge.

The whole schema (every key but ``name`` is optional)::

    name: FireSim U250 Rocket     # free text; the canonical target name is derived from it
    description: Rocket on FireSim
    kind: fpga_emulation          # fpga_emulation | silicon_board | rtl_simulation;
                                  # when absent it is inferred from platform
    platform:                     # facts; the ones marked * decide the class
      vendor: xilinx
      fpga: xilinx_u250           # * an FPGA device -> fpga_emulation
      soc: spacemit_k1            # * an SoC ...
      board: bananapi_f3          # * ... or a board -> silicon_board
      simulator: verilator        # * an RTL simulator -> rtl_simulation
      design: rocket              # the RTL design or core
      isa: RV64GC                 # lowercased
      cores: 1
    resource: firesim_u250        # the catalog key the hardware rungs hold, or
    resource_labels: {kind: fpga} # a pool (not both): any key carrying these labels, the one
                                  # that frees first, bound when the run starts
    count: 2                      # with resource_labels: hold this many of the pool's keys (default 1)
    resource_keys: [firesim_u250, radiance_sim_lane_a]   # or a set: all of these keys, together,
                                  # for the whole run ({resource} -> the keys, joined by ",")
    job:                          # what the run's Ray job needs beyond the lease (Ray engine only)
      num_cpus: 2                 # CPUs for the job's entrypoint (default 0)
      memory: 4g                  # bytes, or 512m / 4g / 4GiB (binary units)
      resources: {bench_gpu: 1}   # custom Ray resources a node advertises
      preemptible: false          # never on a node labelled ray.io/market-type=spot
    workflow: bringup             # a label carried into the bundle (default bringup)
    ladder:                       # per-rung overrides of the class's default ladder
      smoke-test:                 # a default rung: its steps are replaced;
                                  # a new name: a rung appended after the defaults
        purpose: run the suite    # optional
        hardware: true            # does the rung hold the resource? default: the
                                  # default rung's answer; true for a new rung
        steps:
          - id: smoke-test        # default: the rung name
            description: ...
            run: [make, smoke]    # argv list, never a shell string. In run and env:
                                  # {target} -> the canonical name, {resource} -> the
                                  # resolved key (only in a rung that holds it),
                                  # {python} -> the interpreter the bundle is made for
            timeout: 10m          # default: the rung's default (10m for a new rung)
            artifacts: [artifacts/smoke/results.json]   # under artifacts/
            needs: [boot]         # default: the previous step (or previous rung)
            gate: Is the board powered?   # an operator gate before the step; null for
                                          # none; default: the rung's default gate on
                                          # its first step
            env: {FOO: bar}
            cwd: .                # relative to the target dir

Mistakes are one ``InvalidRequest`` line naming the file, the field and the
bad value; a YAML syntax error or a repeated key names file:line.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.core.durations import parse_duration
from broker.errors import InvalidRequest
from broker.models import RESOURCE_KEY_PATTERN
from targetgen.bundle import STEP_ID_PATTERN, JobResources
from targetgen.normalize import TargetClass, normalize_name

__all__ = ["Platform", "StepSpec", "RungSpec", "TargetSpec", "parse_spec", "load_spec", "MAX_TIMEOUT_S"]

MAX_TIMEOUT_S = 7 * 86400.0  # the bundle's limit for one step
ARTIFACT_DIR = "artifacts"
_STEP_ID = re.compile(STEP_ID_PATTERN)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ISA = re.compile(r"^[a-z0-9_]{1,64}$")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Set by load_spec from the file, never read from it: a spec cannot vouch for its own hash.
_PROVENANCE = ("source", "spec_sha256")


def _scalar_text(value: Any, what: str) -> Any:
    """YAML reads ``[sleep, 1]`` with an int in it; argv and env are text, so numbers become text."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r} is a YAML boolean: quote it")
    if isinstance(value, (int, float)):
        return str(value)
    return value


class Platform(BaseModel):
    """Facts about the hardware; ``fpga``, ``soc``/``board`` and ``simulator`` decide the class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vendor: str | None = Field(default=None, min_length=1, max_length=128)
    fpga: str | None = Field(default=None, min_length=1, max_length=128)
    soc: str | None = Field(default=None, min_length=1, max_length=128)
    board: str | None = Field(default=None, min_length=1, max_length=128)
    simulator: str | None = Field(default=None, min_length=1, max_length=128)
    design: str | None = Field(default=None, min_length=1, max_length=128)
    isa: str | None = None
    cores: StrictInt | None = Field(default=None, ge=1, le=65536)

    @field_validator("isa")
    @classmethod
    def _isa(cls, isa: str | None) -> str | None:
        if isa is None:
            return None
        lowered = isa.strip().lower()
        if not _ISA.match(lowered):
            raise ValueError("an ISA string is letters, digits and _ (e.g. rv64gc, rv64gcv_zba)")
        return lowered


class StepSpec(BaseModel):
    """One step of a rung, as written in a spec; the plan fills in what is left out."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str | None = None
    description: str = Field(default="", max_length=512)
    run: tuple[str, ...]
    timeout_s: float | None = Field(default=None, alias="timeout")
    artifacts: tuple[str, ...] = ()
    needs: tuple[str, ...] | None = None
    gate: str | None = Field(default=None, min_length=1, max_length=512)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = "."

    @field_validator("id")
    @classmethod
    def _id(cls, step_id: str | None) -> str | None:
        if step_id is not None and not _STEP_ID.match(step_id):
            raise ValueError(f"a step id must match {STEP_ID_PATTERN} (lowercase, e.g. flash-fpga)")
        return step_id

    @field_validator("run", mode="before")
    @classmethod
    def _run(cls, run: Any) -> Any:
        if isinstance(run, str):
            raise ValueError("run is an argv list like [make, bitstream], not a shell string")
        if isinstance(run, list):
            if not run:
                raise ValueError("the step has no command: run is an empty list")
            run = [_scalar_text(arg, "argument") for arg in run]
            if isinstance(run[0], str) and not run[0].strip():
                raise ValueError("the step has no command: run[0] is empty")
        return run

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> float | None:
        if value is None:
            return None
        try:
            seconds = parse_duration(value, field="timeout")
        except InvalidRequest as exc:  # pydantic adds the location to a ValueError
            raise ValueError(str(exc)) from None
        if seconds <= 0 or seconds > MAX_TIMEOUT_S:
            raise ValueError("a timeout is more than 0s and at most 7d")
        return seconds

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, artifacts: tuple[str, ...]) -> tuple[str, ...]:
        for path in artifacts:
            pure = PurePosixPath(path)
            if pure.is_absolute() or ".." in pure.parts or len(pure.parts) < 2 or pure.parts[0] != ARTIFACT_DIR:
                raise ValueError(f"artifact {path!r} must be a relative path under {ARTIFACT_DIR}/")
        return artifacts

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, env: Any) -> Any:
        if not isinstance(env, dict):
            return env
        for name in env:
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise ValueError(f"environment variable name {name!r} is not valid")
        return {name: _scalar_text(value, f"env {name}") for name, value in env.items()}

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, cwd: str) -> str:
        pure = PurePosixPath(cwd)
        if not cwd.strip() or pure.is_absolute() or ".." in pure.parts:
            raise ValueError("cwd must be a relative path inside the target dir")
        return cwd

    @property
    def gate_given(self) -> bool:
        """True when the spec wrote ``gate:`` (even ``null``): it then overrides the rung's default gate."""
        return "gate" in self.model_fields_set


class RungSpec(BaseModel):
    """An override of one rung: a default rung's steps are replaced, a new rung is appended."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: str | None = Field(default=None, min_length=1, max_length=512)
    hardware: StrictBool | None = None
    steps: tuple[StepSpec, ...] | None = None

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: tuple[StepSpec, ...] | None) -> tuple[StepSpec, ...] | None:
        if steps is not None and not steps:
            raise ValueError("a rung needs at least one step")
        return steps


class TargetSpec(BaseModel):
    """A validated capability spec. ``source`` and ``spec_sha256`` come from the file, not its text."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    description: str = Field(default="", max_length=2048)
    kind: TargetClass | None = None
    platform: Platform = Field(default_factory=Platform)
    resource: str | None = Field(default=None, pattern=RESOURCE_KEY_PATTERN)
    resource_labels: dict[str, str] | None = Field(default=None, min_length=1)
    count: StrictInt | None = Field(default=None, ge=1, le=64)  # keys of the pool held together
    resource_keys: tuple[Annotated[str, Field(pattern=RESOURCE_KEY_PATTERN)], ...] | None = Field(
        default=None, min_length=1, max_length=64
    )
    # What the run's Ray job needs beyond the lease: num_cpus, memory (4g), resources, preemptible.
    job: JobResources | None = None
    workflow: str = Field(default="bringup", pattern=STEP_ID_PATTERN)
    ladder: dict[str, RungSpec] = Field(default_factory=dict)
    source: str = ""
    spec_sha256: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not normalize_name(name):
            raise ValueError("the name has no letters or digits to make a target name from")
        return name

    @field_validator("resource_labels")
    @classmethod
    def _labels(cls, labels: dict[str, str] | None) -> dict[str, str] | None:
        for name in labels or {}:
            if not _LABEL_KEY.match(name):
                raise ValueError(f"label name {name!r} must match {_LABEL_KEY.pattern}")
        return labels

    @field_validator("ladder")
    @classmethod
    def _rung_names(cls, ladder: dict[str, RungSpec]) -> dict[str, RungSpec]:
        for rung in ladder:
            if not _STEP_ID.match(rung):
                raise ValueError(f"rung name {rung!r} must match {STEP_ID_PATTERN}")
        return ladder

    @model_validator(mode="after")
    def _one_resource(self) -> TargetSpec:
        if self.resource is not None and self.resource_labels is not None:
            raise ValueError("give either resource or resource_labels, not both")
        if self.resource_keys is not None and (self.resource is not None or self.resource_labels is not None):
            raise ValueError("give one of resource, resource_labels or resource_keys")
        if self.resource_keys is not None and len(set(self.resource_keys)) != len(self.resource_keys):
            raise ValueError("resource_keys names a key twice")
        if self.count is not None and self.resource_labels is None:
            raise ValueError("count is how many keys of a pool to hold: it needs resource_labels")
        return self

    @property
    def target(self) -> str:
        """The canonical target name (``"FireSim U250 Rocket"`` -> ``"firesim-u250-rocket"``)."""
        return normalize_name(self.name)


def _field_names() -> set[str]:
    names: set[str] = set()
    for model in (Platform, StepSpec, RungSpec, TargetSpec, JobResources):
        names.update(info.alias or name for name, info in model.model_fields.items())
    return names - set(_PROVENANCE)


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _invalid(exc: ValidationError, source: str) -> InvalidRequest:
    """One line for the first error: ``<file>: <field>=<value>: <what is wrong>``."""
    errors = exc.errors()
    err = errors[0]
    loc = tuple(err["loc"])
    where = _where(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _field_names(), n=1)
        msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if err["type"] == "missing":
        if loc and loc[-1] == "run":
            return InvalidRequest(f"{source}: {where}: the step has no command: add run: [program, args...]", where)
        return InvalidRequest(f"{source}: {where}: required field is missing{more}", where)
    if not loc:
        return InvalidRequest(f"{source}: {msg}{more}", "spec")
    bad = repr(err.get("input"))
    bad = bad if len(bad) <= 80 else bad[:77] + "..."
    return InvalidRequest(f"{source}: {where}={bad}: {msg}{more}", where)


def parse_spec(data: Any, source: str = "spec", spec_sha256: str = "") -> TargetSpec:
    """Validate already-parsed spec data.

    Args:
        data: the YAML document as Python values.
        source: where it came from, for messages (a file name).
        spec_sha256: the hash of the file's bytes, recorded for the bundle.

    Returns:
        The spec.

    Raises:
        InvalidRequest: one line naming the source, the field and the bad value.
    """
    if not isinstance(data, dict):
        raise InvalidRequest(f"{source}: a spec is a mapping with at least name:, got {type(data).__name__}", "spec")
    for key in _PROVENANCE:
        if key in data:
            raise InvalidRequest(f"{source}: {key}={data[key]!r}: unknown field (it is set from the file)", key)
    try:
        spec = TargetSpec.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc, source) from None
    return spec.model_copy(update={"source": source, "spec_sha256": spec_sha256})


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; in a spec that silently drops a rung or a field."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_spec(path: str | Path) -> TargetSpec:
    """Read and validate a capability spec file.

    Args:
        path: the YAML file.

    Returns:
        The spec, with ``source`` set to the path and ``spec_sha256`` to the hash of its bytes.

    Raises:
        InvalidRequest: the file cannot be read, is not YAML (naming file:line),
            or does not fit the schema (naming the field and the value).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read spec {path}: {exc.strerror}", "spec") from None
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path}: not UTF-8 text", "spec") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise InvalidRequest(f"{path}{where}: {problem}", "spec") from None
    if data is None:
        raise InvalidRequest(f"{path}: the spec is empty (it needs at least name:)", "spec")
    return parse_spec(data, str(path), hashlib.sha256(raw).hexdigest())
