"""Curricula: easy instances first (LFME's instance weighting) and reference B's growing class-balanced subset.

Both follow the same ramp ``r(t)`` over the first ``fraction`` of training, ``t = epoch / (fraction * epochs)``
clipped to ``[0, 1]`` (epochs count over both stages, so stage 2 continues where stage 1 left off):

- ``linear``: ``r = t``; ``convex``: ``r = 1 - cos(pi t / 2)`` (slow start); ``concave``: ``r = log2(1 + t)``
  (fast start). These are the three schedules of LFME's code (its instance weights ``w + (1 - w) r``).

Instance weights are ``r + (1 - r) * easiness``, with ``easiness`` in ``[0, 1]`` the teacher's (expert's)
probability of the true class: at the start an instance counts as much as the teacher is sure of it, at the
end of the ramp every instance counts 1. The losses normalise by the sum of the weights, so the curriculum
changes the emphasis, not the scale of the loss.

:class:`BalancedSubsetSampler` starts each class at ``min(n_c, n_min)`` images (``n_min`` the smallest class)
and adds the rest of each class as ``r`` grows, so after the ramp it draws every image. The images kept are a
fixed seeded order per class, so the subset only ever grows. Every epoch has the same length (the training set
size) so learning-rate schedules and step counts are those of an ordinary run: early epochs revisit the small
balanced subset several times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from dermlab.config import Config
from dermlab.data.datamodule import draw_seed
from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = [
    "CURRICULUM_SHAPES",
    "curriculum_ramp",
    "instance_weights",
    "BalancedSubsetSampler",
    "create_curriculum_sampler",
]

CURRICULUM_SHAPES: Registry[Callable[[float], float]] = Registry("curriculum shape")
CURRICULUM_SHAPES.add("linear", lambda t: t)
CURRICULUM_SHAPES.add("convex", lambda t: 1.0 - math.cos(math.pi * t / 2.0))
CURRICULUM_SHAPES.add("concave", lambda t: math.log2(1.0 + t))


def curriculum_ramp(epoch: int, total_epochs: int, fraction: float = 0.5, shape: str = "linear") -> float:
    """``r`` in ``[0, 1]`` at the start of 0-based ``epoch``: 0 at epoch 0, 1 from ``fraction * total_epochs`` on."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"distill.curriculum_fraction must be in (0, 1], got {fraction}")
    ramp_epochs = fraction * max(1, total_epochs)
    progress = min(1.0, max(0.0, epoch / ramp_epochs))
    return float(CURRICULUM_SHAPES.get(shape)(progress))


def instance_weights(easiness: torch.Tensor, ramp: float) -> torch.Tensor:
    """``ramp + (1 - ramp) * easiness`` per sample; ``easiness`` (e.g. the teacher's true-class probability)."""
    if not 0.0 <= ramp <= 1.0:
        raise ValueError(f"curriculum ramp must be in [0, 1], got {ramp}")
    return ramp + (1.0 - ramp) * easiness.detach().float().clamp(0.0, 1.0)


class BalancedSubsetSampler(Sampler[int]):
    """Draws from a class-balanced subset that grows to the whole training set over the curriculum ramp.

    ``epoch_offset`` is the run epoch at which this stage starts (stage 2 continues stage 1's ramp);
    :meth:`set_epoch` takes the stage's own epoch, as Lightning passes it.
    """

    def __init__(
        self,
        labels: Sequence[int],
        total_epochs: int,
        fraction: float = 0.5,
        shape: str = "linear",
        epoch_offset: int = 0,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
        if label_tensor.ndim != 1 or label_tensor.numel() == 0:
            raise ConfigError("the balanced-subset curriculum needs a non-empty list of training labels")
        CURRICULUM_SHAPES.get(shape)  # an unknown shape fails now, not at the first epoch
        self.total_epochs = total_epochs
        self.fraction = fraction
        self.shape = shape
        self.epoch_offset = epoch_offset
        self.num_samples = len(label_tensor) if num_samples is None else int(num_samples)
        self.seed = seed
        self.epoch = 0
        # one fixed order per class: the subset of size k is always the first k of it, so it only grows
        generator = torch.Generator().manual_seed(draw_seed(seed, 5))
        self._class_orders: dict[int, torch.Tensor] = {}
        for label in torch.unique(label_tensor).tolist():
            members = torch.nonzero(label_tensor == label).flatten()
            self._class_orders[int(label)] = members[torch.randperm(len(members), generator=generator)]
        self._smallest = min(len(order) for order in self._class_orders.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset_sizes(self, epoch: int | None = None) -> dict[int, int]:
        """Images of each class in the subset at stage epoch ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        ramp = curriculum_ramp(self.epoch_offset + epoch, self.total_epochs, self.fraction, self.shape)
        return {
            label: int(round(self._smallest + ramp * (len(order) - self._smallest)))
            for label, order in self._class_orders.items()
        }

    def subset(self, epoch: int | None = None) -> torch.Tensor:
        """The dataset indices in the subset at stage epoch ``epoch``."""
        sizes = self.subset_sizes(epoch)
        return torch.cat([order[: sizes[label]] for label, order in self._class_orders.items()])

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        pool = self.subset()
        generator = torch.Generator().manual_seed(draw_seed(self.seed, 6, self.epoch_offset + self.epoch))
        repeats = -(-self.num_samples // len(pool))
        order = torch.cat([pool[torch.randperm(len(pool), generator=generator)] for _ in range(repeats)])
        return iter(order[: self.num_samples].tolist())


def create_curriculum_sampler(
    config: Config, labels: Sequence[int], base: Sampler[int] | None, epoch_offset: int = 0
) -> Sampler[int] | None:
    """``base`` unless ``distill.curriculum`` is ``balanced_subset``, which replaces the class sampler."""
    if config.distill.curriculum != "balanced_subset":
        return base
    if config.data.sampler != "none":
        raise ConfigError(
            f"distill.curriculum=balanced_subset chooses the training images itself; set data.sampler=none "
            f"(got {config.data.sampler!r})"
        )
    return BalancedSubsetSampler(
        labels,
        total_epochs=config.train.stage1_epochs + config.train.stage2_epochs,
        fraction=config.distill.curriculum_fraction,
        shape=config.distill.curriculum_shape,
        epoch_offset=epoch_offset,
        seed=config.train.seed,
    )
