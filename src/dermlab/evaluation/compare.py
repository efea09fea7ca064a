"""Side-by-side comparison of several runs from their ``metrics.json`` files."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dermlab.errors import DataError
from dermlab.io import atomic_write_text

__all__ = ["COMPARISON_METRICS", "compare_runs", "write_comparison", "comparison_markdown"]

COMPARISON_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "balanced_accuracy",
    "auc_macro",
)


def compare_runs(
    run_dirs: Sequence[str | Path], split: str = "test", classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per run (index ``run``), columns :data:`COMPARISON_METRICS` plus ``recall_<class>`` per class.

    A run is named by the string ``label`` in its ``metrics.json`` when there is one, else by its folder name;
    names that collide fall back to the path as given. Undefined values (and classes a run lacks) are NaN.
    """
    if not run_dirs:
        raise DataError("compare needs at least one run folder")
    rows = []
    names = []
    for run_dir in run_dirs:
        metrics, label = _load_split(Path(run_dir), split)
        names.append(label)
        row: dict[str, Any] = {name: _number(metrics.get(name)) for name in COMPARISON_METRICS}
        per_class = metrics.get("per_class") or {}
        for class_name in classes or ():
            row[f"recall_{class_name}"] = _number((per_class.get(class_name) or {}).get("recall"))
        rows.append(row)
    duplicated = {name for name in names if names.count(name) > 1}
    names = [str(run_dir) if name in duplicated else name for name, run_dir in zip(names, run_dirs)]
    frame = pd.DataFrame(rows, index=pd.Index(names, name="run"))
    return frame.astype(float)


def comparison_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table of :func:`compare_runs` output; NaN shows as ``-``."""
    header = [frame.index.name or "run", *map(str, frame.columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * len(frame.columns)) + " |",
    ]
    for name, values in zip(frame.index, frame.to_numpy()):
        cells = [str(name).replace("|", "\\|"), *(_format(value, digits) for value in values)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(frame: pd.DataFrame, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<out_prefix>.md`` and ``<out_prefix>.csv`` atomically and return both paths."""
    prefix = Path(out_prefix)
    markdown_path = prefix.with_name(prefix.name + ".md")
    csv_path = prefix.with_name(prefix.name + ".csv")
    atomic_write_text(markdown_path, comparison_markdown(frame))
    atomic_write_text(csv_path, frame.to_csv())
    return markdown_path, csv_path


def _load_split(run_dir: Path, split: str) -> tuple[dict[str, Any], str]:
    path = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.json (evaluate the run first)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    metrics = data.get(split)
    if not isinstance(metrics, dict):
        available = sorted(k for k, v in data.items() if isinstance(v, dict))
        raise DataError(f"{path}: no '{split}' metrics; splits present: {', '.join(available) or 'none'}")
    label = data.get("label")
    return metrics, label if isinstance(label, str) and label else run_dir.resolve().name


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _format(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
