"""A suite's history as a small inline SVG chart: pass rate above, duration below, regressions marked.

Drawn on the server: the page's Content-Security-Policy allows no script, and
an inline <svg> element is markup, not a fetched resource, so no directive
stands in its way. Colours come from classes in page.css (style-src 'self')
and SVG presentation attributes; never a `style` attribute or a <style>
element, which the policy would block. Tooltips are SVG <title> elements and
links are SVG <a> elements, so the chart needs no script to be read.

`layout` (pure geometry, plain numbers in and out) is separate from
`render_chart` (markup), so the arithmetic is tested without parsing SVG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .markup import Safe, html, join

WIDTH, HEIGHT = 760, 280
LEFT, RIGHT = 64, 16  # room for the y-axis labels on the left
RATE_TOP, RATE_BOTTOM = 28, 138  # the pass-rate panel; room above it for regression markers
DURATION_TOP, DURATION_BOTTOM = 170, 250  # the duration panel; room below it for the first and last dates


@dataclass(frozen=True)
class Marker:
    """A regression appeared at this point."""

    title: str
    href: str


@dataclass(frozen=True)
class ChartItem:
    """One run, oldest first in a chart."""

    pass_rate: float | None  # 0..1
    duration_s: float | None
    title: str  # the point's tooltip
    href: str
    marker: Marker | None = None


@dataclass(frozen=True)
class Geometry:
    xs: tuple[float, ...]
    rate_ys: tuple[float | None, ...]
    duration_ys: tuple[float | None, ...]
    duration_max: float  # the duration panel's top, a round number of seconds
    rate_ticks: tuple[tuple[float, float], ...]  # (y, pass rate)
    duration_ticks: tuple[tuple[float, float], ...]  # (y, seconds)

    def segments(self, ys: Sequence[float | None]) -> list[list[tuple[float, float]]]:
        """The polylines of a series: a point without a value breaks the line."""
        runs: list[list[tuple[float, float]]] = [[]]
        for x, y in zip(self.xs, ys):
            if y is None:
                runs.append([])
            else:
                runs[-1].append((x, y))
        return [r for r in runs if r]


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `value` (1 for nothing)."""
    if not value or value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power * (1 + 1e-12):
            return step * power
    return 10 * power


def layout(rates: Sequence[float | None], durations: Sequence[float | None]) -> Geometry:
    """Where each run's points go: evenly spaced in run order (runs bunch up in time), oldest left."""
    n = len(rates)
    if n == 1:
        xs: tuple[float, ...] = ((LEFT + WIDTH - RIGHT) / 2,)
    else:
        step = (WIDTH - RIGHT - LEFT) / max(n - 1, 1)
        xs = tuple(LEFT + i * step for i in range(n))
    top = nice_ceiling(max((d for d in durations if d is not None), default=0.0))

    def rate_y(rate: float) -> float:
        return RATE_BOTTOM - min(max(rate, 0.0), 1.0) * (RATE_BOTTOM - RATE_TOP)

    def duration_y(seconds: float) -> float:
        return DURATION_BOTTOM - min(max(seconds / top, 0.0), 1.0) * (DURATION_BOTTOM - DURATION_TOP)

    return Geometry(
        xs=xs,
        rate_ys=tuple(None if r is None else rate_y(r) for r in rates),
        duration_ys=tuple(None if d is None else duration_y(d) for d in durations),
        duration_max=top,
        rate_ticks=tuple((rate_y(r), r) for r in (0.0, 0.5, 1.0)),
        duration_ticks=tuple((duration_y(s), s) for s in (0.0, top / 2, top)),
    )


def render_chart(items: Sequence[ChartItem], title: str, first_label: str, last_label: str,
                 duration_text: Callable[[float], str] = lambda s: f"{s:g}s") -> Safe:
    """The chart as an <svg> element; `first_label`/`last_label` go under the first and last runs."""
    g = layout([i.pass_rate for i in items], [i.duration_s for i in items])
    parts = [
        html('<title id="history-chart-title">{}</title>', title),
        _panel_axes("Pass rate", RATE_TOP, g.rate_ticks, lambda r: f"{r * 100:.0f}%"),
        _panel_axes("Duration", DURATION_TOP, g.duration_ticks, duration_text),
        join(_polyline("series rate", seg) for seg in g.segments(g.rate_ys)),
        join(_polyline("series duration", seg) for seg in g.segments(g.duration_ys)),
    ]
    for item, x, ry, dy in zip(items, g.xs, g.rate_ys, g.duration_ys):
        if item.marker is not None:
            parts.append(_marker(item.marker, x, RATE_TOP if ry is None else ry))
        for cls, y in (("rate", ry), ("duration", dy)):
            if y is not None:
                parts.append(html(
                    '<a href="{href}" class="point-link"><circle class="point {cls}" cx="{x}" cy="{y}" r="4">'
                    '<title>{title}</title></circle></a>',
                    href=item.href, cls=cls + (" regressed" if item.marker else ""), x=_n(x), y=_n(y),
                    title=item.title))
    if items:
        parts.append(html('<text class="x-label" x="{}" y="{}" text-anchor="start">{}</text>',
                          _n(g.xs[0] - 4), DURATION_BOTTOM + 20, first_label))
        if len(items) > 1:
            parts.append(html('<text class="x-label" x="{}" y="{}" text-anchor="end">{}</text>',
                              _n(g.xs[-1] + 4), DURATION_BOTTOM + 20, last_label))
    return html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="history-chart" id="history-chart" role="img" '
        'aria-labelledby="history-chart-title" viewBox="0 0 {w} {h}" width="{w}" height="{h}">{body}</svg>',
        w=WIDTH, h=HEIGHT, body=join(parts),
    )


def _panel_axes(label: str, top: float, ticks: Sequence[tuple[float, float]], text: Callable[[float], str]) -> Safe:
    lines = join(
        html('<line class="grid" x1="{l}" y1="{y}" x2="{r}" y2="{y}"/>'
             '<text class="tick" x="{tx}" y="{ty}" text-anchor="end">{t}</text>',
             l=LEFT, r=WIDTH - RIGHT, y=_n(y), tx=LEFT - 6, ty=_n(y + 4), t=text(value))
        for y, value in ticks
    )
    # Left of the plot, above the tick labels: clear of the regression markers above the panel.
    return html('<text class="panel-label" x="4" y="{}">{}</text>{}', _n(top - 12), label, lines)


def _polyline(cls: str, points: Sequence[tuple[float, float]]) -> Safe:
    if len(points) == 1:  # a lone point still shows as its circle
        return Safe("")
    return html('<polyline class="{}" fill="none" points="{}"/>', cls, " ".join(f"{_n(x)},{_n(y)}" for x, y in points))


def _marker(marker: Marker, x: float, y: float) -> Safe:
    """A downward triangle above the point, and a dashed line down through both panels."""
    tip = y - 7
    return html(
        '<a href="{href}" class="regression"><title>{title}</title>'
        '<line class="regression-line" x1="{x}" y1="{top}" x2="{x}" y2="{bottom}"/>'
        '<path class="marker" d="M{x} {tip} L{l} {base} L{r} {base} Z"/></a>',
        href=marker.href, title=marker.title, x=_n(x), top=RATE_TOP - 14, bottom=DURATION_BOTTOM,
        tip=_n(tip), l=_n(x - 6), r=_n(x + 6), base=_n(tip - 10),
    )


def _n(value: float) -> str:
    """A coordinate, short: SVG needs no more than a tenth of a pixel."""
    return f"{value:.1f}".rstrip("0").rstrip(".")
