"""Training: the LightningModule, cached-feature stage 1, mixing, samplers and the run orchestration."""

from dermlab.training.module import ClassifierModule, cosine_with_warmup

__all__ = ["ClassifierModule", "cosine_with_warmup"]
