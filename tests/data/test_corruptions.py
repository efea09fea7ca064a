"""Corruptions of the shift report, their random training counterparts (``derm-robust``) and the aspect policies.

The aspect policies (``resize_mode``) live in ``transforms.py`` but are tested here, beside the ``squash_1to1``
corruption that probes them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from dermlab.data.color_constancy import shades_of_gray
from dermlab.data.corruptions import (
    CORRUPTIONS,
    SHIFT_CORRUPTIONS,
    RandomColorCast,
    RandomDownscale,
    RandomGamma,
    RandomHair,
    RandomJpeg,
    RandomVignette,
    apply_corruption,
)
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.transforms import AUGMENTATIONS, create_transform
from dermlab.errors import ConfigError

RANDOM_DIRECTION = ("colour_cast", "gamma", "blur", "vignette")  # draw something from the generator


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A 4:3 image (200x150) with texture and a darker 'lesion', larger than the 100 px of downscale100."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:150, 0:200]
    base = np.stack([180 + 0 * x, 130 + 0 * x, 110 + 0 * x], axis=-1).astype(np.float32)
    lesion = ((y - 75) ** 2 + (x - 100) ** 2) < 40**2
    base[lesion] *= 0.5
    base += rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_the_registry_holds_the_report_set() -> None:
    assert sorted(SHIFT_CORRUPTIONS) == CORRUPTIONS.list()
    assert len(SHIFT_CORRUPTIONS) == 7


@pytest.mark.parametrize("name", SHIFT_CORRUPTIONS)
def test_each_corruption_is_deterministic_from_its_seed_and_changes_the_image(photo: Image.Image, name: str) -> None:
    first = apply_corruption(photo, name, seed=3, index=5)
    assert first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(apply_corruption(photo, name, seed=3, index=5)))
    expected_size = (150, 150) if name == "squash_1to1" else photo.size
    assert first.size == expected_size
    if name != "squash_1to1":
        assert np.abs(_pixels(first) - _pixels(photo)).mean() > 1.0
    if name in RANDOM_DIRECTION:
        others = [apply_corruption(photo, name, seed=s, index=i) for s, i in ((4, 5), (3, 6), (0, 0))]
        assert all(not np.array_equal(np.asarray(first), np.asarray(other)) for other in others)


def test_corruptions_do_not_touch_the_input(photo: Image.Image) -> None:
    before = np.asarray(photo).copy()
    for name in SHIFT_CORRUPTIONS:
        apply_corruption(photo, name, seed=1, index=2)
    assert np.array_equal(np.asarray(photo), before)


def test_colour_cast_shifts_hue_not_brightness_and_shades_of_gray_undoes_it(photo: Image.Image) -> None:
    gray = Image.fromarray(np.repeat(np.asarray(photo.convert("L"))[:, :, None], 3, axis=2), "RGB")
    cast = _pixels(apply_corruption(gray, "colour_cast", seed=0, index=0))
    means = cast.mean(axis=(0, 1))
    assert means.max() - means.min() > 10
    assert abs(means.mean() - _pixels(gray).mean()) < 3
    balanced = shades_of_gray(torch.from_numpy(cast.astype(np.uint8)).permute(2, 0, 1))
    restored = balanced.float().mean(dim=(1, 2))
    assert restored.max() - restored.min() < 1.5


def test_gamma_is_monotone_and_keeps_black_and_white() -> None:
    ramp = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4, 1))[:, :, None].repeat(3, 2), "RGB")
    for seed in range(6):
        out = _pixels(apply_corruption(ramp, "gamma", seed=seed, index=0))[0, :, 0]
        assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out) >= 0)
        assert np.abs(out - np.arange(256)).max() > 20


def test_geometry_corruptions(photo: Image.Image) -> None:
    small = photo.resize((80, 60))
    assert np.array_equal(np.asarray(apply_corruption(small, "downscale100", 0, 0)), np.asarray(small))  # nothing to lose
    square = photo.resize((90, 90))
    assert np.array_equal(np.asarray(apply_corruption(square, "squash_1to1", 0, 0)), np.asarray(square))
    detail = lambda image: np.abs(np.diff(_pixels(image), axis=1)).mean()  # noqa: E731 - edge energy
    assert detail(apply_corruption(photo, "downscale100", 0, 0)) < 0.7 * detail(photo)
    assert detail(apply_corruption(photo, "blur", 0, 0)) < 0.7 * detail(photo)


def test_vignette_darkens_the_corners_only() -> None:
    flat = Image.new("RGB", (120, 90), (200, 200, 200))
    out = _pixels(apply_corruption(flat, "vignette", seed=0, index=0))
    assert np.all(out[45, 60] == 200)
    assert np.all(out[[0, 0, -1, -1], [0, -1, 0, -1]] < 200 * 0.45)


def test_bad_names_and_seeds_raise(photo: Image.Image) -> None:
    with pytest.raises(ConfigError, match="unknown corruption 'fog'; valid names: blur, colour_cast"):
        apply_corruption(photo, "fog", seed=0, index=0)
    with pytest.raises(ConfigError, match="seed"):
        apply_corruption(photo, "blur", seed=-1, index=0)
    with pytest.raises(ConfigError, match="index"):
        apply_corruption(photo, "blur", seed=0, index=1.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- random training transforms


RANDOM_TRANSFORMS = [RandomColorCast(), RandomGamma(), RandomVignette(), RandomHair(), RandomDownscale(), RandomJpeg()]


@pytest.mark.parametrize("transform", RANDOM_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_random_transforms_keep_kind_shape_and_dtype_and_follow_torch_seed(photo: Image.Image, transform) -> None:
    image = tv_tensors.Image(torch.from_numpy(np.array(photo.resize((40, 30)))).permute(2, 0, 1))
    torch.manual_seed(7)
    out = transform(image)
    assert isinstance(out, tv_tensors.Image) and out.shape == image.shape and out.dtype == torch.uint8
    torch.manual_seed(7)
    assert torch.equal(out, transform(image))
    assert not torch.equal(out, image)
    if not isinstance(transform, RandomJpeg):  # JPEG is defined on 8-bit pixels only
        as_float = transform(image.as_subclass(torch.Tensor).float() / 255)
        assert type(as_float) is torch.Tensor and as_float.dtype == torch.float32
        assert 0 <= as_float.min() <= as_float.max() <= 1
    pil = transform(photo)
    assert isinstance(pil, Image.Image) and pil.size == photo.size


def test_hair_draws_thin_dark_strokes() -> None:
    image = torch.full((3, 64, 64), 220, dtype=torch.uint8)
    torch.manual_seed(0)
    out = RandomHair(count=(3, 3))(image)
    dark = (out.float().mean(dim=0) < 80)
    assert 20 < int(dark.sum()) < 0.25 * 64 * 64  # strokes, not blobs
    assert torch.equal(out[:, ~dark], image[:, ~dark])  # nothing else touched


def test_random_jpeg_matches_the_jpeg30_corruption(photo: Image.Image) -> None:
    """Training and the shift report compress with the same codec: quality 30 gives the same pixels."""
    tensor = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    out = RandomJpeg((30, 30))(tensor)
    assert np.array_equal(out.permute(1, 2, 0).numpy(), np.asarray(apply_corruption(photo, "jpeg30", 0, 0)))
    with pytest.raises(ConfigError, match="uint8"):
        RandomJpeg()(tensor.float())


def test_random_transform_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="RandomGamma gamma"):
        RandomGamma((1.5, 0.5))
    with pytest.raises(ConfigError, match="RandomVignette strength"):
        RandomVignette(strength=(0.5, 1.5))


# ------------------------------------------------------------------------------- derm-robust and resize modes


def _preprocessing(size: tuple[int, int] = (32, 32), **options: object) -> Preprocessing:
    return Preprocessing(input_size=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **options)


def test_derm_robust_is_registered() -> None:
    assert "derm-robust" in AUGMENTATIONS


@pytest.mark.parametrize("size", [(32, 32), (24, 32)])
@pytest.mark.parametrize("mode", ["squash", "letterbox", "crop"])
def test_derm_robust_output_shape_dtype_and_seeding(photo: Image.Image, size: tuple[int, int], mode: str) -> None:
    transform = create_transform("derm-robust", _preprocessing(size, resize_mode=mode), train=True)
    outputs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outputs.append(transform(photo))
    assert all(type(out) is torch.Tensor and out.shape == (3, *size) and out.dtype == torch.float32 for out in outputs)
    assert all(torch.isfinite(out).all() for out in outputs)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    evaluation = create_transform("derm-robust", _preprocessing(size, resize_mode=mode), train=False)
    assert torch.equal(evaluation(photo), create_transform("none", _preprocessing(size, resize_mode=mode), train=False)(photo))


def _unnormalised(out: torch.Tensor) -> torch.Tensor:
    return out * 0.25 + 0.5


def _black_lines(pixels: torch.Tensor, dim: int) -> int:
    """Number of rows (dim=1) or columns (dim=2) that are black across the whole image."""
    return int((pixels.amax(dim=(0, 3 - dim)) < 0.02).sum())


@pytest.mark.parametrize("train", [False, True])
def test_letterbox_keeps_the_aspect_and_pads_black(train: bool) -> None:
    wide = Image.new("RGB", (64, 48), (200, 150, 120))  # 4:3 into a square: 32x24 of image, 4 black rows each side
    out = _unnormalised(create_transform("none", _preprocessing(resize_mode="letterbox"), train=train)(wide))
    assert out.shape == (3, 32, 32)
    assert _black_lines(out, dim=1) == 8 and _black_lines(out, dim=2) == 0
    assert (out[:, :4].abs() < 1e-6).all() and (out[:, -4:].abs() < 1e-6).all()
    assert torch.allclose(out[:, 4:28], torch.tensor([200, 150, 120]).div(255)[:, None, None].expand(3, 24, 32), atol=0.01)
    tall = Image.new("RGB", (48, 64), (200, 150, 120))
    out = _unnormalised(create_transform("none", _preprocessing(resize_mode="letterbox"), train=train)(tall))
    assert _black_lines(out, dim=2) == 8 and _black_lines(out, dim=1) == 0
    fitting = _unnormalised(create_transform("none", _preprocessing((24, 32), resize_mode="letterbox"), train=train)(wide))
    assert _black_lines(fitting, dim=1) == 0 and _black_lines(fitting, dim=2) == 0  # same aspect: no padding


def test_letterbox_does_not_distort_a_circle() -> None:
    """A round lesion on a 4:3 image stays round with letterbox, and becomes an ellipse with squash."""
    y, x = np.mgrid[0:90, 0:120]
    disc = np.where(((y - 45) ** 2 + (x - 60) ** 2) < 30**2, 40, 220).astype(np.uint8)
    image = Image.fromarray(np.repeat(disc[:, :, None], 3, axis=2), "RGB")

    def extent(mode: str) -> tuple[int, int]:
        out = _unnormalised(create_transform("none", _preprocessing((48, 48), resize_mode=mode), train=False)(image))
        dark = (out.mean(dim=0) < 0.5) & (out.mean(dim=0) > 0.02)  # the disc, not the black padding
        return int(dark.any(dim=1).sum()), int(dark.any(dim=0).sum())

    height, width = extent("letterbox")
    assert abs(height - width) <= 1
    height, width = extent("squash")
    assert width < 0.85 * height


@pytest.mark.parametrize("source", [(64, 48), (48, 64), (100, 30), (31, 97)])
@pytest.mark.parametrize("size", [(32, 32), (24, 32)])
def test_crop_never_pads(source: tuple[int, int], size: tuple[int, int]) -> None:
    image = Image.new("RGB", source, (200, 150, 120))
    out = _unnormalised(create_transform("none", _preprocessing(size, resize_mode="crop"), train=False)(image))
    assert out.shape == (3, *size)
    assert torch.allclose(out, torch.tensor([200, 150, 120]).div(255)[:, None, None].expand(3, *size), atol=0.01)


def test_crop_keeps_the_centre_at_its_aspect() -> None:
    """A 4:3 image cropped into a square loses its left and right edges, and nothing is stretched."""
    pixels = np.full((72, 96, 3), 120, dtype=np.uint8)  # 96 -> 42.7 px wide: 12 source px cut on each side
    pixels[:, :4] = 0  # side bands the centre crop must remove, with the resize filter's reach to spare
    pixels[:, -4:] = 255
    out = _unnormalised(create_transform("none", _preprocessing(resize_mode="crop"), train=False)(Image.fromarray(pixels)))
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out, torch.full_like(out, 120 / 255), atol=0.02)
