"""Line plots as server-rendered SVG: the templates draw what :func:`plot` computes."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

#: The plot's drawing area in SVG user units (the SVG scales to its box).
WIDTH = 600
HEIGHT = 120


@dataclasses.dataclass(frozen=True, slots=True)
class Line:
    """One series: its label, its CSS class, the SVG ``points`` and its latest value."""

    label: str
    css: str
    points: str
    last: str


@dataclasses.dataclass(frozen=True, slots=True)
class Plot:
    """What the ``plot`` macro draws."""

    title: str
    lines: tuple[Line, ...]
    top: str
    span: str
    width: int = WIDTH
    height: int = HEIGHT


def _nice(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above ``value`` (> 0)."""
    power = 10.0 ** math.floor(math.log10(value))
    return next(float(step * power) for step in (1, 2, 5, 10) if step * power >= value)


def plot(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    *,
    now: float,
    window: float,
    fmt: Callable[[float], str],
) -> Plot:
    """Scale ``series`` (label -> ``(time, value)``) into the last ``window`` seconds.

    A ``None`` value breaks nothing: it is left out. The y axis starts at 0 and ends at
    a round number above the largest value.
    """
    values = [v for points in series.values() for _, v in points if v is not None]
    top = _nice(max(values)) if values and max(values) > 0 else 1.0
    lines = []
    for index, (label, points) in enumerate(series.items()):
        coords = [
            f"{(t - (now - window)) / window * WIDTH:.1f},{HEIGHT - v / top * HEIGHT:.1f}"
            for t, v in points
            if v is not None and t >= now - window
        ]
        known = [v for _, v in points if v is not None]
        lines.append(Line(label, f"s{index}", " ".join(coords), fmt(known[-1]) if known else "-"))
    span = f"{window:g} s" if window < 120 else f"{window / 60:g} min"  # noqa: PLR2004 - 2 min
    return Plot(title, tuple(lines), fmt(top), span)
