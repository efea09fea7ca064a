"""The exponential moving average of the weights (``train.ema``), as Lightning's ``EMAWeightAveraging``.

Lightning's callback does the work: it validates with the averaged weights, writes them to every checkpoint's
``state_dict`` (so ``best.ckpt``, the ONNX export and the service all use the average) and keeps the raw
weights under ``current_model_state`` (read by ``dermlab evaluate --weights raw``), and it resumes both. What it
does not know is the run's length: here the decay is sized so that its half-life is ``train.ema_half_life`` of
the stage's optimiser steps, ``decay = 0.5 ** (1 / (half_life * steps))``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

__all__ = ["RunSizedEMA", "ema_decay"]


def ema_decay(total_steps: int, half_life: float) -> float:
    """The per-step decay whose half-life is ``half_life`` (a share in (0, 1]) of ``total_steps`` steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 < half_life <= 1.0:
        raise ValueError(f"half_life must be in (0, 1], got {half_life}")
    return 0.5 ** (1.0 / max(1.0, half_life * total_steps))


class RunSizedEMA(EMAWeightAveraging):
    """``EMAWeightAveraging`` whose decay is set from the trainer's step count when fitting starts."""

    def __init__(self, half_life: float) -> None:
        super().__init__(decay=0.999, use_buffers=True)
        self.half_life = half_life
        self.decay: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            estimate = float(trainer.estimated_stepping_batches)
            steps = int(estimate) if math.isfinite(estimate) and estimate >= 1 else 1
            self.decay = ema_decay(steps, self.half_life)
            self._kwargs["avg_fn"] = get_ema_avg_fn(decay=self.decay)
        super().setup(trainer, pl_module, stage)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self.decay}
