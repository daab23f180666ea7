"""Normalization and classification: a spec's canonical target name and its target class.

The canonical name is the target's id everywhere else (bundle, run records,
artifact paths): lowercase ``[a-z0-9_.-]``, at most 64 characters, starting
with a letter or digit. ``"FireSim U250 Rocket"`` becomes
``"firesim-u250-rocket"``.

The class decides the default verification ladder. An explicit ``kind:`` in
the spec wins; otherwise the platform facts decide, and a spec that names
facts of two classes (or of none) is refused rather than guessed.
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from broker.core.compat import StrEnum
from broker.errors import InvalidRequest

if TYPE_CHECKING:
    from targetgen.spec import TargetSpec

__all__ = ["TARGET_NAME_PATTERN", "TargetClass", "normalize_name", "classify"]

TARGET_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
_NOT_ALLOWED = re.compile(r"[^a-z0-9_.]+")  # "-" included: runs of separators collapse to one "-"
_LEADING = re.compile(r"^[^a-z0-9]+")
_TRAILING = re.compile(r"[-_.]+$")
_MAX_NAME = 64


class TargetClass(StrEnum):
    """What kind of hardware a target is; each class has its own default ladder."""

    FPGA_EMULATION = "fpga_emulation"
    SILICON_BOARD = "silicon_board"
    RTL_SIMULATION = "rtl_simulation"


# Which platform facts point at which class. A fact that fits two classes
# (vendor, isa, cores, design) is not a signal.
_SIGNALS: tuple[tuple[str, TargetClass], ...] = (
    ("fpga", TargetClass.FPGA_EMULATION),
    ("soc", TargetClass.SILICON_BOARD),
    ("board", TargetClass.SILICON_BOARD),
    ("simulator", TargetClass.RTL_SIMULATION),
)


def normalize_name(text: str) -> str:
    """The canonical target name for free text; ``""`` when nothing usable is left.

    Accents are folded to ASCII, every run of other characters becomes one
    ``-``, leading and trailing separators go, and the result is cut to 64
    characters. Applying it twice changes nothing.
    """
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    name = _LEADING.sub("", _NOT_ALLOWED.sub("-", folded))
    return _TRAILING.sub("", _TRAILING.sub("", name)[:_MAX_NAME])


def classify(spec: TargetSpec) -> TargetClass:
    """The target class of a spec: its ``kind:`` if given, else inferred from ``platform:``.

    Args:
        spec: a validated spec.

    Returns:
        The class; an FPGA device means ``fpga_emulation``, an SoC or board
        ``silicon_board``, a simulator ``rtl_simulation``.

    Raises:
        InvalidRequest: no ``kind:`` and the platform facts point at no class
            or at more than one; the message says what to add.
    """
    if spec.kind is not None:
        return spec.kind
    found: dict[TargetClass, list[str]] = {}
    for fact, target_class in _SIGNALS:
        value = getattr(spec.platform, fact)
        if value is not None:
            found.setdefault(target_class, []).append(f"platform.{fact}={value!r}")
    where = f"{spec.source}: " if spec.source else ""
    choices = ", ".join(c.value for c in TargetClass)
    if not found:
        raise InvalidRequest(
            f"{where}cannot tell the target class of {spec.name!r}: add kind: ({choices}) "
            "or one of platform.fpga, platform.soc, platform.board, platform.simulator",
            "kind",
        )
    if len(found) > 1:
        facts = "; ".join(f"{c.value} from {', '.join(f)}" for c, f in found.items())
        raise InvalidRequest(
            f"{where}the target class of {spec.name!r} is ambiguous ({facts}): add kind: ({choices})", "kind"
        )
    return next(iter(found))
