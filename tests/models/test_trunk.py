"""The frozen trunk / trainable tail cut: exact, per family, and refused where it cannot be made."""

from __future__ import annotations

import pytest
import timm
import torch

from dermlab.errors import ConfigError
from dermlab.models.factory import DermClassifier
from dermlab.models.freezing import freeze_backbone, unfreeze_last_blocks
from dermlab.models.trunk import split_frozen_trunk


def _model(name: str) -> DermClassifier:
    torch.manual_seed(0)
    return DermClassifier(timm.create_model(name, pretrained=False, num_classes=0), num_classes=3).eval()


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
@pytest.mark.parametrize("blocks", ["1", "2", "3"])
def test_tail_of_trunk_equals_the_backbone(name: str, blocks: str) -> None:
    model = _model(name)
    unfreeze_last_blocks(model, blocks)
    split = split_frozen_trunk(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = split.trunk(images)
        assert maps.dim() == 4  # spatial maps, not pooled features
        torch.testing.assert_close(split.tail(maps), model.forward_features(images))


def test_cut_lands_before_the_first_trainable_module_and_moves_with_unfreeze() -> None:
    model = _model("test_efficientnet")
    indices = []
    for blocks in ("1", "2", "3"):
        unfreeze_last_blocks(model, blocks)
        split = split_frozen_trunk(model)
        indices.append(split.index)
        # every parameter the trunk uses is frozen; the tail holds every trainable one
        assert 0 < split.index < split.length
    assert indices[0] > indices[1] > indices[2]


def test_nothing_or_everything_trainable_is_refused() -> None:
    model = _model("test_efficientnet")
    freeze_backbone(model)
    with pytest.raises(ConfigError, match="unfreeze"):
        split_frozen_trunk(model)
    unfreeze_last_blocks(model, "all")
    with pytest.raises(ConfigError, match="nothing to cache"):
        split_frozen_trunk(model)


def test_unsupported_family_names_the_option() -> None:
    model = _model("test_vit")
    unfreeze_last_blocks(model, "1")
    with pytest.raises(ConfigError, match="stage2_cached_views"):
        split_frozen_trunk(model)
