"""Scoring data that holds only some of the model's classes: the full and the class-restricted softmax."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from dermlab.config import EvaluationConfig
from dermlab.evaluation.present_classes import present_class_metrics

CLASSES = ["nv", "mel", "bkl", "bcc"]


def _case() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y_true = np.array([0] * 30 + [1] * 20)  # nevi and melanomas only
    logits = rng.normal(size=(50, 4))
    logits[y_true == 1, 1] += 1.0
    logits[:5, 2] += 6.0  # five nevi the model calls bkl, a class absent here
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, prob


def test_the_restricted_softmax_is_the_two_class_problem_of_the_present_classes() -> None:
    y_true, prob = _case()
    present = present_class_metrics(y_true, prob, CLASSES, EvaluationConfig(bootstrap_resamples=50))
    assert present["classes"] == ["nv", "mel"] and present["of"] == CLASSES
    restricted = present["restricted_softmax"]
    mel_share = prob[:, 1] / (prob[:, 0] + prob[:, 1])
    assert np.isclose(restricted["auc"]["mel"], roc_auc_score(y_true == 1, mel_share))
    assert np.isclose(restricted["auc_macro"], restricted["auc"]["mel"])  # two classes: one AUC
    assert np.isclose(restricted["accuracy"], np.mean((mel_share >= 0.5) == (y_true == 1)))
    assert restricted["target"]["class"] == "mel"
    low, high = restricted["intervals"]["auc_macro"]
    assert low <= restricted["auc_macro"] <= high


def test_the_full_softmax_counts_an_answer_outside_the_present_classes_as_a_miss() -> None:
    y_true, prob = _case()
    full = present_class_metrics(y_true, prob, CLASSES, EvaluationConfig(bootstrap_resamples=0))["full_softmax"]
    predicted = prob.argmax(axis=1)
    assert np.isclose(full["recall"]["nv"], np.mean(predicted[y_true == 0] == 0))
    assert full["predicted_as"]["nv"]["bkl"] == int(np.sum(predicted[y_true == 0] == 2)) >= 5
    assert sum(full["predicted_as"]["mel"].values()) == 20


def test_nothing_is_added_when_every_class_or_a_single_one_is_present() -> None:
    prob = np.full((8, 4), 0.25)
    assert present_class_metrics(np.array([0, 1, 2, 3] * 2), prob, CLASSES, EvaluationConfig()) is None
    assert present_class_metrics(np.zeros(8, dtype=int), prob, CLASSES, EvaluationConfig()) is None
