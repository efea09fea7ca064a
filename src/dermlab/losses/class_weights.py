"""Per-class weights from training-split class counts (inverse frequency, effective number of samples)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dermlab.errors import ConfigError

__all__ = ["WEIGHT_METHODS", "compute_class_weights", "resolve_class_weights", "class_priors"]

WEIGHT_METHODS = ("inverse", "effective")
ClassWeightSpec = str | Sequence[float] | None


def _counts_tensor(class_counts: Sequence[int], option: str) -> torch.Tensor:
    counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ConfigError(f"{option}: class_counts must be a non-empty list of per-class counts")
    empty = [index for index, count in enumerate(counts.tolist()) if count <= 0]
    if empty:
        raise ConfigError(f"{option}: class(es) {empty} have no training samples; each class needs one")
    return counts


def compute_class_weights(
    class_counts: Sequence[int], method: str = "inverse", beta: float = 0.9999, option: str = "weights"
) -> torch.Tensor:
    """Per-class weights normalised so their mean over classes is 1 (float32, shape ``(C,)``).

    ``inverse``: ``n_total / n_c`` (reference B). ``effective``: ``(1 - beta) / (1 - beta ** n_c)``, the
    inverse effective number of samples of Cui et al. (2019); ``beta -> 0`` gives equal weights, ``beta -> 1``
    inverse frequency.
    """
    counts = _counts_tensor(class_counts, option)
    if method == "inverse":
        raw = counts.sum() / counts
    elif method == "effective":
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"beta must be in [0, 1) for {option}='effective', got {beta}")
        raw = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    else:
        valid = ", ".join(WEIGHT_METHODS)
        raise ConfigError(f"unknown {option} {method!r}; valid: {valid} or a list of per-class floats")
    return (raw / raw.mean()).to(torch.float32)


def resolve_class_weights(
    spec: ClassWeightSpec, class_counts: Sequence[int], beta: float = 0.9999, option: str = "weights"
) -> torch.Tensor | None:
    """A weight option as a tensor: None, a method name, or explicit per-class floats (used as given)."""
    if spec is None or spec == "none":
        return None
    if isinstance(spec, str):
        return compute_class_weights(class_counts, spec, beta=beta, option=option)
    weights = torch.as_tensor(list(spec), dtype=torch.float32)
    if weights.ndim != 1 or weights.numel() != len(class_counts):
        raise ConfigError(f"{option} must list one weight per class ({len(class_counts)}), got {list(spec)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ConfigError(f"{option} must be finite and non-negative, got {list(spec)}")
    return weights


def class_priors(class_counts: Sequence[int], option: str = "class_counts") -> torch.Tensor:
    """Class frequencies ``n_c / n_total`` of the training split (float32, sums to 1)."""
    counts = _counts_tensor(class_counts, option)
    return (counts / counts.sum()).to(torch.float32)
