"""Augmentation presets and the train / eval transforms built from a Preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dermlab.data import transforms
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.transforms import AUGMENTATIONS, create_transform
from dermlab.errors import ConfigError
from dermlab.registry import Registry

PRESETS = ["clinical", "derm", "derm-robust", "none", "reference-a", "reference-b"]


@pytest.fixture
def image() -> Image.Image:
    """A 4:3 RGB photo-sized stand-in (60x45, like HAM10000's 600x450)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8), mode="RGB")


def _preprocessing(size: tuple[int, int] = (32, 32), **options: object) -> Preprocessing:
    return Preprocessing(input_size=size, mean=(0.6, 0.5, 0.4), std=(0.2, 0.25, 0.3), **options)


def test_registry_holds_the_presets() -> None:
    assert AUGMENTATIONS.list() == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [(32, 32), (24, 32)])  # square and 3:4 (height, width)
def test_output_shape_and_dtype(image: Image.Image, preset: str, train: bool, size: tuple[int, int]) -> None:
    out = create_transform(preset, _preprocessing(size), train=train)(image)
    assert type(out) is torch.Tensor
    assert out.shape == (3, *size) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_eval_is_deterministic_and_ignores_the_preset(image: Image.Image, preset: str) -> None:
    preprocessing = _preprocessing((24, 32))
    first = create_transform(preset, preprocessing, train=False)(image)
    assert torch.equal(first, create_transform(preset, preprocessing, train=False)(image))
    assert torch.equal(first, create_transform("none", preprocessing, train=False)(image))


def test_none_equals_a_manual_resize_and_normalise(image: Image.Image) -> None:
    preprocessing = _preprocessing((24, 32))
    resized = np.asarray(image.resize((32, 24), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array(preprocessing.mean), np.array(preprocessing.std)
    expected = torch.from_numpy(((resized - mean) / std).transpose(2, 0, 1).astype(np.float32))
    for train in (False, True):
        out = create_transform("none", preprocessing, train=train)(image)
        assert torch.allclose(out, expected, atol=1e-6)


def test_train_augmentation_is_random_but_seedable(image: Image.Image) -> None:
    transform = create_transform("derm", _preprocessing(), train=True)
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    assert torch.equal(first, transform(image))
    assert not torch.equal(first, transform(image))


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ConfigError, match="valid names: clinical, derm, derm-robust, none, reference-a, reference-b"):
        create_transform("autoaugment", _preprocessing(), train=True)
    with pytest.raises(ConfigError, match="autoaugment"):
        create_transform("autoaugment", _preprocessing(), train=False)


def test_color_constancy_hook(image: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    methods: Registry = Registry("colour constancy method")
    methods.add("black", lambda p=6.0: (lambda img: torch.zeros_like(img)))
    monkeypatch.setattr(transforms, "COLOR_CONSTANCY", methods)
    preprocessing = _preprocessing(color_constancy="black")
    out = create_transform("none", preprocessing, train=False)(image)
    expected = (0 - torch.tensor(preprocessing.mean)) / torch.tensor(preprocessing.std)
    assert torch.allclose(out, expected[:, None, None].expand(3, 32, 32))
    with pytest.raises(ConfigError, match="valid names: black"):
        create_transform("none", _preprocessing(color_constancy="grey_world"), train=False)
