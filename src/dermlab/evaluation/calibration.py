"""Calibration: top-label expected calibration error, reliability bins, and temperature scaling.

Bins are equal-width over ``[0, 1]`` and right-closed, ``((m-1)/M, m/M]`` (Guo et al., 2017), with a
confidence of exactly 0 in the first bin. Temperature scaling divides logits by one scalar ``T > 0`` fitted
on validation logits by minimising the negative log-likelihood; it changes confidences, never the predicted
class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from dermlab.errors import DataError

__all__ = [
    "expected_calibration_error",
    "reliability_bins",
    "fit_temperature",
    "apply_temperature",
    "negative_log_likelihood",
]

# fit_temperature searches T in this range; real networks land well inside it.
_TEMPERATURE_BOUNDS = (1e-2, 1e2)

ArrayT = TypeVar("ArrayT")


def reliability_bins(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[Sequence[float]] | np.ndarray, n_bins: int = 15
) -> dict[str, Any]:
    """Per-bin mean confidence, accuracy and count of the top-label prediction, for a reliability diagram.

    Returns ``{"edges": [n_bins + 1], "confidence": [n_bins], "accuracy": [n_bins], "count": [n_bins],
    "ece": float}``; confidence and accuracy are ``None`` for empty bins.
    """
    truth, prob = _check_probabilities(y_true, y_prob)
    if int(n_bins) < 1:
        raise DataError(f"n_bins must be >= 1, got {n_bins}")
    n_bins = int(n_bins)
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == truth).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a confidence equal to an edge into the bin that edge closes: right-closed bins.
    index = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    confidence_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    filled = count > 0
    mean_confidence = np.divide(confidence_sum, count, out=np.zeros(n_bins), where=filled)
    accuracy = np.divide(correct_sum, count, out=np.zeros(n_bins), where=filled)
    ece = float(np.sum(np.abs(accuracy - mean_confidence) * count) / truth.size)
    return {
        "edges": edges.tolist(),
        "confidence": [float(c) if f else None for c, f in zip(mean_confidence, filled)],
        "accuracy": [float(a) if f else None for a, f in zip(accuracy, filled)],
        "count": count.astype(int).tolist(),
        "ece": ece,
    }


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[Sequence[float]] | np.ndarray, n_bins: int = 15
) -> float:
    """Top-label ECE: the count-weighted mean gap between accuracy and confidence over equal-width bins."""
    return reliability_bins(y_true, y_prob, n_bins)["ece"]


def negative_log_likelihood(
    logits: Sequence[Sequence[float]] | np.ndarray,
    y_true: Sequence[int] | np.ndarray,
    temperature: float = 1.0,
) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against the true class indices."""
    scores, truth = _check_logits(logits, y_true)
    return _nll(scores, truth, 1.0 / temperature)


def fit_temperature(
    logits: Sequence[Sequence[float]] | np.ndarray, y_true: Sequence[int] | np.ndarray
) -> float:
    """The temperature ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` on (validation) data.

    The NLL is convex in ``1 / T``, so a bounded scalar search on ``log T`` finds the global minimum; the
    result is clipped to [0.01, 100] (a perfectly separable set would otherwise drive ``T`` to 0).
    """
    scores, truth = _check_logits(logits, y_true)
    low, high = np.log(_TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: _nll(scores, truth, float(np.exp(-log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


def apply_temperature(logits: ArrayT, temperature: float) -> ArrayT:
    """``logits / temperature``; a numpy array or torch tensor comes back as the same kind."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise DataError(f"temperature must be a finite number > 0, got {temperature}")
    if isinstance(logits, (list, tuple)):
        logits = np.asarray(logits, dtype=float)  # type: ignore[assignment]
    return logits / temperature  # type: ignore[operator,return-value]


def _nll(scores: np.ndarray, truth: np.ndarray, inverse_temperature: float) -> float:
    scaled = scores * inverse_temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(truth.size), truth]))


def _check_labels(y_true: Sequence[int] | np.ndarray, n_rows: int, n_classes: int, what: str) -> np.ndarray:
    truth = np.asarray(y_true)
    if truth.ndim != 1 or truth.size != n_rows or truth.size == 0:
        raise DataError(f"y_true must have shape ({n_rows},) matching {what}, got {truth.shape}")
    if not np.issubdtype(truth.dtype, np.integer):
        if not np.all(np.mod(truth, 1) == 0):
            raise DataError("y_true must hold integer class indices")
    truth = truth.astype(np.int64)
    if truth.min() < 0 or truth.max() >= n_classes:
        raise DataError(f"y_true holds class indices outside 0..{n_classes - 1}")
    return truth


def _check_probabilities(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[Sequence[float]] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    prob = np.asarray(y_prob, dtype=float)
    if prob.ndim != 2 or prob.shape[0] == 0:
        raise DataError(f"y_prob must have shape (N, C) with N > 0, got {prob.shape}")
    if not np.isfinite(prob).all():
        raise DataError("y_prob holds NaN or infinite values")
    return _check_labels(y_true, prob.shape[0], prob.shape[1], "y_prob"), prob


def _check_logits(
    logits: Sequence[Sequence[float]] | np.ndarray, y_true: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(logits, "detach"):  # a torch tensor, possibly on a GPU
        logits = logits.detach().cpu().double().numpy()  # type: ignore[union-attr]
    if hasattr(y_true, "detach"):
        y_true = y_true.detach().cpu().numpy()  # type: ignore[union-attr]
    scores = np.asarray(logits, dtype=float)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] < 2:
        raise DataError(f"logits must have shape (N, C) with N > 0 and C >= 2, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise DataError("logits hold NaN or infinite values")
    return scores, _check_labels(y_true, scores.shape[0], scores.shape[1], "logits")
