"""The resource catalog (``configs/resources.yaml``): which keys exist, their labels and limits.

Validated with pydantic, ``extra="forbid"``: a typo in the catalog is an error
naming the file, the field and the value, never a silently ignored setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.core.durations import parse_duration
from broker.core.placement_rules import HOST_PATTERN
from broker.errors import InvalidRequest
from broker.models import MAX_TTL_S, RESOURCE_KEY_PATTERN

__all__ = ["ResourceSpec", "BrokerSettings", "Catalog", "load_catalog", "parse_catalog"]

_RESOURCE_KEY = re.compile(RESOURCE_KEY_PATTERN)
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _seconds(value: Any, field: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value, field=field.removesuffix("_s"))
    except InvalidRequest as exc:  # pydantic adds the location to a ValueError
        raise ValueError(str(exc)) from None


class ResourceSpec(BaseModel):
    """One schedulable unit: a board, an FPGA slot, a simulator lane."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    description: str = Field(default="", max_length=512)
    labels: dict[str, str] = Field(default_factory=dict)
    properties: dict[str, Any] = Field(default_factory=dict)
    # The Ray node the hardware is attached to: the node labelled merlin-host=<host>. Its runs'
    # jobs execute there; while no alive node carries the label the key is down (no grants).
    host: str | None = Field(default=None, pattern=HOST_PATTERN)
    max_hold_s: float | None = Field(default=None, alias="max_hold", gt=0, le=MAX_TTL_S)
    warn_before_s: float = Field(default=300.0, alias="warn_before", ge=0)

    @field_validator("max_hold_s", "warn_before_s", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: Any) -> float | None:
        return _seconds(value, info.field_name)

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for name, value in labels.items():
            if not _LABEL_KEY.match(name):
                raise ValueError(f"label name {name!r} must match {_LABEL_KEY.pattern}")
            if len(value) > 128:
                raise ValueError(f"label {name!r} is longer than 128 characters")
        return labels


class BrokerSettings(BaseModel):
    """Broker-wide settings; every one has a default."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    claim_s: float = Field(default=60.0, alias="claim", gt=0)
    retention_s: float = Field(default=24 * 3600.0, alias="retention", gt=0)
    # sha256 (hex) of the admin secret; when set, revoke, maintenance and `broker down`
    # need the secret. The catalog holds only the hash (`merlin broker admin-secret` makes one).
    admin_secret_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("claim_s", "retention_s", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: Any) -> float | None:
        return _seconds(value, info.field_name)


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    version: int = 1
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    resources: dict[str, ResourceSpec]

    @field_validator("resources")
    @classmethod
    def _keys(cls, resources: dict[str, ResourceSpec]) -> dict[str, ResourceSpec]:
        if not resources:
            raise ValueError("the catalog lists no resources")
        for key in resources:
            if not _RESOURCE_KEY.match(key):
                raise ValueError(f"resource key {key!r} must match {RESOURCE_KEY_PATTERN}")
        return resources


def parse_catalog(data: Any, source: str = "catalog") -> Catalog:
    """Validate already-parsed catalog data; ``InvalidRequest`` names the source, field and value."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{source}: expected a mapping with 'resources', got {type(data).__name__}", "catalog")
    try:
        return Catalog.model_validate(data)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{source}: {exc}", exc.field) from None
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        where = ".".join(str(part) for part in err["loc"])
        bad = repr(err.get("input"))
        bad = bad if len(bad) <= 80 else bad[:77] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidRequest(f"{source}: {where}={bad}: {msg}{more}", where) from None


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequest(f"cannot read catalog {path}: {exc.strerror}", "catalog") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise InvalidRequest(f"{path}{where}: not valid YAML", "catalog") from None
    return parse_catalog(data, str(path))
