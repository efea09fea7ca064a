"""Training a student from teachers: plain distillation (one teacher) and LFME (one expert per class group).

LFME (Xiang, Ding, Han, "Learning From Multiple Experts", ECCV 2020) as built here:

- :func:`~dermlab.training.class_groups.group_classes_by_count` splits the classes into ``K`` groups by
  training-image count (many / medium / few); one expert per group is an ordinary dermlab run with
  ``data.class_subset`` = the group's classes (:mod:`dermlab.training.experts`).
- The student's loss is ``CE(z, y) + kd_weight * sum_l w_l * T**2 * KL(softmax(z_l / T) || softmax(z[:, G_l] / T))``
  (:func:`dermlab.losses.lfme_loss`), ``z_l`` expert ``l``'s logits, ``G_l`` its classes' columns in the student.
- Self-paced expert weights (:func:`expert_weight`): after each validation, ``w_l`` is 1 while the student's
  accuracy on the val images of group ``l`` is at most ``alpha`` times the expert's, then falls linearly to 0 as
  the student reaches the expert's accuracy. The student's accuracy is its ordinary top-1 accuracy (over all
  classes) on those images, as in LFME; the expert's is within its group (it knows no other class).
- Curricula (:mod:`dermlab.training.curriculum`): instance weights from the covering expert's probability of
  the true class, or reference B's growing class-balanced subset.

Teachers (:mod:`dermlab.training.teachers`) never enter the student's ``state_dict``: only their run paths are in the config, so the student's
checkpoint is an ordinary checkpoint. Their logits come

- in stage 1 from cached features: once per cached view, aligned with :class:`~dermlab.training.features.
  FeatureDataset`'s flat index. When a teacher's backbone is the student's frozen backbone with the same
  preprocessing (experts trained in stage 1 only from the same weights) its logits are its head applied to
  the student's cached features: exact and free. Otherwise the teachers see the very same augmented views
  (same transform, same per-image seeds) converted to their own normalisation, and the logits are cached
  beside the features.
- in stage 2 (and stage 1 without cached features) on the fly, under ``torch.inference_mode``, from the
  student's (augmented, possibly mixed) batch converted to each teacher's normalisation by
  :func:`~dermlab.training.teachers.convert_normalisation`. Teachers with identical backbones share one
  backbone pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermlab.config import Config, DistillConfig
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.splits import split_rows
from dermlab.errors import ConfigError
from dermlab.losses.distillation import group_sample_masks, lfme_loss
from dermlab.models.checkpoint import resolve_checkpoint_path
from dermlab.training.curriculum import curriculum_ramp, instance_weights
from dermlab.data.datamodule import FeatureDataset
from dermlab.training.features import compute_features, load_or_compute_features
from dermlab.training.module import ClassifierModule, LossTerm, TermStep
from dermlab.training.teachers import (
    TeacherBank,
    TeacherFeatureDataset,
    TeacherLogitsExtractor,
    load_teachers,
)

__all__ = [
    "expert_weight",
    "Distillation",
    "DistillationTerm",
    "create_distillation",
    "CHECKPOINT_KEY",
    "distillation_summary",
]

log = logging.getLogger(__name__)

#: where a student's checkpoint keeps the distillation state (expert weights and what they were computed from)
CHECKPOINT_KEY = "dermlab_distill"


# --------------------------------------------------------------------------------------------- schedule
def expert_weight(student_accuracy: float, expert_accuracy: float, alpha: float = 0.3) -> float:
    """LFME's self-paced weight: 1 up to ``alpha * expert``, then linear down to 0 at ``expert`` and beyond."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    if math.isnan(expert_accuracy) or math.isnan(student_accuracy):
        return 1.0  # nothing to compare (no validation image of the group): keep distilling
    if expert_accuracy <= 0.0 or student_accuracy >= expert_accuracy:
        return 0.0
    if student_accuracy <= alpha * expert_accuracy:
        return 1.0
    return (expert_accuracy - student_accuracy) / ((1.0 - alpha) * expert_accuracy)


# --------------------------------------------------------------------------------------------- the loss term
class DistillationTerm(LossTerm):
    """Distillation from ``distillation.bank``'s teachers as a term of :class:`ClassifierModule`'s loss.

    The batch's extra item, when there is one, holds the teachers' packed logits for the cached views
    (:class:`~dermlab.training.teachers.TeacherFeatureDataset`); without it the teachers see the student's very
    (augmented, possibly mixed) images. With ``distill.curriculum: instance`` the term also weights the
    task loss per image. After each validation LFME's expert weights follow the student's accuracy per group;
    they are saved in, and restored from, the checkpoint. Logs ``train/distill`` and ``distill/w_<expert>``.
    """

    name = "distill"

    def __init__(self, distillation: Distillation) -> None:
        self.distillation = distillation  # a plain object: its teachers stay out of state_dict
        self.expert_weights = list(distillation.initial_weights)

    def on_fit_start(self, module: ClassifierModule) -> None:
        self.distillation.bank.to(module.device)

    def _ramp(self, module: ClassifierModule) -> float:
        config = self.distillation.config
        return curriculum_ramp(
            module.epoch_offset + module.current_epoch, self.distillation.total_epochs, config.curriculum_fraction, config.curriculum_shape
        )

    def step(self, module: ClassifierModule, inputs: Any, logits: torch.Tensor, targets: torch.Tensor, extra: Sequence[torch.Tensor]) -> TermStep:
        bank = self.distillation.bank
        teacher_logits = bank.split(extra[0]) if extra else None
        if teacher_logits is None and module.features_input:
            raise ValueError("a features batch needs the teachers' logits (use TeacherFeatureDataset)")
        if teacher_logits is None:
            images = inputs[0] if isinstance(inputs, (tuple, list)) else inputs  # (images, metadata): fusion
            teacher_logits = bank.logits(images)  # on the very (augmented, mixed) images the student sees
        sample_weight = None
        if self.distillation.config.curriculum == "instance":
            sample_weight = instance_weights(bank.easiness(teacher_logits, targets), self._ramp(module))
        distill = self.distillation.loss(logits, teacher_logits, self.expert_weights, sample_weight, targets)
        return TermStep(self.distillation.config.kd_weight * distill, sample_weight, {"train/distill": distill})

    def on_validation_epoch_end(self, module: ClassifierModule, val_stats: Any) -> dict[str, float]:
        if self.distillation.config.method != "lfme":
            return {}
        stats = val_stats.compute()  # (C, 5): tp, fp, tn, fn, support
        tp, support = stats[:, 0].float().cpu(), stats[:, 4].float().cpu()
        accuracies = self.distillation.expert_accuracy
        for index, group in enumerate(self.distillation.bank.groups):
            seen = float(support[group].sum())
            student = float(tp[group].sum()) / seen if seen > 0 else float("nan")
            self.expert_weights[index] = expert_weight(student, accuracies[index], self.distillation.config.alpha)
        return {f"distill/w_{name}": float(w) for name, w in zip(self.distillation.bank.names, self.expert_weights)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = self.distillation.state(self.expert_weights)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state and len(state.get("expert_weights", [])) == len(self.expert_weights):
            self.expert_weights = [float(w) for w in state["expert_weights"]]


# --------------------------------------------------------------------------------------------- orchestration
class Distillation:
    """What a student run needs from its teachers; :func:`create_distillation` builds it for ``train_run``."""

    def __init__(
        self,
        config: DistillConfig,
        bank: TeacherBank,
        *,
        total_epochs: int,
        student_model: nn.Module,
        student_preprocessing: Preprocessing,
        frame: pd.DataFrame,
        classes: Sequence[str],
        eval_transform: Any,
        cache_dir: Path,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        device: str = "cpu",
    ) -> None:
        self.config = config
        self.bank = bank
        self.total_epochs = total_epochs
        self.classes = list(classes)
        self.frame = frame
        self.eval_transform = eval_transform
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        # decided now, while the student's backbone is still the frozen one stage 1 caches features of
        self.shares_backbone = bank.shares_backbone(student_model, student_preprocessing)
        self.initial_weights = [1.0] * len(bank.teachers)
        self.expert_accuracy: list[float] | None = None

    # ---- the loss
    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: Sequence[torch.Tensor],
        weights: Sequence[float],
        sample_weight: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The distillation term (before ``kd_weight``): LFME's weighted sum, or plain KD with weight 1.

        Each expert's KL is a (``sample_weight``-weighted) mean over the batch; with ``expert_samples: group``
        only over the images of the expert's own classes (``targets`` needed; 0 for a batch without any).
        """
        weights = weights if self.config.method == "lfme" else [1.0] * len(teacher_logits)
        masks: list[torch.Tensor] | None = None if sample_weight is None else [sample_weight] * len(teacher_logits)
        if self.config.expert_samples == "group":
            if targets is None:
                raise ValueError("distill.expert_samples=group needs the batch's targets")
            own = [m.float() for m in group_sample_masks(targets, self.bank.groups)]
            masks = own if masks is None else [m * w for m, w in zip(own, masks)]
        return lfme_loss(student_logits, teacher_logits, self.bank.groups, weights, self.config.temperature, masks)

    # ---- the loss term
    def create_term(self) -> DistillationTerm:
        """The term a stage's :class:`ClassifierModule` adds to its loss (each stage gets a fresh one)."""
        if self.config.method == "lfme" and self.expert_accuracy is None:
            self.expert_accuracy = self._expert_accuracy_from_images()
        return DistillationTerm(self)

    def state(self, weights: Sequence[float]) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "teachers": [str(t.path) for t in self.bank.teachers],
            "expert_names": self.bank.names,
            "expert_classes": [[self.classes[c] for c in group] for group in self.bank.groups],
            "expert_val_accuracy": list(self.expert_accuracy or []),
            "expert_weights": [float(w) for w in weights],
        }

    def load_state(self, checkpoint_path: str | Path) -> None:
        """Start the next stage from the expert weights saved in ``checkpoint_path`` (a stage-1 checkpoint)."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        state = checkpoint.get(CHECKPOINT_KEY) or {}
        weights = state.get("expert_weights")
        if weights and len(weights) == len(self.initial_weights):
            self.initial_weights = [float(w) for w in weights]
        if state.get("expert_val_accuracy") and self.expert_accuracy is None:
            self.expert_accuracy = [float(a) for a in state["expert_val_accuracy"]]

    # ---- stage 1 from cached features
    def feature_dataset(
        self,
        dataset: FeatureDataset,
        val: tuple[torch.Tensor, Sequence[int]],
        *,
        frame: pd.DataFrame,
        keep: np.ndarray,
        transform: Any,
        views: int,
    ) -> TeacherFeatureDataset:
        """``dataset`` (the stage-1 training features) with each cached view's teacher logits.

        ``val`` is the validation features and labels (for the experts' accuracy when they share the backbone).
        ``frame`` is the frame the features were computed on and ``keep`` the rows kept of it (a class-subset run
        caches the whole split), so teachers that need the images see exactly the cached views.
        """
        if self.shares_backbone:
            packed = self.bank.logits_from_features(dataset.features)
            if self.config.method == "lfme" and self.expert_accuracy is None:
                self.expert_accuracy = self._expert_accuracy(self.bank.split(self.bank.logits_from_features(val[0])[0]), list(val[1]))
        else:
            key = self._cache_key("train", frame, views, transform)
            packed = load_or_compute_features(self.cache_dir, key, lambda: self._logits_over(frame, transform, views))
            if not keep.all():
                packed = packed[:, torch.tensor(keep)]
        return TeacherFeatureDataset(dataset, packed)

    # ---- helpers
    def _logits_over(self, frame: pd.DataFrame, transform: Any, views: int) -> torch.Tensor:
        classes = sorted(frame["label"].unique())  # labels are not used, only the images
        return compute_features(
            TeacherLogitsExtractor(self.bank), frame, classes, transform, views=views, seed=self.seed,
            batch_size=self.batch_size, num_workers=self.num_workers, device=self.device,
        )

    def _cache_key(self, split: str, frame: pd.DataFrame, views: int, transform: Any) -> dict[str, Any]:
        teachers = []
        for teacher in self.bank.teachers:
            stat = teacher.path.stat()
            teachers.append([str(teacher.path.resolve()), stat.st_size, stat.st_mtime_ns])
        return {
            "kind": "teacher-logits",
            "split": split,
            "teachers": teachers,
            "student_preprocessing": self.bank.student_preprocessing.to_dict(),
            "transform": repr(transform),
            "views": views,
            "seed": self.seed,
            "images": frame["image_id"].tolist(),
        }

    def _expert_accuracy_from_images(self) -> list[float]:
        val = split_rows(self.frame, "val")
        key = self._cache_key("val", val, 1, self.eval_transform)
        packed = load_or_compute_features(self.cache_dir, key, lambda: self._logits_over(val, self.eval_transform, 1))[0]
        labels = [self.classes.index(label) for label in val["label"]]
        return self._expert_accuracy(self.bank.split(packed), labels)

    def _expert_accuracy(self, teacher_logits: Sequence[torch.Tensor], labels: Sequence[int]) -> list[float]:
        """Each expert's top-1 accuracy on the validation images of its own classes."""
        targets = torch.as_tensor(list(labels), dtype=torch.long)
        accuracies = []
        for teacher, logits in zip(self.bank.teachers, teacher_logits):
            columns = torch.as_tensor(teacher.columns)
            mask = torch.isin(targets, columns)
            if not mask.any():
                log.warning("expert %s: no validation image of its classes; its weight stays 1", teacher.name)
                accuracies.append(float("nan"))
                continue
            predicted = columns[logits[mask].argmax(dim=1).cpu()]
            accuracies.append(float((predicted == targets[mask]).float().mean()))
        for teacher, accuracy in zip(self.bank.teachers, accuracies):
            log.info("expert %s: val accuracy %.4f on %s", teacher.name, accuracy, teacher.classes)
        return accuracies


def create_distillation(
    config: Config,
    frame: pd.DataFrame,
    classes: Sequence[str],
    model: nn.Module,
    preprocessing: Preprocessing,
    eval_transform: Any,
    cache_dir: Path,
) -> Distillation | None:
    """The run's :class:`Distillation`, or ``None`` when ``distill.method`` is ``none``."""
    distill = config.distill
    if distill.method == "none":
        return None
    if distill.curriculum == "instance" and config.mixing.method != "none":
        raise ConfigError("distill.curriculum=instance weighs each image by its label: it cannot be combined with mixing")
    for path in distill.teachers:
        resolve_checkpoint_path(path)  # a missing teacher fails before any training
    teachers = load_teachers(distill.teachers, classes, distill.method)
    bank = TeacherBank(teachers, preprocessing, len(classes))
    wants_gpu = torch.cuda.is_available() and config.train.accelerator in ("auto", "gpu", "cuda")
    return Distillation(
        distill,
        bank,
        total_epochs=config.train.stage1_epochs + config.train.stage2_epochs,
        student_model=model,
        student_preprocessing=preprocessing,
        frame=frame,
        classes=classes,
        eval_transform=eval_transform,
        cache_dir=cache_dir,
        seed=config.train.seed,
        batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        device="cuda" if wants_gpu else "cpu",
    )


def distillation_summary(checkpoint_path: str | Path) -> dict[str, Any] | None:
    """The distillation state saved in a student's checkpoint (teachers, groups, expert accuracies and weights)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return checkpoint.get(CHECKPOINT_KEY)
