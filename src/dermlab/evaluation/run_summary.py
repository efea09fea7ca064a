"""Finishing a run folder: score val and test with the best checkpoint, write metrics.json, curves, report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from dermlab.evaluation.evaluate import evaluate_frame
from dermlab.evaluation.plots import plot_training_curves
from dermlab.evaluation.report import write_report
from dermlab.io import atomic_write_json
from dermlab.models.checkpoint import load_checkpoint

__all__ = ["summarise_run"]

log = logging.getLogger(__name__)


def summarise_run(
    run_dir: Path,
    frame: pd.DataFrame,
    splits: tuple[str, ...] = ("val", "test"),
    extras: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Evaluate the run's best checkpoint on each split present in ``frame['split']`` and write the summary."""
    run_dir = Path(run_dir)
    loaded = load_checkpoint(run_dir)
    batch_size = loaded.config.data.eval_batch_size
    summary: dict[str, Any] = {}
    for split in splits:
        rows = frame[frame["split"] == split].reset_index(drop=True)
        if len(rows) == 0:
            continue
        summary[split] = evaluate_frame(
            loaded, rows, run_dir / "eval" / split, loaded.config.evaluation, batch_size=batch_size, num_workers=num_workers
        )
    summary.update(extras or {})
    atomic_write_json(run_dir / "metrics.json", summary)
    metrics_csv = run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        try:
            plot_training_curves(metrics_csv, run_dir / "plots" / "training_curves.png")
        except Exception as error:  # curves are a nicety; never lose the run's metrics over them
            log.warning("could not plot training curves: %s", error)
    write_report(run_dir)
    return summary
