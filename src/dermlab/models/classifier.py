"""The classifiers dermlab trains: a timm backbone, then dropout and a linear head; optionally metadata fusion.

``DermClassifier`` = timm backbone (``num_classes=0``, global average pooling) -> dropout -> linear head.
Keeping the head outside the backbone lets stage 1 train it on cached pooled features and lets every
backbone family be frozen, unfrozen and explained the same way. ``MetadataFusionClassifier`` (``model.
metadata_fusion: true``) keeps the backbone, and its head becomes ``Linear([dropout(pooled) ; ReLU(Linear(
metadata))])`` over the fixed encoding of :mod:`dermlab.data.metadata`. Built by
:func:`dermlab.models.factory.create_model`.

Metadata dropout (``model.metadata_dropout``): in training, each image's metadata is replaced by "all unknown"
with that probability, so the head learns what to answer when a clinic sends no age, sex or site. Without it the
"all unknown" code means whatever the few training rows without metadata were: HAM10000's 42 such rows are all
nevi or keratoses, and a model trained on it calls its own test melanomas nevi when their metadata is withheld
(measured: melanoma recall 0.461 -> 0.101; with ``metadata_dropout`` 0.25, 0.478 -> 0.410; docs/robustness.md).
"""

from __future__ import annotations

import torch
from torch import nn

from dermlab.data.metadata import METADATA_WIDTH, missing_metadata
from dermlab.errors import ConfigError

__all__ = ["DermClassifier", "MetadataFusionClassifier", "unknown_metadata_caveat", "uses_metadata", "withhold_metadata"]


class DermClassifier(nn.Module):
    """A timm backbone returning pooled features ``(N, F)``, then dropout and a linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        # timm >= 1.0: head_hidden_size is the width of what a headless model returns (it differs from
        # num_features in models with a pre-logits layer, e.g. MobileNetV3).
        self.num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        self.num_classes = num_classes
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(N, num_features)``."""
        return self.backbone(x)

    def forward_head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` from pooled features."""
        return self.head(self.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def train(self, mode: bool = True) -> DermClassifier:
        """Like ``nn.Module.train``, but BatchNorm layers frozen by ``freeze_backbone`` stay in eval mode."""
        super().train(mode)
        if mode:
            from dermlab.models.freezing import set_frozen_batchnorm_eval

            set_frozen_batchnorm_eval(self)
        return self



class MetadataFusionClassifier(DermClassifier):
    """A :class:`DermClassifier` whose head also sees encoded metadata (see the module docstring).

    ``forward(images, metadata=None)`` and ``forward_head(pooled, metadata=None)``; ``None`` means "all unknown".
    """

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0, embedding: int = 32,
                 metadata_dropout: float = 0.0) -> None:
        super().__init__(backbone, num_classes, drop_rate)
        if not 0.0 <= metadata_dropout <= 1.0:
            raise ConfigError(f"metadata_dropout must be in [0, 1], got {metadata_dropout}")
        self.metadata_dropout = metadata_dropout
        self.metadata_encoder = nn.Sequential(nn.Linear(METADATA_WIDTH, embedding), nn.ReLU())
        self.head = nn.Linear(self.num_features + embedding, num_classes)

    def forward_head(self, pooled: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if metadata is None:
            metadata = missing_metadata(pooled.shape[0])
        elif self.training and self.metadata_dropout > 0:
            metadata = withhold_metadata(metadata, self.metadata_dropout)
        embedded = self.metadata_encoder(metadata.to(device=pooled.device, dtype=pooled.dtype))
        return self.head(torch.cat([self.dropout(pooled), embedded], dim=1))

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x), metadata)


def withhold_metadata(metadata: torch.Tensor, probability: float) -> torch.Tensor:
    """``metadata`` with each row replaced by the "all unknown" code with ``probability`` (torch's global RNG)."""
    withheld = torch.rand(metadata.shape[0], device=metadata.device) < probability
    unknown = missing_metadata(metadata.shape[0]).to(device=metadata.device, dtype=metadata.dtype)
    return torch.where(withheld[:, None], unknown, metadata)


def unknown_metadata_caveat(model: nn.Module) -> str:
    """A clause for a note about images scored without metadata: empty unless ``model`` fuses metadata and never
    had it withheld in training, in which case "all unknown" answers like the training rows that lacked it."""
    if not isinstance(model, MetadataFusionClassifier) or model.metadata_dropout > 0:
        return ""
    return (
        "; it was trained without model.metadata_dropout, so it answers such images as it learned to answer its "
        "few training images without metadata (on HAM10000 all nevi or keratoses: its own test melanomas, scored "
        "without metadata, fell from 0.46 to 0.10 recall); retrain with model.metadata_dropout=0.25"
    )


def uses_metadata(model: nn.Module) -> bool:
    """Whether ``model`` takes metadata beside the images (a :class:`MetadataFusionClassifier`, or a model
    that says so, as an ensemble with a fusion member does)."""
    return isinstance(model, MetadataFusionClassifier) or bool(getattr(model, "takes_metadata", False))
