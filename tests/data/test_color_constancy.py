"""Colour constancy: Shades of Gray / Gray World, as functions, as a pipeline step, and from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dermlab.config import Config, ModelConfig, config_from_dict
from dermlab.data.color_constancy import ShadesOfGray, gray_world, shades_of_gray
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.transforms import COLOR_CONSTANCY, create_color_constancy, create_transform
from dermlab.errors import ConfigError, DataError

CAST = np.array([1.0, 0.8, 0.6])  # a warm white balance: blue at 60%, green at 80%
CHROMATIC_CAST = np.array([1.15, 1.0, 0.85])  # the same hue shift at constant brightness (mean gain 1)


def _neutral(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    """A textured gray uint8 image ``(H, W, 3)``: every pixel has R = G = B, values 30-220."""
    gray = np.random.default_rng(seed).integers(30, 221, size=(height, width), dtype=np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _cast(neutral: np.ndarray, gains: np.ndarray = CAST) -> np.ndarray:
    return np.clip(np.round(neutral * gains), 0, 255).astype(np.uint8)


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _channel_means(image: torch.Tensor) -> torch.Tensor:
    return image.float().mean(dim=(-2, -1))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared, busy machine torch's thread pool spins and runs ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("p", [1.0, 2.0, 6.0, 12.0])
def test_shades_of_gray_equalises_the_channel_means_of_a_cast_image(p: float) -> None:
    cast = _chw(_cast(_neutral()))
    before = _channel_means(cast)
    assert before.max() - before.min() > 40  # the cast is real
    after = _channel_means(shades_of_gray(cast, p))
    assert after.max() - after.min() < 1.0  # within uint8 rounding
    assert abs(after.mean() - before.mean()) < 0.25 * before.mean()  # brightness roughly kept


def test_gray_world_makes_any_image_average_to_gray() -> None:
    rng = np.random.default_rng(1)
    pixels = np.stack([rng.integers(20, 151, (20, 30)), rng.integers(20, 101, (20, 30)), rng.integers(20, 81, (20, 30))], axis=2)
    image = _chw(pixels.astype(np.uint8))
    means = _channel_means(gray_world(image))
    assert means.max() - means.min() < 0.6


def test_neutral_images_are_unchanged() -> None:
    neutral = _neutral()
    tensor = _chw(neutral)
    for p in (1.0, 6.0):
        assert torch.equal(shades_of_gray(tensor, p), tensor)
    as_float = tensor.float() / 255
    assert torch.allclose(shades_of_gray(as_float), as_float, atol=1e-6)
    pil = Image.fromarray(neutral, "RGB")
    assert np.array_equal(np.asarray(shades_of_gray(pil)), neutral)


def test_kinds_and_dtypes_are_kept_and_batches_are_per_image() -> None:
    first, second = _chw(_cast(_neutral(seed=2))), _chw(_cast(_neutral(seed=3), np.array([0.7, 1.0, 0.9])))
    batch = torch.stack([first, second])
    out = shades_of_gray(batch)
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out[0], shades_of_gray(first)) and torch.equal(out[1], shades_of_gray(second))
    as_float = shades_of_gray(first.double() / 255)
    assert as_float.dtype == torch.float64 and 0 <= as_float.min() and as_float.max() <= 1
    assert (as_float * 255 - shades_of_gray(first).double()).abs().max() <= 0.5 + 1e-6
    pil = shades_of_gray(Image.fromarray(_cast(_neutral()), "RGB"))
    assert isinstance(pil, Image.Image) and pil.mode == "RGB"
    assert np.array_equal(np.asarray(pil), shades_of_gray(_chw(_cast(_neutral()))).permute(1, 2, 0).numpy())
    wrapped = ShadesOfGray()(tv_tensors.Image(first))
    assert isinstance(wrapped, tv_tensors.Image) and torch.equal(wrapped.as_subclass(torch.Tensor), shades_of_gray(first))


def test_an_empty_channel_keeps_a_gain_of_one_and_brightness_is_clipped() -> None:
    pixels = _neutral()
    pixels[:, :, 2] = 0  # no blue at all: nothing to balance there
    out = shades_of_gray(_chw(pixels))
    assert out[2].max() == 0
    assert torch.equal(out[0], out[1])  # red and green had the same illuminant: left alone
    bright = _chw(_cast(_neutral(), np.array([1.0, 1.0, 0.3])))
    assert shades_of_gray(bright).max() <= 255  # uint8 arithmetic would wrap around, not clip, if done wrong
    assert shades_of_gray(bright)[2].float().mean() > 2 * bright[2].float().mean()


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="p must be"):
        shades_of_gray(_chw(_neutral()), 0.5)
    with pytest.raises(ConfigError, match="p must be"):
        ShadesOfGray(float("inf"))
    with pytest.raises(DataError, match=r"\(\.\.\., 3, H, W\)"):
        shades_of_gray(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="int32"):
        shades_of_gray(torch.zeros(3, 8, 8, dtype=torch.int32))


# ------------------------------------------------------------------------------- in the pipeline


def _preprocessing(**options: object) -> Preprocessing:
    return Preprocessing(input_size=(24, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **options)


def test_the_registry_and_create_color_constancy() -> None:
    assert COLOR_CONSTANCY.list() == ["gray_world", "shades_of_gray"]
    assert create_color_constancy(None) is None
    assert create_color_constancy("shades_of_gray", p=3).p == 3.0
    assert create_color_constancy("gray_world", p=6).p == 1.0  # Gray World is p = 1 whatever is stored
    with pytest.raises(ConfigError, match="valid names: gray_world, shades_of_gray"):
        create_color_constancy("retinex")


@pytest.mark.parametrize("train", [False, True])
def test_the_transform_applies_it_after_resizing(train: bool) -> None:
    image = Image.fromarray(_cast(_neutral()), "RGB")  # already (24, 32): the resize is the identity
    preprocessing = _preprocessing(color_constancy="shades_of_gray", color_constancy_p=4)
    torch.manual_seed(0)
    out = create_transform("none", preprocessing, train=train)(image)
    balanced = shades_of_gray(_chw(np.array(image)), 4).float() / 255
    assert torch.allclose(out, (balanced - 0.5) / 0.25, atol=1e-5)
    plain = create_transform("none", _preprocessing(), train=train)(image)
    assert not torch.allclose(out, plain, atol=0.1)


def test_colour_constancy_runs_after_the_augmentation() -> None:
    """A colour cast drawn by the augmentation is removed again: train and test see balanced images alike."""
    image = Image.fromarray(_neutral(), "RGB")
    transform = create_transform("derm-robust", _preprocessing(color_constancy="gray_world"), train=True)
    for seed in range(4):
        torch.manual_seed(seed)
        pixels = transform(image) * 0.25 + 0.5
        means = pixels.mean(dim=(1, 2))
        assert (means.max() - means.min()) < 0.03


def test_preprocessing_and_config_carry_the_settings() -> None:
    preprocessing = _preprocessing(color_constancy="shades_of_gray", color_constancy_p=4, resize_mode="letterbox")
    data = preprocessing.to_dict()
    assert data["color_constancy_p"] == 4.0 and data["resize_mode"] == "letterbox"
    assert Preprocessing.from_dict(data) == preprocessing
    old = {key: value for key, value in data.items() if key not in ("color_constancy_p", "resize_mode")}
    restored = Preprocessing.from_dict(old)  # a checkpoint written before these keys existed
    assert (restored.color_constancy_p, restored.resize_mode) == (6.0, "squash")
    with pytest.raises(ConfigError, match="resize_mode"):
        _preprocessing(resize_mode="stretch")
    with pytest.raises(ConfigError, match="color_constancy_p"):
        _preprocessing(color_constancy_p=0)
    config = config_from_dict({"model": {"color_constancy": "gray_world", "resize_mode": "crop", "color_constancy_p": 2}})
    assert (config.model.color_constancy, config.model.resize_mode, config.model.color_constancy_p) == ("gray_world", "crop", 2.0)
    assert (ModelConfig().color_constancy, ModelConfig().resize_mode) == (None, "squash")
    with pytest.raises(ConfigError, match="model.resize_mode"):
        config_from_dict({"model": {"resize_mode": "stretch"}})
    with pytest.raises(ConfigError, match="model.color_constancy_p"):
        config_from_dict({"model": {"color_constancy_p": 0.5}})


# ------------------------------------------------------------------------------- from a checkpoint


@pytest.fixture
def cc_checkpoint(tmp_path: Path) -> Path:
    """A tiny untrained checkpoint whose preprocessing has Shades of Gray (p 4) and letterboxing."""
    from dermlab.models.checkpoint import save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing

    torch.manual_seed(0)
    model_config = ModelConfig(
        name="test_efficientnet", input_size=[24, 32], color_constancy="shades_of_gray", color_constancy_p=4, resize_mode="letterbox"
    )
    model = create_model(model_config, 3, load_weights=False)
    preprocessing = resolve_preprocessing(model, model_config)
    assert preprocessing.color_constancy == "shades_of_gray" and preprocessing.resize_mode == "letterbox"
    return save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", model, Config(model=model_config), ["nv", "mel", "bkl"], preprocessing)


@pytest.mark.slow
def test_predict_and_serve_apply_the_stored_colour_constancy(cc_checkpoint: Path, tmp_path: Path) -> None:
    """A cast image and its neutral original give the same input tensor, logits and probabilities.

    Shades of Gray keeps the cast image's brightness, so the cast here has mean gain 1.
    """
    import pandas as pd

    from dermlab.evaluation.evaluate import predict_logits
    from dermlab.models.checkpoint import load_checkpoint

    neutral = _neutral(36, 48)  # 4:3 into a 4:3 input: letterboxing is an exact fit
    images = [Image.fromarray(neutral, "RGB"), Image.fromarray(_cast(neutral, CHROMATIC_CAST), "RGB")]
    paths = []
    for name, image in zip(("neutral", "cast"), images):
        image.save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))

    loaded = load_checkpoint(cc_checkpoint)
    assert loaded.preprocessing.color_constancy_p == 4.0
    logits = predict_logits(loaded, pd.DataFrame({"path": paths}), batch_size=2)
    assert np.allclose(logits[0], logits[1], atol=0.05)

    try:
        from dermlab.serving.predictor import Predictor
    except ImportError:  # serving is optional in this tree
        return
    predictor = Predictor.from_path(cc_checkpoint.parent.parent)
    assert predictor.preprocessing == loaded.preprocessing
    batch = predictor.preprocess(images)
    assert (batch[0] - batch[1]).abs().max() < 4 / 255 / 0.224  # uint8 rounding of the cast, normalised
    plain = create_transform("none", Preprocessing(**{**loaded.preprocessing.to_dict(), "color_constancy": None}), train=False)
    assert (plain(images[0]) - plain(images[1])).abs().max() > 0.5  # without it the cast is plain to see
    probabilities = predictor.predict_images(images)
    assert np.allclose(probabilities[0], probabilities[1], atol=0.02)
    assert np.allclose(probabilities, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-5)
