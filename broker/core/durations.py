"""Human durations for the CLI and the catalog: ``90s``, ``10m``, ``2h``, ``1h30m``, ``1d``."""

from __future__ import annotations

import math
import re

from broker.core.duration_text import format_duration
from broker.errors import InvalidRequest

__all__ = ["parse_duration", "format_duration"]

_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: str | float | int, *, field: str = "duration") -> float:
    """Seconds in ``text``; a bare number is seconds. Raises ``InvalidRequest`` naming the text."""
    if isinstance(text, bool):
        raise InvalidRequest(f"invalid {field}: {text!r} is not a duration", field)
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        cleaned = text.strip().lower().replace(" ", "")
        try:
            seconds = float(cleaned)
        except ValueError:
            parts = _PART.findall(cleaned)
            if not parts or "".join(number + unit for number, unit in parts) != cleaned:
                raise InvalidRequest(f"invalid {field}: {text!r} (use e.g. 90s, 10m, 2h, 1h30m, 1d)", field) from None
            seconds = sum(float(number) * _UNIT_S[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(f"invalid {field}: {text!r} must be a finite, non-negative duration", field)
    return seconds
