"""Classification metrics as pure functions of ``(y_true, y_prob, classes)`` returning plain JSON-able dicts.

Conventions (the same in every function of this package):

- The predicted class is ``argmax(y_prob)``; a tie goes to the lowest class index (the ISIC scorer would call
  a tie "undecided" and count it wrong; ties do not occur with real-valued network outputs).
- A value that is undefined is ``None`` (JSON ``null``), never NaN, so ``metrics.json`` stays strict JSON.
- A class **absent from the truth** (support 0) has recall, F1 and AUC ``None`` and is left out of every macro
  average, of ``balanced_accuracy`` and of ``auc_macro``. Its precision is 0.0 when the model predicted it
  (all those predictions are wrong) and ``None`` when it did not.
- A class **present in the truth but never predicted** has precision 0.0 (scikit-learn's ``zero_division=0``,
  without the warning): a model that ignores a class pays for it in ``precision_macro``.
- Macro averages run over the classes present in the truth, so ``recall_macro == balanced_accuracy`` (the ISIC
  challenge metric); weighted averages weight by support, so absent classes weigh nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve

from dermlab.errors import DataError
from dermlab.evaluation.calibration import expected_calibration_error

__all__ = [
    "compute_metrics",
    "operating_points",
    "format_metrics_table",
    "format_per_class_table",
    "SUMMARY_METRICS",
]

# The headline numbers, in the order tables show them.
SUMMARY_METRICS = (
    "n",
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_weighted",
    "recall_weighted",
    "f1_weighted",
    "auc_macro",
    "ece",
)


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_prob: Sequence[Sequence[float]] | np.ndarray,
    classes: Sequence[str],
    target_class: str | None = "mel",
    fixed_specificity: float = 0.8,
    fixed_sensitivity: float = 0.8,
    ece_bins: int = 15,
) -> dict[str, Any]:
    """Every standard metric of a multi-class classifier, as a JSON-able dict (see the module docstring).

    ``y_true`` holds class indices ``(N,)``; ``y_prob`` the predicted probabilities ``(N, C)`` in the order of
    ``classes``. ``target`` is ``None`` when ``target_class`` is ``None`` or not one of ``classes``.
    """
    truth, prob = _check_inputs(y_true, y_prob, classes)
    n_classes = len(classes)
    labels = np.arange(n_classes)
    predicted = prob.argmax(axis=1)
    support = np.bincount(truth, minlength=n_classes)
    predicted_count = np.bincount(predicted, minlength=n_classes)
    present = labels[support > 0]

    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, labels=labels, average=None, zero_division=0
    )
    macro = precision_recall_fscore_support(
        truth, predicted, labels=present, average="macro", zero_division=0
    )
    weighted = precision_recall_fscore_support(
        truth, predicted, labels=labels, average="weighted", zero_division=0
    )
    auc = [_one_vs_rest_auc(truth == k, prob[:, k]) for k in labels]
    defined_auc = [value for value in auc if value is not None]

    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(classes):
        in_truth = bool(support[k] > 0)
        per_class[name] = {
            "precision": float(precision[k]) if in_truth or predicted_count[k] > 0 else None,
            "recall": float(recall[k]) if in_truth else None,
            "f1": float(f1[k]) if in_truth else None,
            "support": int(support[k]),
            "auc": auc[k],
        }

    return {
        "n": int(truth.size),
        "classes": list(classes),
        "accuracy": float(np.mean(predicted == truth)),
        # Mean recall over the classes present in the truth: the ISIC challenge metric.
        "balanced_accuracy": float(np.mean(recall[present])),
        "precision_macro": float(macro[0]),
        "recall_macro": float(macro[1]),
        "f1_macro": float(macro[2]),
        "precision_weighted": float(weighted[0]),
        "recall_weighted": float(weighted[1]),
        "f1_weighted": float(weighted[2]),
        "auc_macro": float(np.mean(defined_auc)) if defined_auc else None,
        "ece": expected_calibration_error(truth, prob, n_bins=ece_bins),
        "per_class": per_class,
        "target": _target_metrics(truth, prob, classes, target_class, fixed_specificity, fixed_sensitivity),
        "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist(),
    }


def operating_points(
    is_positive: Sequence[bool] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    fixed_specificity: float = 0.8,
    fixed_sensitivity: float = 0.8,
) -> dict[str, dict[str, Any]]:
    """Sensitivity at a fixed specificity and specificity at a fixed sensitivity for one binary problem.

    The rule is ``positive if score >= threshold``. Each operating point is the best ROC point meeting the
    constraint; ``specificity`` / ``sensitivity`` are the values achieved there and ``requested`` the
    constraint.
    Values are ``None`` when the truth lacks positives or negatives; ``threshold`` is ``None`` when only
    "call nothing positive" meets the constraint.
    """
    for name, value in (("fixed_specificity", fixed_specificity), ("fixed_sensitivity", fixed_sensitivity)):
        if not 0.0 <= value <= 1.0:
            raise DataError(f"{name} must lie in [0, 1], got {value}")
    positive = np.asarray(is_positive, dtype=bool)
    score = np.asarray(score, dtype=float)
    undefined = {"specificity": None, "sensitivity": None, "threshold": None}
    if positive.all() or not positive.any():
        return {
            "sensitivity_at_specificity": {"requested": fixed_specificity, **undefined},
            "specificity_at_sensitivity": {"requested": fixed_sensitivity, **undefined},
        }
    fpr, tpr, thresholds = roc_curve(positive, score, drop_intermediate=False)
    tolerance = 1e-12
    # fpr and tpr never decrease along the curve: the last point within the FPR budget has the best TPR,
    # the first point reaching the TPR goal has the best FPR.
    at_spec = int(np.flatnonzero(fpr <= 1.0 - fixed_specificity + tolerance)[-1])
    at_sens = int(np.flatnonzero(tpr >= fixed_sensitivity - tolerance)[0])
    return {
        "sensitivity_at_specificity": _operating_point(fixed_specificity, fpr, tpr, thresholds, at_spec),
        "specificity_at_sensitivity": _operating_point(fixed_sensitivity, fpr, tpr, thresholds, at_sens),
    }


def format_metrics_table(metrics: dict[str, Any], digits: int = 4) -> str:
    """The headline numbers of one :func:`compute_metrics` dict as an aligned two-column text table."""
    rows = [(name, _format_value(metrics.get(name), digits)) for name in SUMMARY_METRICS if name in metrics]
    target = metrics.get("target")
    if target:
        name = target["class"]
        at_spec = target["sensitivity_at_specificity"]
        at_sens = target["specificity_at_sensitivity"]
        rows += [
            (f"{name} auc", _format_value(target.get("auc"), digits)),
            (
                f"{name} sensitivity @ specificity {at_spec['requested']:g}",
                _format_value(at_spec["sensitivity"], digits),
            ),
            (
                f"{name} specificity @ sensitivity {at_sens['requested']:g}",
                _format_value(at_sens["specificity"], digits),
            ),
        ]
    return _format_rows(("metric", "value"), rows)


def format_per_class_table(metrics: dict[str, Any], digits: int = 4) -> str:
    """Per-class precision, recall, F1, support and AUC, laid out like sklearn's classification report."""
    header = ("class", "precision", "recall", "f1", "support", "auc")
    rows = [
        (
            name,
            *(_format_value(values[key], digits) for key in ("precision", "recall", "f1")),
            str(values["support"]),
            _format_value(values["auc"], digits),
        )
        for name, values in metrics["per_class"].items()
    ]
    total = str(metrics.get("n", sum(values["support"] for values in metrics["per_class"].values())))
    for kind in ("macro", "weighted"):
        rows.append(
            (
                f"{kind} avg",
                *(_format_value(metrics.get(f"{key}_{kind}"), digits) for key in _PRF),
                total,
                _format_value(metrics.get("auc_macro"), digits) if kind == "macro" else "",
            )
        )
    return _format_rows(header, rows)


_PRF = ("precision", "recall", "f1")


def _check_inputs(
    y_true: Sequence[int] | np.ndarray, y_prob: Sequence[Sequence[float]] | np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    truth = np.asarray(y_true)
    prob = np.asarray(y_prob, dtype=float)
    if len(classes) < 2:
        raise DataError(f"metrics need at least two classes, got {list(classes)}")
    if len(set(classes)) != len(classes):
        raise DataError(f"class names repeat: {list(classes)}")
    if truth.ndim != 1 or truth.size == 0:
        raise DataError(f"y_true must be a non-empty 1-D array of class indices, got shape {truth.shape}")
    if prob.shape != (truth.size, len(classes)):
        raise DataError(f"y_prob must have shape ({truth.size}, {len(classes)}), got {prob.shape}")
    if not np.issubdtype(truth.dtype, np.integer):
        if not np.all(np.mod(truth, 1) == 0):
            raise DataError("y_true must hold integer class indices")
        truth = truth.astype(np.int64)
    if truth.min() < 0 or truth.max() >= len(classes):
        bad = int(truth[(truth < 0) | (truth >= len(classes))][0])
        raise DataError(f"y_true holds class index {bad}, outside 0..{len(classes) - 1}")
    if not np.isfinite(prob).all():
        raise DataError("y_prob holds NaN or infinite values")
    row_sums = prob.sum(axis=1)
    if (prob < 0).any() or not np.allclose(row_sums, 1.0, atol=1e-2):
        raise DataError("y_prob rows must be probabilities that sum to 1 (pass softmax outputs, not logits)")
    return truth.astype(np.int64), prob


def _one_vs_rest_auc(is_positive: np.ndarray, score: np.ndarray) -> float | None:
    if is_positive.all() or not is_positive.any():
        return None
    return float(roc_auc_score(is_positive, score))


def _operating_point(
    requested: float, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, index: int
) -> dict[str, Any]:
    threshold = float(thresholds[index])
    return {
        "requested": requested,
        "specificity": float(1.0 - fpr[index]),
        "sensitivity": float(tpr[index]),
        "threshold": threshold if np.isfinite(threshold) else None,
    }


def _target_metrics(
    truth: np.ndarray,
    prob: np.ndarray,
    classes: Sequence[str],
    target_class: str | None,
    fixed_specificity: float,
    fixed_sensitivity: float,
) -> dict[str, Any] | None:
    if target_class is None or target_class not in classes:
        return None
    k = list(classes).index(target_class)
    is_positive = truth == k
    return {
        "class": target_class,
        **operating_points(is_positive, prob[:, k], fixed_specificity, fixed_sensitivity),
        "auc": _one_vs_rest_auc(is_positive, prob[:, k]),
    }


def _format_value(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join([str(first).ljust(widths[0]), *(str(c).rjust(w) for c, w in zip(rest, widths[1:]))])

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)])
