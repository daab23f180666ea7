"""Summaries of timing samples: medians, p99, ratios against a baseline, targets. Pure."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

__all__ = ["Summary", "summarize", "Target", "Result"]


@dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p99: float
    mean: float
    unit: str = "ms"

    def as_dict(self) -> dict[str, float | int | str]:
        return {"n": self.n, "median": self.median, "p99": self.p99, "mean": self.mean, "unit": self.unit}


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def summarize(samples: list[float], *, scale: float = 1000.0, unit: str = "ms") -> Summary:
    """Seconds in, ``unit`` out (default milliseconds)."""
    values = sorted(sample * scale for sample in samples)
    if not values:
        return Summary(0, math.nan, math.nan, math.nan, unit)
    return Summary(len(values), statistics.median(values), _percentile(values, 0.99), statistics.fmean(values), unit)


@dataclass(frozen=True)
class Target:
    """A goal: ``value`` compared with ``limit`` (``<=`` unless ``at_least``)."""

    text: str
    value: float
    limit: float
    at_least: bool = False

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.limit if self.at_least else self.value <= self.limit


@dataclass
class Result:
    """One scenario's figures, baselines and targets."""

    name: str
    figures: dict[str, Summary | float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def ratio(self, name: str, figure: str, baseline: str) -> float:
        value, base = self._value(figure), self._value(baseline)
        ratio = value / base if base else math.nan
        self.figures[name] = ratio
        return ratio

    def _value(self, name: str) -> float:
        figure = self.figures[name]
        return figure.median if isinstance(figure, Summary) else float(figure)
