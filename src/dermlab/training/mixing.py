"""Mixup and CutMix at the batch level: the loss is taken against both label sets and mixed by lambda.

One lambda and one random pairing (a permutation of the batch) per call, as in reference B. Randomness comes
from the ``generator`` given to :func:`create_mixer`, or from the global torch RNG when None (what the
training module uses: it reseeds that RNG per step, so resumed runs repeat their mixing). Lambda is drawn from
Beta(alpha, alpha) by a numpy generator seeded from the torch one, since torch's Beta sampler takes no
generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dermlab.config import MixingConfig
from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = [
    "MIXERS",
    "MixedBatch",
    "Mixer",
    "NoMixing",
    "Mixup",
    "CutMix",
    "SwitchMix",
    "create_mixer",
    "mixed_loss",
]

MIXERS: Registry[Callable[[MixingConfig, int, torch.Generator | None], "Mixer"]] = Registry("mixing method")


@dataclass
class MixedBatch:
    """Mixed images, the two label sets and the share ``lam`` of ``targets_a`` (1.0: not mixed).

    ``index`` is the permutation that paired each sample with ``images[index]`` (None when not mixed).
    """

    images: torch.Tensor
    targets_a: torch.Tensor
    targets_b: torch.Tensor
    lam: float
    index: torch.Tensor | None = None

    def soft_targets(self, num_classes: int) -> torch.Tensor:
        """``lam * one_hot(a) + (1 - lam) * one_hot(b)`` (for class-index targets)."""
        one_hot_a = F.one_hot(self.targets_a.long(), num_classes).float()
        one_hot_b = F.one_hot(self.targets_b.long(), num_classes).float()
        return self.lam * one_hot_a + (1.0 - self.lam) * one_hot_b


def mixed_loss(
    loss_fn: Callable[..., torch.Tensor],
    logits: torch.Tensor,
    batch: MixedBatch,
    sample_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lam * loss(logits, targets_a) + (1 - lam) * loss(logits, targets_b)``; one call when not mixed.

    ``sample_weight`` is passed on only when given, so plain ``nn.CrossEntropyLoss`` works too.
    """
    extra: dict[str, Any] = {} if sample_weight is None else {"sample_weight": sample_weight}
    loss_a = loss_fn(logits, batch.targets_a, **extra)
    if batch.lam >= 1.0:
        return loss_a
    return batch.lam * loss_a + (1.0 - batch.lam) * loss_fn(logits, batch.targets_b, **extra)


class Mixer:
    """Mixes a batch with probability ``prob``; inactive in the last ``stop_epochs`` epochs."""

    def __init__(
        self, prob: float = 1.0, stop_epochs: int = 0, generator: torch.Generator | None = None
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"mixing.prob must be in [0, 1], got {prob}")
        if stop_epochs < 0:
            raise ConfigError(f"mixing.stop_epochs must be >= 0, got {stop_epochs}")
        self.prob = prob
        self.stop_epochs = stop_epochs
        self.generator = generator

    def active(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether to mix in 0-based ``epoch`` of ``max_epochs``: not in the last ``stop_epochs`` epochs."""
        if max_epochs is None or max_epochs < 0:  # unbounded training: never reaches the tail
            return True
        return epoch < max_epochs - self.stop_epochs

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        if images.shape[0] < 2 or self.prob <= 0.0 or self._uniform() >= self.prob:
            return MixedBatch(images, targets, targets, 1.0)
        index = torch.randperm(images.shape[0], generator=self.generator).to(images.device)
        mixed, lam = self._mix(images, index)
        return MixedBatch(mixed, targets, targets[index], lam, index)

    def _mix(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        return images, 1.0

    # ---- random draws, all from ``self.generator`` (global torch RNG when None)
    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (), generator=self.generator))

    def _beta(self, alpha: float) -> float:
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return float(np.random.default_rng(seed).beta(alpha, alpha))


def _positive(value: float, option: str) -> float:
    if not value > 0.0:
        raise ConfigError(f"{option} must be > 0, got {value}")
    return float(value)


class NoMixing(Mixer):
    """Leaves every batch as it is (``lam = 1``)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        super().__init__(prob=0.0, generator=generator)

    def active(self, epoch: int, max_epochs: int | None) -> bool:
        return False


class Mixup(Mixer):
    """``lam * x + (1 - lam) * x[index]`` with ``lam ~ Beta(alpha, alpha)`` (Zhang et al. 2018)."""

    def __init__(self, alpha: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = _positive(alpha, "mixing.mixup_alpha")

    def _mix(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        lam = self._beta(self.alpha)
        return images * lam + images[index] * (1.0 - lam), lam


class CutMix(Mixer):
    """Pastes a box of ``x[index]`` into ``x`` (Yun et al. 2019); ``lam = 1 - box area / image area``.

    The box follows timm's ``rand_bbox`` (side ``sqrt(1 - lam)`` times the image side, centre uniform, clipped
    at the borders) and lambda is corrected to the clipped box, as timm's ``correct_lam``. It is
    re-implemented here only because timm draws from numpy's global RNG, which ``generator`` could not seed.
    """

    def __init__(self, alpha: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = _positive(alpha, "mixing.cutmix_alpha")

    def _box(self, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        centre_y, centre_x = self._randint(height), self._randint(width)
        top = min(max(centre_y - cut_h // 2, 0), height)
        bottom = min(max(centre_y + (cut_h + 1) // 2, 0), height)
        left = min(max(centre_x - cut_w // 2, 0), width)
        right = min(max(centre_x + (cut_w + 1) // 2, 0), width)
        return top, bottom, left, right

    def _mix(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        height, width = images.shape[-2:]
        top, bottom, left, right = self._box(height, width, self._beta(self.alpha))
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images[index][..., top:bottom, left:right]
        return mixed, 1.0 - (bottom - top) * (right - left) / float(height * width)


class SwitchMix(Mixer):
    """Per batch, CutMix with probability ``switch_prob``, else Mixup (timm's ``switch_prob``)."""

    def __init__(
        self, mixup_alpha: float = 0.2, cutmix_alpha: float = 1.0, switch_prob: float = 0.5, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= switch_prob <= 1.0:
            raise ConfigError(f"mixing.switch_prob must be in [0, 1], got {switch_prob}")
        self.switch_prob = switch_prob
        self.mixup = Mixup(mixup_alpha, generator=self.generator)
        self.cutmix = CutMix(cutmix_alpha, generator=self.generator)

    def _mix(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, float]:
        chosen = self.cutmix if self._uniform() < self.switch_prob else self.mixup
        return chosen._mix(images, index)


def _common(config: MixingConfig, generator: torch.Generator | None) -> dict[str, Any]:
    return {"prob": config.prob, "stop_epochs": config.stop_epochs, "generator": generator}


MIXERS.add("none", lambda config, num_classes, generator: NoMixing(generator=generator))
MIXERS.add(
    "mixup", lambda config, num_classes, generator: Mixup(config.mixup_alpha, **_common(config, generator))
)
MIXERS.add(
    "cutmix", lambda config, num_classes, generator: CutMix(config.cutmix_alpha, **_common(config, generator))
)
MIXERS.add(
    "switch",
    lambda config, num_classes, generator: SwitchMix(
        config.mixup_alpha, config.cutmix_alpha, config.switch_prob, **_common(config, generator)
    ),
)


def create_mixer(config: MixingConfig, num_classes: int, generator: torch.Generator | None = None) -> Mixer:
    """The mixer named by ``config.method`` (``none``, ``mixup``, ``cutmix``, ``switch``).

    ``generator`` seeds every draw; None uses the global torch RNG. ``num_classes`` is checked only
    (targets stay class indices; see :meth:`MixedBatch.soft_targets`).
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    try:
        factory = MIXERS.get(config.method)
    except ConfigError as error:
        raise ConfigError(f"mixing.method: {error}") from None
    return factory(config, num_classes, generator)
