"""Abstention: say "uncertain" instead of a class when an image is unlike the lesions the model knows.

Each score maps logits to one number per image, higher meaning "more like the training lesions":

- ``max_probability``: the top softmax probability after temperature scaling (Hendrycks & Gimpel, 2017),
- ``energy``: the negative free energy ``logsumexp(logits)`` of the raw logits (Liu et al., 2020),
- ``max_logit``: the largest raw logit (Hendrycks et al., 2022),
- ``mahalanobis``: minus the Mahalanobis distance of the image's pooled backbone features to the training
  images' (:mod:`dermlab.evaluation.familiarity`; Lee et al., 2018): it sees images unlike the training set
  even when the classifier is confident about them. It needs the features and the checkpoint's
  ``feature_statistics``.
- ``level``: minus the image's level score (:mod:`dermlab.evaluation.level_statistics`: how far its colour,
  contrast and texture statistics at each of the backbone's feature levels are from the training images', on the
  identity view): it sees another clinic's or camera's images, which the pooled features hardly tell apart. It
  needs the images' level descriptors and the checkpoint's ``level_statistics``.

With test-time augmentation each logit score is averaged over the views; the feature and level scores read the
identity view, as their statistics were fitted. A rule keeps one threshold per chosen score
and rejects an image when any score falls below its threshold. The thresholds are set on the validation
lesions: every score's threshold sits at the same quantile ``q``, and ``q`` is the largest for which the rule
rejects at most the target share of them (the false-rejection rate), so several scores together still reject
about that share of real lesions. Non-lesion images are never needed to fit the rule.

This module stays light (numpy and torch only): the serving stack imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dermlab.errors import CheckpointError, ConfigError, DataError
from dermlab.evaluation.familiarity import FeatureStatistics
from dermlab.evaluation.level_statistics import LevelStatistics
from dermlab.registry import Registry

__all__ = [
    "ABSTENTION_SCORES",
    "UNCERTAIN_MESSAGE",
    "AbstentionRule",
    "ScoreInputs",
    "compute_scores",
    "needs_features",
    "needs_levels",
    "fit_abstention",
    "abstention_summary",
    "synthetic_non_lesion_images",
]

UNCERTAIN_MESSAGE = (
    "uncertain: this image may not be a skin lesion, or it is unlike the lesions the model was trained on"
)
"""What the web service and the page say when the rule abstains."""

@dataclass(frozen=True)
class ScoreInputs:
    """What a score may read: view logits ``(V, N, C)`` float64, the temperature, for feature scores the pooled
    features ``(N, F)`` (identity view) with the checkpoint's feature statistics, and for the level
    score the level descriptors (per level ``(N, 2C)``, identity view) with the checkpoint's level statistics."""

    logits: torch.Tensor
    temperature: float
    features: np.ndarray | None = None
    statistics: FeatureStatistics | None = None
    levels: Mapping[str, np.ndarray] | None = None
    level_statistics: LevelStatistics | None = None


_ScoreFn = Callable[[ScoreInputs], torch.Tensor]

#: Scores by name: ``score(inputs) -> (N,)``, higher = more in-distribution. A score that reads the pooled
#: features carries ``needs_features = True`` (see :func:`needs_features`).
ABSTENTION_SCORES: Registry[_ScoreFn] = Registry("abstention score")
ABSTENTION_SCORES.add(
    "max_probability", lambda s: torch.softmax(s.logits / s.temperature, dim=-1).mean(dim=0).max(dim=-1).values
)
ABSTENTION_SCORES.add("energy", lambda s: torch.logsumexp(s.logits, dim=-1).mean(dim=0))
ABSTENTION_SCORES.add("max_logit", lambda s: s.logits.max(dim=-1).values.mean(dim=0))


@ABSTENTION_SCORES.register("mahalanobis")
def _mahalanobis(inputs: ScoreInputs) -> torch.Tensor:
    if inputs.features is None or inputs.statistics is None:
        raise ConfigError("the abstention score mahalanobis needs pooled features and the checkpoint's feature statistics")
    if len(inputs.features) != inputs.logits.shape[1]:
        raise DataError(f"{len(inputs.features)} feature rows for {inputs.logits.shape[1]} images")
    return torch.from_numpy(-inputs.statistics.distance(inputs.features))


_mahalanobis.needs_features = True  # type: ignore[attr-defined]


@ABSTENTION_SCORES.register("level")
def _level(inputs: ScoreInputs) -> torch.Tensor:
    if inputs.levels is None or inputs.level_statistics is None:
        raise ConfigError("the abstention score level needs the images' level descriptors and the checkpoint's level statistics")
    scores = inputs.level_statistics.score(inputs.levels)
    if len(scores) != inputs.logits.shape[1]:
        raise DataError(f"{len(scores)} level descriptor rows for {inputs.logits.shape[1]} images")
    return torch.from_numpy(-scores)


_level.needs_levels = True  # type: ignore[attr-defined]


def needs_features(names: Sequence[str]) -> bool:
    """Whether any of the named scores reads pooled features (a feature score)."""
    return any(getattr(ABSTENTION_SCORES.get(name), "needs_features", False) for name in names)


def needs_levels(names: Sequence[str]) -> bool:
    """Whether any of the named scores reads the level descriptors (``level``)."""
    return any(getattr(ABSTENTION_SCORES.get(name), "needs_levels", False) for name in names)


def _as_view_logits(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    if hasattr(logits, "detach"):
        scores = logits.detach().cpu().double()  # type: ignore[union-attr]
    else:
        scores = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    if scores.dim() == 2:
        scores = scores.unsqueeze(0)
    if scores.dim() != 3 or scores.shape[1] == 0:
        raise DataError(f"logits must have shape (views, N, C) or (N, C) with N > 0, got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise DataError("logits hold NaN or infinite values")
    return scores


def compute_scores(
    logits: torch.Tensor | np.ndarray,
    names: Sequence[str],
    temperature: float = 1.0,
    features: np.ndarray | None = None,
    statistics: FeatureStatistics | None = None,
    levels: Mapping[str, np.ndarray] | None = None,
    level_statistics: LevelStatistics | None = None,
) -> dict[str, np.ndarray]:
    """Each named score of every image: ``{name: (N,)}``, from logits ``(V, N, C)`` or ``(N, C)`` (and, for a
    feature score, the pooled features ``(N, F)`` with the feature statistics; for ``level``, the level
    descriptors with the level statistics)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature}")
    inputs = ScoreInputs(_as_view_logits(logits), float(temperature), features, statistics, levels, level_statistics)
    return {name: ABSTENTION_SCORES.get(name)(inputs).double().numpy() for name in names}


@dataclass(frozen=True)
class AbstentionRule:
    """Thresholds per score, fitted by :func:`fit_abstention`; stored in checkpoints as :meth:`to_dict`."""

    thresholds: dict[str, float]
    false_rejection: float  # the target share of validation lesions to reject
    val_rejection: float  # the share the rule actually rejects there
    temperature: float = 1.0  # the one max_probability is computed with
    views: tuple[str, ...] = ("identity",)  # TTA views the rule was fitted on
    quantile: float = 0.0
    fitted_on: str = "val"
    extra: dict[str, Any] = field(default_factory=dict)
    # the checkpoint's feature and level statistics, for a rule with a feature or level score (stored beside the
    # rule, not in it)
    statistics: FeatureStatistics | None = field(default=None, compare=False, repr=False)
    level_statistics: LevelStatistics | None = field(default=None, compare=False, repr=False)

    @property
    def needs_features(self) -> bool:
        """Whether the rule reads pooled features (it has a feature score such as ``mahalanobis``)."""
        return needs_features(list(self.thresholds))

    @property
    def needs_levels(self) -> bool:
        """Whether the rule reads the images' level descriptors (it has the ``level`` score)."""
        return needs_levels(list(self.thresholds))

    def scores(
        self, logits: torch.Tensor | np.ndarray, features: np.ndarray | None = None, levels: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        return compute_scores(logits, list(self.thresholds), self.temperature, features, self.statistics, levels, self.level_statistics)

    def reasons(self, scores: Mapping[str, np.ndarray]) -> list[list[str]]:
        """For each image, the scores that fell below their threshold (empty = accepted)."""
        below = {name: np.asarray(scores[name]) < threshold for name, threshold in self.thresholds.items()}
        count = len(next(iter(below.values()))) if below else 0
        return [[name for name, flags in below.items() if flags[i]] for i in range(count)]

    def reject(
        self, logits: torch.Tensor | np.ndarray, features: np.ndarray | None = None, levels: Mapping[str, np.ndarray] | None = None
    ) -> np.ndarray:
        """Boolean ``(N,)``: True where the rule abstains."""
        return _rejected(self.scores(logits, features, levels), self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``weights_only=True`` can read it back)."""
        return {
            "thresholds": {name: float(value) for name, value in self.thresholds.items()},
            "false_rejection": float(self.false_rejection),
            "val_rejection": float(self.val_rejection),
            "temperature": float(self.temperature),
            "views": list(self.views),
            "quantile": float(self.quantile),
            "fitted_on": self.fitted_on,
            **({"extra": dict(self.extra)} if self.extra else {}),
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        source: str = "checkpoint",
        statistics: FeatureStatistics | None = None,
        level_statistics: LevelStatistics | None = None,
    ) -> AbstentionRule:
        try:
            thresholds = {str(name): float(value) for name, value in dict(data["thresholds"]).items()}
            rule = cls(
                thresholds=thresholds,
                false_rejection=float(data["false_rejection"]),
                val_rejection=float(data.get("val_rejection", data["false_rejection"])),
                temperature=float(data.get("temperature", 1.0)),
                views=tuple(str(v) for v in data.get("views", ("identity",))),
                quantile=float(data.get("quantile", 0.0)),
                fitted_on=str(data.get("fitted_on", "val")),
                extra=dict(data.get("extra") or {}),
                statistics=statistics,
                level_statistics=level_statistics,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{source}: damaged abstention settings ({error!r})") from None
        for name in rule.thresholds:
            if name not in ABSTENTION_SCORES:
                raise CheckpointError(f"{source}: unknown abstention score {name!r}; valid: {', '.join(ABSTENTION_SCORES)}")
        if not rule.thresholds or not (np.isfinite(rule.temperature) and rule.temperature > 0):
            raise CheckpointError(f"{source}: damaged abstention settings (no thresholds or a bad temperature)")
        if rule.needs_features and statistics is None:
            raise CheckpointError(f"{source}: the abstention rule uses a feature score but there are no feature statistics")
        if rule.needs_levels and level_statistics is None:
            raise CheckpointError(f"{source}: the abstention rule uses the level score but there are no level statistics")
        return rule


def _rejected(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float]) -> np.ndarray:
    flags = [np.asarray(scores[name]) < threshold for name, threshold in thresholds.items()]
    return np.logical_or.reduce(flags) if flags else np.zeros(0, dtype=bool)


def fit_abstention(
    logits: torch.Tensor | np.ndarray,
    false_rejection: float = 0.05,
    scores: Sequence[str] = ("max_probability", "energy"),
    temperature: float = 1.0,
    views: Sequence[str] = ("identity",),
    features: np.ndarray | None = None,
    statistics: FeatureStatistics | None = None,
    levels: Mapping[str, np.ndarray] | None = None,
    level_statistics: LevelStatistics | None = None,
) -> AbstentionRule:
    """Thresholds on validation logits ``(V, N, C)`` so the rule rejects at most ``false_rejection`` of them.

    With one score its threshold is the ``false_rejection`` quantile of that score. With several, each sits at
    the same quantile ``q <= false_rejection``, the largest whose union of rejections stays within the target.
    A feature score also needs the validation images' pooled ``features`` and the ``statistics``; ``level`` their
    ``levels`` descriptors and the ``level_statistics``.
    """
    if not 0.0 < false_rejection < 1.0:
        raise ConfigError(f"false_rejection must be in (0, 1), got {false_rejection}")
    if not scores:
        raise ConfigError("abstention needs at least one score")
    names = list(dict.fromkeys(scores))
    values = compute_scores(logits, names, temperature, features, statistics, levels, level_statistics)

    def thresholds_at(q: float) -> dict[str, float]:
        # "lower" keeps each threshold an observed value, so exactly the images strictly below it are rejected
        return {name: float(np.quantile(values[name], q, method="lower")) for name in names}

    def rejection_at(q: float) -> float:
        return float(_rejected(values, thresholds_at(q)).mean())

    low, high = 0.0, float(false_rejection)
    if rejection_at(high) <= false_rejection:
        low = high
    else:  # the union rejects more than any single score: shrink the common quantile
        for _ in range(40):
            middle = (low + high) / 2
            if rejection_at(middle) <= false_rejection:
                low = middle
            else:
                high = middle
    thresholds = thresholds_at(low)
    return AbstentionRule(
        thresholds=thresholds,
        false_rejection=float(false_rejection),
        val_rejection=float(_rejected(values, thresholds).mean()),
        temperature=float(temperature),
        views=tuple(views),
        quantile=float(low),
        statistics=statistics if needs_features(names) else None,
        level_statistics=level_statistics if needs_levels(names) else None,
    )


def abstention_summary(
    y_true: Sequence[int] | np.ndarray, y_prob: np.ndarray, rejected: np.ndarray
) -> dict[str, Any]:
    """How abstaining changes a labelled split: the share rejected, accuracy on the accepted and the rejected.

    ``balanced_accuracy_accepted`` averages the recall of the classes that still have accepted images.
    """
    truth = np.asarray(y_true, dtype=np.int64)
    flags = np.asarray(rejected, dtype=bool)
    if truth.shape != flags.shape or y_prob.shape[0] != truth.size:
        raise DataError(f"y_true {truth.shape}, y_prob {y_prob.shape} and rejected {flags.shape} do not match")
    correct = np.asarray(y_prob).argmax(axis=1) == truth
    accepted = ~flags

    def mean_or_none(values: np.ndarray) -> float | None:
        return float(values.mean()) if values.size else None

    recalls = [correct[accepted & (truth == k)].mean() for k in np.unique(truth[accepted])]
    return {
        "rejected": float(flags.mean()) if flags.size else 0.0,
        "n_rejected": int(flags.sum()),
        "accuracy_accepted": mean_or_none(correct[accepted]),
        "balanced_accuracy_accepted": float(np.mean(recalls)) if recalls else None,
        "accuracy_rejected": mean_or_none(correct[flags]),
    }


def synthetic_non_lesion_images(
    size: tuple[int, int] = (224, 224), per_kind: int = 8, seed: int = 0
) -> dict[str, list[Any]]:
    """Images that are certainly not skin lesions, by kind, to measure what an abstention rule rejects.

    ``solid colours`` (uniform random RGB), ``noise textures`` (per-pixel noise, half of them smoothed) and
    ``patterns`` (stripes and checkerboards of random colours and periods); ``size`` is (width, height).
    """
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    width, height = size
    solid = [Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(per_kind)]
    noise = []
    for index in range(per_kind):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        noise.append(image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1, 6)))) if index % 2 else image)
    patterns = []
    y, x = np.mgrid[0:height, 0:width]
    for index in range(per_kind):
        period = int(rng.integers(6, 48))
        mask = ((x // period + y // period) % 2 == 0) if index % 2 else ((x + y) // period) % 2 == 0
        first, second = rng.integers(0, 256, (2, 3))
        pixels = np.where(mask[..., None], first, second).astype(np.uint8)
        patterns.append(Image.fromarray(pixels, "RGB"))
    return {"solid colours": solid, "noise textures": noise, "patterns": patterns}
