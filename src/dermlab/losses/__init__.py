"""Losses chosen by name for long-tailed classification, and distillation losses (KD, LFME)."""

from dermlab.losses.balanced_softmax import BalancedSoftmaxLoss, LDAMLoss
from dermlab.losses.class_weights import class_priors, compute_class_weights, resolve_class_weights
from dermlab.losses.distillation import group_sample_masks, kd_loss, lfme_loss
from dermlab.losses.focal import FocalLoss
from dermlab.losses.weighted_ce import (
    LOSSES,
    CrossEntropyLoss,
    WeightedCrossEntropyLoss,
    create_loss,
    list_losses,
)

__all__ = [
    "LOSSES",
    "create_loss",
    "list_losses",
    "CrossEntropyLoss",
    "WeightedCrossEntropyLoss",
    "FocalLoss",
    "BalancedSoftmaxLoss",
    "LDAMLoss",
    "compute_class_weights",
    "resolve_class_weights",
    "class_priors",
    "kd_loss",
    "lfme_loss",
    "group_sample_masks",
]
