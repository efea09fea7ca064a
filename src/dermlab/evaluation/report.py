"""A self-contained HTML report of one run folder: every image is embedded, so the file opens anywhere."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dermlab.errors import DataError
from dermlab.evaluation.metrics import SUMMARY_METRICS
from dermlab.io import atomic_write_text

__all__ = ["write_report", "render_report"]

_DISCLAIMER = (
    "dermlab is a research tool, not a medical device. Its outputs must not be used to diagnose, treat or "
    "triage any person."
)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; } td.num { text-align: right;
font-variant-numeric: tabular-nums; } th { background: #f2f2f2; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; white-space: pre-wrap; font-size: 0.85rem; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; width: 480px; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #555; }
.notice { background: #fff4e5; border-left: 4px solid #f0a000; padding: 0.6rem 1rem; }
.missing { color: #777; font-style: italic; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) from whatever the run folder holds, and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    path = run_dir / "report.html"
    atomic_write_text(path, render_report(run_dir))
    return path


def render_report(run_dir: str | Path) -> str:
    """The report of :func:`write_report` as an HTML string; optional parts that are missing are noted."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    sections = [
        _section("Configuration", _config_html(run_dir / "config.yaml")),
        _section("Data splits", _splits_html(run_dir / "splits.csv")),
        _section("Metrics", _metrics_html(metrics)),
        _section("Evaluation plots", _images_html(run_dir, sorted((run_dir / "eval").glob("*/*.png")))),
        _section("Training curves", _images_html(run_dir, sorted((run_dir / "plots").glob("*.png")))),
    ]
    gallery = sorted((run_dir / "gallery").glob("*.png"))
    if gallery:
        sections.append(_section("Grad-CAM gallery", _images_html(run_dir, gallery)))
    card = run_dir / "model_card.md"
    if card.is_file():
        sections.append(_section("Model card", f"<pre>{html.escape(card.read_text(encoding='utf-8'))}</pre>"))
    title = f"dermlab run report: {html.escape(run_dir.resolve().name)}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{title}</h1>",
            f'<p class="notice"><strong>{html.escape(_DISCLAIMER)}</strong></p>',
            *sections,
            f'<p class="notice">{html.escape(_DISCLAIMER)}</p>',
            "</body>",
            "</html>",
            "",
        ]
    )


def _section(heading: str, body: str) -> str:
    anchor = heading.lower().replace(" ", "-")
    return f'<section id="{anchor}">\n<h2>{html.escape(heading)}</h2>\n{body}\n</section>'


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)}</p>'


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _config_html(path: Path) -> str:
    if not path.is_file():
        return _missing("config.yaml not found.")
    return f"<pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>"


def _splits_html(path: Path) -> str:
    if not path.is_file():
        return _missing("splits.csv not found.")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: cannot read as CSV ({error})") from error
    missing = {"label", "split"} - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    order = [s for s in ("train", "val", "test") if s in set(frame["split"])]
    order += sorted(set(frame["split"]) - set(order))
    counts = pd.crosstab(frame["label"], frame["split"]).reindex(columns=order, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    rows = [[label, *(int(v) for v in values)] for label, values in zip(counts.index, counts.to_numpy())]
    return _table(["class", *counts.columns], rows)


def _metrics_html(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return _missing("metrics.json not found: the run has not been evaluated.")
    splits = {k: v for k, v in metrics.items() if isinstance(v, dict) and "per_class" in v}
    extras = {k: v for k, v in metrics.items() if k not in splits and not isinstance(v, (dict, list))}
    parts = []
    if splits:
        names = list(splits)
        rows = [[name, *(splits[s].get(name) for s in names)] for name in SUMMARY_METRICS]
        for key, label in (
            ("auc", "auc"),
            ("sensitivity_at_specificity", "sensitivity @ specificity"),
            ("specificity_at_sensitivity", "specificity @ sensitivity"),
        ):
            row = _target_row(splits, names, key, label)
            if row is not None:
                rows.append(row)
        parts.append(_table(["metric", *names], rows))
        for name in names:
            parts.append(f"<h3>Per class ({html.escape(name)})</h3>")
            parts.append(_per_class_html(splits[name]))
    else:
        parts.append(_missing("metrics.json holds no per-split metrics."))
    if extras:
        parts.append("<h3>Run facts</h3>")
        parts.append(_table(["key", "value"], [[k, v] for k, v in extras.items()]))
    return "\n".join(parts)


def _target_row(splits: dict[str, Any], names: Sequence[str], key: str, label: str) -> list[Any] | None:
    targets = [splits[s].get("target") for s in names]
    first = next((t for t in targets if t), None)
    if first is None:
        return None
    if key == "auc":
        return [f"{first['class']} auc", *((t or {}).get("auc") for t in targets)]
    point = first[key]
    achieved = "sensitivity" if key == "sensitivity_at_specificity" else "specificity"
    heading = f"{first['class']} {label} {point['requested']:g}"
    return [heading, *(((t or {}).get(key) or {}).get(achieved) for t in targets)]


def _per_class_html(metrics: dict[str, Any]) -> str:
    rows = [
        [name, *(values.get(key) for key in ("precision", "recall", "f1", "support", "auc"))]
        for name, values in metrics["per_class"].items()
    ]
    table = _table(["class", "precision", "recall", "f1", "support", "auc"], rows)
    matrix = metrics.get("confusion_matrix")
    classes = list(metrics["per_class"])
    if not matrix or len(matrix) != len(classes):
        return table
    confusion = _table(
        ["true \\ predicted", *classes], [[name, *row] for name, row in zip(classes, matrix)]
    )
    return f"{table}\n<p>Confusion matrix (rows = truth):</p>\n{confusion}"


def _table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for row in rows:
        first, *rest = row
        cells = [f"<th>{html.escape(str(first))}</th>", *(_cell(value) for value in rest)]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="num">&ndash;</td>'
    if isinstance(value, bool):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f'<td class="num">{value:.4f}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _images_html(run_dir: Path, paths: Sequence[Path]) -> str:
    figures = []
    for path in paths:
        data = path.read_bytes()
        caption = html.escape(path.relative_to(run_dir).as_posix())
        if not data.startswith(_PNG_SIGNATURE):
            figures.append(_missing(f"{caption}: not a PNG file, left out."))
            continue
        encoded = base64.b64encode(data).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{encoded}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return "\n".join(figures) if figures else _missing("no images found.")
