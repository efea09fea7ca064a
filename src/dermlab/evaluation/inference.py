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
from dermlab.evaluation.tta import average_probabilities, resolve_tta_views

__all__ = ["InferenceBehaviour", "Decisions", "resolve_behaviour", "checkpoint_temperature", "checkpoint_abstention"]

TtaSetting = bool | str | Sequence[str] | None


@dataclass(frozen=True)
class Decisions:
    """Probabilities ``(N, C)``, the argmax class index, and per image the abstention verdict and its reasons."""

    probabilities: np.ndarray
    predicted: np.ndarray
    uncertain: np.ndarray
    reasons: list[list[str]]
    scores: dict[str, np.ndarray]


@dataclass(frozen=True)
class InferenceBehaviour:
    """TTA views, temperature and abstention rule (``None`` = off); see :func:`resolve_behaviour`."""

    views: tuple[str, ...] = ("identity",)
    temperature: float = 1.0
    abstention: AbstentionRule | None = None

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """``mean over views of softmax(logits / temperature)`` of view logits ``(V, N, C)`` (or ``(N, C)``)."""
        return average_probabilities(logits, self.temperature)

    def decide(self, logits: torch.Tensor | np.ndarray) -> Decisions:
        """The decision rule: probabilities, argmax, and "uncertain" where the abstention rule rejects."""
        probabilities = self.probabilities(logits)
        count = probabilities.shape[0]
        if self.abstention is not None and count:
            scores = self.abstention.scores(logits)
            reasons = self.abstention.reasons(scores)
        else:
            scores, reasons = {}, [[] for _ in range(count)]
        return Decisions(
            probabilities=probabilities,
            predicted=probabilities.argmax(axis=1) if count else np.zeros(0, dtype=np.int64),
            uncertain=np.asarray([bool(r) for r in reasons], dtype=bool),
            reasons=[list(r) for r in reasons],
            scores=scores,
        )

    def describe(self) -> str:
        """One line, e.g. ``TTA views: identity, hflip; temperature 1.31; abstention rule on``."""
        rule = "on" if self.abstention is not None else "off"
        return f"TTA views: {', '.join(self.views)}; temperature {self.temperature:.4g}; abstention rule {rule}"


def resolve_behaviour(
    run_views: TtaSetting,
    extras: Mapping[str, Any],
    source: str,
    *,
    tta: TtaSetting = None,
    calibrated: bool = True,
    abstain: bool = True,
) -> InferenceBehaviour:
    """The behaviour of a run: ``run_views`` (its ``evaluation.tta``) unless ``tta`` overrides them, the
    temperature of ``extras`` unless ``calibrated`` is False, its abstention rule unless ``abstain`` is False.

    ``tta``: ``None`` = the run's views; ``True`` = flips; ``False`` = identity only; names or a comma list.
    ``extras``: the checkpoint's ``dermlab`` entries (or an ONNX export's metadata); ``source`` names it in errors.
    """
    return InferenceBehaviour(
        views=resolve_tta_views(run_views if tta is None else tta),
        temperature=checkpoint_temperature(extras, source) if calibrated else 1.0,
        abstention=checkpoint_abstention(extras, source) if abstain else None,
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
    """The ``abstention`` rule of a checkpoint's extras, or None."""
    value = extras.get("abstention")
    return AbstentionRule.from_dict(value, source) if value else None
