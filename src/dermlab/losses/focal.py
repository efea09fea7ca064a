"""Multi-class focal loss (Lin et al. 2017) on soft or hard targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dermlab.errors import ConfigError
from dermlab.losses.class_weights import ClassWeightSpec, resolve_class_weights
from dermlab.losses.weighted_ce import LOSSES, _TargetLoss

__all__ = ["FocalLoss"]

# (1 - p) is clamped so that p == 1 in float32 (logits far apart) gives a zero, not NaN, gradient (gamma < 1)
_MIN_COMPLEMENT = 1e-12


@LOSSES.register("focal")
class FocalLoss(_TargetLoss):
    """``-sum_c y_c * alpha_c * (1 - p_c) ** gamma * log p_c`` per sample, averaged over samples.

    ``log p`` comes from ``log_softmax`` (finite on any finite logits). ``alpha``: None, ``"inverse"``,
    ``"effective"`` (with ``beta``; both mean 1 over classes) or a list of per-class floats. Unlike the
    weighted cross-entropy, alpha is part of the per-sample loss and the batch mean divides by the number of
    samples (as in Lin et al.); with ``gamma=0`` and no alpha this is exactly cross-entropy.
    """

    def __init__(
        self,
        class_counts: Sequence[int],
        gamma: float = 2.0,
        alpha: ClassWeightSpec = None,
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(class_counts, label_smoothing)
        if float(gamma) < 0.0:
            raise ConfigError(f"loss.options.gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.class_weight = resolve_class_weights(alpha, class_counts, beta=beta, option="loss.options.alpha")

    def _per_sample(
        self, logits: torch.Tensor, soft_target: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        log_prob = F.log_softmax(logits, dim=1)
        terms = soft_target * log_prob
        if self.gamma > 0.0:
            complement = (1.0 - log_prob.exp()).clamp_min(_MIN_COMPLEMENT)
            terms = terms * complement.pow(self.gamma)
        if self.class_weight is not None:
            terms = terms * self.class_weight.to(terms)
        return -terms.sum(dim=1)
