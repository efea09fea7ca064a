"""The HTML pieces of a self-contained report: sections, folded details, tables whose cells format numbers,
and PNG images embedded as data URLs (so the file opens anywhere). Every text is escaped; only :class:`Raw`
cells pass through as written.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Raw", "cell", "details", "embedded_images", "missing", "number_cell", "section", "table"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Raw(str):
    """A whole ``<td>`` that :func:`table` puts into a row as it is."""


def number_cell(value: Any) -> Raw:
    """A right-aligned cell showing ``value`` as written (a dash for None)."""
    return Raw(f'<td class="num">{html.escape(str(value)) if value is not None else "&ndash;"}</td>')


def section(heading: str, body: str, css_class: str = "") -> str:
    anchor = heading.lower().replace(" ", "-")
    attribute = f' class="{css_class}"' if css_class else ""
    return f'<section id="{anchor}"{attribute}>\n<h2>{html.escape(heading)}</h2>\n{body}\n</section>'


def details(summary: str, body: str) -> str:
    return f"<details>\n<summary>{html.escape(summary)}</summary>\n{body}\n</details>"


def missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]], css_class: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for row in rows:
        first, *rest = row
        cells = [f"<th>{html.escape(str(first))}</th>", *(cell(value) for value in rest)]
        body.append(f"<tr>{''.join(cells)}</tr>")
    attribute = f' class="{css_class}"' if css_class else ""
    return (
        f"<table{attribute}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + "\n</tbody>\n</table>"
    )


def cell(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if value is None:
        return '<td class="num">&ndash;</td>'
    if isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def embedded_images(run_dir: Path, paths: Sequence[Path], wide: bool = False) -> str:
    figures = []
    for path in paths:
        data = path.read_bytes()
        caption = html.escape(path.relative_to(run_dir).as_posix())
        if not data.startswith(_PNG_SIGNATURE):
            figures.append(missing(f"{caption}: not a PNG file, left out."))
            continue
        encoded = base64.b64encode(data).decode("ascii")
        figure_class = ' class="wide"' if wide else ""
        figures.append(
            f'<figure{figure_class}><img src="data:image/png;base64,{encoded}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "\n".join(figures) if figures else missing("no images found.")
