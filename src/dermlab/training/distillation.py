"""Training a student from teachers: plain distillation (one teacher) and LFME (one expert per class group).

LFME (Xiang, Ding, Han, "Learning From Multiple Experts", ECCV 2020) as built here:

- :func:`group_classes_by_count` splits the classes into ``K`` groups by training-image count (many / medium /
  few); one expert per group is an ordinary dermlab run with ``data.class_subset`` = the group's classes.
- The student's loss is ``CE(z, y) + kd_weight * sum_l w_l * T**2 * KL(softmax(z_l / T) || softmax(z[:, G_l] / T))``
  (:func:`dermlab.losses.lfme_loss`), ``z_l`` expert ``l``'s logits, ``G_l`` its classes' columns in the student.
- Self-paced expert weights (:func:`expert_weight`): after each validation, ``w_l`` is 1 while the student's
  accuracy on the val images of group ``l`` is at most ``alpha`` times the expert's, then falls linearly to 0 as
  the student reaches the expert's accuracy. The student's accuracy is its ordinary top-1 accuracy (over all
  classes) on those images, as in LFME; the expert's is within its group (it knows no other class).
- Curricula (:mod:`dermlab.training.curriculum`): instance weights from the covering expert's probability of
  the true class, or reference B's growing class-balanced subset.

Teachers never enter the student's ``state_dict``: only their run paths are in the config, so the student's
checkpoint is an ordinary checkpoint. Their logits come

- in stage 1 from cached features: once per cached view, aligned with :class:`~dermlab.training.features.
  FeatureDataset`'s flat index. When a teacher's backbone is the student's frozen backbone with the same
  preprocessing (experts trained in stage 1 only from the same weights) its logits are its head applied to
  the student's cached features: exact and free. Otherwise the teachers see the very same augmented views
  (same transform, same per-image seeds) converted to their own normalisation, and the logits are cached
  beside the features.
- in stage 2 (and stage 1 without cached features) on the fly, under ``torch.inference_mode``, from the
  student's (augmented, possibly mixed) batch converted to each teacher's normalisation by
  :func:`convert_normalisation`. Teachers with identical backbones share one backbone pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dermlab.config import Config, DistillConfig
from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import ConfigError
from dermlab.losses.distillation import group_sample_masks, lfme_loss
from dermlab.models.checkpoint import load_checkpoint, resolve_checkpoint_path
from dermlab.models.fusion import uses_metadata
from dermlab.training.curriculum import curriculum_ramp, instance_weights
from dermlab.training.features import FeatureDataset, compute_features, load_or_compute_features
from dermlab.training.module import ClassifierModule

__all__ = [
    "ClassGroup",
    "group_names",
    "group_classes_by_count",
    "convert_normalisation",
    "expert_weight",
    "Teacher",
    "TeacherBank",
    "load_teachers",
    "TeacherFeatureDataset",
    "Distillation",
    "DistillationModule",
    "create_distillation",
    "CHECKPOINT_KEY",
    "EXPERTS_FILE",
    "resolve_splits_file",
    "train_class_counts",
    "train_experts",
    "read_experts",
    "distillation_summary",
]

log = logging.getLogger(__name__)

#: where a student's checkpoint keeps the distillation state (expert weights and what they were computed from)
CHECKPOINT_KEY = "dermlab_distill"
#: the file in an experts folder that lists the groups, their runs and the split they were trained on
EXPERTS_FILE = "experts.json"


# --------------------------------------------------------------------------------------------- class groups
@dataclass
class ClassGroup:
    """One group of classes with their training-image counts, most frequent first."""

    name: str
    classes: list[str]
    counts: list[int]


def group_names(number: int) -> list[str]:
    """``many, medium, few`` for 3 groups, ``many, few`` for 2, else ``group1 ... groupK``."""
    if number == 3:
        return ["many", "medium", "few"]
    if number == 2:
        return ["many", "few"]
    return [f"group{i + 1}" for i in range(number)]


def group_classes_by_count(
    counts: Mapping[str, int],
    groups: int = 3,
    thresholds: Sequence[int] | None = None,
    min_classes: int = 2,
) -> list[ClassGroup]:
    """Split classes into groups by training-image count, most frequent group first.

    With ``thresholds`` (e.g. ``[500, 200]``): a class with ``n >= 500`` images is in the first group, ``200 <= n
    < 500`` in the second, the rest in the last. Without: natural breaks of ``log(n)`` into ``groups`` contiguous
    groups of at least ``min_classes`` classes (the split with the least within-group spread of log counts),
    since a group of one class has nothing to distil (its softmax is always 1).
    """
    ordered = sorted(counts.items(), key=lambda item: (-int(item[1]), item[0]))
    names = [name for name, _ in ordered]
    values = [int(n) for _, n in ordered]
    if thresholds is not None:
        cuts = sorted({int(t) for t in thresholds}, reverse=True)
        if len(cuts) != len(list(thresholds)) or any(t <= 0 for t in cuts):
            raise ConfigError(f"class-group thresholds must be distinct positive counts, got {list(thresholds)}")
        labels = group_names(len(cuts) + 1)
        members: list[list[int]] = [[] for _ in labels]
        for position, n in enumerate(values):
            members[sum(n < cut for cut in cuts)].append(position)
        result = [
            ClassGroup(label, [names[i] for i in idx], [values[i] for i in idx]) for label, idx in zip(labels, members)
        ]
        for group in result:
            if len(group.classes) < min_classes:
                raise ConfigError(
                    f"class group {group.name!r} (thresholds {cuts}) has {len(group.classes)} class(es) "
                    f"{group.classes}; each group needs at least {min_classes}"
                )
        return result
    if groups < 1 or groups * min_classes > len(names):
        raise ConfigError(
            f"cannot split {len(names)} classes into {groups} groups of at least {min_classes} classes"
        )
    logs = np.log(np.maximum(np.asarray(values, dtype=float), 1.0))
    bounds = _natural_breaks(logs, groups, min_classes)
    labels = group_names(groups)
    return [
        ClassGroup(label, names[start:stop], values[start:stop])
        for label, (start, stop) in zip(labels, zip([0, *bounds], [*bounds, len(names)]))
    ]


def _natural_breaks(values: np.ndarray, groups: int, min_size: int) -> list[int]:
    """Cut positions splitting sorted ``values`` into ``groups`` runs of ``>= min_size`` with least total SSE."""
    n = len(values)

    def sse(start: int, stop: int) -> float:
        part = values[start:stop]
        return float(((part - part.mean()) ** 2).sum())

    # best[k][i]: (cost, cuts) of splitting values[:i] into k runs
    best: list[dict[int, tuple[float, list[int]]]] = [{0: (0.0, [])}]
    for k in range(1, groups + 1):
        layer: dict[int, tuple[float, list[int]]] = {}
        for stop in range(k * min_size, n + 1):
            options = [
                (cost + sse(start, stop), cuts + ([start] if start > 0 else []))
                for start, (cost, cuts) in best[k - 1].items()
                if stop - start >= min_size
            ]
            if options:
                layer[stop] = min(options, key=lambda option: option[0])
        best.append(layer)
    return best[groups][n][1]


# --------------------------------------------------------------------------------------------- teachers
def convert_normalisation(inputs: torch.Tensor, source: Preprocessing, target: Preprocessing) -> torch.Tensor:
    """Re-express a batch normalised for ``source`` as ``target`` expects it: un-normalise, resize, normalise.

    Resizing (bilinear, antialiased) from the student's already-resized tensor is an approximation of the
    teacher's own resize from the original image; the rest is exact.
    """
    if source.mean == target.mean and source.std == target.std and source.input_size == target.input_size:
        return inputs
    shape = (1, 3, 1, 1)
    raw = inputs * inputs.new_tensor(source.std).view(shape) + inputs.new_tensor(source.mean).view(shape)
    if tuple(raw.shape[-2:]) != tuple(target.input_size):
        raw = F.interpolate(raw, size=tuple(target.input_size), mode="bilinear", align_corners=False, antialias=True)
    return (raw - inputs.new_tensor(target.mean).view(shape)) / inputs.new_tensor(target.std).view(shape)


def _pixel_pipeline(preprocessing: Preprocessing) -> dict[str, Any]:
    """The parts of the preprocessing that :func:`convert_normalisation` cannot translate."""
    return {k: v for k, v in preprocessing.to_dict().items() if k not in ("mean", "std", "input_size", "interpolation")}


@dataclass
class Teacher:
    """A frozen teacher network: its outputs are the student's classes ``columns`` (student indices), in order."""

    name: str
    path: Path
    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    columns: list[int]


def _teacher_name(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        return path.name
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem


def load_teachers(paths: Sequence[str | Path], student_classes: Sequence[str], method: str) -> list[Teacher]:
    """Load teacher runs (or checkpoints) and map their classes onto the student's.

    ``kd``: one teacher with exactly the student's classes (any order). ``lfme``: experts whose class sets are
    disjoint subsets of the student's classes.
    """
    if method not in ("kd", "lfme"):
        raise ConfigError(f"distill.method must be kd or lfme to load teachers, got {method!r}")
    if not paths:
        raise ConfigError(f"distill.method={method} needs distill.teachers (run folders), got none")
    if method == "kd" and len(paths) != 1:
        raise ConfigError(f"distill.method=kd takes exactly one teacher, got {len(paths)}; use lfme for several")
    student_index = {name: i for i, name in enumerate(student_classes)}
    teachers: list[Teacher] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    for path in paths:
        loaded = load_checkpoint(path)
        if uses_metadata(loaded.model):
            raise ConfigError(f"teacher {path}: a teacher with metadata fusion is not supported; use an image-only run")
        name = _teacher_name(Path(path))
        if name in names:
            name = f"{name}{len(teachers)}"
        names.add(name)
        unknown = [c for c in loaded.classes if c not in student_index]
        if unknown:
            raise ConfigError(f"teacher {path}: class {unknown[0]!r} is not one of the student's classes {list(student_classes)}")
        if method == "kd" and set(loaded.classes) != set(student_classes):
            missing = sorted(set(student_classes) - set(loaded.classes))
            raise ConfigError(f"teacher {path}: distill.method=kd needs the student's classes; it lacks {missing}")
        for class_name in loaded.classes:
            if class_name in seen:
                raise ConfigError(f"teacher {path}: class {class_name!r} is already taught by expert {seen[class_name]}")
            seen[class_name] = str(path)
        loaded.model.eval()
        for parameter in loaded.model.parameters():
            parameter.requires_grad_(False)
        teachers.append(
            Teacher(name, loaded.path, loaded.model, loaded.classes, loaded.preprocessing, [student_index[c] for c in loaded.classes])
        )
    uncovered = [c for c in student_classes if c not in seen]
    if uncovered and method == "lfme":
        log.warning("LFME: no expert covers class(es) %s; they learn from the labels only", ", ".join(uncovered))
    return teachers


def _shares_backbone(first: nn.Module, second: nn.Module) -> bool:
    """Whether two classifiers have one backbone (weights and statistics); never for an ensemble."""
    if not (hasattr(first, "backbone") and hasattr(second, "backbone")):
        return False
    return _same_weights(first.backbone, second.backbone)


def _same_weights(first: nn.Module, second: nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


class TeacherBank:
    """The teachers of one student: logits on the student's batches, on cached features, and per-sample easiness.

    Not an ``nn.Module`` on purpose: nothing of it enters the student's ``state_dict``.
    """

    def __init__(self, teachers: Sequence[Teacher], student_preprocessing: Preprocessing, num_classes: int) -> None:
        self.teachers = list(teachers)
        self.student_preprocessing = student_preprocessing
        self.num_classes = num_classes
        for teacher in self.teachers:
            if _pixel_pipeline(teacher.preprocessing) != _pixel_pipeline(student_preprocessing):
                raise ConfigError(
                    f"teacher {teacher.path}: its preprocessing {_pixel_pipeline(teacher.preprocessing)} differs from the "
                    f"student's {_pixel_pipeline(student_preprocessing)} beyond mean, std and size; it cannot be converted"
                )
        # teachers with identical backbones and preprocessing share one backbone pass
        self.families: list[list[int]] = []
        for index, teacher in enumerate(self.teachers):
            for family in self.families:
                lead = self.teachers[family[0]]
                if lead.preprocessing == teacher.preprocessing and _shares_backbone(lead.model, teacher.model):
                    family.append(index)
                    break
            else:
                self.families.append([index])
        self.sizes = [len(t.columns) for t in self.teachers]
        self.groups = [list(t.columns) for t in self.teachers]
        # student class -> (teacher, position in that teacher's outputs); -1 where no teacher covers it
        self._owner = torch.full((num_classes,), -1, dtype=torch.long)
        self._position = torch.zeros(num_classes, dtype=torch.long)
        for index, teacher in enumerate(self.teachers):
            for position, column in enumerate(teacher.columns):
                self._owner[column] = index
                self._position[column] = position

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    def to(self, device: torch.device | str) -> TeacherBank:
        for teacher in self.teachers:
            teacher.model.eval().to(device)
        return self

    def shares_backbone(self, model: nn.Module, preprocessing: Preprocessing) -> bool:
        """Whether every teacher's backbone is ``model``'s (weights and BatchNorm statistics) with the same input."""
        return all(t.preprocessing == preprocessing and _shares_backbone(t.model, model) for t in self.teachers)

    def logits(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's logits on a batch normalised for the student (ordinary tensors, no graph)."""
        with torch.inference_mode():
            outputs = self._logits(inputs)
        return [o.clone() for o in outputs]

    def _logits(self, inputs: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(self.teachers)
        for family in self.families:
            lead = self.teachers[family[0]]
            if lead.model.training:  # Lightning never reaches these modules, but a caller might have
                lead.model.eval()
            converted = convert_normalisation(inputs, self.student_preprocessing, lead.preprocessing)
            if not hasattr(lead.model, "forward_features"):  # an ensemble: the log of its members' mean probabilities
                outputs[family[0]] = lead.model(converted).float()
                continue
            pooled = lead.model.forward_features(converted)
            for index in family:
                outputs[index] = self.teachers[index].model.forward_head(pooled).float()
        return outputs  # type: ignore[return-value]

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """All teachers' logits, concatenated, from the student's pooled features ``(..., F)`` (shared backbone)."""
        with torch.inference_mode():
            flat = features.reshape(-1, features.shape[-1]).float()
            parts = []
            for teacher in self.teachers:
                head = teacher.model.head
                parts.append(teacher.model.forward_head(flat.to(head.weight.device)).float().cpu())
            packed = torch.cat(parts, dim=1)
        return packed.reshape(*features.shape[:-1], packed.shape[-1]).clone()

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Concatenated logits ``(N, sum C_l)`` back into one tensor per teacher."""
        return list(torch.split(packed, self.sizes, dim=1))

    def easiness(self, teacher_logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """The covering teacher's probability of each sample's true class; 1 where no teacher covers the class."""
        owner = self._owner.to(targets.device)[targets]
        position = self._position.to(targets.device)[targets]
        result = torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)
        for index, logits in enumerate(teacher_logits):
            mask = owner == index
            if mask.any():
                probabilities = logits[mask].float().softmax(dim=1)
                result[mask] = probabilities.gather(1, position[mask].unsqueeze(1)).squeeze(1)
        return result


class _TeacherLogitsExtractor(nn.Module):
    """Presents the teachers to :func:`compute_features`: its "features" are all teachers' logits."""

    def __init__(self, bank: TeacherBank) -> None:
        super().__init__()
        self.bank = bank
        self.networks = nn.ModuleList([t.model for t in bank.teachers])  # so .to(device) moves them
        self.num_features = sum(bank.sizes)
        self.eval()  # compute_features restores this mode afterwards: the teachers must stay in eval mode

    def forward_features(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.bank._logits(inputs), dim=1)


class TeacherFeatureDataset(Dataset):
    """A :class:`FeatureDataset`'s items with each cached view's teacher logits: ``(inputs, label, logits)``.

    ``teacher_logits`` is ``(views, N, sum C_l)``, aligned with the features' flat index ``view * N + i``.
    """

    def __init__(self, base: FeatureDataset, teacher_logits: torch.Tensor) -> None:
        if teacher_logits.dim() == 2:
            teacher_logits = teacher_logits.unsqueeze(0)
        if tuple(teacher_logits.shape[:2]) != tuple(base.features.shape[:2]):
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match features {tuple(base.features.shape)}"
            )
        self.base = base
        self.teacher_logits = teacher_logits

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        view, item = divmod(int(index), self.base.num_items)
        inputs, label = self.base[index]
        return inputs, label, self.teacher_logits[view, item]


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


# --------------------------------------------------------------------------------------------- the module
class DistillationModule(ClassifierModule):
    """:class:`ClassifierModule` whose loss adds distillation from ``distillation.bank``'s teachers.

    Batches are ``(inputs, targets)`` (teachers run on the fly) or ``(features, targets, packed_teacher_logits)``
    from :class:`TeacherFeatureDataset`. Logs ``train/ce``, ``train/distill`` and ``distill/w_<expert>``.
    """

    def __init__(self, model: nn.Module, loss: nn.Module, classes: Sequence[str], *, distillation: Distillation, **kwargs: Any) -> None:
        super().__init__(model, loss, classes, **kwargs)
        self.distillation = distillation  # a plain object: its teachers stay out of state_dict
        self.expert_weights = list(distillation.initial_weights)

    def on_fit_start(self) -> None:
        self.distillation.bank.to(self.device)

    def _ramp(self) -> float:
        config = self.distillation.config
        return curriculum_ramp(
            self.epoch_offset + self.current_epoch, self.distillation.total_epochs, config.curriculum_fraction, config.curriculum_shape
        )

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        bank = self.distillation.bank
        inputs, targets = batch[0], batch[1]
        teacher_logits = bank.split(batch[2]) if len(batch) > 2 else None
        if teacher_logits is None and self.features_input:
            raise ValueError("a features batch needs the teachers' logits (use TeacherFeatureDataset)")
        mixed = None
        mixing_active = self.mixer is not None and self.mixed_loss is not None
        if mixing_active and hasattr(self.mixer, "active"):
            mixing_active = bool(self.mixer.active(self.current_epoch, self.trainer.max_epochs))
        if mixing_active:
            mixed = self.mixer(inputs, targets)
            inputs = mixed.images
        logits = self(inputs)
        if teacher_logits is None:
            images = inputs[0] if isinstance(inputs, (tuple, list)) else inputs  # (images, metadata): fusion
            teacher_logits = bank.logits(images)  # on the very (augmented, mixed) images the student sees
        sample_weight = None
        if self.distillation.config.curriculum == "instance":
            sample_weight = instance_weights(bank.easiness(teacher_logits, targets), self._ramp())
        extra = {} if sample_weight is None else {"sample_weight": sample_weight}
        if mixed is not None:
            ce = self.mixed_loss(self.loss, logits, mixed, **extra)
        else:
            ce = self.loss(logits, targets, **extra)
        distill = self.distillation.loss(logits, teacher_logits, self.expert_weights, sample_weight, targets)
        loss = ce + self.distillation.config.kd_weight * distill
        size = len(targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/ce", ce, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/distill", distill, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self.distillation.config.method == "lfme":
            stats = self.val_stats.compute()  # (C, 5): tp, fp, tn, fn, support
            tp, support = stats[:, 0].float().cpu(), stats[:, 4].float().cpu()
            accuracies = self.distillation.expert_accuracy
            for index, group in enumerate(self.distillation.bank.groups):
                seen = float(support[group].sum())
                student = float(tp[group].sum()) / seen if seen > 0 else float("nan")
                self.expert_weights[index] = expert_weight(student, accuracies[index], self.distillation.config.alpha)
            self.log_dict(
                {f"distill/w_{name}": float(w) for name, w in zip(self.distillation.bank.names, self.expert_weights)}
            )
        super().on_validation_epoch_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
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

    # ---- the module
    def create_module(self, model: nn.Module, loss: nn.Module, classes: Sequence[str], **kwargs: Any) -> DistillationModule:
        if self.config.method == "lfme" and self.expert_accuracy is None:
            self.expert_accuracy = self._expert_accuracy_from_images()
        return DistillationModule(model, loss, classes, distillation=self, **kwargs)

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
            _TeacherLogitsExtractor(self.bank), frame, classes, transform, views=views, seed=self.seed,
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
        val = self.frame[self.frame["split"] == "val"].reset_index(drop=True)
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


# --------------------------------------------------------------------------------------------- experts
def resolve_splits_file(path: str | Path) -> Path:
    """A run folder resolves to its ``splits.csv``; a file is taken as it is."""
    path = Path(path)
    candidate = path / "splits.csv" if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"{path}: no splits.csv here (give a run folder or a splits file)")
    return candidate.resolve()


def train_class_counts(config: Config, splits_file: str | Path) -> dict[str, int]:
    """Training images per class of ``config.data.path`` under the split in ``splits_file``."""
    from dermlab.data.datasets import load_dataset
    from dermlab.data.splits import load_splits

    if not config.data.path:
        raise ConfigError("data.path is not set: pass the dataset folder")
    table = load_dataset(config.data.path, config.data)
    splits = load_splits(splits_file, table)
    train = table.frame["label"][splits.reindex(table.frame.index) == "train"]
    return {name: int((train == name).sum()) for name in table.classes}


def train_experts(
    config: Config,
    student_split: str | Path,
    out_dir: str | Path,
    groups: int = 3,
    thresholds: Sequence[int] | None = None,
    on_trained: Any = None,
) -> list[Path]:
    """Train one ordinary run per class group into ``out_dir/<group>``, all on ``student_split``'s split.

    ``config`` is the experts' recipe (``data.path`` set); each expert gets ``data.splits_file`` = the student's
    split and ``data.class_subset`` = its group. Finished experts are reused, unfinished ones resumed.
    ``on_trained(run_dir, config)`` is called after each newly trained expert (the CLI scores it there).
    Writes ``out_dir/experts.json`` and returns the expert run folders, most frequent group first.
    """
    import json

    from dermlab.config import apply_overrides
    from dermlab.io import atomic_write_json
    from dermlab.training.run import train_run

    out_dir = Path(out_dir)
    splits_file = resolve_splits_file(student_split)
    counts = train_class_counts(config, splits_file)
    class_groups = group_classes_by_count(counts, groups=groups, thresholds=thresholds)
    plan = {
        "splits_file": str(splits_file),
        "groups": [{"name": g.name, "classes": g.classes, "train_counts": g.counts} for g in class_groups],
    }
    manifest = out_dir / EXPERTS_FILE
    if manifest.is_file():
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous.get("groups") != plan["groups"] or previous.get("splits_file") != plan["splits_file"]:
            raise ConfigError(f"{manifest}: this folder holds experts of another grouping or split; pick a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, plan)
    runs = []
    for group in class_groups:
        run_dir = out_dir / group.name
        expert_config = apply_overrides(
            config,
            [
                f"data.splits_file={json.dumps(str(splits_file))}",
                f"data.class_subset={json.dumps(group.classes)}",
                "distill.method=none",
                "distill.teachers=[]",
                "distill.curriculum=none",
            ],
        )
        runs.append(run_dir)
        if (run_dir / "checkpoints" / "best.ckpt").is_file():
            log.info("expert %s: reusing %s", group.name, run_dir)
            continue
        log.info("expert %s: training on %s", group.name, ", ".join(group.classes))
        train_run(expert_config, run_dir, resume=(run_dir / "config.yaml").is_file())
        if on_trained is not None:
            on_trained(run_dir, expert_config)
    return runs


def read_experts(experts_dir: str | Path) -> tuple[list[Path], Path | None]:
    """The expert runs of an experts folder (from its ``experts.json``) and the split they were trained on."""
    import json

    experts_dir = Path(experts_dir)
    manifest = experts_dir / EXPERTS_FILE
    if not manifest.is_file():
        raise ConfigError(f"{experts_dir}: no {EXPERTS_FILE}; create the experts with `dermlab distill experts`")
    plan = json.loads(manifest.read_text(encoding="utf-8"))
    runs = [experts_dir / group["name"] for group in plan.get("groups", [])]
    for run in runs:
        resolve_checkpoint_path(run)
    splits = plan.get("splits_file")
    return runs, Path(splits) if splits else None


def distillation_summary(checkpoint_path: str | Path) -> dict[str, Any] | None:
    """The distillation state saved in a student's checkpoint (teachers, groups, expert accuracies and weights)."""
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    return checkpoint.get(CHECKPOINT_KEY)
