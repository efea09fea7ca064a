"""Metadata fusion: age, sex and localization encoded and joined with the pooled image features in the head.

``model.metadata_fusion: true`` builds a :class:`MetadataFusionClassifier`: the backbone is the same, and the
head becomes ``Linear([dropout(pooled) ; ReLU(Linear(metadata))])``. The metadata encoding is fixed (nothing is
fitted, so a checkpoint needs no extra state):

- ``age``: ``age / 100`` and a missing flag (missing: NaN, negative, or no ``age`` column);
- ``sex``: one-hot ``male`` / ``female`` and a missing flag (anything else, e.g. HAM10000's ``unknown``);
- ``localization``: one-hot over HAM10000's 14 body sites and a missing flag (``unknown``, empty, other).

A value that is missing sets only its flag, so a model trained with some missing values handles images with
none at all (``metadata=None``: every flag set), which is what ``predict`` and ``serve`` pass. The diagnosis
method (HAM10000's ``dx_type``) is never read: it is a property of the label, not of the patient.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from dermlab.config import Config
from dermlab.errors import ConfigError
from dermlab.models.factory import DermClassifier

__all__ = [
    "METADATA_COLUMNS",
    "SEXES",
    "LOCALIZATIONS",
    "METADATA_WIDTH",
    "encode_metadata",
    "missing_metadata",
    "MetadataFusionClassifier",
    "uses_metadata",
    "check_fusion_config",
]

METADATA_COLUMNS = ("age", "sex", "localization")
"""The frame columns the encoder reads; ``dx_type`` is deliberately not among them."""
SEXES = ("male", "female")
LOCALIZATIONS = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)
_AGE_SCALE = 100.0
_SEX_OFFSET = 2  # [age, age missing, male, female, sex missing, localizations..., localization missing]
_LOCALIZATION_OFFSET = _SEX_OFFSET + len(SEXES) + 1
METADATA_WIDTH = _LOCALIZATION_OFFSET + len(LOCALIZATIONS) + 1
_MISSING_FLAGS = (1, _SEX_OFFSET + len(SEXES), METADATA_WIDTH - 1)


def missing_metadata(count: int) -> torch.Tensor:
    """``(count, METADATA_WIDTH)`` encodings of images whose age, sex and localization are all unknown."""
    encoded = torch.zeros(count, METADATA_WIDTH)
    encoded[:, list(_MISSING_FLAGS)] = 1.0
    return encoded


def encode_metadata(frame: pd.DataFrame) -> torch.Tensor:
    """Float32 ``(len(frame), METADATA_WIDTH)`` encodings of the ``age``, ``sex`` and ``localization`` columns.

    Absent columns count as missing for every row; text is compared case-insensitively.
    """
    count = len(frame)
    encoded = missing_metadata(count).numpy()
    if "age" in frame:
        age = pd.to_numeric(frame["age"], errors="coerce").to_numpy(dtype=float)
        known = np.isfinite(age) & (age >= 0)
        encoded[known, 0] = np.minimum(age[known], 120.0) / _AGE_SCALE
        encoded[known, 1] = 0.0
    for column, vocabulary, offset in (("sex", SEXES, _SEX_OFFSET), ("localization", LOCALIZATIONS, _LOCALIZATION_OFFSET)):
        if column not in frame:
            continue
        values = frame[column].fillna("").astype(str).str.strip().str.lower().to_numpy()
        for position, name in enumerate(vocabulary):
            rows = values == name
            encoded[rows, offset + position] = 1.0
            encoded[rows, offset + len(vocabulary)] = 0.0  # the missing flag
    return torch.from_numpy(encoded)


def check_fusion_config(config: Config) -> None:
    """Refuse what metadata fusion does not support: Mixup / CutMix (images would mix, metadata not) and
    distillation (the teachers see images only)."""
    if not config.model.metadata_fusion:
        return
    if config.mixing.method != "none":
        raise ConfigError(f"model.metadata_fusion does not work with mixing.method={config.mixing.method!r}; set mixing.method=none")
    if config.distill.method != "none":
        raise ConfigError(f"model.metadata_fusion does not work with distill.method={config.distill.method!r}; set distill.method=none")


def uses_metadata(model: nn.Module) -> bool:
    """Whether ``model`` takes metadata beside the images (a :class:`MetadataFusionClassifier`)."""
    return isinstance(model, MetadataFusionClassifier)


class MetadataFusionClassifier(DermClassifier):
    """A :class:`DermClassifier` whose head also sees encoded metadata (see the module docstring).

    ``forward(images, metadata=None)`` and ``forward_head(pooled, metadata=None)``; ``None`` means "all unknown".
    """

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0, embedding: int = 32) -> None:
        super().__init__(backbone, num_classes, drop_rate)
        self.metadata_encoder = nn.Sequential(nn.Linear(METADATA_WIDTH, embedding), nn.ReLU())
        self.head = nn.Linear(self.num_features + embedding, num_classes)

    def forward_head(self, pooled: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if metadata is None:
            metadata = missing_metadata(pooled.shape[0])
        embedded = self.metadata_encoder(metadata.to(device=pooled.device, dtype=pooled.dtype))
        return self.head(torch.cat([self.dropout(pooled), embedded], dim=1))

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x), metadata)
