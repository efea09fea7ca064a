"""Scoring on data that holds only some of the model's classes (e.g. melanomas and nevi from another clinic).

The model still answers over all its classes, so two views are reported:

- ``full_softmax``: the recall of each present class when any of the model's classes may be chosen (an
  external melanoma called "bkl" is a miss), and each present class's AUC against the other present images;
- ``restricted_softmax``: the probabilities of the present classes only, renormalised to sum to 1, then
  scored as a classifier over those classes (accuracy, balanced accuracy, per-class recall, macro AUC, the
  target class's sensitivity at the fixed specificity), with bootstrap intervals. For two classes this is the
  plain "melanoma vs nevus" task, whose AUC is that of the full softmax's ``p(mel) / (p(mel) + p(nv))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dermlab.config import EvaluationConfig
from dermlab.evaluation.bootstrap import bootstrap_intervals
from dermlab.evaluation.metrics import compute_metrics

__all__ = ["present_class_metrics"]


def present_class_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    evaluation: EvaluationConfig,
    groups: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """Both views above when ``y_true`` holds at least two but not all of ``classes``; else None."""
    present = sorted(set(int(label) for label in y_true))
    if len(present) < 2 or len(present) == len(classes):
        return None
    names = [classes[k] for k in present]
    restricted = y_prob[:, present]
    restricted = restricted / np.clip(restricted.sum(axis=1, keepdims=True), 1e-12, None)
    position = {k: i for i, k in enumerate(present)}
    truth = np.array([position[int(label)] for label in y_true], dtype=np.int64)
    target = evaluation.target_class if evaluation.target_class in names else None
    metrics = compute_metrics(
        truth, restricted, names, target_class=target, fixed_specificity=evaluation.fixed_specificity,
        fixed_sensitivity=evaluation.fixed_sensitivity, ece_bins=evaluation.ece_bins,
    )
    restricted_view: dict[str, Any] = {
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "auc_macro": metrics["auc_macro"],
        "recall": {name: metrics["per_class"][name]["recall"] for name in names},
        "auc": {name: metrics["per_class"][name]["auc"] for name in names},
    }
    sensitivity = ((metrics.get("target") or {}).get("sensitivity_at_specificity") or {}).get("sensitivity")
    if target is not None:
        restricted_view["target"] = {"class": target, "fixed_specificity": evaluation.fixed_specificity, "sensitivity": sensitivity}
    if evaluation.bootstrap_resamples > 0:
        restricted_view["intervals"] = bootstrap_intervals(
            truth, restricted, names, groups=groups, resamples=evaluation.bootstrap_resamples, seed=evaluation.bootstrap_seed,
            target_class=target, fixed_specificity=evaluation.fixed_specificity,
        )["intervals"]
    predicted = y_prob.argmax(axis=1)
    full_view = {
        "recall": {classes[k]: float(np.mean(predicted[y_true == k] == k)) for k in present},
        "predicted_as": {
            classes[k]: {classes[j]: int(np.sum(predicted[y_true == k] == j)) for j in range(len(classes)) if np.any(predicted[y_true == k] == j)}
            for k in present
        },
    }
    return {"classes": names, "of": list(classes), "full_softmax": full_view, "restricted_softmax": restricted_view}
