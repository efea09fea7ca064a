"""The lesion bootstrap: exact weighted metrics, seeded intervals that behave, and the paired difference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from dermlab.config import Config, EvaluationConfig, apply_overrides
from dermlab.errors import ConfigError, DataError
from dermlab.evaluation.bootstrap import (
    bootstrap_intervals,
    bootstrap_statistics,
    interval_keys,
    paired_bootstrap,
    resample_weights,
)
from dermlab.evaluation.evaluate import score_predictions
from dermlab.evaluation.metrics import compute_metrics, operating_points

CLASSES = ["nv", "mel", "bkl", "df"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _lesion_data(lesions: int, images_per_lesion: int = 1, seed: int = 0, signal: float = 1.5):
    """Labels, probabilities and lesion ids; images of one lesion share its logits (plus a little noise)."""
    rng = np.random.default_rng(seed)
    lesion_label = rng.choice(len(CLASSES), size=lesions, p=[0.6, 0.2, 0.15, 0.05])
    lesion_logits = rng.normal(size=(lesions, len(CLASSES))) + signal * np.eye(len(CLASSES))[lesion_label]
    label = np.repeat(lesion_label, images_per_lesion)
    logits = np.repeat(lesion_logits, images_per_lesion, axis=0)
    logits = logits + 0.05 * rng.normal(size=logits.shape)
    groups = np.repeat([f"L{i}" for i in range(lesions)], images_per_lesion)
    return label, _softmax(logits), groups


def _width(interval: list[float]) -> float:
    return interval[1] - interval[0]


def test_unit_weights_reproduce_compute_metrics() -> None:
    label, prob, _ = _lesion_data(300, seed=1)
    prob = _softmax(np.round(np.log(prob), 1))  # rounded logits: tied scores
    label[label == 3] = 0  # df absent from the truth: left out of every macro average
    metrics = compute_metrics(label, prob, CLASSES, target_class="mel", fixed_specificity=0.9)
    values = bootstrap_statistics(label, prob, CLASSES, np.ones((1, label.size)), "mel", 0.9)
    assert list(values) == interval_keys(CLASSES, "mel")
    for key in ("accuracy", "balanced_accuracy", "precision_macro", "f1_macro", "auc_macro"):
        assert values[key][0] == pytest.approx(metrics[key], abs=1e-12)
    for name in ("nv", "mel", "bkl"):
        assert values[f"recall_{name}"][0] == pytest.approx(metrics["per_class"][name]["recall"], abs=1e-12)
    assert np.isnan(values["recall_df"][0])
    expected = metrics["target"]["sensitivity_at_specificity"]["sensitivity"]
    assert values["sensitivity_at_specificity_mel"][0] == pytest.approx(expected, abs=1e-12)


def test_weighted_auc_and_operating_point_match_sklearn_on_repeated_images() -> None:
    label, prob, groups = _lesion_data(120, images_per_lesion=2, seed=2)
    prob = _softmax(np.round(np.log(prob), 1))
    weights = resample_weights(groups, resamples=5, seed=3)
    values = bootstrap_statistics(label, prob, CLASSES, weights, "mel", 0.8)
    for row in range(weights.shape[0]):
        repeated_label = np.repeat(label, weights[row])
        repeated_prob = np.repeat(prob, weights[row], axis=0)
        aucs = [roc_auc_score(repeated_label == k, repeated_prob[:, k]) for k in range(len(CLASSES))]
        assert values["auc_macro"][row] == pytest.approx(np.mean(aucs), abs=1e-12)
        point = operating_points(repeated_label == 1, repeated_prob[:, 1], 0.8)["sensitivity_at_specificity"]
        assert values["sensitivity_at_specificity_mel"][row] == pytest.approx(point["sensitivity"], abs=1e-12)
        reference = compute_metrics(repeated_label, repeated_prob, CLASSES)
        assert values["balanced_accuracy"][row] == pytest.approx(reference["balanced_accuracy"], abs=1e-12)
        assert values["f1_macro"][row] == pytest.approx(reference["f1_macro"], abs=1e-12)


def test_resample_weights_draw_whole_lesions() -> None:
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    weights = resample_weights(groups, resamples=50, seed=0)
    assert weights.shape == (50, 6)
    assert (weights.reshape(50, 6)[:, [0, 1]] == weights[:, [2, 2]]).all()  # a lesion's images move together
    assert (weights[:, 4] == weights[:, 5]).all()
    lesion_counts = weights[:, [0, 3, 4]]
    assert (lesion_counts.sum(axis=1) == 3).all()  # as many lesions drawn as there are


def test_intervals_contain_the_estimate_and_repeat_for_a_seed() -> None:
    label, prob, groups = _lesion_data(200, images_per_lesion=2, seed=4)
    metrics = compute_metrics(label, prob, CLASSES, target_class="mel")
    first = bootstrap_intervals(label, prob, CLASSES, groups, resamples=300, seed=7, target_class="mel")
    again = bootstrap_intervals(label, prob, CLASSES, groups, resamples=300, seed=7, target_class="mel")
    other = bootstrap_intervals(label, prob, CLASSES, groups, resamples=300, seed=8, target_class="mel")
    assert first == again
    assert first["intervals"] != other["intervals"]
    assert first["bootstrap"] == {
        "resamples": 300,
        "seed": 7,
        "confidence": 0.95,
        "unit": "lesion",
        "groups": 200,
        "images": 400,
    }
    point = {key: metrics[key] for key in ("accuracy", "balanced_accuracy", "precision_macro", "f1_macro", "auc_macro")}
    point.update({f"recall_{name}": metrics["per_class"][name]["recall"] for name in CLASSES})
    point["sensitivity_at_specificity_mel"] = metrics["target"]["sensitivity_at_specificity"]["sensitivity"]
    assert set(first["intervals"]) == set(point)
    for key, value in point.items():
        low, high = first["intervals"][key]
        assert low <= value <= high, key
        assert low < high, key


def test_intervals_shrink_with_more_lesions() -> None:
    widths = {}
    for lesions in (100, 1600):
        label, prob, groups = _lesion_data(lesions, seed=5)
        widths[lesions] = bootstrap_intervals(
            label, prob, CLASSES, groups, resamples=300, seed=0, target_class="mel"
        )
    small, large = widths[100], widths[1600]
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "auc_macro", "recall_mel"):
        # four times the square root of 16 fewer lesions would be equal widths: demand at least half of that
        assert _width(large["intervals"][key]) < _width(small["intervals"][key]) / 2, key


def test_lesion_bootstrap_is_wider_than_image_bootstrap_for_correlated_images() -> None:
    label, prob, groups = _lesion_data(150, images_per_lesion=6, seed=6)
    by_lesion = bootstrap_intervals(label, prob, CLASSES, groups, resamples=400, seed=0)
    by_image = bootstrap_intervals(label, prob, CLASSES, None, resamples=400, seed=0)
    assert by_image["bootstrap"]["unit"] == "image" and by_lesion["bootstrap"]["unit"] == "lesion"
    for key in ("accuracy", "balanced_accuracy", "f1_macro"):
        # six near-copies per lesion: the honest interval is about sqrt(6) = 2.4 times wider
        assert _width(by_lesion["intervals"][key]) > 1.6 * _width(by_image["intervals"][key]), key


def test_a_class_never_drawn_has_no_interval() -> None:
    label = np.array([0, 0, 1, 1, 0, 1])
    prob = np.full((6, 4), 0.25)
    result = bootstrap_intervals(label, prob, CLASSES, resamples=20, seed=0, target_class="df")
    assert result["intervals"]["recall_df"] is None
    assert result["intervals"]["sensitivity_at_specificity_df"] is None
    assert result["intervals"]["auc_macro"] == [0.5, 0.5]  # constant scores: every AUC is one half


def test_paired_bootstrap_marks_a_real_gain_and_not_noise() -> None:
    label, weak, groups = _lesion_data(300, images_per_lesion=2, seed=9, signal=1.0)
    _, strong, _ = _lesion_data(300, images_per_lesion=2, seed=9, signal=3.0)
    same = paired_bootstrap(label, weak, weak, CLASSES, groups, resamples=200, seed=0, target_class="mel")
    for key, entry in same.items():
        assert entry["difference"] in (0.0, None) and not entry["significant"], key
    gain = paired_bootstrap(label, weak, strong, CLASSES, groups, resamples=200, seed=0, target_class="mel")
    for key in ("accuracy", "balanced_accuracy", "f1_macro", "auc_macro"):
        low, high = gain[key]["interval"]
        assert gain[key]["significant"] and 0 < low <= gain[key]["difference"] <= high, key
    loss = paired_bootstrap(label, strong, weak, CLASSES, groups, resamples=200, seed=0)
    assert loss["accuracy"]["significant"] and loss["accuracy"]["interval"][1] < 0
    assert loss["accuracy"]["difference"] == pytest.approx(-gain["accuracy"]["difference"])


def test_paired_interval_is_narrower_than_either_run_alone() -> None:
    label, weak, groups = _lesion_data(300, seed=10, signal=1.4)
    _, stronger, _ = _lesion_data(300, seed=10, signal=1.6)  # the same lesions, a slightly better model
    paired = paired_bootstrap(label, weak, stronger, CLASSES, groups, resamples=300, seed=0)
    alone = bootstrap_intervals(label, weak, CLASSES, groups, resamples=300, seed=0)
    assert _width(paired["accuracy"]["interval"]) < _width(alone["intervals"]["accuracy"]) / 2


def test_bad_input_is_named() -> None:
    label, prob, groups = _lesion_data(10, seed=0)
    with pytest.raises(DataError, match="one entry per image"):
        bootstrap_intervals(label, prob, CLASSES, groups[:-1], resamples=10)
    with pytest.raises(DataError, match="empty entry"):
        bootstrap_intervals(label, prob, CLASSES, [*groups[:-1], ""], resamples=10)
    with pytest.raises(DataError, match="resamples must be >= 1"):
        bootstrap_intervals(label, prob, CLASSES, groups, resamples=0)
    with pytest.raises(DataError, match="y_prob must have shape"):
        bootstrap_intervals(label, prob[:, :3], CLASSES, groups, resamples=10)


@pytest.mark.slow
def test_thousand_resamples_of_a_ham10000_sized_test_split() -> None:
    """Every interval of a HAM10000-sized split (its speed: ``benchmarks/bootstrap.py``, never a timed test)."""
    classes = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
    rng = np.random.default_rng(0)
    label = rng.choice(7, size=1600, p=[0.67, 0.11, 0.11, 0.05, 0.03, 0.015, 0.015])
    prob = _softmax(rng.normal(size=(1600, 7)) + 1.5 * np.eye(7)[label])
    groups = rng.integers(0, 1100, size=1600).astype(str)
    result = bootstrap_intervals(label, prob, classes, groups, resamples=1000, seed=0, target_class="mel")
    assert len(result["intervals"]) == 5 + 7 + 1
    assert all(low <= high for low, high in result["intervals"].values())


def _predictions_frame(label: np.ndarray, prob: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(label.size)],
            "path": [f"/data/img{i}.jpg" for i in range(label.size)],
            "true": [CLASSES[k] for k in label],
            "predicted": [CLASSES[k] for k in prob.argmax(axis=1)],
        }
    )
    for k, name in enumerate(CLASSES):
        frame[f"prob_{name}"] = prob[:, k]
    return frame


@pytest.mark.slow  # writes predictions.csv and the plots
def test_score_predictions_writes_intervals_to_metrics_json(tmp_path: Path) -> None:
    label, prob, groups = _lesion_data(20, images_per_lesion=2, seed=11)
    evaluation = EvaluationConfig(bootstrap_resamples=50, bootstrap_seed=3)
    metrics = score_predictions(
        _predictions_frame(label, prob), CLASSES, tmp_path, evaluation, groups=list(groups)
    )
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["intervals"] == metrics["intervals"]
    assert set(written["intervals"]) == set(interval_keys(CLASSES, "mel"))
    assert written["bootstrap"] == {
        "resamples": 50,
        "seed": 3,
        "confidence": 0.95,
        "unit": "lesion",
        "groups": 20,
        "images": 40,
    }
    low, high = written["intervals"]["balanced_accuracy"]
    assert low <= written["balanced_accuracy"] <= high
    assert written["accuracy"] == compute_metrics(label, prob, CLASSES)["accuracy"]  # existing keys unchanged


@pytest.mark.slow  # writes predictions.csv and the plots
def test_bootstrap_off(tmp_path: Path) -> None:
    label, prob, _ = _lesion_data(12, seed=12)
    metrics = score_predictions(
        _predictions_frame(label, prob), CLASSES, tmp_path, EvaluationConfig(bootstrap_resamples=0)
    )
    assert "intervals" not in metrics and "bootstrap" not in metrics
    assert len(metrics["data_fingerprint"]) == 16


def test_bootstrap_config_is_checked() -> None:
    assert Config().evaluation.bootstrap_resamples == 1000
    assert apply_overrides(Config(), ["evaluation.bootstrap_resamples=0"]).evaluation.bootstrap_resamples == 0
    with pytest.raises(ConfigError, match="evaluation.bootstrap_resamples must be >= 0"):
        apply_overrides(Config(), ["evaluation.bootstrap_resamples=-1"])
