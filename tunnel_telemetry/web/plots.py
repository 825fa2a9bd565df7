"""Plots drawn on the server as inline SVG: no script, no font, no request of their own.

Each plotted series is a ``<g class="series" data-series="...">`` (each bar a ``<g
class="bar">``) so that a browser test can find what was drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#17becf")
_W, _H = 640, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 14, 34


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def line_chart(name: str, title: str, labels: Sequence[str],
               series: dict[str, list[float | None]]) -> Markup:
    """Ratios (0-1) over time, one line per series; None leaves a gap."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    n = max(len(labels), 1)

    def x(i: int) -> float:
        return _LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - min(max(value, 0.0), 1.0))

    parts = [f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {_W} {_H}" '
             f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>"]
    for tick in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_num(y(tick))}" '
                     f'y2="{_num(y(tick))}"/><text class="tick" x="{_LEFT - 4}" '
                     f'y="{_num(y(tick) + 4)}" text-anchor="end">{int(tick * 100)}%</text>')
    if labels:
        marks = sorted({0, (len(labels) - 1) // 2, len(labels) - 1})
        for i in marks:
            anchor = "start" if i == 0 and len(labels) > 1 else \
                "end" if i == len(labels) - 1 and len(labels) > 1 else "middle"
            parts.append(f'<text class="tick" x="{_num(x(i))}" y="{_H - 12}" '
                         f'text-anchor="{anchor}">{escape(labels[i])}</text>')
    for index, (label, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        path, pen_down, dots = [], False, []
        for i, value in enumerate(values):
            if value is None:
                pen_down = False
                continue
            path.append(f"{'L' if pen_down else 'M'}{_num(x(i))} {_num(y(value))}")
            pen_down = True
            dots.append(f'<circle cx="{_num(x(i))}" cy="{_num(y(value))}" r="2.5">'
                        f"<title>{escape(label)} {escape(labels[i])}: "
                        f"{round(value * 100)}%</title></circle>")
        points = sum(value is not None for value in values)
        parts.append(f'<g class="series" data-series="{escape(label)}" data-points="{points}" '
                     f'stroke="{colour}" fill="{colour}"><path fill="none" stroke-width="2" '
                     f'd="{" ".join(path)}"/>{"".join(dots)}</g>')
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it went through escape()


def legend(series: dict[str, list[float | None]]) -> Markup:
    """The colour of each series of a line chart, in its order."""
    items = "".join(f'<li style="--c:{COLOURS[i % len(COLOURS)]}">{escape(label)}</li>'
                    for i, label in enumerate(series))
    return Markup(f'<ul class="legend">{items}</ul>')  # noqa: S704 - labels escaped


def bar_chart(name: str, title: str, bars: Sequence[tuple[str, float, str]]) -> Markup:
    """Horizontal bars: (label, value, text shown beside the bar), longest first."""
    row, label_w, text_w = 30, 110, 170
    height = max(len(bars), 1) * row + 8
    top = max((value for _, value, _ in bars), default=0) or 1
    span = _W - label_w - text_w
    parts = [f'<svg class="chart" data-chart="{escape(name)}" viewBox="0 0 {_W} {height}" '
             f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">',
             f"<title>{escape(title)}</title>"]
    for i, (label, value, text) in enumerate(bars):
        y0 = 4 + i * row
        width = max(span * value / top, 1)
        parts.append(f'<g class="bar" data-label="{escape(label)}" data-value="{_num(value)}">'
                     f'<text x="{label_w - 6}" y="{y0 + 16}" text-anchor="end">{escape(label)}'
                     f'</text><rect x="{label_w}" y="{y0}" width="{_num(width)}" height="22" '
                     f'fill="{COLOURS[1]}"/><text x="{_num(label_w + width + 6)}" y="{y0 + 16}">'
                     f"{escape(text)}</text></g>")
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text in it went through escape()
