"""Durations as people write them (``1h30m``): formatting only, importing nothing of ours,
so the error tree can use it (:mod:`broker.core.durations` parses, and re-exports this)."""

from __future__ import annotations

__all__ = ["format_duration"]


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
