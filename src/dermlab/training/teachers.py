"""Teachers of a distilled student: loading teacher runs, and their logits for the student's batches.

A teacher is a trained run (or an image-only ensemble). :class:`TeacherBank` holds the teachers and gives
their logits on the student's (augmented, possibly mixed) batch, each converted to its own normalisation by
:func:`convert_normalisation`; teachers with identical backbones share one backbone pass, and a teacher whose
backbone is the student's frozen backbone with the same preprocessing reads the student's cached features.
:class:`TeacherFeatureDataset` pairs cached feature views with the teachers' logits of the very same views.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import ConfigError
from dermlab.models.checkpoint import load_checkpoint
from dermlab.models.classifier import uses_metadata
from dermlab.data.datamodule import FeatureDataset

__all__ = [
    "convert_normalisation",
    "Teacher",
    "load_teachers",
    "TeacherBank",
    "TeacherLogitsExtractor",
    "TeacherFeatureDataset",
]

log = logging.getLogger(__name__)


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
            if teacher.preprocessing.pixel_pipeline() != student_preprocessing.pixel_pipeline():
                raise ConfigError(
                    f"teacher {teacher.path}: its preprocessing {teacher.preprocessing.pixel_pipeline()} differs from the "
                    f"student's {student_preprocessing.pixel_pipeline()} beyond mean, std and size; it cannot be converted"
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


class TeacherLogitsExtractor(nn.Module):
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
