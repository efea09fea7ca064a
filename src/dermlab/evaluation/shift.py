"""The shift report: a model's figures on its test images as another camera or clinic might have taken them.

Each corruption of :data:`dermlab.data.corruptions.CORRUPTIONS` is applied to every image as read from disk,
seeded per image (see :func:`dermlab.data.corruptions.apply_corruption`), and the corrupted images go through
the checkpoint's own preprocessing exactly as in ``dermlab evaluate``. One row per condition (``clean`` first),
columns ``accuracy``, ``balanced_accuracy``, ``auc_macro`` and ``mel_vs_nv_auc`` (the AUC of p(mel) on the
images whose truth is melanoma or nevus: the distinction that matters most clinically).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from dermlab.data.corruptions import CORRUPTIONS, SHIFT_CORRUPTIONS, apply_corruption
from dermlab.data.images import read_image
from dermlab.errors import ConfigError, DataError
from dermlab.evaluation.evaluate import predict_logits
from dermlab.evaluation.metrics import compute_metrics
from dermlab.io import atomic_write_json, atomic_write_text
from dermlab.models.checkpoint import LoadedModel

__all__ = ["SHIFT_METRICS", "shift_report", "shift_table", "shift_markdown", "write_shift_report"]

#: The report's columns, in order.
SHIFT_METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "mel_vs_nv_auc")

_CLEAN = "clean"
_MELANOMA, _NEVUS = "mel", "nv"


class _CorruptingLoader:
    """``read_image`` followed by one corruption, seeded by the image's row in the frame (picklable for workers)."""

    def __init__(self, paths: Sequence[str], name: str, seed: int) -> None:
        self.name, self.seed = name, seed
        self.index = {path: i for i, path in enumerate(paths)}

    def __call__(self, path: str) -> Image.Image:
        return apply_corruption(read_image(path), self.name, self.seed, self.index[path])


def shift_report(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    corruptions: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    external: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Metrics of ``loaded`` on the labelled rows of ``frame`` (``path``, ``label``), clean and corrupted.

    ``corruptions`` defaults to :data:`SHIFT_CORRUPTIONS`; unknown names raise :class:`ConfigError` before
    any image is read. ``external``: labelled rows of other sources by name (e.g. another clinic's folder,
    whose classes may be a subset of the model's), each one more row ``external: <name>`` scored the same way,
    uncorrupted: the real shift beside the imitated ones. The frame's index is named ``corruption``; ``attrs``
    hold ``seed`` and ``images``.
    """
    names = list(dict.fromkeys(SHIFT_CORRUPTIONS if corruptions is None else corruptions))
    for name in names:
        if name == _CLEAN:
            raise ConfigError(f"{_CLEAN!r} is the uncorrupted baseline, always reported; not a corruption name")
        CORRUPTIONS.get(name)
    if len(frame) == 0:
        raise DataError("nothing to evaluate: the chosen split is empty")
    frame = frame.reset_index(drop=True)
    y_true = _true_indices(frame, loaded.classes)
    paths = frame["path"].astype(str).tolist()
    sources = {name: (frame, y_true, None if name == _CLEAN else _CorruptingLoader(paths, name, seed)) for name in [_CLEAN, *names]}
    for name, rows_of_source in (external or {}).items():
        rows_of_source = rows_of_source.reset_index(drop=True)
        sources[f"external: {name}"] = (rows_of_source, _true_indices(rows_of_source, loaded.classes), None)
    rows: dict[str, dict[str, float | None]] = {}
    for name, (part, truth, loader) in sources.items():
        logits = predict_logits(loaded, part, batch_size=batch_size, num_workers=num_workers, device=device, image_loader=loader)
        rows[name] = _row(truth, torch.from_numpy(logits).double().softmax(dim=1).numpy(), list(loaded.classes))
    report = pd.DataFrame.from_dict(rows, orient="index", columns=list(SHIFT_METRICS)).astype(object)
    report = report.where(report.notna(), None)
    report.index.name = "corruption"
    report.attrs.update(seed=int(seed), images=len(frame))
    return report


def _true_indices(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    unknown = sorted(set(frame["label"].astype(str)) - set(classes))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's classes {list(classes)}")
    if len(frame) == 0:
        raise DataError("nothing to evaluate: no labelled images")
    index = {name: i for i, name in enumerate(classes)}
    return frame["label"].astype(str).map(index).to_numpy(dtype=np.int64)


def _row(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float | None]:
    metrics = compute_metrics(y_true, probabilities, classes, target_class=None)
    return {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "auc_macro": metrics["auc_macro"],
        "mel_vs_nv_auc": _mel_vs_nv_auc(y_true, probabilities, classes),
    }


def _mel_vs_nv_auc(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> float | None:
    """AUC of p(mel) separating melanomas from nevi; ``None`` without both classes in the model and the truth."""
    if _MELANOMA not in classes or _NEVUS not in classes:
        return None
    mel, nv = classes.index(_MELANOMA), classes.index(_NEVUS)
    keep = (y_true == mel) | (y_true == nv)
    positive = y_true[keep] == mel
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, probabilities[keep, mel]))


def _number(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def shift_table(report: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows: each value, and for corruptions its change from ``clean`` in brackets."""
    header = ["corruption", *SHIFT_METRICS]
    clean = report.loc[_CLEAN] if _CLEAN in report.index else None
    rows = []
    for name, row in report.iterrows():
        cells = [str(name)]
        for metric in SHIFT_METRICS:
            value = _number(row[metric])
            if value is None:
                cells.append("n/a")
                continue
            base = _number(clean[metric]) if clean is not None else None
            delta = f" ({value - base:+.3f})" if name != _CLEAN and base is not None else ""
            cells.append(f"{value:.3f}{delta}")
        rows.append(cells)
    return header, rows


def shift_markdown(report: pd.DataFrame) -> str:
    """The report as a Markdown table with a one-line preamble (images, seed)."""
    header, rows = shift_table(report)
    lines = [
        "# Shift report",
        "",
        f"{report.attrs.get('images', '?')} images, corruption seed {report.attrs.get('seed', '?')}; "
        "brackets: change from clean. mel_vs_nv_auc: AUC of p(mel) on melanomas and nevi only.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def write_shift_report(report: pd.DataFrame, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``shift.json`` (seed, images and one record per condition) and ``shift.md``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [
        {"corruption": str(name), **{metric: _number(row[metric]) for metric in SHIFT_METRICS}}
        for name, row in report.iterrows()
    ]
    data = {"seed": report.attrs.get("seed"), "images": report.attrs.get("images"), "rows": records}
    json_path, markdown_path = out_dir / "shift.json", out_dir / "shift.md"
    atomic_write_json(json_path, data)
    atomic_write_text(markdown_path, shift_markdown(report))
    return json_path, markdown_path
