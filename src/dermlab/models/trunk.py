"""Split a partly frozen backbone into its frozen trunk and trainable tail, for cached stage-2 training.

With ``train.unfreeze: N`` only the last N blocks learn in stage 2, and everything before them is a fixed
function of the (augmented) image. :func:`split_frozen_trunk` cuts the backbone's forward pass at the first
module that has a trainable parameter, so ``tail(trunk(x)) == backbone(x)`` (tested). The trunk's outputs
for K augmented views per image can then be computed once, and stage 2 trains the tail over them, which on a
CPU costs a fraction of a pass through the whole network.

Supported: timm's EfficientNet family (incl. EfficientNet-Lite, MobileNet-style ``conv_stem/blocks/conv_head``)
and ResNet family (``conv1 ... layer4``). Other backbones raise a :class:`ConfigError` naming the option to
turn off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dermlab.errors import ConfigError

__all__ = ["TrunkSplit", "split_frozen_trunk", "forward_sequence"]


@dataclass
class TrunkSplit:
    """``trunk(images)`` -> intermediate maps (frozen part); ``tail(maps)`` -> pooled features ``(N, F)``."""

    trunk: Callable[[torch.Tensor], torch.Tensor]
    tail: Callable[[torch.Tensor], torch.Tensor]
    index: int  # position of the first trainable module in :func:`forward_sequence`
    length: int


def forward_sequence(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's ``forward_features`` as a flat list of modules applied in order (blocks flattened)."""
    if all(hasattr(backbone, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        blocks = [block for stage in backbone.blocks for block in (stage if isinstance(stage, nn.Sequential) else [stage])]
        return [backbone.conv_stem, backbone.bn1, *blocks, backbone.conv_head, backbone.bn2]
    if all(hasattr(backbone, name) for name in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer4")):
        layers = [getattr(backbone, f"layer{i}") for i in range(1, 5)]
        return [backbone.conv1, backbone.bn1, backbone.act1, backbone.maxpool, *[b for layer in layers for b in layer]]
    raise ConfigError(
        f"train.stage2_cached_views: cannot cut a {type(backbone).__name__} backbone into trunk and tail "
        "(EfficientNet and ResNet families only); set train.stage2_cached_views to 0"
    )


def split_frozen_trunk(model: nn.Module) -> TrunkSplit:
    """Cut ``model.backbone`` before its first module with a trainable parameter.

    The trunk runs in eval mode (its BatchNorm statistics and weights are frozen); the tail ends with the
    backbone's global pooling, so ``model.forward_head(split.tail(maps))`` gives the logits.
    """
    backbone = model.backbone
    sequence = forward_sequence(backbone)
    index = next((i for i, module in enumerate(sequence) if any(p.requires_grad for p in module.parameters())), None)
    if index is None:
        raise ConfigError("train.stage2_cached_views: no backbone block is trainable; set train.unfreeze to a number of blocks")
    if index == 0:
        raise ConfigError("train.stage2_cached_views: every backbone block is trainable, nothing to cache; unfreeze fewer blocks or set it to 0")
    head, rest = sequence[:index], sequence[index:]

    def trunk(images: torch.Tensor) -> torch.Tensor:
        for module in head:
            images = module(images)
        return images

    def tail(maps: torch.Tensor) -> torch.Tensor:
        for module in rest:
            maps = module(maps)
        return backbone.forward_head(maps, pre_logits=True)

    return TrunkSplit(trunk=trunk, tail=tail, index=index, length=len(sequence))
