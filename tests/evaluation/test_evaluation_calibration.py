"""ECE, reliability bins and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from dermlab.errors import DataError
from dermlab.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _synthetic(n: int, n_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a well-calibrated model: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(n, n_classes))
    labels = np.array([rng.choice(n_classes, p=p) for p in _softmax(logits)])
    return logits, labels


def test_reliability_bins_by_hand() -> None:
    y_prob = np.array([[0.7, 0.3], [0.4, 0.6], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    y_true = np.array([0, 0, 0, 1, 0])
    bins = reliability_bins(y_true, y_prob, n_bins=4)
    assert bins["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # confidences .7 .6 .6 .5 .9; .5 lies in (.25, .5] (right-closed bins)
    assert bins["count"] == [0, 1, 3, 1]
    assert bins["confidence"][0] is None and bins["accuracy"][0] is None
    assert bins["confidence"][1] == pytest.approx(0.5)
    assert bins["accuracy"][1] == pytest.approx(0.0)  # tie goes to class 0, truth is 1
    assert bins["confidence"][2] == pytest.approx(1.9 / 3)
    assert bins["accuracy"][2] == pytest.approx(2 / 3)
    expected = (0.5 * 1 + abs(2 - 1.9) + 0.1 * 1) / 5
    assert bins["ece"] == pytest.approx(expected)
    assert expected_calibration_error(y_true, y_prob, n_bins=4) == pytest.approx(expected)


def test_fit_temperature_recovers_true_temperature() -> None:
    logits, labels = _synthetic(4000)
    assert fit_temperature(logits * 2.5, labels) == pytest.approx(2.5, rel=0.1)
    assert fit_temperature(logits * 0.5, labels) == pytest.approx(0.5, rel=0.1)


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    logits, labels = _synthetic(6000, seed=1)
    overconfident = logits * 5.0
    validation, test = slice(0, 3000), slice(3000, None)
    temperature = fit_temperature(overconfident[validation], labels[validation])
    before = expected_calibration_error(labels[test], _softmax(overconfident[test]))
    scaled_test = apply_temperature(overconfident[test], temperature)
    after = expected_calibration_error(labels[test], _softmax(scaled_test))
    assert temperature > 3.0
    assert after < before / 3
    nll_before = negative_log_likelihood(overconfident[test], labels[test])
    assert negative_log_likelihood(overconfident[test], labels[test], temperature) < nll_before
    # scaling never changes the predicted class
    scaled = apply_temperature(overconfident, temperature)
    assert np.array_equal(scaled.argmax(axis=1), overconfident.argmax(axis=1))


def test_fit_temperature_separable_data_stays_bounded() -> None:
    logits = np.array([[5.0, -5.0], [-5.0, 5.0]] * 10)
    labels = np.array([0, 1] * 10)
    temperature = fit_temperature(logits, labels)
    assert 0 < temperature < 1.0


def test_apply_temperature_keeps_tensor_type() -> None:
    torch = pytest.importorskip("torch")
    scaled = apply_temperature(torch.tensor([[2.0, 4.0]]), 2.0)
    assert isinstance(scaled, torch.Tensor)
    assert scaled.tolist() == [[1.0, 2.0]]
    assert fit_temperature(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]), torch.tensor([0, 1, 1])) > 0


def test_bad_inputs() -> None:
    with pytest.raises(DataError, match="temperature"):
        apply_temperature(np.zeros((2, 2)), 0.0)
    with pytest.raises(DataError, match="logits"):
        fit_temperature(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(DataError, match="outside"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(DataError, match="n_bins"):
        reliability_bins([0], [[1.0, 0.0]], n_bins=0)
