"""compute_metrics against hand-computed values, absent classes, and the official ISIC scorer."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from dermlab.errors import DataError
from dermlab.evaluation.metrics import (
    compute_metrics,
    format_metrics_table,
    format_per_class_table,
    operating_points,
)

CLASSES = ["a", "b", "c", "d"]
# truth a a a b b c; predicted a a b b d a: "c" is never predicted, "d" is predicted but not in the truth.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2])
Y_PROB = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],
        [0.6, 0.2, 0.1, 0.1],
        [0.3, 0.4, 0.2, 0.1],
        [0.1, 0.6, 0.2, 0.1],
        [0.1, 0.3, 0.2, 0.4],
        [0.5, 0.1, 0.3, 0.1],
    ]
)


@pytest.fixture(scope="module")
def metrics() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # absent classes must not spam warnings
        return compute_metrics(Y_TRUE, Y_PROB, CLASSES, target_class="b", ece_bins=4)


def test_headline_numbers_match_hand_computation(metrics: dict) -> None:
    assert metrics["n"] == 6
    assert metrics["accuracy"] == pytest.approx(0.5)
    # recalls a 2/3, b 1/2, c 0; d absent from the truth is left out.
    assert metrics["balanced_accuracy"] == pytest.approx(7 / 18)
    assert metrics["recall_macro"] == pytest.approx(7 / 18)
    # precisions a 2/3, b 1/2, c 0 (never predicted); macro over the classes in the truth.
    assert metrics["precision_macro"] == pytest.approx(7 / 18)
    assert metrics["f1_macro"] == pytest.approx(7 / 18)
    assert metrics["precision_weighted"] == pytest.approx(0.5)
    assert metrics["recall_weighted"] == pytest.approx(0.5)
    assert metrics["f1_weighted"] == pytest.approx(0.5)
    assert metrics["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    # bins of width 0.25: {.4, .4, .5} all wrong, {.7, .6, .6} all right -> (1.3 + 1.1) / 6
    assert metrics["ece"] == pytest.approx(0.4)


def test_per_class_and_auc(metrics: dict) -> None:
    per_class = metrics["per_class"]
    assert per_class["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3, "auc": 8 / 9}
    )
    assert per_class["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "auc": 7 / 8}
    )
    # present in the truth, never predicted: precision 0, recall 0
    assert per_class["c"] == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "auc": 1.0}
    )
    # absent from the truth but predicted once: precision 0, the rest undefined
    assert per_class["d"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0, "auc": None}
    assert metrics["auc_macro"] == pytest.approx((8 / 9 + 7 / 8 + 1.0) / 3)


def test_target_operating_points(metrics: dict) -> None:
    target = metrics["target"]
    assert target["class"] == "b"
    assert target["auc"] == pytest.approx(7 / 8)
    # positives score .6 .3, negatives .1 .2 .4 .1
    assert target["sensitivity_at_specificity"] == pytest.approx(
        {"requested": 0.8, "specificity": 1.0, "sensitivity": 0.5, "threshold": 0.6}
    )
    assert target["specificity_at_sensitivity"] == pytest.approx(
        {"requested": 0.8, "specificity": 0.75, "sensitivity": 1.0, "threshold": 0.3}
    )


def test_operating_points_edge_cases() -> None:
    points = operating_points([True, False, True, False], [0.9, 0.8, 0.7, 0.1], fixed_specificity=1.0)
    assert points["sensitivity_at_specificity"]["sensitivity"] == 0.5
    assert points["sensitivity_at_specificity"]["threshold"] == 0.9
    # the top score is a negative: only "call nothing positive" reaches specificity 1
    points = operating_points([False, True], [0.9, 0.1], fixed_specificity=1.0)
    assert points["sensitivity_at_specificity"] == {
        "requested": 1.0,
        "specificity": 1.0,
        "sensitivity": 0.0,
        "threshold": None,
    }
    undefined = operating_points([True, True], [0.9, 0.1])
    assert undefined["specificity_at_sensitivity"]["sensitivity"] is None
    with pytest.raises(DataError, match="fixed_specificity"):
        operating_points([True, False], [0.9, 0.1], fixed_specificity=80)


def test_target_missing_or_absent() -> None:
    assert compute_metrics(Y_TRUE, Y_PROB, CLASSES, target_class="mel")["target"] is None
    assert compute_metrics(Y_TRUE, Y_PROB, CLASSES, target_class=None)["target"] is None
    absent = compute_metrics(Y_TRUE, Y_PROB, CLASSES, target_class="d")["target"]
    assert absent["auc"] is None
    assert absent["sensitivity_at_specificity"]["sensitivity"] is None


def test_class_absent_from_truth_and_predictions() -> None:
    y_prob = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    metrics = compute_metrics([0, 1, 1], y_prob, ["x", "y", "z"], target_class=None)
    undefined = {"precision": None, "recall": None, "f1": None, "support": 0, "auc": None}
    assert metrics["per_class"]["z"] == undefined
    assert metrics["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["auc_macro"] == pytest.approx(1.0)


def test_metrics_are_strict_json(metrics: dict) -> None:
    text = json.dumps(metrics, allow_nan=False)
    assert json.loads(text) == metrics


def test_bad_inputs_raise_data_error() -> None:
    with pytest.raises(DataError, match="shape"):
        compute_metrics(Y_TRUE, Y_PROB[:, :3], CLASSES)
    with pytest.raises(DataError, match="class index 7"):
        compute_metrics([0, 7, 1, 1, 1, 1], Y_PROB, CLASSES)
    with pytest.raises(DataError, match="logits"):
        compute_metrics(Y_TRUE, Y_PROB * 5, CLASSES)
    with pytest.raises(DataError, match="non-empty"):
        compute_metrics([], np.zeros((0, 4)), CLASSES)


def test_text_tables(metrics: dict) -> None:
    summary = format_metrics_table(metrics)
    assert "balanced_accuracy" in summary and "0.3889" in summary
    assert "b sensitivity @ specificity 0.8" in summary
    per_class = format_per_class_table(metrics)
    lines = per_class.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support", "auc"]
    assert lines[5].split() == ["d", "0.0000", "-", "-", "0", "-"]
    assert lines[6].startswith("macro avg")


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_official_isic_scorer(seed: int) -> None:
    pd = pytest.importorskip("pandas")
    isic = pytest.importorskip("isic_challenge_scoring.metrics")
    rng = np.random.default_rng(seed)
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    y_true = rng.integers(0, len(classes), size=300)
    if seed == 1:
        y_true[y_true == 5] = 0  # a class absent from the truth
    logits = rng.normal(size=(300, len(classes))) + 1.5 * np.eye(len(classes))[y_true]
    y_prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = compute_metrics(y_true, y_prob, classes, target_class="MEL")

    truth = pd.DataFrame(np.eye(len(classes))[y_true], columns=classes)
    prediction = pd.DataFrame(y_prob, columns=classes)
    weights = pd.Series(np.ones(len(y_true)))
    official = isic.balanced_multiclass_accuracy(truth, prediction, weights)
    assert metrics["balanced_accuracy"] == pytest.approx(official, abs=1e-6)
    for name in classes:
        if truth[name].sum() == 0:
            assert metrics["per_class"][name]["auc"] is None
            continue
        official_auc = isic.auc(truth[name], prediction[name], weights)
        assert metrics["per_class"][name]["auc"] == pytest.approx(official_auc, abs=1e-6)
