"""Decision rules from one model: argmax, and post-hoc logit adjustment for balanced accuracy.

A model trained for accuracy favours the frequent classes. Logit adjustment (Menon et al. 2021) moves the
decision without retraining: predict ``argmax_c log p_c - tau * log prior_c`` with ``prior`` the training
split's class shares. ``tau = 0`` is the plain argmax; ``tau = 1`` is the Bayes rule for a uniform prior.
Here ``tau`` is fitted on the val split, as the value of a grid that maximises val balanced accuracy, and
stored in the checkpoint (``checkpoint["dermlab"]["decision"]``), so one trained model serves two rules:

* ``argmax``: accuracy first (the probabilities as they are);
* ``balanced``: the adjusted probabilities, ``softmax(log p - tau * log prior)``.

The probabilities it adjusts are the run's own (after TTA averaging and temperature), so the rule means the
same thing in evaluate, predict and serve. This module stays light (numpy only): the serving stack imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dermlab.errors import CheckpointError, DataError

__all__ = ["DecisionRule", "RULES", "adjust_probabilities", "balanced_probabilities", "fit_tau", "checkpoint_decision"]

#: the decision rules, in the order they are reported
RULES: tuple[str, ...] = ("argmax", "balanced")
TAU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(41))  # 0, 0.05, ..., 2.0


def adjust_probabilities(probabilities: np.ndarray, tau: float, prior: Sequence[float]) -> np.ndarray:
    """``softmax(log p - tau * log prior)`` row by row; ``tau = 0`` returns ``probabilities`` unchanged."""
    prob = np.asarray(probabilities, dtype=np.float64)
    if tau == 0 or prob.size == 0:
        return prob
    prior_arr = np.asarray(prior, dtype=np.float64)
    if prior_arr.shape != (prob.shape[1],) or not np.all(prior_arr > 0):
        raise DataError(f"the class prior must hold {prob.shape[1]} shares > 0, got {list(prior_arr)}")
    scores = np.log(np.clip(prob, 1e-300, None)) - float(tau) * np.log(prior_arr)
    scores -= scores.max(axis=1, keepdims=True)
    adjusted = np.exp(scores)
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def balanced_probabilities(probabilities: np.ndarray, tau: float | None, prior: Sequence[float] | None) -> np.ndarray:
    """The balanced rule's probabilities; ``tau`` or ``prior`` None (no fitted rule) = unchanged."""
    if tau is None or prior is None:
        return np.asarray(probabilities, dtype=np.float64)
    return adjust_probabilities(probabilities, tau, prior)


def _balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    recalls = [float(np.mean(predicted[truth == k] == k)) for k in range(num_classes) if np.any(truth == k)]
    return float(np.mean(recalls)) if recalls else 0.0


def fit_tau(
    probabilities: np.ndarray, y_true: Sequence[int] | np.ndarray, prior: Sequence[float], grid: Sequence[float] = TAU_GRID
) -> tuple[float, dict[float, float]]:
    """The ``tau`` of ``grid`` with the highest balanced accuracy of the adjusted argmax; ties go to the smaller.

    Returns ``(tau, {tau: balanced accuracy})``.
    """
    prob = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(y_true, dtype=np.int64)
    if prob.ndim != 2 or truth.shape != (prob.shape[0],) or truth.size == 0:
        raise DataError(f"probabilities (N, C) {prob.shape} and labels {truth.shape} do not match")
    scores = {float(t): _balanced_accuracy(truth, adjust_probabilities(prob, float(t), prior).argmax(axis=1), prob.shape[1]) for t in sorted(grid)}
    best = max(scores.values())
    return next(t for t, value in scores.items() if value >= best - 1e-12), scores


@dataclass(frozen=True)
class DecisionRule:
    """The fitted rules of a run: ``tau`` and the training ``prior`` of the balanced rule, and the default."""

    tau: float
    prior: tuple[float, ...]
    default: str = "argmax"

    def probabilities(self, probabilities: np.ndarray, rule: str | None = None) -> np.ndarray:
        """The probabilities a rule decides on: ``argmax`` as given, ``balanced`` adjusted."""
        rule = rule or self.default
        if rule not in RULES:
            raise DataError(f"unknown decision rule {rule!r}; valid rules: {', '.join(RULES)}")
        return np.asarray(probabilities, dtype=np.float64) if rule == "argmax" else adjust_probabilities(probabilities, self.tau, self.prior)

    def predict(self, probabilities: np.ndarray, rule: str | None = None) -> np.ndarray:
        return self.probabilities(probabilities, rule).argmax(axis=1)

    def describe(self, rule: str | None = None) -> str:
        rule = rule or self.default
        other = "balanced" if rule == "argmax" else "argmax"
        return f"decision rule: {rule} (tau {self.tau:g}); the {other} rule is given beside it"

    def to_dict(self) -> dict[str, Any]:
        return {"tau": float(self.tau), "class_prior": [float(p) for p in self.prior], "default": self.default}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], source: str) -> DecisionRule:
        try:
            tau = float(value["tau"])
            prior = tuple(float(p) for p in value["class_prior"])
            default = str(value.get("default", "argmax"))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: damaged decision rule (needs tau and class_prior), got {dict(value)!r}") from None
        if not np.isfinite(tau) or tau < 0 or not prior or not all(p > 0 for p in prior) or default not in RULES:
            raise CheckpointError(f"{source}: bad decision rule (tau >= 0, class shares > 0, default in {RULES}), got {dict(value)!r}")
        return cls(tau, prior, default)


def checkpoint_decision(extras: Mapping[str, Any], source: str) -> DecisionRule | None:
    """The ``decision`` rule of a checkpoint's extras (or an ONNX export's metadata), or None."""
    value = extras.get("decision")
    return DecisionRule.from_dict(value, source) if value else None
