"""Evaluation figures as PNG files: each function takes computed results, writes one file, returns its path.

Figures are built with matplotlib's object API on an Agg canvas (no pyplot state, no global backend switch),
so plotting works headless, in threads and inside notebooks alike, and nothing is left open afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dermlab.errors import DataError
from dermlab.evaluation.calibration import reliability_bins
from dermlab.io import atomic_save

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_confusion_matrix",
    "plot_roc_curves",
    "plot_reliability_diagram",
    "plot_training_curves",
]

_DPI = 110


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    normalize: bool = False,
    title: str | None = None,
) -> Path:
    """Confusion matrix (rows = truth); ``normalize=True`` divides each row by its total (empty rows: 0)."""
    matrix = np.asarray(cm, dtype=float)
    if matrix.shape != (len(classes), len(classes)):
        raise DataError(f"confusion matrix shape {matrix.shape} does not match {len(classes)} classes")
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    size = max(4.5, 0.65 * len(classes) + 2.5)
    figure = _new_figure((size + 1.0, size))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(matrix.max(), 1.0))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    threshold = (1.0 if normalize else max(matrix.max(), 1.0)) / 2.0
    for row in range(len(classes)):
        for column in range(len(classes)):
            value = matrix[row, column]
            text = f"{value:.2f}" if normalize else f"{int(value)}"
            axes.text(
                column,
                row,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > threshold else "black",
            )
    axes.set_xticks(range(len(classes)), labels=list(classes), rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    return _save(figure, path)


def plot_roc_curves(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """One-vs-rest ROC curve per class; classes without both positives and negatives are listed as skipped."""
    from sklearn.metrics import roc_auc_score, roc_curve

    truth = np.asarray(y_true)
    prob = np.asarray(y_prob, dtype=float)
    if prob.ndim != 2 or prob.shape != (truth.size, len(classes)):
        raise DataError(f"y_prob must have shape ({truth.size}, {len(classes)}), got {prob.shape}")
    figure = _new_figure((6.5, 6.0))
    axes = figure.add_subplot()
    skipped = []
    for k, name in enumerate(classes):
        positive = truth == k
        if positive.all() or not positive.any():
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(positive, prob[:, k])
        axes.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUC {roc_auc_score(positive, prob[:, k]):.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if skipped:
        axes.plot([], [], " ", label=f"no ROC (absent or only class): {', '.join(skipped)}")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title(title or "ROC curves, one vs rest")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_reliability_diagram(
    bins: Mapping[str, Any] | tuple[Any, Any],
    path: str | Path,
    calibrated: Mapping[str, Any] | tuple[Any, Any] | None = None,
    n_bins: int = 15,
    labels: tuple[str, str] = ("uncalibrated", "temperature-scaled"),
    title: str | None = None,
) -> Path:
    """Reliability diagram from :func:`reliability_bins` output or a ``(y_true, y_prob)`` pair.

    ``calibrated`` (same forms) draws a second set of bars, e.g. after temperature scaling; the legend shows
    each set's ECE. A lower panel shows how many samples fall in each bin.
    """
    sets = [(labels[0], _as_bins(bins, n_bins))]
    if calibrated is not None:
        sets.append((labels[1], _as_bins(calibrated, n_bins)))
    figure = _new_figure((6.0, 7.0))
    grid = figure.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    axes = figure.add_subplot(grid[0])
    counts_axes = figure.add_subplot(grid[1], sharex=axes)
    width_share = 1.0 / len(sets)
    colours = ("tab:blue", "tab:orange")
    for position, (label, values) in enumerate(sets):
        edges = np.asarray(values["edges"], dtype=float)
        width = np.diff(edges)
        left = edges[:-1] + position * width * width_share
        accuracy = np.array([a if a is not None else 0.0 for a in values["accuracy"]])
        confidence = np.array([c if c is not None else np.nan for c in values["confidence"]])
        axes.bar(
            left,
            accuracy,
            width=width * width_share,
            align="edge",
            color=colours[position],
            alpha=0.75,
            edgecolor="black",
            linewidth=0.4,
            label=f"{label} (ECE {values['ece']:.3f})",
        )
        centres = left + width * width_share / 2
        axes.plot(centres, confidence, "o", markersize=3, color=colours[position])
        counts_axes.bar(
            left,
            values["count"],
            width=width * width_share,
            align="edge",
            color=colours[position],
            alpha=0.75,
        )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy (bars), mean confidence (dots)")
    axes.set_title(title or "reliability diagram (top label)")
    axes.legend(loc="upper left", fontsize=8)
    axes.tick_params(labelbottom=False)
    counts_axes.set_xlabel("confidence")
    counts_axes.set_ylabel("samples")
    return _save(figure, path)


def plot_training_curves(metrics_csv_path: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Loss, metric and learning-rate curves per epoch from a Lightning ``CSVLogger`` ``metrics.csv``.

    Rows are sparse (train and validation rows are logged separately), so each column keeps its last logged
    value per epoch. ``*_step`` columns are dropped when the matching ``*_epoch`` column exists, and counters
    (``epoch``, ``step``, ``run_epoch``) are never drawn as curves. Epochs count over the whole run: stage 2
    (a new trainer, whose ``epoch`` restarts at 0) continues after stage 1, and a dotted line marks where it
    starts. Any column may be missing; a file with nothing to plot still produces a figure that says so.
    """
    source = Path(metrics_csv_path)
    if not source.is_file():
        raise DataError(f"{source}: training log not found")
    try:
        frame = pd.read_csv(source)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{source}: cannot read as CSV ({error})") from error
    curves = _epoch_curves(frame)
    losses = [c for c in curves.columns if "loss" in c.lower()]
    rates = [c for c in curves.columns if c.lower() == "lr" or c.lower().startswith(("lr-", "lr_", "lr/"))]
    others = [c for c in curves.columns if c not in losses and c not in rates]
    candidates = [("loss", losses), ("metric", others), ("learning rate", rates)]
    panels = [(name, columns) for name, columns in candidates if columns]
    figure = _new_figure((5.0 * max(len(panels), 1), 4.0))
    if not panels:
        axes = figure.add_subplot()
        axes.text(0.5, 0.5, f"no curves logged in {source.name}", ha="center", va="center")
        axes.set_axis_off()
    for position, (name, columns) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        for column in columns:
            series = curves[column].dropna()
            axes.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=column)
        for number, start in enumerate(curves.attrs.get("stage_starts", []), start=2):
            axes.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
            axes.annotate(f"stage {number}", (start - 0.5, 1.0), xycoords=("data", "axes fraction"),
                          xytext=(3, -10), textcoords="offset points", fontsize=7, color="grey")
        axes.set_xlabel(curves.index.name or "epoch")
        if curves.index.name in ("epoch", "step"):
            from matplotlib.ticker import MaxNLocator

            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(name)
        if name == "learning rate" and (curves[columns] > 0).all(axis=None):
            axes.set_yscale("log")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    figure.suptitle(title or "training curves")
    return _save(figure, path)


# Counters a training log carries beside the metrics: the x axis, never a curve.
_BOOKKEEPING_COLUMNS = frozenset({"epoch", "step", "run_epoch", "global_step", "stage", "created_at"})


def _epoch_curves(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.dropna(axis="columns", how="all")
    values = [c for c in frame.columns if c not in _BOOKKEEPING_COLUMNS]
    values = [c for c in values if not (c.endswith("_step") and c.removesuffix("_step") + "_epoch" in frame)]
    numeric = frame[values].apply(pd.to_numeric, errors="coerce").dropna(axis="columns", how="all")
    if "epoch" in frame.columns:
        key, stages = _run_epochs(frame)
        # groupby().last() skips NaN, so each epoch gets the last value actually logged in it.
        curves = numeric[key.notna()].groupby(key[key.notna()].astype(int)).last()
        curves.index.name = "epoch"
        starts = key.groupby(stages).min().dropna()
        curves.attrs["stage_starts"] = [int(value) for value in starts.iloc[1:]]
    elif "step" in frame.columns:
        curves = numeric.groupby(pd.to_numeric(frame["step"], errors="coerce")).last()
        curves.index.name = "step"
    else:
        curves = numeric
        curves.index.name = "row"
    return curves


def _run_epochs(frame: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each row's epoch counted over the whole run (every stage, a new trainer, restarts ``epoch``) and stage.

    Within a stage the offset is ``run_epoch - epoch`` where the validation rows log ``run_epoch``, else the
    stage continues where the previous one ended.
    """
    epoch = _numeric_column(frame, "epoch")
    logged_offset = _numeric_column(frame, "run_epoch") - epoch
    stages = _stage_numbers(epoch, _numeric_column(frame, "step"), logged_offset)
    run_epoch = pd.Series(np.nan, index=frame.index)
    next_start = 0.0
    for number in sorted(set(stages)):
        rows = stages == number
        known = logged_offset[rows].dropna()
        run_epoch[rows] = epoch[rows] + (float(known.iloc[0]) if len(known) else next_start)
        if run_epoch[rows].notna().any():
            next_start = float(run_epoch[rows].max()) + 1.0
    return run_epoch, stages


def _stage_numbers(epoch: pd.Series, step: pd.Series, logged_offset: pd.Series) -> pd.Series:
    """0, 1, ... per row: a stage starts where ``epoch`` or ``step`` falls back or the logged offset changes."""
    stage, numbers = 0, []
    last_epoch = last_step = last_offset = np.nan
    for this_epoch, this_step, offset in zip(epoch, step, logged_offset):
        offset_changed = not (np.isnan(offset) or np.isnan(last_offset)) and offset != last_offset
        if this_epoch < last_epoch or this_step < last_step or offset_changed:  # False against NaN
            stage, last_offset = stage + 1, np.nan
        numbers.append(stage)
        last_epoch = last_epoch if np.isnan(this_epoch) else this_epoch
        last_step = last_step if np.isnan(this_step) else this_step
        last_offset = last_offset if np.isnan(offset) else offset
    return pd.Series(numbers, index=epoch.index)


def _numeric_column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name not in frame:
        return pd.Series(np.nan, index=frame.index, dtype=float)
    return pd.to_numeric(frame[name], errors="coerce").astype(float)


def _as_bins(value: Mapping[str, Any] | tuple[Any, Any], n_bins: int) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        missing = {"edges", "accuracy", "confidence", "count", "ece"} - set(value)
        if missing:
            raise DataError(f"reliability bins lack {sorted(missing)}; pass reliability_bins() output")
        return value
    y_true, y_prob = value
    return reliability_bins(y_true, y_prob, n_bins)


def _new_figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_save(path, lambda tmp: figure.savefig(tmp, format="png"))
    figure.clear()
    return path
