"""HTML pieces of the public site (site.py): escaping, the Markdown of the daily and weekly
reports, and line charts drawn as inline SVG. No scripts, nothing loaded from elsewhere: the
site must work from any static host, offline, and show community text as text."""

from __future__ import annotations

import html
import math
import re

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_POINTS = 800
"""Points drawn per series: a long run logs a loss at every step, and a page must stay light."""
_URL = re.compile(r"https?://[^\s<>\"']+[^\s<>\"'.,;:)]")
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")


def esc(value) -> str:
    """Any value as HTML text (community text included), quotes escaped for attributes."""
    return html.escape(str(value), quote=True)


def link(url: str, text: str | None = None) -> str:
    """An external link when `url` is http(s), else the text alone (no javascript: or data: URLs)."""
    if not re.match(r"^https?://", url):
        return esc(text if text is not None else url)
    return f'<a href="{esc(url)}" rel="nofollow noopener">{esc(text if text is not None else url)}</a>'


def _inline(text: str) -> str:
    """Escaped text with `code` spans and http(s) URLs made links."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick is a backtick
        parts[-2:] = ["`".join(parts[-2:])]
    return "".join(f"<code>{esc(p)}</code>" if i % 2 else _URL.sub(lambda m: link(html.unescape(m[0])), esc(p))
                   for i, p in enumerate(parts))


def markdown(text: str, images: set[str]) -> str:
    """The Markdown the reports write (headings, `- ` lists, paragraphs, code fences, `code`,
    images on a line of their own) as HTML. An image is shown only when its source is one of
    `images`, files copied beside the page; any other becomes its alt text."""
    out, para, items, code = [], [], [], None

    def flush():
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if code is not None:
            if line.startswith("```"):
                out.append(f"<pre><code>{esc(chr(10).join(code))}</code></pre>")
                code = None
            else:
                code.append(line)
        elif line.startswith("```"):
            flush()
            code = []
        elif m := re.match(r"^(#{1,6}) (.*)$", line):
            flush()
            out.append(f"<h{len(m[1])}>{_inline(m[2])}</h{len(m[1])}>")
        elif m := re.match(r"^[-*] (.*)$", line):
            if para:
                flush()
            items.append(m[1])
        elif m := _IMAGE.match(line.strip()):
            flush()
            out.append(f'<p><img src="{esc(m[2])}" alt="{esc(m[1])}"></p>' if m[2] in images else f"<p>{esc(m[1])}</p>")
        elif not line.strip():
            flush()
        else:
            if items:
                flush()
            para.append(line.strip())
    if code is not None:
        out.append(f"<pre><code>{esc(chr(10).join(code))}</code></pre>")
    flush()
    return "\n".join(out)


def number(v: float) -> str:
    """4 significant digits, thousands as k, millions as M, billions as G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.4g}{suffix}"
    return f"{v:.4g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[tuple[float, str]]:
    """About n round values from lo to hi, with their labels: as many decimals as the spacing
    needs (a loss that moves by 0.001 gets distinct labels), thousands and up as number() has them."""
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (step / mag == 2.5)
    values = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    big = max(abs(lo), abs(hi)) >= 1e4
    return [(v, number(v) if big else f"{v:.{decimals}f}") for v in values]


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / (MAX_POINTS - 1)
    return [points[int(i * stride)] for i in range(MAX_POINTS - 1)] + [points[-1]]


def line_chart(series: list[tuple[str, list[tuple[float, float]]]], x_label: str, y_label: str) -> str:
    """An SVG line chart, one polyline per (label, [(x, y), ...]) series (non-finite points
    left out), with axes, tick labels and a legend; a note when no series has a point."""
    series = [(label, _thin(sorted((x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y))))
              for label, pts in series]
    series = [(label, pts) for label, pts in series if pts]
    if not series:
        return '<p class="empty">No data yet.</p>'
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    w, h, left, right, top, bottom = 640, 280, 64, 16, 12, 44
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    parts = [f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
             f'aria-label="{esc(y_label)} by {esc(x_label)}">',
             f'<line class="axis" x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}"/>',
             f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}"/>']
    for t, label in _ticks(x0, x1):
        parts.append(f'<text class="tick" x="{sx(t):.1f}" y="{h - bottom + 14}" text-anchor="middle">{label}</text>')
    for t, label in _ticks(y0, y1):
        parts.append(f'<line class="grid" x1="{left}" y1="{sy(t):.1f}" x2="{w - right}" y2="{sy(t):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{label}</text>')
    parts.append(f'<text class="label" x="{(left + w - right) / 2}" y="{h - 6}" text-anchor="middle">{esc(x_label)}</text>')
    parts.append(f'<text class="label" x="12" y="{(top + h - bottom) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(top + h - bottom) / 2})">{esc(y_label)}</text>')
    legend = []
    for i, (label, pts) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.5" points="{coords}">'
                     f"<title>{esc(label)}</title></polyline>")
        if len(pts) == 1:  # a polyline of one point draws nothing
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        legend.append(f'<li><span class="swatch" style="background:{color}"></span>{esc(label)}</li>')
    parts.append("</svg>")
    return "\n".join(parts) + f'\n<ul class="legend">{"".join(legend)}</ul>'
