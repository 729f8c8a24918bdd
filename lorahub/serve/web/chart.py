"""The adapter page's per-module chart, drawn by the server as SVG: no script, no external
resource (the page's CSP allows neither), every text escaped (module names come from the
uploaded files), readable at any width (a ``viewBox``, scaled by CSS to the page).

One horizontal bar per module, in layer order, its length the module's norm; hovering a
bar (anywhere on its row) shows the module's name and value. Up to :data:`LABELLED` modules
each row carries its name and value; beyond that the rows get thinner, the drawing never
taller than :data:`MAX_PLOT_H`, and only every few rows is named on the left.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup

from .norms import ModuleNorm

WIDTH = 400  # viewBox units; the page scales it to its width (about 1:1 on a phone)
LABELLED = 40  # up to this many modules, every row carries its name and value
ROW = 16.0  # a labelled row's height
MAX_PLOT_H = 600.0  # the bars' area is never taller than this
LABEL_W = 160.0  # the names' column
VALUE_W = 46.0  # room for the value written after the longest bar
TOP, BOTTOM = 6.0, 40.0  # above the bars; below them: the axis, its ticks and its label
_CHARS = 26  # of a name that fit in the names' column (10-unit monospace)
_DIGITS = re.compile(r"(\d+)", re.ASCII)


def natural_key(name: str) -> list[Any]:
    """Sort key with the numbers in a name compared as numbers: ``layers.9`` before
    ``layers.10``. Splitting on a capturing group alternates text and digits, so items at
    one position are always of one type."""
    return [int(p) if k % 2 else p for k, p in enumerate(_DIGITS.split(name))]


def nice_ticks(top: float) -> list[float]:
    """Axis ticks from 0 to a round value at or above ``top``: steps of 1, 2 or 5 times a
    power of ten, at most six ticks."""
    if not top > 0 or not math.isfinite(top):
        return [0.0, 1.0]
    power = 10 ** math.floor(math.log10(top))
    step = next(power * m for m in (0.2, 0.5, 1, 2, 5, 10) if top / (power * m) <= 5)
    count = math.ceil(top / step - 1e-9)
    return [float(f"{step * k:.12g}") for k in range(count + 1)]


def norms_svg(
    norms: Sequence[ModuleNorm], axis: str = "‖scale · B · A‖ (Frobenius norm)"
) -> Markup:
    """A bar chart of ``norms``, one bar per module in natural (layer) order, with an axis
    labelled ``axis``; every text escaped.

    Example:
        >>> norms_svg([ModuleNorm("model.layers.0.self_attn.q_proj", 1.5)])  # doctest: +SKIP
        Markup('<svg class="norms" ...')
    """
    rows = sorted(norms, key=lambda n: natural_key(n.name))
    n = max(len(rows), 1)
    labelled = n <= LABELLED
    row = ROW if labelled else MAX_PLOT_H / n
    plot_h = row * n
    height = TOP + plot_h + BOTTOM
    x0 = LABEL_W + 6
    plot_w = WIDTH - x0 - (VALUE_W if labelled else 10)
    ticks = nice_ticks(max((r.norm for r in rows), default=0.0))
    scale = plot_w / ticks[-1]
    thick = row * 0.7 if labelled else max(row * 0.8, min(row, 1.0))
    every = 1 if labelled else math.ceil(14 / row)  # names on the left at least 14 apart
    out = [
        f'<svg class="norms" role="img" viewBox="0 0 {WIDTH} {_f(height)}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{html.escape(axis)} per module">'
    ]
    for k, m in enumerate(rows):
        y = TOP + k * row
        tip = f"{m.name}: {m.norm:.4g}"
        out.append(
            f'<g class="bar"><title>{html.escape(tip)}</title>'
            f'<rect class="hit" x="0" y="{_f(y)}" width="{WIDTH}" height="{_f(row)}" />'
            f'<rect class="fill" x="{_f(x0)}" y="{_f(y + (row - thick) / 2)}" '
            f'width="{_f(m.norm * scale)}" height="{_f(thick)}" />'
        )
        if k % every == 0:
            out.append(
                f'<text class="name" x="{_f(LABEL_W)}" y="{_f(y + min(row, ROW) / 2 + 4)}" '
                f'text-anchor="end">{html.escape(_short(m.name))}</text>'
            )
        if labelled:
            out.append(
                f'<text class="value" x="{_f(x0 + m.norm * scale + 4)}" y="{_f(y + row / 2 + 4)}">'
                f"{m.norm:.3g}</text>"
            )
        out.append("</g>")
    base, end = _f(TOP + plot_h), _f(x0 + plot_w)
    out.append(f'<line class="axis" x1="{_f(x0)}" y1="{base}" x2="{end}" y2="{base}" />')
    for t in ticks:
        x = _f(x0 + t * scale)
        out.append(
            f'<line class="tick" x1="{x}" y1="{base}" x2="{x}" y2="{_f(TOP + plot_h + 4)}" />'
            f'<text class="tick" x="{x}" y="{_f(TOP + plot_h + 16)}" text-anchor="middle">'
            f"{t:g}</text>"
        )
    out.append(
        f'<text class="axis" x="{_f(x0 + plot_w / 2)}" y="{_f(height - 6)}" '
        f'text-anchor="middle">{html.escape(axis)}</text></svg>'
    )
    return Markup("".join(out))


def _short(name: str) -> str:
    """The end of a long name, which tells modules apart (layer number, projection): whole
    dotted parts where they fit (``…layers.0.self_attn.q_proj``)."""
    if len(name) <= _CHARS:
        return name
    parts = name.split(".")
    while len(parts) > 1 and len(".".join(parts)) > _CHARS - 1:
        parts.pop(0)
    tail = ".".join(parts)
    return "…" + (tail if len(tail) <= _CHARS - 1 else tail[-(_CHARS - 1) :])


def _f(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")
