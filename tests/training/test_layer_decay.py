"""train.layer_decay: layer-wise learning rates, every trainable parameter in exactly one group."""

from __future__ import annotations

from dermlab.config import ModelConfig
from dermlab.models.factory import create_model
from dermlab.models.freezing import freeze_backbone, unfreeze_last_blocks
from dermlab.training.module import parameter_groups


def _model(fusion: bool = False):
    return create_model(ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32], metadata_fusion=fusion), 3)


def test_no_decay_is_one_group_at_the_base_rate() -> None:
    model = _model()
    groups = parameter_groups(model, 1e-3, 1e-4, 1.0)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert len(groups[0]["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_decay_lowers_the_rate_towards_the_stem_and_covers_every_parameter_once() -> None:
    model = _model(fusion=True)
    groups = parameter_groups(model, 1e-3, 1e-4, 0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in model.parameters() if p.requires_grad])
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    stem, head = model.backbone.conv_stem.weight, model.head.weight
    last_block = list(model.backbone.blocks[-1].parameters())[0]
    assert rate[id(head)] == 1e-3 and rate[id(model.metadata_encoder[0].weight)] == 1e-3  # outside the backbone
    assert rate[id(stem)] < rate[id(last_block)] <= 1e-3
    assert all(g["weight_decay"] == 1e-4 for g in groups)


def test_frozen_parameters_stay_out_of_every_group() -> None:
    model = _model()
    freeze_backbone(model)
    unfreeze_last_blocks(model, "2")
    groups = parameter_groups(model, 1e-3, 0.0, 0.7)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    assert all(p.requires_grad for g in groups for p in g["params"])
