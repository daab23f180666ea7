"""The resource catalog (``configs/resources.yaml``): which keys exist, their labels and limits.

Validated with pydantic, ``extra="forbid"``: a typo in the catalog is an error
naming the file, the field and the value, never a silently ignored setting.

A catalog is input the coordinator keeps in memory, writes to ``catalog.json``
and serves on every listing, so it is bounded (issue 10): the file's size, the
size of the document once YAML aliases are expanded, the number of keys and
each key's properties. A key written twice in one mapping is an error (YAML's
"last one wins" hides typos), and so is a file that is not UTF-8 text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from broker.core.durations import parse_duration
from broker.core.groups import parse_selector
from broker.core.health import HealthCheck
from broker.core.placement_rules import HOST_PATTERN
from broker.errors import InvalidRequest
from broker.models import MAX_TTL_S, RESOURCE_KEY_PATTERN

__all__ = [
    "ResourceSpec",
    "BrokerSettings",
    "Catalog",
    "CATALOG_VERSIONS",
    "load_catalog",
    "parse_catalog",
    "read_catalog_data",
]

CATALOG_VERSIONS = (1,)  # the formats this broker reads; anything else is refused, not guessed at
MAX_CATALOG_FILE_BYTES = 1024 * 1024
# Nodes of the parsed document, counting every use of an alias: a few nested aliases
# otherwise expand to megabytes (a 283-byte file once became a 17.7 MB catalog.json).
MAX_CATALOG_NODES = 200_000
MAX_RESOURCES = 2000
MAX_LABELS = 64
MAX_POOLS = 64
MAX_PROPERTIES_BYTES = 16 * 1024  # one key's properties, as JSON

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
    # A probe run on the key's host while nobody holds it; failures quarantine the key (broker.core.health).
    health_check: HealthCheck | None = None

    @field_validator("max_hold_s", "warn_before_s", mode="before")
    @classmethod
    def _duration(cls, value: Any, info: Any) -> float | None:
        return _seconds(value, info.field_name)

    @field_validator("properties")
    @classmethod
    def _bounded_properties(cls, properties: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(properties, default=str))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"properties must be plain data: {exc}") from None
        if size > MAX_PROPERTIES_BYTES:
            raise ValueError(f"properties are {size} bytes as JSON; at most {MAX_PROPERTIES_BYTES} are allowed")
        return properties

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        if len(labels) > MAX_LABELS:
            raise ValueError(f"{len(labels)} labels; at most {MAX_LABELS} are allowed")
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

    version: Literal[1] = 1  # CATALOG_VERSIONS
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    resources: dict[str, ResourceSpec]
    # Named pools: a name for a label selector (``u250: board=u250``), for listings, metrics and
    # `reserve --pool`. Any selector can be asked for without a name; a name only shows it.
    pools: dict[str, str] = Field(default_factory=dict)

    @field_validator("pools")
    @classmethod
    def _pools(cls, pools: dict[str, str]) -> dict[str, str]:
        if len(pools) > MAX_POOLS:
            raise ValueError(f"{len(pools)} pools; at most {MAX_POOLS} are allowed")
        for name, selector in pools.items():
            if not _LABEL_KEY.match(name):
                raise ValueError(f"pool name {name!r} must match {_LABEL_KEY.pattern}")
            try:
                parse_selector(selector)
            except InvalidRequest as exc:
                raise ValueError(f"pool {name!r}: {exc}") from None
        return {name: parse_selector(selector).text() for name, selector in pools.items()}

    def pool_members(self, name: str) -> tuple[str, ...]:
        """The keys of the named pool, in catalog order."""
        selector = parse_selector(self.pools[name])
        return tuple(key for key, spec in self.resources.items() if selector.matches(spec.labels))

    @field_validator("resources")
    @classmethod
    def _keys(cls, resources: dict[str, ResourceSpec]) -> dict[str, ResourceSpec]:
        if not resources:
            raise ValueError("the catalog lists no resources")
        if len(resources) > MAX_RESOURCES:
            raise ValueError(f"the catalog lists {len(resources)} resources; at most {MAX_RESOURCES} are allowed")
        for key in resources:
            if not _RESOURCE_KEY.match(key):
                raise ValueError(f"resource key {key!r} must match {RESOURCE_KEY_PATTERN}")
        return resources


def parse_catalog(data: Any, source: str = "catalog") -> Catalog:
    """Validate already-parsed catalog data; ``InvalidRequest`` names the source, field and value."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{source}: expected a mapping with 'resources', got {type(data).__name__}", "catalog")
    _check_size(data, source)
    version = data.get("version", 1)
    if version not in CATALOG_VERSIONS or isinstance(version, bool):
        known = ", ".join(str(v) for v in CATALOG_VERSIONS)
        raise InvalidRequest(
            f"{source}: unknown catalog version {_shown(version)} (this broker reads version {known})", "version"
        )
    try:
        return Catalog.model_validate(data)
    except InvalidRequest as exc:
        raise InvalidRequest(f"{source}: {exc}", exc.field) from None
    except ValidationError as exc:
        errors = exc.errors()
        err = errors[0]
        where = ".".join(str(part) for part in err["loc"])
        bad = _shown(err.get("input"))
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidRequest(f"{source}: {where}={bad}: {msg}{more}", where) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_size(data: Any, source: str) -> None:
    """Count the document's nodes (an alias counts each time it is used), up to a bound."""
    budget = MAX_CATALOG_NODES
    stack = [data]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise InvalidRequest(
                f"{source}: the catalog expands to more than {MAX_CATALOG_NODES} values (YAML aliases count "
                "each time they are used)",
                "catalog",
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, (str, bytes)) and len(node) > MAX_CATALOG_FILE_BYTES:
            raise InvalidRequest(f"{source}: a value is longer than {MAX_CATALOG_FILE_BYTES} characters", "catalog")


class _CatalogLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class names that error
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def read_catalog_data(path: str | Path) -> Any:
    """The parsed YAML of a catalog file: bounded in size, UTF-8 text, no duplicate keys."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CATALOG_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidRequest(f"cannot read catalog {path}: {exc.strerror}", "catalog") from None
    if len(raw) > MAX_CATALOG_FILE_BYTES:
        raise InvalidRequest(f"{path}: larger than {MAX_CATALOG_FILE_BYTES} bytes; not a catalog", "catalog")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{path}: not UTF-8 text (byte {exc.start}); not a catalog", "catalog") from None
    try:
        return yaml.load(text, Loader=_CatalogLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        detail = f": {problem}" if isinstance(problem, str) else ""
        raise InvalidRequest(f"{path}{where}: not valid YAML{detail}", "catalog") from None
    except RecursionError:
        raise InvalidRequest(f"{path}: nested too deeply; not a catalog", "catalog") from None


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog YAML file."""
    return parse_catalog(read_catalog_data(path), str(Path(path)))
