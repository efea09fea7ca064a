"""Freeze the backbone for stage 1 and unfreeze its last blocks for stage 2 (reference A's schedule).

What a "block" is, for every timm family alike: one group of timm's fine-grained ``group_matcher``
(``model.group_matcher(coarse=False)``), the same ordered grouping timm uses for layer-wise learning-rate
decay. Group 0 is the stem; then, in forward order:

- ResNet: one residual block each (``layer4.2`` is the last of ResNet-50's 17 groups);
- EfficientNet: one MBConv block each, the last one together with ``conv_head`` / ``bn2``;
- DenseNet: one dense layer each (a transition joins the layer before it), ``norm5`` last;
- Inception-ResNet-v2 and others: whatever their own ``group_matcher`` defines.

A backbone without a ``group_matcher`` falls back to its top-level child modules, in order.
So ``unfreeze_last_blocks(model, "1")`` trains the head plus the deepest block.

A frozen backbone's BatchNorm layers are kept in eval mode, so their running statistics do not move
while the head trains. ``DermClassifier.train()`` re-applies this; :func:`set_frozen_batchnorm_eval`
does it for any other module tree.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dermlab.errors import ConfigError

__all__ = [
    "freeze_backbone",
    "unfreeze_last_blocks",
    "set_frozen_batchnorm_eval",
    "freeze_batchnorm_statistics",
    "list_backbone_blocks",
    "trainable_parameter_count",
]

_FROZEN_FLAG = "_dermlab_frozen"  # set on BatchNorm modules whose statistics must not move


def freeze_backbone(model: nn.Module) -> None:
    """No gradient for any backbone parameter, backbone BatchNorm in eval mode; the head stays trainable."""
    backbone = _backbone(model)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    for module in backbone.modules():
        if isinstance(module, _BatchNorm):
            setattr(module, _FROZEN_FLAG, True)
    for name, parameter in model.named_parameters():
        if not name.startswith("backbone."):
            parameter.requires_grad_(True)
    set_frozen_batchnorm_eval(model)


def unfreeze_last_blocks(model: nn.Module, spec: str | int) -> None:
    """Make exactly the head and the last ``spec`` backbone blocks trainable (``"all"``: everything).

    A number larger than the backbone's block count unfreezes the whole backbone.
    """
    text = str(spec).strip()
    if text == "all":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        for module in _backbone(model).modules():
            if isinstance(module, _BatchNorm) and hasattr(module, _FROZEN_FLAG):
                delattr(module, _FROZEN_FLAG)
        return
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"unfreeze must be 'all' or a positive number of blocks, got {spec!r}")
    freeze_backbone(model)
    backbone = _backbone(model)
    parameters = dict(backbone.named_parameters())
    trainable = {name for block in list_backbone_blocks(model)[-int(text):] for name in block}
    for name in trainable:
        parameters[name].requires_grad_(True)
    for module in backbone.modules():
        if isinstance(module, _BatchNorm) and any(p.requires_grad for p in module.parameters(recurse=False)):
            if hasattr(module, _FROZEN_FLAG):
                delattr(module, _FROZEN_FLAG)
            module.train(model.training)


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Keep every backbone BatchNorm layer in eval mode (running statistics as they are) while its scale and
    shift stay as trainable as they were (``train.frozen_batchnorm``)."""
    for module in _backbone(model).modules():
        if isinstance(module, _BatchNorm):
            setattr(module, _FROZEN_FLAG, True)
    set_frozen_batchnorm_eval(model)


def set_frozen_batchnorm_eval(model: nn.Module) -> None:
    """Put BatchNorm layers frozen by :func:`freeze_backbone` back in eval mode (call after ``.train()``)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm) and getattr(module, _FROZEN_FLAG, False):
            module.eval()


def list_backbone_blocks(model: nn.Module) -> list[list[str]]:
    """The backbone's blocks in forward order, each as its parameter names (relative to the backbone)."""
    backbone = _backbone(model)
    try:
        matcher = backbone.group_matcher(coarse=False)
    except (AttributeError, NotImplementedError):
        matcher = None
    if matcher is not None:
        from timm.models import group_parameters

        groups = group_parameters(backbone, matcher)
        return [list(groups[key]) for key in sorted(groups) if groups[key]]
    blocks = []
    for child_name, child in backbone.named_children():
        names = [f"{child_name}.{name}" for name, _ in child.named_parameters()]
        if names:
            blocks.append(names)
    return blocks


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters that receive gradients."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no .backbone module; expected a DermClassifier")
    return backbone
