"""Each plot writes a readable PNG from computed results, including awkward inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermlab.errors import DataError
from dermlab.evaluation.calibration import reliability_bins
from dermlab.evaluation.plots import (
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_training_curves,
)

CLASSES = ["nv", "mel", "df"]


def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind


def _predictions(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=n)  # "df" is absent from the truth
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y_true]
    return y_true, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix(tmp_path: Path, normalize: bool) -> None:
    cm = [[5, 1, 0], [2, 3, 1], [0, 0, 0]]  # an empty row must not divide by zero
    path = plot_confusion_matrix(cm, CLASSES, tmp_path / "sub" / "cm.png", normalize=normalize)
    assert path == tmp_path / "sub" / "cm.png"
    _assert_png(path)


def test_confusion_matrix_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="3 classes"):
        plot_confusion_matrix([[1, 2], [3, 4]], CLASSES, tmp_path / "cm.png")


def test_roc_curves_skip_absent_class(tmp_path: Path) -> None:
    y_true, y_prob = _predictions()
    _assert_png(plot_roc_curves(y_true, y_prob, CLASSES, tmp_path / "roc.png"))


def test_reliability_diagram_before_and_after(tmp_path: Path) -> None:
    y_true, y_prob = _predictions()
    before = reliability_bins(y_true, y_prob, n_bins=10)
    _assert_png(plot_reliability_diagram(before, tmp_path / "one.png"))
    softened = np.sqrt(y_prob) / np.sqrt(y_prob).sum(axis=1, keepdims=True)
    two = plot_reliability_diagram((y_true, y_prob), tmp_path / "two.png", calibrated=(y_true, softened))
    _assert_png(two)
    with pytest.raises(DataError, match="reliability_bins"):
        plot_reliability_diagram({"edges": [0, 1]}, tmp_path / "bad.png")


def test_training_curves_from_sparse_lightning_csv(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,lr-AdamW,train/loss_step,train/loss_epoch,val/loss,val/accuracy,val/balanced_accuracy\n"
        "0,9,0.001,1.9,,,,\n"
        "0,19,,1.7,,,,\n"
        "0,19,,,,1.6,0.41,0.30\n"
        "0,19,,,1.8,,,\n"
        "1,29,0.0005,1.2,,,,\n"
        "1,39,,,,1.1,0.55,0.47\n"
        "1,39,,,1.3,,,\n"
    )
    _assert_png(plot_training_curves(csv, tmp_path / "curves.png"))


def test_training_curves_with_missing_columns(tmp_path: Path) -> None:
    only_train = tmp_path / "train_only.csv"
    only_train.write_text("step,train/loss\n0,2.0\n1,1.5\n")
    _assert_png(plot_training_curves(only_train, tmp_path / "train_only.png"))
    header_only = tmp_path / "empty.csv"
    header_only.write_text("epoch,step,val/loss\n")
    _assert_png(plot_training_curves(header_only, tmp_path / "empty.png"))
    with pytest.raises(DataError, match="not found"):
        plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
