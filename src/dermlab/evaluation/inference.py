"""A run's own inference behaviour: the TTA views, temperature and decision rule that turn logits into answers.

``dermlab evaluate``, ``dermlab predict`` and ``dermlab serve`` (both engines) all resolve their behaviour here,
from the run itself: the views of the run's ``evaluation.tta`` (which the temperature was fitted with), the
checkpoint's temperature and its abstention rule. Flags override one piece at a time (``--tta-views identity``,
``--uncalibrated``), so by default one model answers the same way everywhere.

This module stays light (numpy and torch only): the serving stack imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dermlab.errors import CheckpointError
from dermlab.evaluation.abstention import AbstentionRule
from dermlab.evaluation.familiarity import FeatureStatistics
from dermlab.evaluation.level_statistics import LevelStatistics
from dermlab.evaluation.decision import RULES, DecisionRule, checkpoint_decision
from dermlab.evaluation.tta import average_probabilities, resolve_tta_views

__all__ = ["InferenceBehaviour", "Decisions", "resolve_behaviour", "checkpoint_temperature", "checkpoint_abstention",
           "checkpoint_feature_statistics", "checkpoint_level_statistics"]

TtaSetting = bool | str | Sequence[str] | None


@dataclass(frozen=True)
class Decisions:
    """Probabilities ``(N, C)``, the class index the decision rule picks, and per image the abstention verdict
    and its reasons; ``by_rule`` holds the class index of every rule the run has (``argmax``, ``balanced``)."""

    probabilities: np.ndarray
    predicted: np.ndarray
    uncertain: np.ndarray
    reasons: list[list[str]]
    scores: dict[str, np.ndarray]
    rule: str = "argmax"
    by_rule: dict[str, np.ndarray] | None = None


@dataclass(frozen=True)
class InferenceBehaviour:
    """TTA views, temperature, abstention rule (``None`` = off) and decision rule; see :func:`resolve_behaviour`.

    ``decision``: the run's fitted rules (``None``: argmax only); ``rule``: the one that picks ``predicted``.
    """

    views: tuple[str, ...] = ("identity",)
    temperature: float = 1.0
    abstention: AbstentionRule | None = None
    decision: DecisionRule | None = None
    rule: str = "argmax"

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """``mean over views of softmax(logits / temperature)`` of view logits ``(V, N, C)`` (or ``(N, C)``)."""
        return average_probabilities(logits, self.temperature)

    @property
    def needs_features(self) -> bool:
        """Whether :meth:`decide` needs the pooled features (the abstention rule has a feature score)."""
        return self.abstention is not None and self.abstention.needs_features

    @property
    def needs_levels(self) -> bool:
        """Whether :meth:`decide` needs the level descriptors (the abstention rule has the ``level`` score)."""
        return self.abstention is not None and self.abstention.needs_levels

    def decide(
        self, logits: torch.Tensor | np.ndarray, features: np.ndarray | None = None, levels: Mapping[str, np.ndarray] | None = None
    ) -> Decisions:
        """The decision rule: probabilities, argmax, and "uncertain" where the abstention rule rejects
        (``features``: the images' pooled features ``(N, F)``, when :attr:`needs_features`; ``levels``: their
        level descriptors on the identity view, when :attr:`needs_levels`)."""
        probabilities = self.probabilities(logits)
        count = probabilities.shape[0]
        if self.abstention is not None and count:
            scores = self.abstention.scores(logits, features, levels)
            reasons = self.abstention.reasons(scores)
        else:
            scores, reasons = {}, [[] for _ in range(count)]
        by_rule = self.choices(probabilities)
        return Decisions(
            probabilities=probabilities,
            predicted=by_rule[self.rule],
            uncertain=np.asarray([bool(r) for r in reasons], dtype=bool),
            reasons=[list(r) for r in reasons],
            scores=scores,
            rule=self.rule,
            by_rule=by_rule,
        )

    def choices(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """The class index each rule of the run picks for probabilities ``(N, C)``: ``argmax``, and ``balanced``
        when the run has a fitted logit adjustment."""
        probabilities = np.asarray(probabilities)
        if not len(probabilities):
            empty = np.zeros(0, dtype=np.int64)
            return {"argmax": empty} | ({"balanced": empty} if self.decision is not None else {})
        picks = {"argmax": probabilities.argmax(axis=1)}
        if self.decision is not None:
            picks["balanced"] = self.decision.predict(probabilities, "balanced")
        return picks

    def describe(self) -> str:
        """One line, e.g. ``TTA views: identity, hflip; temperature 1.31; abstention rule on; decision rule argmax``."""
        rule = "on" if self.abstention is not None else "off"
        decision = self.rule + (f" (balanced rule: tau {self.decision.tau:g})" if self.decision is not None else "")
        return f"TTA views: {', '.join(self.views)}; temperature {self.temperature:.4g}; abstention rule {rule}; decision rule {decision}"


def resolve_behaviour(
    run_views: TtaSetting,
    extras: Mapping[str, Any],
    source: str,
    *,
    tta: TtaSetting = None,
    calibrated: bool = True,
    abstain: bool = True,
    rule: str | None = None,
) -> InferenceBehaviour:
    """The behaviour of a run: its views unless ``tta`` overrides them, the temperature of ``extras`` unless
    ``calibrated`` is False, its abstention rule unless ``abstain`` is False, its decision rule unless ``rule``.

    The run's views are those chosen on val after training (``extras["tta_views"]``, see
    ``evaluation.tta_candidates``), else ``run_views`` (its ``evaluation.tta``).
    ``tta``: ``None`` = the run's views; ``True`` = flips; ``False`` = identity only; names or a comma list.
    ``rule``: ``None`` = the run's default (``extras["decision"]["default"]``, else argmax); ``argmax`` or ``balanced``.
    ``extras``: the checkpoint's ``dermlab`` entries (or an ONNX export's metadata); ``source`` names it in errors.
    """
    decision = checkpoint_decision(extras, source)
    chosen = rule or (decision.default if decision is not None else "argmax")
    if chosen not in RULES:
        raise CheckpointError(f"unknown decision rule {chosen!r}; valid rules: {', '.join(RULES)}")
    if chosen == "balanced" and decision is None:
        raise CheckpointError(f"{source}: has no fitted balanced rule (evaluation.logit_adjustment was off or it predates it)")
    own_views = extras.get("tta_views") or run_views
    return InferenceBehaviour(
        views=resolve_tta_views(own_views if tta is None else tta),
        temperature=checkpoint_temperature(extras, source) if calibrated else 1.0,
        abstention=checkpoint_abstention(extras, source) if abstain else None,
        decision=decision,
        rule=chosen,
    )


def checkpoint_temperature(extras: Mapping[str, Any], source: str) -> float:
    """The fitted ``temperature`` of a checkpoint's extras, 1.0 when it has none; a bad value raises."""
    value = extras.get("temperature")
    if value is None:
        return 1.0
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: temperature must be a number, got {value!r}") from None
    if not np.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{source}: temperature must be a finite number > 0, got {value!r}")
    return temperature


def checkpoint_abstention(extras: Mapping[str, Any], source: str) -> AbstentionRule | None:
    """The ``abstention`` rule of a checkpoint's extras (with its feature and level statistics), or None."""
    value = extras.get("abstention")
    if not value:
        return None
    return AbstentionRule.from_dict(
        value, source, checkpoint_feature_statistics(extras, source), checkpoint_level_statistics(extras, source)
    )


def checkpoint_level_statistics(extras: Mapping[str, Any], source: str) -> LevelStatistics | None:
    """The training images' level statistics of a checkpoint's extras, or None (fitted after training with the
    feature statistics; see :mod:`dermlab.evaluation.level_statistics`)."""
    return _stored_statistics(extras, "level_statistics", "level statistics", LevelStatistics.from_dict, source)


def checkpoint_feature_statistics(extras: Mapping[str, Any], source: str) -> FeatureStatistics | None:
    """The training images' pooled-feature statistics of a checkpoint's extras, or None (fitted after training
    when ``evaluation.feature_statistics`` is on; see :mod:`dermlab.evaluation.familiarity`)."""
    return _stored_statistics(extras, "feature_statistics", "feature statistics", FeatureStatistics.from_dict, source)


def _stored_statistics(extras: Mapping[str, Any], key: str, what: str, read: Any, source: str) -> Any:
    """``read(extras[key], source)``; None when absent, a CheckpointError naming ``what`` when not a mapping."""
    value = extras.get(key)
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{source}: damaged {what} (not a mapping)")
    return read(value, source)
