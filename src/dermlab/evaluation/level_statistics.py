"""How an image's look at each resolution compares with the training images': per-image shift detection.

The pooled features a classifier ends on are made to ignore how an image was taken, so they hardly tell another
clinic's images from the model's own (measured on HAM10000 against other ISIC sources: AUROC about 0.6). The
early layers keep it: the colour, contrast and texture statistics of each resolution stage change with the
camera, the light, the resolution and the population. Here, per image, the channel means and standard
deviations of the output of each *feature level* of the backbone (the stages timm declares in
``feature_info``: the last block at each resolution) are one descriptor per level (Lee et al., 2018, use
Mahalanobis distances of such per-layer statistics; the style statistics of Huang and Belongie, 2017, are the
same means and deviations).

For each level a :class:`~dermlab.evaluation.familiarity.FeatureStatistics` is fitted on the training split's
descriptors; the val split sets each level's scale (mean and standard deviation of the log distance). An
image's **level score** is the mean over levels of its standardised log distance: about 0 for images of the
training source, larger for images unlike them. No level is chosen by hand and no external image is used to
fit or combine them. :attr:`LevelStatistics.unusual_score` is the val split's 95th percentile, so about 5% of
images of the training source score above it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dermlab.errors import CheckpointError, ConfigError, DataError
from dermlab.evaluation.familiarity import UNUSUAL_QUANTILE, FeatureStatistics, fit_feature_statistics, share_is_unusual

__all__ = ["LevelStatistics", "LevelVerdict", "capture_levels", "channel_moments", "feature_levels", "fit_level_statistics", "stack_levels"]


def feature_levels(model: nn.Module) -> list[str]:
    """The backbone's feature levels (module names inside ``model.backbone``), as timm's ``feature_info`` lists
    them; a model without them is refused with the reason."""
    backbone = getattr(model, "backbone", None)
    info = getattr(backbone, "feature_info", None)
    if not isinstance(backbone, nn.Module) or not info:
        raise ConfigError(f"{type(model).__name__} declares no feature levels (a timm backbone's feature_info): no level statistics")
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    levels = [str(entry["module"]) for entry in entries if entry.get("module")]
    if not levels:
        raise ConfigError(f"{type(model).__name__}: its feature_info names no modules: no level statistics")
    return levels


def channel_moments(maps: torch.Tensor) -> torch.Tensor:
    """A level's descriptor: the channel means, then the channel standard deviations, of maps ``(N, C, H, W)``
    as ``(N, 2C)`` float32 (traceable, so an ONNX export computes it in its graph)."""
    flat = maps.float().flatten(2)
    return torch.cat([flat.mean(dim=2), flat.std(dim=2, correction=0)], dim=1)


@contextlib.contextmanager
def capture_levels(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """While open, every forward pass appends to ``captured[level]`` the ``(N, 2C)`` channel means and standard
    deviations of that level's output (``(N, C, H, W)``)."""
    backbone = model.backbone
    levels = feature_levels(model)
    captured: dict[str, list[torch.Tensor]] = {level: [] for level in levels}

    def hook(level: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured[level].append(channel_moments(output.detach()).cpu())

        return record

    handles = [backbone.get_submodule(level).register_forward_hook(hook(level)) for level in levels]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def stack_levels(captured: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, np.ndarray]:
    """The captured batches of each level as one ``(N, 2C)`` array."""
    return {level: torch.cat(list(batches)).numpy() if batches else np.zeros((0, 0), np.float32) for level, batches in captured.items()}


@dataclass(frozen=True)
class LevelVerdict:
    """How many of some images look unlike the training images at the feature levels, and the warning."""

    images: int
    unusual_share: float
    expected_share: float
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "unusual_share": self.unusual_share, "expected_share": self.expected_share,
                "warning": self.warning}

    def describe(self) -> str:
        """One or two lines for the terminal."""
        line = (
            f"look (level statistics): {self.unusual_share:.0%} of these {self.images} images differ from the training "
            f"images in colour, contrast or texture more than {UNUSUAL_QUANTILE:.0%} of the model's own validation "
            f"images do (expected about {self.expected_share:.0%})"
        )
        return line + (f"\nWARNING: {self.warning}" if self.warning else "")


@dataclass(frozen=True)
class LevelStatistics:
    """One :class:`FeatureStatistics` per feature level, and each level's val scale of the log distance."""

    levels: tuple[str, ...]
    statistics: tuple[FeatureStatistics, ...]
    log_mean: tuple[float, ...]
    log_std: tuple[float, ...]
    unusual_score: float  # the UNUSUAL_QUANTILE of the val split's level scores

    def score(self, descriptors: Mapping[str, np.ndarray | torch.Tensor]) -> np.ndarray:
        """Per image, the mean over levels of the standardised log distance ``(N,)`` (about 0: familiar)."""
        absent = [level for level in self.levels if level not in descriptors]
        if absent:
            raise DataError(f"level descriptors lack {', '.join(absent)} (the statistics were fitted on {', '.join(self.levels)})")
        scores = [
            (np.log(np.maximum(statistics.distance(descriptors[level]), 1e-12)) - mean) / std
            for level, statistics, mean, std in zip(self.levels, self.statistics, self.log_mean, self.log_std)
        ]
        return np.mean(np.stack(scores, axis=1), axis=1)

    def verdict(self, descriptors: Mapping[str, np.ndarray | torch.Tensor]) -> LevelVerdict:
        """The dataset-level verdict: the unusual share, and a warning when it is clearly above 5%."""
        return self.verdict_of_scores(self.score(descriptors))

    def verdict_of_scores(self, scores: np.ndarray) -> LevelVerdict:
        """:meth:`verdict` from the images' level scores ``(N,)``."""
        scores = np.asarray(scores, dtype=np.float64)
        unusual, count = int((scores > self.unusual_score).sum()), int(scores.size)
        share = unusual / count if count else 0.0
        warning = None
        if share_is_unusual(unusual, count):
            warning = (
                f"{share:.0%} of these images look unlike the ones this model was trained on, where about "
                f"{1 - UNUSUAL_QUANTILE:.0%} is normal: another clinic, camera or population. Its figures from its own "
                "test split do not apply here; check it on labelled images of this source before relying on it"
            )
        return LevelVerdict(count, share, 1.0 - UNUSUAL_QUANTILE, warning)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain values (``weights_only=True`` reads it back)."""
        return {
            "levels": list(self.levels),
            "statistics": [statistics.to_dict() for statistics in self.statistics],
            "log_mean": [float(value) for value in self.log_mean],
            "log_std": [float(value) for value in self.log_std],
            "unusual_score": float(self.unusual_score),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> LevelStatistics:
        try:
            levels = tuple(str(level) for level in data["levels"])
            statistics = tuple(FeatureStatistics.from_dict(entry, source) for entry in data["statistics"])
            result = cls(levels, statistics, tuple(float(v) for v in data["log_mean"]), tuple(float(v) for v in data["log_std"]),
                         float(data["unusual_score"]))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: damaged level statistics ({error!r})") from None
        if not levels or not len(levels) == len(statistics) == len(result.log_mean) == len(result.log_std):
            raise CheckpointError(f"{source}: damaged level statistics ({len(levels)} levels, {len(statistics)} statistics)")
        if not all(std > 0 for std in result.log_std):
            raise CheckpointError(f"{source}: damaged level statistics (a level's scale is not > 0)")
        return result


def fit_level_statistics(
    train: Mapping[str, np.ndarray | torch.Tensor], val: Mapping[str, np.ndarray | torch.Tensor], components: int = 128
) -> LevelStatistics:
    """Fit each level on the training split's descriptors; the val split's set each level's scale and the
    unusual score."""
    if set(train) != set(val) or not train:
        raise DataError(f"train and val descriptors must have the same levels, got {sorted(train)} and {sorted(val)}")
    levels = tuple(train)
    fitted, means, stds, val_scores = [], [], [], []
    for level in levels:
        statistics = fit_feature_statistics(train[level], val[level], components)
        log_distance = np.log(np.maximum(statistics.distance(val[level]), 1e-12))
        spread = float(log_distance.std())
        if not spread > 0:
            raise DataError(f"level {level}: the val images' distances do not vary: no scale to fit")
        fitted.append(statistics)
        means.append(float(log_distance.mean()))
        stds.append(spread)
        val_scores.append((log_distance - means[-1]) / spread)
    unusual = float(np.quantile(np.mean(np.stack(val_scores, axis=1), axis=1), UNUSUAL_QUANTILE))
    return LevelStatistics(levels, tuple(fitted), tuple(means), tuple(stds), unusual)
