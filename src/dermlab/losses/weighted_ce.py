"""The loss registry, the shared target handling, and (weighted) cross-entropy.

Every loss takes ``forward(logits (N, C), target, sample_weight=None)`` where ``target`` is class indices
``(N,)`` (integer) or soft targets ``(N, C)`` (float rows summing to 1; not checked, to avoid a device sync),
and ``sample_weight`` ``(N,)`` scales each sample (curriculum). It returns one scalar, computed in float32.

Batch reduction, the same for every loss here::

    loss = sum_i s_i * l_i / sum_i s_i * v_i

with ``l_i`` the per-sample loss, ``s_i`` the sample weight (1 when not given) and ``v_i`` the class weight of
the target, ``sum_c w_c * y_ic`` (taken before label smoothing) for the class-weighted cross-entropy and
LDAM-DRW, and 1 otherwise. For hard labels this is exactly ``F.cross_entropy(weight=w, label_smoothing=...)``
with ``reduction='mean'``, which divides by ``sum_i w_{y_i}``; one-hot soft targets give the same value as
their hard labels. (PyTorch itself divides soft-target losses by N instead, so hard and soft would disagree
there.)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dermlab.errors import ConfigError
from dermlab.losses.class_weights import ClassWeightSpec, resolve_class_weights
from dermlab.registry import Registry

__all__ = ["LOSSES", "create_loss", "list_losses", "CrossEntropyLoss", "WeightedCrossEntropyLoss"]

LOSSES: Registry[type[nn.Module]] = Registry("loss")


def create_loss(name: str, class_counts: Sequence[int], **options: Any) -> nn.Module:
    """The loss registered as ``name``; ``class_counts``: training-split counts in class order."""
    loss_class = LOSSES.get(name)
    parameters = inspect.signature(loss_class).parameters
    valid = [key for key in parameters if key != "class_counts"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid)
        raise ConfigError(f"unknown loss.options {unknown} for loss {name!r}; valid options: {listed}")
    return loss_class(class_counts, **options)


def list_losses() -> list[str]:
    """Names accepted by :func:`create_loss`."""
    return LOSSES.list()


def _soft_targets(target: torch.Tensor, num_classes: int, batch_size: int) -> torch.Tensor:
    """Class indices or soft targets -> float32 ``(N, C)`` on the target's device."""
    if target.ndim == 1:
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"class-index targets must be integers, got dtype {target.dtype}")
        if target.shape[0] != batch_size:
            raise ValueError(f"target has {target.shape[0]} samples but logits have {batch_size}")
        return F.one_hot(target.long(), num_classes).to(torch.float32)
    if target.ndim == 2:
        if tuple(target.shape) != (batch_size, num_classes):
            expected = (batch_size, num_classes)
            raise ValueError(f"soft targets must have shape {expected}, got {tuple(target.shape)}")
        return target.to(torch.float32)
    raise ValueError(f"target must be class indices (N,) or soft targets (N, C), not {tuple(target.shape)}")


class _TargetLoss(nn.Module):
    """Shared forward: target conversion, label smoothing, sample weights and the batch reduction above."""

    class_weight: torch.Tensor | None
    normalise_by_class_weight = False

    def __init__(self, class_counts: Sequence[int], label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.num_classes = len(class_counts)
        if self.num_classes < 1:
            raise ConfigError("class_counts must list at least one class")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"loss.options.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        # derived from class_counts, so not saved: checkpoints stay loadable whatever loss trained them
        self.register_buffer("class_weight", None, persistent=False)

    def _per_sample(
        self, logits: torch.Tensor, soft_target: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (N, {self.num_classes}), got {tuple(logits.shape)}")
        logits = logits.float()
        soft = _soft_targets(target.to(logits.device), self.num_classes, logits.shape[0])
        smoothed = soft
        if self.label_smoothing > 0.0:
            smoothed = soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        per_sample = self._per_sample(logits, smoothed, soft)
        if self.normalise_by_class_weight and self.class_weight is not None:
            target_weight = soft @ self.class_weight.to(soft)
        else:
            target_weight = torch.ones_like(per_sample)
        if sample_weight is not None:
            sample_weight = sample_weight.to(per_sample).reshape(-1)
            if sample_weight.shape[0] != per_sample.shape[0]:
                counts = f"{sample_weight.shape[0]} entries for {per_sample.shape[0]} samples"
                raise ValueError(f"sample_weight has {counts}")
            per_sample = per_sample * sample_weight
            target_weight = target_weight * sample_weight
        total = target_weight.sum()
        # a batch whose weights are all zero gives 0 (not NaN), with a finite gradient
        return per_sample.sum() / torch.where(total > 0, total, torch.ones_like(total))


def _weighted_soft_cross_entropy(
    logits: torch.Tensor, soft: torch.Tensor, weight: torch.Tensor | None
) -> torch.Tensor:
    """``-sum_c w_c y_c log p_c`` per sample."""
    terms = soft * F.log_softmax(logits, dim=1)
    if weight is not None:
        terms = terms * weight.to(terms)
    return -terms.sum(dim=1)


@LOSSES.register("cross_entropy")
class CrossEntropyLoss(_TargetLoss):
    """Plain cross-entropy, optionally label-smoothed; ``class_counts`` only fixes the number of classes."""

    def _per_sample(
        self, logits: torch.Tensor, soft_target: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        return _weighted_soft_cross_entropy(logits, soft_target, None)


@LOSSES.register("weighted_cross_entropy")
class WeightedCrossEntropyLoss(_TargetLoss):
    """Class-weighted cross-entropy ``-sum_c w_c y_c log p_c``, divided by the targets' weights (see module).

    ``weights``: ``"inverse"`` (``n_total / n_c``, reference B), ``"effective"`` (Cui et al. 2019 with
    ``beta``), both normalised to mean 1 over classes, or an explicit list of per-class floats used as given.
    """

    normalise_by_class_weight = True

    def __init__(
        self,
        class_counts: Sequence[int],
        weights: ClassWeightSpec = "inverse",
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(class_counts, label_smoothing)
        option = "loss.options.weights"
        self.class_weight = resolve_class_weights(weights, class_counts, beta=beta, option=option)

    def _per_sample(
        self, logits: torch.Tensor, soft_target: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        return _weighted_soft_cross_entropy(logits, soft_target, self.class_weight)
