"""The LightningModule: it receives its network and loss, and owns metrics and the optimisation schedule."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAUROC, MulticlassStatScores

from dermlab.data.datamodule import draw_seed
from dermlab.registry import Registry

__all__ = ["ClassifierModule", "LR_SCHEDULES", "LossTerm", "OPTIMIZERS", "TermStep", "cosine_with_warmup", "parameter_groups"]

#: Optimisers by name (``train.optimizer``): ``build(parameter_groups, lr, weight_decay) -> torch.optim.Optimizer``.
OPTIMIZERS: Registry[Callable[[list, float, float], torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.add("adamw", lambda groups, lr, decay: torch.optim.AdamW(groups, lr=lr, weight_decay=decay))
OPTIMIZERS.add("adam", lambda groups, lr, decay: torch.optim.Adam(groups, lr=lr, weight_decay=decay))

#: Learning-rate schedules by name (``train.scheduler``): ``schedule(total_steps, warmup_steps)`` -> the factor of
#: each optimiser step, or None for a constant rate (no scheduler; warmup does not apply).
LR_SCHEDULES: Registry[Callable[[int, int], Callable[[int], float] | None]] = Registry("learning-rate schedule")
LR_SCHEDULES.add("cosine", lambda total, warmup: lambda step: cosine_with_warmup(step, total, warmup))
LR_SCHEDULES.add("constant", lambda total, warmup: None)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the trainable parameters, with layer-wise learning-rate decay.

    ``layer_decay < 1`` (timm's ``param_groups_layer_decay`` over the backbone's own layer groups): the top
    layer group of ``model.backbone`` trains at ``lr``, each one below at ``layer_decay`` times the one above;
    everything outside the backbone (head, metadata encoder) at ``lr``. Every group keeps ``weight_decay``.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone = getattr(model, "backbone", None)
    if layer_decay >= 1.0 or backbone is None or not hasattr(backbone, "group_matcher"):
        return [{"params": trainable, "lr": lr, "weight_decay": weight_decay}]
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, weight_decay_exclude_1d=False, layer_decay=layer_decay)
    in_backbone = {id(p) for p in backbone.parameters()}
    rest = [p for p in trainable if id(p) not in in_backbone]
    out = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0), "weight_decay": weight_decay} for g in groups if g["params"]]
    if rest:
        out.append({"params": rest, "lr": lr, "weight_decay": weight_decay})
    return out


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine annealing to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TermStep:
    """What a loss term gives for one training batch: its share of the loss (already weighted), per-image
    weights for the task loss (or None), and values to log."""

    loss: torch.Tensor
    sample_weight: torch.Tensor | None = None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class LossTerm:
    """An extra term of :class:`ClassifierModule`'s training loss (e.g. distillation from teachers).

    ``step`` sees each training batch after the forward pass (the inputs the student saw, possibly mixed, its
    logits, the targets and the batch's extra items); the other hooks let a term follow validation and keep
    its state in the checkpoint. The defaults do nothing.
    """

    name = "term"

    def on_fit_start(self, module: ClassifierModule) -> None:
        pass

    def step(self, module: ClassifierModule, inputs: Any, logits: torch.Tensor, targets: torch.Tensor, extra: Sequence[torch.Tensor]) -> TermStep:
        raise NotImplementedError

    def on_validation_epoch_end(self, module: ClassifierModule, val_stats: Any) -> dict[str, float]:
        return {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        pass


class ClassifierModule(L.LightningModule):
    """Trains ``model`` (a :class:`~dermlab.models.factory.DermClassifier`) with ``loss``.

    ``features_input=True`` means batches hold pooled backbone features (cached stage 1) and only the head runs;
    with ``feature_fn`` they hold cached maps of a frozen trunk, and ``feature_fn`` (the trainable tail of the
    backbone, see :mod:`dermlab.models.trunk`) turns them into pooled features first (cached stage 2).
    ``mixer`` (from :mod:`dermlab.training.mixing`) mixes images and the loss is mixed by lambda.
    ``metadata`` is stored in every checkpoint under ``"dermlab"`` (config, classes, preprocessing).
    ``term`` (a :class:`LossTerm`, e.g. distillation) adds its share to the loss and may weight the task loss
    per image; the task loss is then logged as ``train/ce`` beside ``train/loss``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        classes: Sequence[str],
        *,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 1e-4,
        scheduler: str = "cosine",
        warmup_epochs: int = 0,
        mixer: Callable[..., Any] | None = None,
        mixed_loss: Callable[..., torch.Tensor] | None = None,
        features_input: bool = False,
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
        frozen_backbone: bool = False,
        epoch_offset: int = 0,
        feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        layer_decay: float = 1.0,
        term: LossTerm | None = None,
    ) -> None:
        super().__init__()
        self.term = term  # a plain object: a teacher it holds stays out of state_dict
        self.model = model
        self.loss = loss
        self.classes = list(classes)
        self.lr = lr
        self.optimizer_name = optimizer
        self.weight_decay = weight_decay
        self.scheduler_name = scheduler
        self.warmup_epochs = warmup_epochs
        self.mixer = mixer
        self.mixed_loss = mixed_loss
        self.features_input = features_input or feature_fn is not None
        self.feature_fn = feature_fn  # a plain function over the model's own modules: no extra state
        self.seed = seed
        self.metadata = metadata or {}
        self.frozen_backbone = frozen_backbone
        self.epoch_offset = epoch_offset  # stage 2 continues the epoch count of stage 1 in the logs
        self.layer_decay = layer_decay
        num_classes = len(self.classes)
        self.val_stats = MulticlassStatScores(num_classes=num_classes, average=None)
        self.val_auroc = MulticlassAUROC(num_classes=num_classes, average=None)

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(inputs, (tuple, list)):  # (images or features, metadata): metadata fusion
            if not self.features_input:
                return self.model(*inputs)
            return self.model.forward_head(self._pooled(inputs[0]), *inputs[1:])
        if self.features_input:
            return self.model.forward_head(self._pooled(inputs))
        return self.model(inputs)

    def _pooled(self, features: torch.Tensor) -> torch.Tensor:
        if self.feature_fn is None:
            return features
        return self.feature_fn(features.float())  # cached maps may be stored as float16

    def on_train_epoch_start(self) -> None:
        if hasattr(self.loss, "set_epoch"):  # e.g. LDAM-DRW switches on its re-weighting at a given epoch
            self.loss.set_epoch(self.epoch_offset + self.current_epoch)
        from dermlab.models.freezing import set_frozen_batchnorm_eval

        # Lightning (>= 2.2) keeps each module's mode as it finds it at the start of fit: a model put in eval mode
        # before (e.g. to cache stage 1's features) would train with its BatchNorm statistics and dropout off.
        # Train mode, then the BatchNorm layers frozen on purpose (frozen backbone, train.frozen_batchnorm) back to eval.
        self.model.train()
        set_frozen_batchnorm_eval(self.model)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # dropout and mixing draw from the global generator: key it to the step so a resumed run repeats them
        torch.manual_seed(draw_seed(self.seed, 1, self.global_step))

    # ------------------------------------------------------------------ steps
    def on_fit_start(self) -> None:
        if self.term is not None:
            self.term.on_fit_start(self)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets, extra = batch[0], batch[1], tuple(batch[2:])
        mixed = None
        mixing_active = self.mixer is not None and self.mixed_loss is not None
        if mixing_active and hasattr(self.mixer, "active"):
            mixing_active = bool(self.mixer.active(self.current_epoch, self.trainer.max_epochs))
        if mixing_active:
            mixed = self.mixer(inputs, targets)
            inputs = mixed.images
        logits = self(inputs)
        term = self.term.step(self, inputs, logits, targets, extra) if self.term is not None else None
        weight = {} if term is None or term.sample_weight is None else {"sample_weight": term.sample_weight}
        task = self.mixed_loss(self.loss, logits, mixed, **weight) if mixed is not None else self.loss(logits, targets, **weight)
        loss = task if term is None else task + term.loss
        size = len(targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        if term is not None:
            self.log("train/ce", task, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
            for key, value in term.logs.items():
                self.log(key, value, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self(inputs)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        probabilities = logits.float().softmax(dim=1)
        self.val_stats.update(probabilities, targets)
        self.val_auroc.update(probabilities, targets)
        self.log("val/loss", loss, on_step=False, on_epoch=True, batch_size=len(targets), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.term is not None:
            logs = self.term.on_validation_epoch_end(self, self.val_stats)
            if logs:
                self.log_dict(logs)
        stats = self.val_stats.compute()  # (C, 5): tp, fp, tn, fn, support
        tp, fp, _, fn, support = stats.float().unbind(dim=1)
        present = support > 0
        recall = torch.where(present, tp / support.clamp(min=1), torch.zeros_like(tp))
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
        total = support.sum().clamp(min=1)
        balanced = recall[present].mean() if present.any() else torch.tensor(0.0)
        auroc = self.val_auroc.compute()
        has_negatives = support < total
        auc_ok = present & has_negatives
        macro_auc = auroc[auc_ok].mean() if auc_ok.any() else torch.tensor(float("nan"))
        self.log_dict(
            {
                "val/accuracy": tp.sum() / total,
                "val/balanced_accuracy": balanced,
                "val/f1_macro": f1[present].mean() if present.any() else torch.tensor(0.0),
                "val/auc_macro": macro_auc,
                "run_epoch": float(self.epoch_offset + self.current_epoch),
            },
            prog_bar=True,
        )
        self.val_stats.reset()
        self.val_auroc.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        parameters = parameter_groups(self.model, self.lr, self.weight_decay, self.layer_decay)
        optimizer = OPTIMIZERS.get(self.optimizer_name)(parameters, self.lr, self.weight_decay)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        factor = LR_SCHEDULES.get(self.scheduler_name)(total_steps, self.warmup_epochs * steps_per_epoch)
        if factor is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dermlab"] = dict(self.metadata)
        if self.term is not None:
            self.term.on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.term is not None:
            self.term.on_load_checkpoint(checkpoint)
