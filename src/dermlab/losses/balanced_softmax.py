"""Balanced softmax / logit-adjusted cross-entropy, and LDAM-DRW: losses that build the class prior in."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dermlab.errors import ConfigError
from dermlab.losses.class_weights import class_priors, compute_class_weights
from dermlab.losses.weighted_ce import LOSSES, _TargetLoss, _weighted_soft_cross_entropy

__all__ = ["BalancedSoftmaxLoss", "LDAMLoss"]


@LOSSES.register("balanced_softmax")
class BalancedSoftmaxLoss(_TargetLoss):
    """Cross-entropy on ``logits + tau * log(prior)``, priors from the training-split ``class_counts``.

    With ``tau=1`` this is the Balanced Softmax of Ren et al. (2020); for any ``tau`` it is the logit-adjusted
    loss of Menon et al. (2021). The network learns prior-free (balanced) logits, so at inference the logits
    are used unadjusted. Menon et al.'s post-hoc alternative trains with plain cross-entropy and subtracts
    ``tau * log(prior)`` at inference; both target the balanced error.
    """

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__(class_counts, label_smoothing)
        if float(tau) < 0.0:
            raise ConfigError(f"loss.options.tau must be >= 0, got {tau}")
        self.tau = float(tau)
        self.register_buffer("log_prior", class_priors(class_counts).log(), persistent=False)

    def _per_sample(
        self, logits: torch.Tensor, soft_target: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        return _weighted_soft_cross_entropy(logits + self.tau * self.log_prior.to(logits), soft_target, None)


@LOSSES.register("ldam")
class LDAMLoss(_TargetLoss):
    """LDAM (Cao et al. 2019): cross-entropy on ``scale * (logits - y * margin)``, margin ∝ ``n_c ** -1/4``.

    Margins are scaled so the rarest class gets ``max_margin``; soft targets subtract ``y_c * margin_c`` from
    each class. The paper's ``scale=30`` assumes a cosine (normalised) head; a linear head wants 1.
    DRW (deferred re-weighting): from epoch ``drw_epoch`` on (None: never), effective-number class weights
    (``beta``) are applied as in the weighted cross-entropy. The training loop must call :meth:`set_epoch`.
    """

    normalise_by_class_weight = True

    def __init__(
        self,
        class_counts: Sequence[int],
        max_margin: float = 0.5,
        scale: float = 1.0,
        drw_epoch: int | None = None,
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(class_counts, label_smoothing)
        if float(max_margin) <= 0.0 or float(scale) <= 0.0:
            raise ConfigError(f"loss.options.max_margin and scale must be > 0, got {max_margin}, {scale}")
        margin = class_priors(class_counts).pow(-0.25)  # ∝ n_c ** -1/4
        self.register_buffer("margin", margin * (float(max_margin) / margin.max()), persistent=False)
        drw_weight = compute_class_weights(class_counts, "effective", beta, option="loss.options.beta")
        self.register_buffer("_drw_weight", drw_weight, persistent=False)
        self.scale = float(scale)
        self.drw_epoch = drw_epoch
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Switch the deferred re-weighting on once ``epoch >= drw_epoch``."""
        reweight = self.drw_epoch is not None and epoch >= self.drw_epoch
        self.class_weight = self._drw_weight if reweight else None

    def _per_sample(
        self, logits: torch.Tensor, soft_target: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        adjusted = self.scale * (logits - target * self.margin.to(logits))
        return _weighted_soft_cross_entropy(adjusted, soft_target, self.class_weight)
