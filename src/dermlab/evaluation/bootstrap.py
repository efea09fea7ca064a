"""Seeded bootstrap confidence intervals of the headline metrics, resampling lesions rather than images.

Images of one lesion are not independent draws (HAM10000 holds up to six photographs of some lesions), so a
resample draws the test split's *groups* (lesion ids; the image id where a dataset has none) with replacement,
as many as there are, and each image weighs as often as its lesion was drawn. Every metric of a resample is then
a weighted metric over the original images, which keeps 1,000 resamples to a few matrix products: no copy of
the data per resample, and AUC from weighted rank sums over one sort per class.

The interval of a metric is the percentile interval of its resampled values (2.5th and 97.5th percentiles for
95%). A metric undefined in a resample (a class's recall when none of its lesions was drawn) is left out of
that metric's percentiles; a metric undefined in every resample has the interval ``None``.

The paired bootstrap applies the same resamples to two sets of predictions of the same images, so the interval
of the difference is not inflated by the spread both runs share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dermlab.errors import DataError

__all__ = [
    "BOOTSTRAP_METRICS",
    "bootstrap_intervals",
    "bootstrap_statistics",
    "interval_keys",
    "paired_bootstrap",
    "resample_weights",
    "sensitivity_key",
]

#: The metrics of all classes that get an interval; each class adds ``recall_<class>``, the target class
#: ``sensitivity_at_specificity_<class>`` (see :func:`interval_keys`).
BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "precision_macro", "f1_macro", "auc_macro")

_MAX_CELLS = 4_000_000  # resamples x images handled at once: bounds memory to some 100 MB for any split
_TOLERANCE = 1e-12  # the same slack as metrics.operating_points


def sensitivity_key(target_class: str) -> str:
    """The interval key of the target class's sensitivity at the fixed specificity."""
    return f"sensitivity_at_specificity_{target_class}"


def interval_keys(classes: Sequence[str], target_class: str | None = None) -> list[str]:
    """Every key :func:`bootstrap_intervals` reports, in display order."""
    keys = [*BOOTSTRAP_METRICS, *(f"recall_{name}" for name in classes)]
    if target_class is not None and target_class in classes:
        keys.append(sensitivity_key(target_class))
    return keys


def resample_weights(groups: Sequence[Any] | np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, N)`` integer weights: how often each image's group was drawn in each resample.

    Each resample draws as many groups as there are, with replacement, from ``numpy.random.default_rng(seed)``.
    """
    codes, n_groups = _group_codes(groups)
    draws = _draw_groups(n_groups, resamples, seed)
    return _weights_from_draws(draws, codes, n_groups)


def bootstrap_statistics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    weights: np.ndarray,
    target_class: str | None = None,
    fixed_specificity: float = 0.8,
) -> dict[str, np.ndarray]:
    """Each metric of :func:`interval_keys` under each row of ``weights`` ``(B, N)``: ``{key: (B,)}``.

    With all weights 1 the values equal :func:`dermlab.evaluation.metrics.compute_metrics`'s. Undefined values
    are NaN.
    """
    truth = np.asarray(y_true, dtype=np.int64)
    prob = np.asarray(y_prob, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    n_classes = len(classes)
    is_true = np.eye(n_classes, dtype=np.float64)[truth]
    is_predicted = np.eye(n_classes, dtype=np.float64)[prob.argmax(axis=1)]
    correct = (truth == prob.argmax(axis=1)).astype(np.float64)

    support = weights @ is_true
    hits = weights @ (is_true * correct[:, None])
    predicted = weights @ is_predicted
    present = support > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / support, np.nan)
        f1 = np.where(present, 2.0 * hits / (support + predicted), np.nan)
        # a present class never predicted has precision 0 (scikit-learn's zero_division=0, as compute_metrics)
        precision = np.where(present, np.where(predicted > 0, hits / np.where(predicted > 0, predicted, 1.0), 0.0), np.nan)
    auc = np.stack([_weighted_auc(truth == k, prob[:, k], weights) for k in range(n_classes)], axis=1)

    statistics = {
        "accuracy": (weights @ correct) / weights.sum(axis=1),
        "balanced_accuracy": _row_nanmean(recall),
        "precision_macro": _row_nanmean(precision),
        "f1_macro": _row_nanmean(f1),
        "auc_macro": _row_nanmean(auc),
    }
    statistics.update({f"recall_{name}": recall[:, k] for k, name in enumerate(classes)})
    if target_class is not None and target_class in classes:
        k = list(classes).index(target_class)
        statistics[sensitivity_key(target_class)] = _weighted_sensitivity_at_specificity(
            truth == k, prob[:, k], weights, fixed_specificity
        )
    return statistics


def bootstrap_intervals(
    y_true: Sequence[int] | np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    target_class: str | None = None,
    fixed_specificity: float = 0.8,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``{"intervals": {key: [low, high] | None}, "bootstrap": {...}}`` for ``metrics.json``.

    ``groups`` (one per image, e.g. lesion ids) are the resampled units; ``None`` resamples images.
    ``bootstrap`` records ``resamples``, ``seed``, ``confidence``, ``unit`` (``"lesion"`` when some group holds
    several images, else ``"image"``), ``groups`` and ``images``.
    """
    truth, prob = _check_predictions(y_true, y_prob, classes)
    units = np.arange(truth.size) if groups is None else _check_groups(groups, truth.size)
    codes, n_groups = _group_codes(units)
    draws = _draw_groups(n_groups, resamples, seed)
    values = _chunked_statistics(
        draws, codes, n_groups, truth, [prob], classes, target_class, fixed_specificity
    )[0]
    return {
        "intervals": {key: _percentile_interval(samples, confidence) for key, samples in values.items()},
        "bootstrap": {
            "resamples": int(resamples),
            "seed": int(seed),
            "confidence": float(confidence),
            "unit": "lesion" if n_groups < truth.size else "image",
            "groups": int(n_groups),
            "images": int(truth.size),
        },
    }


def paired_bootstrap(
    y_true: Sequence[int] | np.ndarray,
    y_prob_a: np.ndarray,
    y_prob_b: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
    target_class: str | None = None,
    fixed_specificity: float = 0.8,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Difference ``b - a`` of each metric of two runs scored on the same images (rows in the same order).

    Returns ``{key: {"difference": d, "interval": [low, high] | None, "significant": bool}}``; ``significant``
    means the interval excludes zero. Both runs see the same resamples of ``groups``.
    """
    truth, prob_a = _check_predictions(y_true, y_prob_a, classes)
    _, prob_b = _check_predictions(y_true, y_prob_b, classes)
    units = np.arange(truth.size) if groups is None else _check_groups(groups, truth.size)
    codes, n_groups = _group_codes(units)
    ones = np.ones((1, truth.size))
    point_a = bootstrap_statistics(truth, prob_a, classes, ones, target_class, fixed_specificity)
    point_b = bootstrap_statistics(truth, prob_b, classes, ones, target_class, fixed_specificity)
    draws = _draw_groups(n_groups, resamples, seed)
    values_a, values_b = _chunked_statistics(
        draws, codes, n_groups, truth, [prob_a, prob_b], classes, target_class, fixed_specificity
    )
    result = {}
    for key in values_a:
        difference = float(point_b[key][0] - point_a[key][0])
        interval = _percentile_interval(values_b[key] - values_a[key], confidence)
        result[key] = {
            "difference": difference if np.isfinite(difference) else None,
            "interval": interval,
            "significant": bool(interval is not None and (interval[0] > 0 or interval[1] < 0)),
        }
    return result


def _check_predictions(
    y_true: Sequence[int] | np.ndarray, y_prob: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(y_true)
    prob = np.asarray(y_prob, dtype=np.float64)
    if truth.ndim != 1 or truth.size == 0:
        raise DataError(f"y_true must be a non-empty 1-D array of class indices, got shape {truth.shape}")
    if prob.shape != (truth.size, len(classes)):
        raise DataError(f"y_prob must have shape ({truth.size}, {len(classes)}), got {prob.shape}")
    if truth.min() < 0 or truth.max() >= len(classes):
        raise DataError(f"y_true holds class indices outside 0..{len(classes) - 1}")
    return truth.astype(np.int64), prob


def _check_groups(groups: Sequence[Any] | np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(groups, dtype=object)
    if values.shape != (n,):
        raise DataError(f"groups must hold one entry per image ({n}), got shape {values.shape}")
    if any(
        value is None or (isinstance(value, float) and np.isnan(value)) or value == "" for value in values
    ):
        raise DataError("groups hold an empty entry: every image needs its lesion id (or its image id)")
    return values


def _group_codes(groups: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, int]:
    _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes.reshape(-1), int(codes.max()) + 1


def _draw_groups(n_groups: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n_groups)`` group indices, drawn in one call so that chunking never changes them."""
    if resamples < 1:
        raise DataError(f"bootstrap resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups), dtype=np.int64)


def _weights_from_draws(draws: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    rows = draws.shape[0]
    offsets = (np.arange(rows, dtype=np.int64) * n_groups)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=rows * n_groups).reshape(rows, n_groups)
    return counts[:, codes]


def _chunked_statistics(
    draws: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    truth: np.ndarray,
    probabilities: Sequence[np.ndarray],
    classes: Sequence[str],
    target_class: str | None,
    fixed_specificity: float,
) -> list[dict[str, np.ndarray]]:
    """Statistics of every resample for each probability array, a memory-bounded block of resamples at a time."""
    step = max(1, _MAX_CELLS // max(truth.size, 1))
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in probabilities]
    for start in range(0, draws.shape[0], step):
        weights = _weights_from_draws(draws[start : start + step], codes, n_groups).astype(np.float64)
        for position, prob in enumerate(probabilities):
            blocks[position].append(
                bootstrap_statistics(truth, prob, classes, weights, target_class, fixed_specificity)
            )
    return [{key: np.concatenate([block[key] for block in parts]) for key in parts[0]} for parts in blocks]


def _tie_blocks(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ascending sort order of ``score`` and the start of each run of equal scores in it."""
    order = np.argsort(score, kind="stable")
    ordered = score[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return order, starts


def _block_weights(
    is_positive: np.ndarray, score: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight of each run of tied scores, in ascending score order: two ``(B, T)``."""
    order, starts = _tie_blocks(score)
    ordered = weights[:, order]
    positive = is_positive[order]
    return (
        np.add.reduceat(ordered * positive, starts, axis=1),
        np.add.reduceat(ordered * ~positive, starts, axis=1),
    )


def _weighted_auc(is_positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC under each weight row (Mann-Whitney: ties count one half); NaN without both kinds."""
    if is_positive.all() or not is_positive.any():
        return np.full(weights.shape[0], np.nan)
    positive, negative = _block_weights(is_positive, score, weights)
    negatives_below = np.cumsum(negative, axis=1) - negative
    pairs = positive.sum(axis=1) * negative.sum(axis=1)
    wins = (positive * (negatives_below + 0.5 * negative)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _weighted_sensitivity_at_specificity(
    is_positive: np.ndarray, score: np.ndarray, weights: np.ndarray, fixed_specificity: float
) -> np.ndarray:
    """The best sensitivity of ``positive if score >= t`` with specificity >= the fixed one, per weight row."""
    if is_positive.all() or not is_positive.any():
        return np.full(weights.shape[0], np.nan)
    positive, negative = _block_weights(is_positive, score, weights)
    # Thresholds from the highest score down: the cumulative weights above each one, as in roc_curve.
    true_positives = np.cumsum(positive[:, ::-1], axis=1)
    false_positives = np.cumsum(negative[:, ::-1], axis=1)
    total_positive, total_negative = true_positives[:, -1:], false_positives[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = true_positives / total_positive
        allowed = false_positives / total_negative <= 1.0 - fixed_specificity + _TOLERANCE
    best = np.where(allowed, sensitivity, 0.0).max(axis=1)  # calling nothing positive always meets it: 0
    defined = (total_positive[:, 0] > 0) & (total_negative[:, 0] > 0)
    return np.where(defined, best, np.nan)


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    defined = np.isfinite(values)
    counts = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.where(defined, values, 0.0).sum(axis=1) / counts, np.nan)


def _percentile_interval(samples: np.ndarray, confidence: float) -> list[float] | None:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return [float(low), float(high)]
