"""A run as a list of declared stages: what each trains, on what inputs, for how long, with which settings.

:func:`plan_stages` turns the ``train`` section into the stages :func:`dermlab.training.run.train_run` walks:

- ``stage1``, the head (and the metadata fusion) with the backbone frozen: a linear probe, on cached pooled
  features of ``train.feature_views`` augmented views (``train.cached_features``) or on pixels;
- ``stage2``, the last ``train.unfreeze`` block groups (or all), on pixels with a fresh augmentation every epoch,
  or over cached maps of the frozen trunk (``train.stage2_cached_views``), starting from stage 1's best head.

What a stage mixes is said in its description: images, the pooled features of a cached linear probe (Mixup
only; ``dermlab.training.checks.check_combinations`` refuses CutMix there) or the trunk maps, and nothing in stage 1
with ``mixing.stage1: false``. Only a stage on pixels averages its weights (EMA) or decays the learning rate
by layer. :data:`STAGE_INPUTS` is the one list of input kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dermlab.config import Config

__all__ = ["STAGE_INPUTS", "Stage", "plan_stages"]

StageInputs = Literal["pixels", "features", "trunk"]

#: where a stage's training inputs come from -> what that means, for descriptions and errors
STAGE_INPUTS: dict[str, str] = {
    "pixels": "images, a fresh augmentation every epoch",
    "features": "cached pooled features of the frozen backbone",
    "trunk": "cached output maps of the frozen trunk",
}


@dataclass(frozen=True)
class Stage:
    """One stage of a run; ``name`` is also its checkpoint folder (``checkpoints/<name>``)."""

    name: str
    inputs: StageInputs
    epochs: int
    lr: float
    batch_size: int
    epoch_offset: int  # run epochs before this stage (schedules and curricula continue across stages)
    unfreeze: str | None  # None: the backbone stays frozen (the head alone trains); else train.unfreeze
    views: int = 0  # augmented views cached per training image (features / trunk inputs)
    mixing: str = "none"  # the mixing.method applied in this stage
    ema: bool = False
    ema_half_life: float = 0.1
    layer_decay: float = 1.0
    frozen_batchnorm: bool = False  # the backbone's BatchNorm statistics stay as loaded (train.frozen_batchnorm)

    @property
    def frozen_backbone(self) -> bool:
        return self.unfreeze is None

    def trainable(self) -> str:
        if self.unfreeze is None:
            return "the head (backbone frozen)"
        return "the whole network" if self.unfreeze == "all" else f"the last {self.unfreeze} block groups and the head"

    def describe(self, mixing_method: str = "none") -> str:
        """One line for the console and metrics.json, e.g. ``stage2: the whole network on images, ...``."""
        inputs = STAGE_INPUTS[self.inputs] + (f" ({self.views} view{'s' if self.views != 1 else ''})" if self.inputs != "pixels" else "")
        parts = [f"{self.name}: {self.trainable()} on {inputs}", f"{self.epochs} epochs", f"lr {self.lr:g}", f"batch {self.batch_size}"]
        if self.mixing != "none":
            parts.append(self.mixing + {"pixels": "", "features": " of the pooled features", "trunk": " of the trunk maps"}[self.inputs])
        elif mixing_method != "none":
            parts.append(f"no {mixing_method} (mixing.stage1 is off)")
        if self.ema:
            parts.append(f"EMA of the weights (half-life {self.ema_half_life:g} of the stage's steps)")
        if self.layer_decay < 1.0:
            parts.append(f"layer-wise lr decay {self.layer_decay:g}")
        if self.frozen_batchnorm and not self.frozen_backbone:
            parts.append("BatchNorm statistics frozen as loaded")
        return ", ".join(parts)


def plan_stages(config: Config) -> list[Stage]:
    """The stages ``config`` asks for, in order (combinations that cannot run are refused by
    :func:`dermlab.training.checks.check_combinations` before this)."""
    train, mixing = config.train, config.mixing.method
    augmented = config.data.augmentation != "none"
    stages = []
    if train.stage1_epochs > 0:
        cached = train.cached_features
        stages.append(Stage(
            name="stage1",
            inputs="features" if cached else "pixels",
            epochs=train.stage1_epochs,
            lr=train.stage1_lr,
            batch_size=config.data.batch_size,
            epoch_offset=0,
            unfreeze=None,
            views=(train.feature_views if augmented else 1) if cached else 0,
            mixing=mixing if config.mixing.stage1 else "none",
        ))
    if train.stage2_epochs > 0:
        trunk = train.stage2_cached_views > 0
        stages.append(Stage(
            name="stage2",
            inputs="trunk" if trunk else "pixels",
            epochs=train.stage2_epochs,
            lr=train.stage2_lr,
            batch_size=train.stage2_batch_size or config.data.batch_size,
            epoch_offset=train.stage1_epochs,
            unfreeze=train.unfreeze,
            views=(train.stage2_cached_views if augmented else 1) if trunk else 0,
            mixing=mixing,
            ema=train.ema,
            ema_half_life=train.ema_half_life,
            layer_decay=train.layer_decay,
            frozen_batchnorm=train.frozen_batchnorm,
        ))
    return stages
