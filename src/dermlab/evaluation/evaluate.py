"""Scoring a trained model on a split: inference, metrics, predictions.csv and the plots."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dermlab.config import EvaluationConfig
from dermlab.data.datamodule import ImageDataset
from dermlab.data.transforms import create_transform
from dermlab.errors import DataError
from dermlab.evaluation.calibration import reliability_bins
from dermlab.evaluation.metrics import compute_metrics
from dermlab.evaluation.plots import plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
from dermlab.io import atomic_save, atomic_write_json
from dermlab.models.checkpoint import LoadedModel

__all__ = ["predict_logits", "predictions_frame", "evaluate_frame", "score_predictions"]

log = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> np.ndarray:
    """Logits ``(N, C)`` of the rows of ``frame`` (``path`` column), preprocessed as the checkpoint says."""
    device = device or _device()
    transform = create_transform("none", loaded.preprocessing, train=False)
    labels_known = frame.assign(label=loaded.classes[0])  # labels are not needed for inference
    dataset = ImageDataset(labels_known, loaded.classes, transform)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model = loaded.model.to(device).eval()
    outputs = [model(images.to(device)).float().cpu() for images, _ in loader]
    if not outputs:
        return np.zeros((0, len(loaded.classes)), dtype=np.float32)
    return torch.cat(outputs).numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(logits, dtype=np.float32)).softmax(dim=1).numpy()


def predictions_frame(frame: pd.DataFrame, classes: Sequence[str], probabilities: np.ndarray) -> pd.DataFrame:
    """``image_id, path, true, predicted, prob_<class>...`` (``true`` empty where the label is unknown)."""
    out = pd.DataFrame(
        {
            "image_id": frame["image_id"].astype(str).to_numpy() if "image_id" in frame else frame["path"].map(lambda p: Path(p).stem),
            "path": frame["path"].astype(str).to_numpy(),
            "true": frame["label"].astype(str).to_numpy() if "label" in frame else "",
            "predicted": [classes[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else [],
        }
    )
    for index, name in enumerate(classes):
        out[f"prob_{name}"] = probabilities[:, index] if len(probabilities) else []
    return out


def score_predictions(
    predictions: pd.DataFrame,
    classes: Sequence[str],
    out_dir: Path,
    evaluation: EvaluationConfig,
    title: str = "",
) -> dict[str, Any]:
    """Metrics and plots from a predictions frame; writes ``metrics.json``, ``predictions.csv`` and PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(predictions["true"]) - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's classes {list(classes)}")
    y_true = predictions["true"].map(index).to_numpy(dtype=np.int64)
    y_prob = predictions[[f"prob_{name}" for name in classes]].to_numpy(dtype=np.float64)
    target = evaluation.target_class if evaluation.target_class in classes else None
    metrics = compute_metrics(
        y_true,
        y_prob,
        list(classes),
        target_class=target,
        fixed_specificity=evaluation.fixed_specificity,
        fixed_sensitivity=evaluation.fixed_sensitivity,
        ece_bins=evaluation.ece_bins,
    )
    atomic_save(out_dir / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    atomic_write_json(out_dir / "metrics.json", metrics)
    cm = np.asarray(metrics["confusion_matrix"])
    plot_confusion_matrix(cm, list(classes), out_dir / "confusion_matrix.png", normalize=False)
    plot_confusion_matrix(cm, list(classes), out_dir / "confusion_matrix_normalized.png", normalize=True)
    plot_roc_curves(y_true, y_prob, list(classes), out_dir / "roc.png")
    plot_reliability_diagram(reliability_bins(y_true, y_prob, n_bins=evaluation.ece_bins), out_dir / "reliability.png")
    return metrics


def evaluate_frame(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    out_dir: Path,
    evaluation: EvaluationConfig | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Run the model over labelled rows and score them (see :func:`score_predictions`)."""
    if len(frame) == 0:
        raise DataError("nothing to evaluate: the chosen split is empty")
    logits = predict_logits(loaded, frame, batch_size=batch_size, num_workers=num_workers)
    probabilities = _softmax(logits)
    predictions = predictions_frame(frame, loaded.classes, probabilities)
    return score_predictions(predictions, loaded.classes, out_dir, evaluation or loaded.config.evaluation)
