"""Freezing for stage 1, unfreezing the last N blocks for stage 2, across backbone families."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dermlab.config import ModelConfig
from dermlab.errors import ConfigError
from dermlab.models import (
    DermClassifier,
    create_model,
    freeze_backbone,
    list_backbone_blocks,
    set_frozen_batchnorm_eval,
    trainable_parameter_count,
    unfreeze_last_blocks,
)


def _model(name: str = "resnet18") -> DermClassifier:
    torch.manual_seed(0)
    return create_model(ModelConfig(name=name, drop_rate=0.0, weights="none"), num_classes=3)


def _backbone_batchnorms(model: DermClassifier) -> list[_BatchNorm]:
    return [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]


def test_frozen_backbone_does_not_move_during_an_optimizer_step() -> None:
    model = _model()
    freeze_backbone(model)
    model.train()  # must not put the frozen BatchNorm layers back in training mode
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics
    assert not torch.equal(head_before, model.head.weight)
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.head.parameters())


def test_frozen_batchnorm_stays_in_eval_after_train() -> None:
    model = _model()
    freeze_backbone(model)
    nn.Sequential(model).train()  # as a LightningModule would, through a parent module
    assert not any(bn.training for bn in _backbone_batchnorms(model))
    assert model.head.training and model.dropout.training
    for bn in _backbone_batchnorms(model):
        bn.train()  # plain nn.Module.train on the layers themselves ...
    set_frozen_batchnorm_eval(model)  # ... is undone by the explicit call
    assert not any(bn.training for bn in _backbone_batchnorms(model))


def test_unfreezing_more_blocks_trains_more_parameters() -> None:
    model = _model()
    freeze_backbone(model)
    head_only = trainable_parameter_count(model)
    counts = []
    for spec in ("1", "2", "3"):
        unfreeze_last_blocks(model, spec)
        counts.append(trainable_parameter_count(model))
    assert head_only < counts[0] < counts[1] < counts[2]
    unfreeze_last_blocks(model, "1")
    assert model.backbone.layer4[1].conv1.weight.requires_grad  # the deepest residual block
    assert not model.backbone.layer4[0].conv1.weight.requires_grad
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert model.backbone.layer4[1].bn1.training and not model.backbone.layer4[0].bn1.training


def test_unfreeze_all_and_more_blocks_than_exist() -> None:
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    freeze_backbone(model)
    unfreeze_last_blocks(model, "all")
    assert trainable_parameter_count(model) == total
    model.train()
    assert all(bn.training for bn in _backbone_batchnorms(model))
    freeze_backbone(model)
    unfreeze_last_blocks(model, 1000)
    assert trainable_parameter_count(model) == total


@pytest.mark.parametrize("spec", ["0", "-1", "last", ""])
def test_bad_unfreeze_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="unfreeze"):
        unfreeze_last_blocks(_model("test_resnet"), spec)


@pytest.mark.parametrize(
    ("name", "last_block_param"),
    [
        ("resnet50", "layer4.2.conv3.weight"),  # a bottleneck block
        ("efficientnet_b0", "conv_head.weight"),  # the last MBConv block with the head conv
        ("densenet121", "features.norm5.weight"),  # dense layers, then the final norm
        ("inception_resnet_v2", "conv2d_7b.conv.weight"),  # timm's own grouping for this family
    ],
)
def test_blocks_are_generic_across_families(name: str, last_block_param: str) -> None:
    with torch.device("meta"):
        model = create_model(ModelConfig(name=name, weights="none"), num_classes=3)
    blocks = list_backbone_blocks(model)
    names = [n for n, _ in model.backbone.named_parameters()]
    assert sorted(n for block in blocks for n in block) == sorted(names)  # a partition of the backbone
    assert names[0] in blocks[0]  # the stem comes first
    assert last_block_param in blocks[-1]
    counts = []
    for spec in ("1", "2", "3"):
        unfreeze_last_blocks(model, spec)
        counts.append(trainable_parameter_count(model))
    assert counts[0] < counts[1] < counts[2]


def test_each_training_epoch_starts_in_train_mode_whatever_mode_the_model_was_left_in() -> None:
    """Lightning keeps the modes it finds at fit start: a model left in eval mode (as after an earlier stage)
    once trained with its BatchNorm statistics frozen and dropout off. Frozen layers stay frozen on purpose."""
    from torch import nn

    from dermlab.config import ModelConfig
    from dermlab.models.factory import create_model
    from dermlab.models.freezing import freeze_batchnorm_statistics
    from dermlab.training.module import ClassifierModule

    model = create_model(ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]), 2, load_weights=False)
    module = ClassifierModule(model, nn.CrossEntropyLoss(), ["a", "b"])
    model.eval()
    module.on_train_epoch_start()
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert model.training and model.dropout.training and all(m.training for m in norms)
    freeze_batchnorm_statistics(model)
    model.eval()
    module.on_train_epoch_start()
    assert model.training and model.dropout.training and not any(m.training for m in norms)
    assert all(p.requires_grad for m in norms for p in m.parameters())  # scale and shift still train
