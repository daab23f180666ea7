"""Support plans: a spec's verification ladder, resolved against the catalog (pure).

A plan is the class's default ladder with the spec's overrides applied:
ordered rungs, each with its purpose, the resource key it holds (``None``
for rungs that need no hardware, such as builds), its steps and the operator
gates on them. Steps are already bundle steps. In a spec's argv and env values,
``{target}`` (the canonical name) and ``{resource}`` (the resolved key) are
filled in here; ``{python}`` stays, bound to an interpreter only when the
bundle is made, so ``plan.json`` means the same on every machine. A step may
name ``{resource}`` only in a rung that holds it: addressing hardware without
its lease is what the broker exists to prevent.

A spec with ``resource_labels`` plans a *pool*: no key is picked here. Its
hardware rungs hold :data:`~targetgen.bundle.POOL_RESOURCE` and ``{resource}``
stays in their texts; the run is bound to whichever member(s) free first
(``resource_labels``, ``count`` and the members at plan time, ``candidates``,
are on the plan and the bundle). A spec with ``resource_keys`` plans a *set*:
those keys, all held together for the whole run, the same way.

Chaining: a step with no ``needs:`` follows the previous step of its rung, and
the first step of a rung follows the last steps of the rung before it (those
no other step of that rung needs).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.core.catalog import Catalog
from broker.core.groups import parse_selector
from broker.errors import InvalidRequest
from targetgen.bundle import POOL_RESOURCE, BundleStep, Gate
from targetgen.graph import check_steps
from targetgen.ladders import DEFAULT_LADDERS, NEW_RUNG_TIMEOUT_S, DefaultRung
from targetgen.normalize import TARGET_NAME_PATTERN, TargetClass, classify
from targetgen.spec import Platform, TargetSpec
from targetgen.standins import ACTIONS

__all__ = ["PYTHON_PLACEHOLDER", "Rung", "SupportPlan", "support_plan", "resolve_resource", "resolve_pool", "pool_text"]

PYTHON_PLACEHOLDER = "{python}"
_RESOURCE_PLACEHOLDER = "{resource}"
_TARGET_PLACEHOLDER = "{target}"


class Rung(BaseModel):
    """One stage of the ladder. ``standin`` is true while it still runs the default stand-in programs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    purpose: str = ""
    resource: str | None = None
    standin: bool = False
    steps: tuple[BundleStep, ...] = Field(min_length=1)

    @property
    def gates(self) -> tuple[str, ...]:
        """The operator gates of the rung's steps, in step order."""
        return tuple(step.gate.prompt for step in self.steps if step.gate is not None)


class SupportPlan(BaseModel):
    """How a target is verified: its class, its resource and its ladder. Written as ``plan.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    target: str = Field(pattern=TARGET_NAME_PATTERN)
    name: str  # as the spec wrote it
    description: str = ""
    target_class: TargetClass
    workflow: str = "bringup"
    platform: Platform = Field(default_factory=Platform)
    resource: str | None = None  # resolved catalog key, None when no rung needs hardware (or on a pool)
    resource_labels: str | None = None  # a pool: canonical selector; the key is bound at run time
    resource_keys: tuple[str, ...] = ()  # a set: these keys, held together
    count: int = 1  # keys of the pool the run holds
    candidates: tuple[str, ...] = ()  # the pool's members in the catalog the plan was made with
    spec_sha256: str = ""
    rungs: tuple[Rung, ...] = Field(min_length=1)

    def steps(self) -> list[BundleStep]:
        """Every step of every rung, in ladder order."""
        return [step for rung in self.rungs for step in rung.steps]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @property
    def where(self) -> str:
        """Where it runs, for people: a key, ``any of: k1, k2`` (``any 2 of: ...``), or no hardware."""
        if self.resource_labels is not None or self.resource_keys:
            return pool_text(self.resource_labels, self.count, self.candidates)
        return self.resource or "no hardware"


def pool_text(selector: str | None, count: int, candidates: tuple[str, ...]) -> str:
    """``any of: firesim_u250, firesim_u250_b (board=u250,kind=fpga)`` — a pool, as a person reads it;
    ``all of: firesim_u250, radiance_sim_lane_a`` — a set."""
    if selector is None:
        return f"all of: {', '.join(candidates)}"
    how_many = "any of" if count == 1 else f"any {count} of"
    return f"{how_many}: {', '.join(candidates)} ({selector})"


def _where(spec: TargetSpec) -> str:
    return spec.source or spec.target


def resolve_resource(spec: TargetSpec, catalog: Catalog) -> str | None:
    """What a spec's hardware rungs hold: its ``resource:`` key, or :data:`POOL_RESOURCE` for a pool.

    Args:
        spec: the spec.
        catalog: the broker's catalog.

    Returns:
        The key, :data:`POOL_RESOURCE` (``resource_labels:``, see :func:`resolve_pool`), or
        ``None`` when the spec names neither.

    Raises:
        InvalidRequest: the key is not in the catalog, or fewer keys than ``count`` carry the labels.
    """
    if spec.resource is not None:
        if spec.resource not in catalog.resources:
            known = ", ".join(catalog.resources)
            raise InvalidRequest(
                f"{_where(spec)}: resource={spec.resource!r} is not in the catalog (known: {known})", "resource"
            )
        return spec.resource
    if spec.resource_labels is not None or spec.resource_keys is not None:
        resolve_pool(spec, catalog)
        return POOL_RESOURCE
    return None


def resolve_pool(spec: TargetSpec, catalog: Catalog) -> tuple[str, int, tuple[str, ...]]:
    """A ``resource_labels:`` spec's pool: (canonical selector, count, its members in catalog order);
    a ``resource_keys:`` spec's set: ("", its size, its keys).

    No member is picked here: the run gets whichever frees first.

    Raises:
        InvalidRequest: the spec names no labels, the labels are not a selector, or fewer
            catalog keys than ``count`` carry them.
    """
    if spec.resource_keys is not None:
        unknown = [key for key in spec.resource_keys if key not in catalog.resources]
        if unknown:
            raise InvalidRequest(
                f"{_where(spec)}: resource_keys {', '.join(unknown)} not in the catalog "
                f"(known: {', '.join(catalog.resources)})",
                "resource_keys",
            )
        return "", len(spec.resource_keys), tuple(spec.resource_keys)
    if spec.resource_labels is None:
        raise InvalidRequest(f"{_where(spec)}: no resource_labels: the spec names no pool", "resource_labels")
    asked = ", ".join(f"{k}={v}" for k, v in spec.resource_labels.items())
    try:
        selector = parse_selector(",".join(f"{k}={v}" for k, v in spec.resource_labels.items()))
    except InvalidRequest as exc:
        raise InvalidRequest(f"{_where(spec)}: resource_labels {{{asked}}}: {exc.message}", "resource_labels") from None
    members = tuple(key for key, resource in catalog.resources.items() if selector.matches(resource.labels))
    count = spec.count or 1
    if len(members) < count:
        shown = "; ".join(
            f"{key} {{{', '.join(f'{k}={v}' for k, v in res.labels.items())}}}"
            for key, res in catalog.resources.items()
        )
        found = "no catalog resource has these labels" if not members else f"only {len(members)} keys have them"
        raise InvalidRequest(
            f"{_where(spec)}: resource_labels {{{asked}}}: {found}, count {count} needed (catalog: {shown})",
            "resource_labels",
        )
    return selector.text(), count, members


def _gate(prompt: str | None, resource: str | None) -> Gate | None:
    if prompt is None:
        return None
    return Gate(prompt=prompt.replace("{resource}", resource or "the target's hardware"))


def _standin_step(rung: DefaultRung, target: str, resource: str | None, needs: tuple[str, ...]) -> BundleStep:
    action = ACTIONS[rung.action]
    argv = [PYTHON_PLACEHOLDER, "-m", "targetgen.standins", action.name, "--step", rung.name, "--target", target]
    if resource is not None:
        argv += ["--resource", resource]
    return BundleStep(
        id=rung.name,
        rung=rung.name,
        description=f"stand-in: {action.summary}",
        argv=tuple(argv),
        timeout_s=rung.timeout_s,
        resource=resource,
        gate=_gate(rung.gate, resource),
        artifacts=(action.output,),
        needs=needs,
    )


def _override_steps(
    spec: TargetSpec, name: str, default: DefaultRung | None, resource: str | None, after: tuple[str, ...]
) -> list[BundleStep]:
    steps: list[BundleStep] = []
    for index, spec_step in enumerate(spec.ladder[name].steps or ()):
        step_id = spec_step.id or name
        texts = [*spec_step.run, *spec_step.env.values()]
        if resource is None and any(_RESOURCE_PLACEHOLDER in text for text in texts):
            raise InvalidRequest(
                f"{_where(spec)}: step {step_id!r} names {_RESOURCE_PLACEHOLDER} but rung {name} does not hold "
                "the resource: set hardware: true on the rung",
                f"ladder.{name}",
            )

        def fill(text: str) -> str:
            return text.replace(_TARGET_PLACEHOLDER, spec.target).replace(_RESOURCE_PLACEHOLDER, resource or "")

        if spec_step.needs is not None:
            needs = spec_step.needs
        else:
            needs = after if index == 0 else (steps[-1].id,)
        if spec_step.gate_given:
            prompt = spec_step.gate
        else:
            # Replacing a rung's commands keeps its safety gate unless the spec says otherwise.
            prompt = default.gate if default is not None and index == 0 else None
        timeout_s = spec_step.timeout_s or (default.timeout_s if default is not None else NEW_RUNG_TIMEOUT_S)
        steps.append(
            BundleStep(
                id=step_id,
                rung=name,
                description=spec_step.description,
                argv=tuple(fill(arg) for arg in spec_step.run),
                env={key: fill(value) for key, value in spec_step.env.items()},
                cwd=spec_step.cwd,
                timeout_s=timeout_s,
                resource=resource,
                gate=_gate(prompt, resource),
                artifacts=spec_step.artifacts,
                needs=needs,
            )
        )
    return steps


def _last_steps(steps: list[BundleStep]) -> tuple[str, ...]:
    needed = {need for step in steps for need in step.needs}
    return tuple(step.id for step in steps if step.id not in needed)


def support_plan(spec: TargetSpec, catalog: Catalog) -> SupportPlan:
    """The verification ladder of a spec, with its resource resolved against the catalog.

    Args:
        spec: a validated spec.
        catalog: the broker's catalog (only its keys and labels are read).

    Returns:
        The plan.

    Raises:
        InvalidRequest: the class cannot be told, a new rung has no steps, the
            resource is unknown or missing while a rung needs hardware, or the
            steps have a duplicate id, an unknown need or a cycle.
    """
    target_class = classify(spec)
    defaults = {rung.name: rung for rung in DEFAULT_LADDERS[target_class]}
    for name, override in spec.ladder.items():
        if name not in defaults and override.steps is None:
            raise InvalidRequest(
                f"{_where(spec)}: ladder.{name}: not a rung of the {target_class} ladder "
                f"({', '.join(defaults)}), so it needs steps:",
                f"ladder.{name}",
            )
    names = list(defaults) + [name for name in spec.ladder if name not in defaults]

    def hardware(name: str) -> bool:
        override = spec.ladder.get(name)
        if override is not None and override.hardware is not None:
            return override.hardware
        # A new rung holds the resource unless told otherwise: touching a board
        # without a lease is the one failure the broker exists to prevent.
        return defaults[name].hardware if name in defaults else True

    key = resolve_resource(spec, catalog)
    pool = resolve_pool(spec, catalog) if key == POOL_RESOURCE else None
    needing = [name for name in names if hardware(name)]
    if needing and key is None:
        raise InvalidRequest(
            f"{_where(spec)}: rung {needing[0]} needs hardware: add resource: (a catalog key, one of "
            f"{', '.join(catalog.resources)}), resource_labels: or resource_keys:",
            "resource",
        )

    rungs: list[Rung] = []
    after: tuple[str, ...] = ()
    try:
        for name in names:
            default, rung_override = defaults.get(name), spec.ladder.get(name)
            resource = key if hardware(name) else None
            if rung_override is not None and rung_override.steps is not None:
                steps = _override_steps(spec, name, default, resource, after)
                standin = False
            else:
                assert default is not None  # new rungs without steps were refused above
                steps = [_standin_step(default, spec.target, resource, after)]
                standin = True
            purpose = (rung_override.purpose if rung_override is not None else None) or (
                default.purpose if default else ""
            )
            rungs.append(Rung(name=name, purpose=purpose, resource=resource, standin=standin, steps=tuple(steps)))
            after = _last_steps(steps)
    except ValidationError as exc:  # the spec's checks run first; this is a guard, not the usual path
        raise InvalidRequest(f"{_where(spec)}: {exc.errors()[0]['msg']}", "ladder") from None
    check_steps([step for rung in rungs for step in rung.steps], _where(spec))
    return SupportPlan(
        target=spec.target,
        name=spec.name,
        description=spec.description,
        target_class=target_class,
        workflow=spec.workflow,
        platform=spec.platform,
        resource=key if needing and pool is None else None,
        resource_labels=pool[0] if needing and pool is not None and spec.resource_keys is None else None,
        resource_keys=tuple(spec.resource_keys or ()) if needing else (),
        count=pool[1] if needing and pool is not None else 1,
        candidates=pool[2] if needing and pool is not None else (),
        spec_sha256=spec.spec_sha256,
        rungs=tuple(rungs),
    )
