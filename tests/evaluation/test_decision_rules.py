"""Decision rules from one model: post-hoc logit adjustment, its tau fitted on val, and how predict reports it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from dermlab.errors import CheckpointError
from dermlab.evaluation.decision import TAU_GRID, DecisionRule, adjust_probabilities, fit_tau
from dermlab.evaluation.inference import resolve_behaviour

PRIOR = [0.8, 0.15, 0.05]


def _long_tailed_case(seed: int = 0, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn by PRIOR; probabilities of a model that knows the classes but leans on the prior."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=PRIOR)
    evidence = np.eye(3)[y] * 1.2 + rng.normal(0, 0.9, (n, 3))  # informative, noisy
    logits = evidence + np.log(PRIOR)  # the prior pulls towards the frequent class
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True), y


def test_tau_zero_is_the_identity() -> None:
    p, _ = _long_tailed_case()
    assert np.array_equal(adjust_probabilities(p, 0.0, PRIOR), p)
    rule = DecisionRule(0.0, tuple(PRIOR))
    assert np.array_equal(rule.predict(p, "balanced"), p.argmax(axis=1))


def test_adjustment_is_subtracting_tau_log_prior_from_the_logits() -> None:
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    shifted = logits - 0.7 * np.log(PRIOR)
    expected = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    assert np.allclose(adjust_probabilities(p, 0.7, PRIOR), expected, atol=1e-12)


def test_the_fitted_tau_maximises_val_balanced_accuracy() -> None:
    p, y = _long_tailed_case()
    tau, curve = fit_tau(p, y, PRIOR)
    by_hand = {t: balanced_accuracy_score(y, adjust_probabilities(p, t, PRIOR).argmax(axis=1)) for t in TAU_GRID}
    assert curve == pytest.approx(by_hand)
    assert by_hand[tau] == max(by_hand.values())
    assert tau > 0 and by_hand[tau] > by_hand[0.0] + 0.05  # the adjustment helps on a long tail


def test_a_balanced_case_keeps_tau_zero() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 50)
    p = np.eye(3)[y] * 0.9 + 0.05 + rng.uniform(0, 0.01, (150, 3))  # every image right already
    tau, _ = fit_tau(p / p.sum(axis=1, keepdims=True), y, PRIOR)
    assert tau == 0.0  # ties go to the smaller tau


def test_a_damaged_rule_and_a_missing_rule_are_refused() -> None:
    with pytest.raises(CheckpointError, match="damaged decision rule"):
        DecisionRule.from_dict({"tau": 1.0}, "x.ckpt")
    with pytest.raises(CheckpointError, match="bad decision rule"):
        DecisionRule.from_dict({"tau": -1.0, "class_prior": PRIOR}, "x.ckpt")
    with pytest.raises(CheckpointError, match="no fitted balanced rule"):
        resolve_behaviour([], {}, "x.ckpt", rule="balanced")


def test_the_behaviour_picks_by_its_rule_and_gives_both() -> None:
    p, _ = _long_tailed_case()
    logits = np.log(p)
    extras = {"decision": DecisionRule(1.0, tuple(PRIOR)).to_dict()}
    argmax = resolve_behaviour([], extras, "x").decide(logits)
    balanced = resolve_behaviour([], extras, "x", rule="balanced").decide(logits)
    assert argmax.rule == "argmax" and balanced.rule == "balanced"
    assert np.array_equal(argmax.predicted, p.argmax(axis=1))
    assert np.array_equal(balanced.predicted, adjust_probabilities(p, 1.0, PRIOR).argmax(axis=1))
    assert np.array_equal(argmax.by_rule["balanced"], balanced.predicted)
    assert not np.array_equal(argmax.predicted, balanced.predicted)
    assert np.allclose(argmax.probabilities, balanced.probabilities)  # the rule moves the choice, not the probabilities
