"""Each plot writes a readable PNG from computed results, including awkward inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermlab.errors import DataError
from dermlab.evaluation.calibration import reliability_bins
from dermlab.evaluation.plots import (
    _epoch_curves,  # the curves as drawn: which series, on which epochs
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


def _drawn_roc(monkeypatch: pytest.MonkeyPatch, *args: object, save: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Plot the ROC curves and return what the figure shows: label -> (fpr, tpr) of each curve, legend texts."""
    import dermlab.evaluation.plots as plots

    shown: dict = {}
    real_save = plots._save

    def capture(figure, path):  # read the figure before _save clears it
        (axes,) = figure.axes
        shown["curves"] = {line.get_label(): line.get_xydata() for line in axes.get_lines() if line.get_label()[0] != "_"}
        shown["legend"] = [text.get_text() for text in axes.get_legend().get_texts()]
        return real_save(figure, path) if save else Path(path)

    monkeypatch.setattr(plots, "_save", capture)
    path = plot_roc_curves(*args)
    if save:
        _assert_png(path)
    return shown["curves"], shown["legend"]


def test_roc_curves_skip_absent_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true, y_prob = _predictions()
    curves, legend = _drawn_roc(monkeypatch, y_true, y_prob, CLASSES, tmp_path / "roc.png")
    skipped = "no ROC (absent or only class): df"
    drawn = {k: f"{name} (AUC {roc_auc_score(y_true == k, y_prob[:, k]):.3f})" for k, name in enumerate(CLASSES[:2])}
    assert legend == [*drawn.values(), skipped]  # a curve for nv and mel, df listed as skipped
    for k, label in drawn.items():
        fpr, tpr, _ = roc_curve(y_true == k, y_prob[:, k])
        np.testing.assert_allclose(curves[label], np.column_stack([fpr, tpr]))
    assert len(curves[skipped]) == 0  # the note draws nothing
    assert not any(label.startswith("df (") for label in legend)
    only_nv = np.zeros_like(y_true)  # one class only: nothing has both positives and negatives
    curves, legend = _drawn_roc(monkeypatch, only_nv, y_prob, CLASSES, tmp_path / "only.png", save=False)
    assert legend == ["no ROC (absent or only class): nv, mel, df"]


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


def test_training_curves_skip_bookkeeping_and_continue_epochs_over_stages(tmp_path: Path) -> None:
    # what the two-stage trainer logs: epoch and step restart in stage 2, run_epoch counts on
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,run_epoch,step,train/loss,val/accuracy,val/loss\n"
        "0,0.0,5,,0.50,1.6\n0,,5,1.9,,\n"
        "1,1.0,11,,0.60,1.5\n1,,11,0.7,,\n"
        "0,2.0,5,,0.70,1.4\n0,,5,0.6,,\n"
        "1,3.0,11,,0.75,1.3\n1,,11,0.5,,\n"
    )
    curves = _epoch_curves(pd.read_csv(csv))
    assert list(curves.columns) == ["train/loss", "val/accuracy", "val/loss"]  # no run_epoch, epoch or step
    assert list(curves.index) == [0, 1, 2, 3]
    assert list(curves["val/accuracy"]) == [0.50, 0.60, 0.70, 0.75]  # stage 2 does not overwrite stage 1
    assert list(curves["train/loss"]) == [1.9, 0.7, 0.6, 0.5]
    assert curves.attrs["stage_starts"] == [2]
    _assert_png(plot_training_curves(csv, tmp_path / "curves.png"))


def test_training_curves_find_stages_without_run_epoch(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"epoch": [0, 1, 2, 0, 1], "step": [3, 7, 11, 3, 7], "val/loss": [5.0, 4.0, 3.0, 2.0, 1.0]}
    )
    curves = _epoch_curves(frame)
    assert list(curves.index) == [0, 1, 2, 3, 4] and list(curves["val/loss"]) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert curves.attrs["stage_starts"] == [3]
