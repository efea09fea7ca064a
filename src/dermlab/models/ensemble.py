"""An ensemble of trained runs as one model: the mean of the members' calibrated probabilities.

``EnsembleClassifier`` holds the members' networks and returns ``log(mean_m softmax(logits_m / T_m))``, so
everything downstream (TTA, the ensemble's own temperature, abstention, the decision rules, ONNX export)
treats it as the logits of one model. Members may differ in backbone and input size: the ensemble takes its
first member's preprocessed input and resizes and re-normalises it for each other member.

A checkpoint of an ensemble has ``model.name: ensemble`` in its config and the members' configs, classes,
preprocessing and temperatures under ``checkpoint["dermlab"]["ensemble"]``; :func:`ensemble_from_metadata`
rebuilds the architecture from them (``dermlab.models.checkpoint.load_checkpoint`` calls it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dermlab.config import config_from_dict
from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import CheckpointError

__all__ = ["ENSEMBLE_NAME", "EnsembleClassifier", "ensemble_from_metadata"]

#: the ``model.name`` of an ensemble's config
ENSEMBLE_NAME = "ensemble"


class EnsembleClassifier(nn.Module):
    """``forward(images, metadata=None)`` -> log of the members' mean calibrated probabilities ``(N, C)``.

    ``preprocessing[m]`` is member ``m``'s own; ``images`` come preprocessed as member 0 expects.
    ``temperatures[m]`` scales member ``m``'s logits before its softmax (its own fitted temperature).
    """

    def __init__(self, members: Sequence[nn.Module], preprocessing: Sequence[Preprocessing], temperatures: Sequence[float]) -> None:
        super().__init__()
        if not members or len(members) != len(preprocessing) or len(members) != len(temperatures):
            raise CheckpointError("an ensemble needs at least one member, each with its preprocessing and temperature")
        from dermlab.models.classifier import uses_metadata

        self.members = nn.ModuleList(members)
        self.member_sizes = [tuple(int(v) for v in p.input_size) for p in preprocessing]
        self.takes_metadata = any(uses_metadata(member) for member in members)
        self._member_metadata = [uses_metadata(member) for member in members]
        first = preprocessing[0]
        self.register_buffer("temperatures", torch.tensor([float(t) for t in temperatures]), persistent=False)
        # member m's input = (x * std_0 + mean_0 - mean_m) / std_m, per channel
        scale = [[s0 / sm for s0, sm in zip(first.std, p.std)] for p in preprocessing]
        shift = [[(m0 - mm) / sm for m0, mm, sm in zip(first.mean, p.mean, p.std)] for p in preprocessing]
        self.register_buffer("input_scale", torch.tensor(scale).view(len(members), 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", torch.tensor(shift).view(len(members), 3, 1, 1), persistent=False)

    def _member_input(self, index: int, images: torch.Tensor) -> torch.Tensor:
        x = images * self.input_scale[index] + self.input_shift[index]
        size = self.member_sizes[index]
        if tuple(x.shape[-2:]) != size and tuple(x.shape[-2:]) != size[::-1]:  # a rotated TTA view keeps its turn
            x = nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, images: torch.Tensor, metadata: torch.Tensor | None = None) -> torch.Tensor:
        probabilities = None
        for index, member in enumerate(self.members):
            x = self._member_input(index, images)
            logits = member(x, metadata) if self._member_metadata[index] else member(x)
            p = torch.softmax(logits.float() / self.temperatures[index], dim=1)
            probabilities = p if probabilities is None else probabilities + p
        assert probabilities is not None
        return torch.log((probabilities / len(self.members)).clamp_min(1e-12))


def ensemble_from_metadata(entry: Mapping[str, Any], num_classes: int, source: str) -> EnsembleClassifier:
    """The architecture of an ensemble checkpoint (weights not loaded) from its ``ensemble`` metadata."""
    from dermlab.models.factory import create_model

    members = entry.get("members") if isinstance(entry, Mapping) else None
    if not isinstance(members, list) or not members:
        raise CheckpointError(f"{source}: an ensemble checkpoint without its members' metadata")
    networks, preprocessing, temperatures = [], [], []
    for index, member in enumerate(members):
        try:
            config = config_from_dict(member["config"])
            if len(member["classes"]) != num_classes:
                raise ValueError(f"{len(member['classes'])} classes, the ensemble has {num_classes}")
            networks.append(create_model(config.model, num_classes, load_weights=False))
            preprocessing.append(Preprocessing.from_dict(member["preprocessing"]))
            temperatures.append(float(member.get("temperature", 1.0)))
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: damaged ensemble member {index} ({error})") from None
    return EnsembleClassifier(networks, preprocessing, temperatures)
