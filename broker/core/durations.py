"""Human durations for the CLI and the catalog: ``90s``, ``10m``, ``2h``, ``1h30m``, ``1d``."""

from __future__ import annotations

import math
import re

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


def format_duration(seconds: float, *, units: int | None = None) -> str:
    """``5400`` -> ``1h30m``; sub-minute values keep one decimal.

    ``units`` keeps only that many of the largest units, truncating the rest
    (``units=2``: ``6934`` -> ``1h55m``), for a glance at "how long until".
    """
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds % 1 else f"{int(seconds)}s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{value}{unit}" for value, unit in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if value]
    if units is not None:
        parts = parts[: max(1, units)]
    return "".join(parts) or "0s"
