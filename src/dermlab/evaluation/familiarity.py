"""How familiar images look to a model: pooled-feature statistics of its training images, stored in the checkpoint.

After training, the backbone's pooled features of the training split (the identity view, as evaluation
preprocesses them) are summarised by their mean and the principal axes of their covariance
(:func:`fit_feature_statistics`); the val split (identity view too) gives the reference values an unseen image
of the training source gets. Every image is scored on its identity view, whatever the TTA views, so the verdicts
do not move with them. From them:

- **per image**, the Mahalanobis distance to the training features (Lee et al., 2018, with one Gaussian for all
  classes), scaled so that a typical training image scores about 1 (``distance``); the abstention score
  ``mahalanobis`` is its negative (higher = more familiar);
- **per dataset** (:meth:`FeatureStatistics.shift`), the *unusual share*: how many of the given images are
  farther from the training images than 95% of the model's own validation images (about 5% for images of the
  training source, whatever their number), and the *shift score*: the Frechet distance between a Gaussian fitted
  to the given images' features and the training features' Gaussian, in the whitened space of the training
  features' top principal axes, per axis (0 = the same statistics). A warning in plain words is raised when the
  unusual share is clearly above 5% (a one-sided binomial test at 1%), or when the shift score is above what
  random sets of the model's own val images of that size reach one time in a hundred (the score of a small set
  is larger by chance: the thresholds are measured per set size when the statistics are fitted).

The covariance keeps its top ``components`` axes; the remaining variance is spread evenly over the other axes
(a probabilistic-PCA form), which keeps the distance defined when there are fewer images than features.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dermlab.errors import CheckpointError, ConfigError, DataError

__all__ = [
    "FeatureStatistics", "ShiftVerdict", "capture_pooled", "fit_feature_statistics", "has_one_backbone", "share_is_unusual",
    "UNUSUAL_QUANTILE",
]

#: The validation quantile of the distance above which an image counts as unusual.
UNUSUAL_QUANTILE = 0.95
#: Principal axes the per-dataset shift score compares (fewer than the distance keeps: a Gaussian of a few hundred
#: images in many axes has a large sampling bias).
SHIFT_AXES = 16
_WARNING_LEVEL = 0.01  # one-sided binomial test of the unusual share against 1 - UNUSUAL_QUANTILE


@dataclass(frozen=True)
class ShiftVerdict:
    """The dataset-level comparison of some images with the training images (see the module docstring)."""

    images: int
    unusual_share: float
    expected_share: float
    shift_score: float
    reference_shift_score: float  # the model's own val images
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "unusual_share": self.unusual_share,
            "expected_share": self.expected_share,
            "shift_score": self.shift_score,
            "reference_shift_score": self.reference_shift_score,
            "warning": self.warning,
        }

    def describe(self) -> str:
        """One or two lines for the terminal."""
        line = (
            f"familiarity: {self.unusual_share:.0%} of these {self.images} images are less typical of the training "
            f"images than {UNUSUAL_QUANTILE:.0%} of the model's own validation images (expected about "
            f"{self.expected_share:.0%}); shift score {self.shift_score:.2f} (its validation images: "
            f"{self.reference_shift_score:.2f})"
        )
        return line + (f"\nWARNING: {self.warning}" if self.warning else "")


@dataclass(frozen=True)
class FeatureStatistics:
    """Mean and principal axes of the training features, and the val split's reference values."""

    mean: torch.Tensor  # (F,)
    components: torch.Tensor  # (F, k), orthonormal columns
    eigenvalues: torch.Tensor  # (k,), descending
    residual_variance: float  # variance per axis outside the k components
    unusual_distance: float  # the UNUSUAL_QUANTILE of the val split's distances
    reference_shift_score: float  # the val split's shift score
    images: int  # training images fitted on
    # the 99th percentile of the shift score of random val subsets, per subset size (empty: no score warning)
    threshold_sizes: tuple[int, ...] = ()
    threshold_scores: tuple[float, ...] = ()

    @property
    def num_features(self) -> int:
        return int(self.mean.numel())

    def distance(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Mahalanobis distance ``(N,)`` of pooled features ``(N, F)``, divided by sqrt(F) (typical: about 1)."""
        x = _as_features(features, self.num_features) - self.mean.double()
        projected = x @ self.components.double()
        inside = (projected**2 / self.eigenvalues.double()).sum(dim=1)
        outside = ((x**2).sum(dim=1) - (projected**2).sum(dim=1)).clamp(min=0.0) / self.residual_variance
        return ((inside + outside) / self.num_features).sqrt().numpy()

    def shift_score(self, features: torch.Tensor | np.ndarray) -> float:
        """Frechet distance per axis between the features' Gaussian and the training one, top axes whitened."""
        x = _as_features(features, self.num_features)
        if x.shape[0] < 2:
            raise DataError("a shift score needs at least 2 images")
        axes = min(SHIFT_AXES, self.components.shape[1])
        z = ((x - self.mean.double()) @ self.components[:, :axes].double()) / self.eigenvalues[:axes].double().sqrt()
        mean = z.mean(dim=0)
        covariance = torch.cov(z.T).reshape(axes, axes)
        roots = torch.linalg.eigvalsh(covariance).clamp(min=0.0).sqrt()
        frechet = float((mean**2).sum() + covariance.trace() + axes - 2 * roots.sum())
        return max(frechet, 0.0) / axes

    def shift_threshold(self, count: int) -> float | None:
        """The shift score that ``count`` of the model's own val images exceed one time in a hundred
        (interpolated over the set sizes measured; None below the smallest, or without thresholds)."""
        if not self.threshold_sizes or count < self.threshold_sizes[0]:
            return None
        sizes = np.log(np.asarray(self.threshold_sizes, dtype=np.float64))
        return float(np.interp(np.log(count), sizes, np.asarray(self.threshold_scores, dtype=np.float64)))

    def shift(self, features: torch.Tensor | np.ndarray) -> ShiftVerdict:
        """The dataset-level verdict on the images whose pooled features ``(N, F)`` are given (N >= 2)."""
        distances = self.distance(features)
        count = int(distances.size)
        unusual = int((distances > self.unusual_distance).sum())
        expected = 1.0 - UNUSUAL_QUANTILE
        share = unusual / count if count else 0.0
        score = self.shift_score(features)
        threshold = self.shift_threshold(count)
        reasons = []
        if share_is_unusual(unusual, count):
            reasons.append(f"{share:.0%} of them are unusual where about {expected:.0%} is normal")
        if threshold is not None and score > threshold:
            reasons.append(f"their features are distributed unlike the training images' (shift score {score:.2f}, where "
                           f"{count} of its own validation images stay below {threshold:.2f} 99 times in 100)")
        warning = None
        if reasons:
            warning = (
                f"these images are unlike the ones this model was trained on ({'; '.join(reasons)}): another clinic, "
                "camera or population. Its figures from its own test split do not apply here; check it on labelled "
                "images of this source before relying on it"
            )
        return ShiftVerdict(count, share, expected, score, self.reference_shift_score, warning)

    def to_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers (``weights_only=True`` reads it back)."""
        return {
            "mean": self.mean.float().clone(),
            "components": self.components.float().clone(),
            "eigenvalues": self.eigenvalues.float().clone(),
            "residual_variance": float(self.residual_variance),
            "unusual_distance": float(self.unusual_distance),
            "reference_shift_score": float(self.reference_shift_score),
            "images": int(self.images),
            "threshold_sizes": [int(size) for size in self.threshold_sizes],
            "threshold_scores": [float(score) for score in self.threshold_scores],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> FeatureStatistics:
        try:
            statistics = cls(
                mean=torch.as_tensor(data["mean"], dtype=torch.float32).flatten(),
                components=torch.as_tensor(data["components"], dtype=torch.float32),
                eigenvalues=torch.as_tensor(data["eigenvalues"], dtype=torch.float32).flatten(),
                residual_variance=float(data["residual_variance"]),
                unusual_distance=float(data["unusual_distance"]),
                reference_shift_score=float(data["reference_shift_score"]),
                images=int(data["images"]),
                threshold_sizes=tuple(int(size) for size in np.asarray(data.get("threshold_sizes", ())).ravel()),
                threshold_scores=tuple(float(score) for score in np.asarray(data.get("threshold_scores", ())).ravel()),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{source}: damaged feature statistics ({error!r})") from None
        features, axes = statistics.mean.numel(), statistics.eigenvalues.numel()
        if statistics.components.shape != (features, axes) or axes < 1:
            raise CheckpointError(f"{source}: damaged feature statistics (components {tuple(statistics.components.shape)} "
                                  f"for {features} features and {axes} axes)")
        if not (statistics.residual_variance > 0 and bool((statistics.eigenvalues > 0).all())):
            raise CheckpointError(f"{source}: damaged feature statistics (variances must be > 0)")
        if len(statistics.threshold_sizes) != len(statistics.threshold_scores) or list(statistics.threshold_sizes) != sorted(set(statistics.threshold_sizes)):
            raise CheckpointError(f"{source}: damaged feature statistics (shift thresholds)")
        return statistics


def fit_feature_statistics(
    train_features: torch.Tensor | np.ndarray, val_features: torch.Tensor | np.ndarray, components: int = 128
) -> FeatureStatistics:
    """Fit on the training split's pooled features ``(N, F)``; the val split's ``(M, F)`` sets the references."""
    x = _as_features(train_features)
    count, width = x.shape
    if count < 3:
        raise DataError(f"feature statistics need at least 3 training images, got {count}")
    if components < 1:
        raise ConfigError(f"components must be >= 1, got {components}")
    mean = x.mean(dim=0)
    centred = x - mean
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    variances = singular**2 / (count - 1)
    total = float(variances.sum())
    if total <= 0:
        raise DataError("the training images' features do not vary: no statistics to fit")
    floor = total / width * 1e-3  # keeps near-empty axes from dominating the distance
    keep = max(1, min(components, width - 1, count - 1)) if width > 1 else 1
    eigenvalues = variances[:keep].clamp(min=floor)
    rest = max(width - keep, 1)
    residual = max(float(variances[keep:].sum()) / rest, floor)
    provisional = FeatureStatistics(mean, right[:keep].T.contiguous(), eigenvalues, residual, math.inf, 0.0, count)
    val = _as_features(val_features, width)
    if val.shape[0] < 2:
        raise DataError(f"feature statistics need at least 2 validation images, got {val.shape[0]}")
    unusual = float(np.quantile(provisional.distance(val), UNUSUAL_QUANTILE))
    reference = provisional.shift_score(val)
    sizes, thresholds = _shift_thresholds(provisional, val)
    return FeatureStatistics(mean.float(), right[:keep].T.contiguous().float(), eigenvalues.float(), residual, unusual,
                             reference, count, sizes, thresholds)


#: Set sizes at which the shift score of random val subsets is measured (those up to half the val split).
_THRESHOLD_SIZES = (10, 20, 50, 100, 200, 500, 1000, 2000)
_THRESHOLD_DRAWS = 200


def _shift_thresholds(statistics: FeatureStatistics, val: torch.Tensor) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The 99th percentile of the shift score of random val subsets (without replacement, seed 0) per size."""
    generator = torch.Generator().manual_seed(0)
    sizes, scores = [], []
    for size in (s for s in _THRESHOLD_SIZES if s <= val.shape[0] // 2):
        draws = [statistics.shift_score(val[torch.randperm(val.shape[0], generator=generator)[:size]]) for _ in range(_THRESHOLD_DRAWS)]
        sizes.append(size)
        scores.append(float(np.quantile(draws, 0.99)))
    return tuple(sizes), tuple(np.maximum.accumulate(np.asarray(scores)[::-1])[::-1].tolist())  # never rising with size


def has_one_backbone(model: nn.Module) -> bool:
    """Whether ``model`` has one feature space to take statistics of (a ``backbone`` module; not an ensemble)."""
    return isinstance(getattr(model, "backbone", None), nn.Module)


@contextlib.contextmanager
def capture_pooled(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, every pooled-feature batch ``(N, F)`` the model's backbone returns is appended to the list.

    The model must be a :class:`~dermlab.models.classifier.DermClassifier` (a ``backbone`` returning pooled
    features); an ensemble has no single feature space and is refused.
    """
    backbone = getattr(model, "backbone", None)
    if not has_one_backbone(model):
        raise ConfigError(f"{type(model).__name__} has no single backbone: feature statistics need one network")
    captured: list[torch.Tensor] = []
    handle = backbone.register_forward_hook(lambda _module, _inputs, output: captured.append(output.detach().float().cpu()))
    try:
        yield captured
    finally:
        handle.remove()


def _as_features(features: torch.Tensor | np.ndarray, width: int | None = None) -> torch.Tensor:
    values = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).detach()
    values = values.cpu().double()
    if values.dim() != 2 or (width is not None and values.shape[1] != width):
        expected = f"(N, {width})" if width is not None else "(N, F)"
        raise DataError(f"pooled features must have shape {expected}, got {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise DataError("pooled features hold NaN or infinite values")
    return values


def share_is_unusual(unusual: int, count: int) -> bool:
    """Whether ``unusual`` of ``count`` images beyond the val 95th percentile is clearly more than the 5% expected
    of images of the training source (a one-sided binomial test at 1%)."""
    return bool(count) and _binomial_upper_tail(unusual, count, 1.0 - UNUSUAL_QUANTILE) < _WARNING_LEVEL


def _binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p)."""
    from scipy.stats import binom

    return float(binom.sf(successes - 1, trials, p))
