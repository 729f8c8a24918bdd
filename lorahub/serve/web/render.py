"""What the templates cannot do alone: the model card as safe HTML, the lineage graph as
SVG, byte sizes for people, and the usage snippets with the real ids filled in."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

import nh3
from markdown_it import MarkdownIt
from markupsafe import Markup

from ...card import split_card

# Tags a model card may use; anything else (script, style, iframe, on* attributes) is
# dropped by the sanitizer, whatever the Markdown says. Links get rel="noopener noreferrer".
_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "code", "dd", "del", "details", "div", "dl", "dt",
    "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "kbd", "li", "ol", "p", "pre",
    "s", "span", "strong", "sub", "summary", "sup", "table", "tbody", "td", "th", "thead",
    "tr", "ul",
}  # fmt: skip
_ATTRS = {"a": {"href", "title"}, "img": {"src", "alt", "title"}, "td": {"align"}, "th": {"align"}}
_MD = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")


def card_html(text: str | None) -> Markup | None:
    """A model card (Markdown, maybe with YAML front matter and raw HTML) as HTML that is
    safe to put in a page: rendered, then sanitized (no script, no event handler, no
    ``javascript:`` URL)."""
    if not text:
        return None
    body = split_card(text)[1]
    rendered = _MD.render(body)
    clean = nh3.clean(
        rendered,
        tags=_TAGS,
        attributes=_ATTRS,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer",
    )
    return Markup(clean)


def size(n: int | float | None) -> str:
    """Bytes for a person: ``1.5 KB``, ``3.2 GB`` (decimal units, as ``lorahub ls``)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


@dataclass(frozen=True)
class Node:
    """One box of the lineage graph: its label, the page it links to, and what the edge
    into the composed adapter says (weight)."""

    label: str
    href: str | None
    note: str = ""


def lineage_svg(child: Node, parents: Sequence[Node], method: str) -> Markup:
    """Parents in a column on the left, arrows into the composed adapter on the right; every
    text escaped. Drawn by the server: no script, readable at any width (viewBox)."""
    box_w, box_h, gap = 220, 44, 16
    n = max(len(parents), 1)
    height = n * box_h + (n - 1) * gap + 40
    width = 2 * box_w + 160
    child_y = (height - box_h) / 2
    out = [
        f'<svg class="lineage" role="img" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="lineage">',
        "<defs><marker id='arrow' viewBox='0 0 10 10' refX='10' refY='5' markerWidth='8' "
        "markerHeight='8' orient='auto'><path d='M0,0 L10,5 L0,10 z' /></marker></defs>",
    ]
    for k, p in enumerate(parents):
        y = 20 + k * (box_h + gap)
        out.append(_box(p, 0, y, box_w, box_h, "parent"))
        x1, y1, x2, y2 = box_w, y + box_h / 2, width - box_w, child_y + box_h / 2
        out.append(
            f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" marker-end="url(#arrow)" />'
            f'<text class="edge" x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 6}" '
            f'text-anchor="middle">{html.escape(p.note)}</text>'
        )
    out.append(_box(child, width - box_w, child_y, box_w, box_h, "child"))
    out.append(
        f'<text class="method" x="{width / 2}" y="{height - 6}" text-anchor="middle">'
        f"{html.escape(method)}</text></svg>"
    )
    return Markup("".join(out))


def _box(node: Node, x: float, y: float, w: int, h: int, cls: str) -> str:
    label = node.label if len(node.label) <= 30 else node.label[:29] + "…"
    rect = (
        f'<g class="node {cls}"><title>{html.escape(node.label)}</title>'
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" />'
        f'<text x="{x + w / 2}" y="{y + h / 2 + 5}" text-anchor="middle">'
        f"{html.escape(label)}</text></g>"
    )
    if node.href:
        return f'<a href="{html.escape(node.href)}">{rect}</a>'
    return rect
