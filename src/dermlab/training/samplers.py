"""Class-aware sampling with replacement: class-balanced or square-root-frequency epochs.

:class:`ClassPowerSampler` draws each epoch's indices so that class ``c`` is drawn with probability
proportional to ``n_c ** power`` (0: balanced, 0.5: square root, 1: the natural frequencies), samples
uniformly within a class. The draw depends only on ``seed`` and the epoch given to
:meth:`~ClassPowerSampler.set_epoch` (Lightning calls it at every epoch start), never on the global RNG, so
every process draws the same list.

DDP: with ``use_distributed_sampler=True`` Lightning wraps this sampler in ``DistributedSamplerWrapper``,
which materialises the sampler's list (the same on every rank, by the above) and hands each rank a disjoint
share of its positions; ``set_epoch`` is forwarded to this sampler. It therefore needs finite ``__len__`` and
``__iter__`` yielding dataset indices, which it has.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = ["SAMPLERS", "ClassPowerSampler", "create_sampler", "class_sampling_probabilities"]

# name -> power of the class count (None: the DataLoader's ordinary shuffle)
SAMPLERS: Registry[float | None] = Registry("sampler")
SAMPLERS.add("none", None)
SAMPLERS.add("balanced", 0.0)
SAMPLERS.add("sqrt", 0.5)


def class_sampling_probabilities(labels: Sequence[int], power: float) -> dict[int, float]:
    """Probability of drawing each class present in ``labels``: ``n_c ** power / sum_k n_k ** power``."""
    classes, counts = torch.unique(torch.as_tensor(list(labels), dtype=torch.long), return_counts=True)
    mass = counts.double().pow(power)
    return dict(zip(classes.tolist(), (mass / mass.sum()).tolist()))


class ClassPowerSampler(Sampler[int]):
    """``num_samples`` indices per epoch, with replacement; class ``c`` has probability ∝ ``n_c**power``."""

    def __init__(
        self, labels: Sequence[int], power: float, num_samples: int | None = None, seed: int = 0
    ) -> None:
        label_tensor = torch.as_tensor(list(labels), dtype=torch.long)
        if label_tensor.ndim != 1 or label_tensor.numel() == 0:
            raise ConfigError("sampler needs a non-empty list of training labels")
        self.num_samples = len(label_tensor) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ConfigError(f"sampler num_samples must be >= 1, got {num_samples}")
        _, inverse, counts = torch.unique(label_tensor, return_inverse=True, return_counts=True)
        class_mass = counts.double().pow(power)
        # each sample carries its class's probability shared among the class's samples
        self.weights = (class_mass / counts.double())[inverse]
        self.power = power
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw :meth:`__iter__` yields (a fresh, reproducible reshuffle per epoch)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        drawn = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        return iter(drawn.tolist())

    def __len__(self) -> int:
        return self.num_samples


def create_sampler(
    labels: Sequence[int], kind: str = "none", num_samples: int | None = None, seed: int = 0
) -> ClassPowerSampler | None:
    """``none`` -> None (shuffle as usual); ``balanced`` / ``sqrt`` -> a :class:`ClassPowerSampler`.

    ``num_samples`` defaults to ``len(labels)`` (one epoch is as long as the training split).
    """
    power = SAMPLERS.get(kind)
    if power is None:
        return None
    return ClassPowerSampler(labels, power, num_samples=num_samples, seed=seed)
