"""The comparison rules of PROTOCOL_v2.md as pure functions: frontiers, matched-recall interpolation, paired
differences, mean and spread. No I/O; the report calls them on the run records.

A method's *frontier* in one world is its points (x, y) — one per learning rate, plus the SFT model as the
learning-rate-0 point every method starts from — sorted by x (object recall, or KL to SFT); y is the prior
hallucination. Along it y is interpolated linearly at fixed x levels inside the x range common to all methods of
that world, and the TPO variants are compared with DPO by the difference of their interpolated y at each level.
"""

from __future__ import annotations

import math
import statistics


Point = tuple[float, float]


def frontier(points: list[Point]) -> list[Point]:
    """The points sorted by x; points that share an x become one, at the mean of their y."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    return [(x, sum(ys) / len(ys)) for x, ys in sorted(by_x.items())]


def interpolate(line: list[Point], x: float) -> float:
    """y at ``x`` by linear interpolation between the neighbouring points of a frontier; nan outside its x range."""
    if not line or x < line[0][0] or x > line[-1][0]:
        return math.nan
    for point_x, point_y in line:  # at a point of the frontier: its own y, not a rounded blend of two
        if x == point_x:
            return point_y
    for (x0, y0), (x1, y1) in zip(line, line[1:], strict=False):
        if x0 < x < x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable: x lies within the frontier's range")


def common_range(lines: list[list[Point]]) -> tuple[float, float] | None:
    """The x interval every frontier covers: (largest first x, smallest last x); None if they do not overlap."""
    if not lines or any(not line for line in lines):
        return None
    low, high = max(line[0][0] for line in lines), min(line[-1][0] for line in lines)
    return (low, high) if low <= high else None


def levels_in_range(levels: tuple[float, ...], span: tuple[float, float] | None) -> list[float]:
    """The fixed levels that lie in ``span`` (inclusive)."""
    return [] if span is None else [level for level in levels if span[0] <= level <= span[1]]


def world_frontiers(runs: list[dict], kind: str, seed: int, methods: tuple[str, ...], x_key: str, y_key: str):
    """Each method's frontier in one world: its runs there and the world's SFT run (learning rate 0)."""
    here = [run for run in runs if run["world_kind"] == kind and run["world_seed"] == seed]
    start = [(run[x_key], run[y_key]) for run in here if run["variant"] == "sft"]
    return {
        method: frontier(start + [(run[x_key], run[y_key]) for run in here if run["variant"] == method])
        for method in methods
    }


def matched(lines: dict[str, list[Point]], levels: list[float]) -> dict[str, dict[float, float]]:
    """Each method's interpolated y at each level."""
    return {method: {level: interpolate(line, level) for level in levels} for method, line in lines.items()}


def paired_differences(values: dict[str, dict[float, float]], baseline: str) -> dict[str, dict[float, float]]:
    """Per method other than ``baseline`` and per level: its value minus the baseline's at that level."""
    base = values[baseline]
    return {
        method: {level: value - base[level] for level, value in by_level.items()}
        for method, by_level in values.items()
        if method != baseline
    }


def mean_over_levels(by_level: dict[float, float]) -> float:
    """The mean of a method's differences over the levels of one world (nan when the world has no level)."""
    values = [value for value in by_level.values() if not math.isnan(value)]
    return sum(values) / len(values) if values else math.nan


def mean_spread(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the non-nan values; sd is 0 for one value, nan for none."""
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)
