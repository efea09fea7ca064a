"""Camera and clinic shifts as image degradations: seeded corruptions for the shift report, random ones for training.

:data:`CORRUPTIONS` holds the fixed set scored by ``dermlab evaluate --shift``, each a function
``(PIL image, numpy Generator) -> PIL image`` working on the image as read from disk (before the model's
resize). :func:`apply_corruption` seeds the generator from ``(seed, image index, corruption name)``, so a
report is reproducible image by image. Severities are fixed; only directions (which colour cast, darker or
lighter) are drawn.

The ``Random*`` classes are the training-time counterparts, torchvision v2 transforms on the resized image
(uint8 or 0-1 float tensors, ``tv_tensors.Image`` or PIL) drawing from torch's global generator like every
other augmentation, so a seeded run is reproducible. The ``derm-robust`` preset in
:mod:`dermlab.data.transforms` combines them.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = [
    "CORRUPTIONS",
    "SHIFT_CORRUPTIONS",
    "apply_corruption",
    "RandomColorCast",
    "RandomGamma",
    "RandomVignette",
    "RandomHair",
    "RandomDownscale",
    "RandomJpeg",
]

Corruption = Callable[[Image.Image, np.random.Generator], Image.Image]

#: Deterministic corruptions by name: ``corruption(image, rng) -> image`` (RGB PIL in, RGB PIL out).
CORRUPTIONS: Registry[Corruption] = Registry("corruption")

#: The shift report's default set, in report order.
SHIFT_CORRUPTIONS = ("colour_cast", "gamma", "jpeg30", "blur", "squash_1to1", "downscale100", "vignette")

_BLUR_REFERENCE_SIDE = 224  # blur radii are in pixels of an image this size, scaled to the real one
_DOWNSCALE_SIDE = 100


def apply_corruption(image: Image.Image, name: str, seed: int = 0, index: int = 0) -> Image.Image:
    """``image`` corrupted by ``name``; the same ``(name, seed, index)`` always gives the same pixels."""
    corruption = CORRUPTIONS.get(name)
    for what, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ConfigError(f"corruption {what} must be an integer >= 0, got {value!r}")
    rng = np.random.default_rng([int(seed), int(index), zlib.crc32(name.encode())])
    return corruption(image.convert("RGB"), rng)


# ------------------------------------------------------------------------------- shared pixel arithmetic


def _cast_gains(angle: float, magnitude: float) -> np.ndarray:
    """Per-channel gains ``1 + magnitude * d`` for a unit direction ``d`` in the chromatic plane (sum 0).

    The direction is at ``angle`` in the plane orthogonal to gray, so the cast changes hue, not brightness.
    """
    red_green = np.array([1.0, -1.0, 0.0]) / math.sqrt(2.0)
    yellow_blue = np.array([1.0, 1.0, -2.0]) / math.sqrt(6.0)
    direction = math.cos(angle) * red_green + math.sin(angle) * yellow_blue
    return 1.0 + magnitude * direction


def _vignette_factor(height: int, width: int, strength: float, start: float) -> np.ndarray:
    """``(H, W)`` multipliers: 1 inside radius ``start``, falling quadratically to ``1 - strength`` at the corners.

    Radii are normalised so the image corners lie at 1, like the dark rim of a dermoscope's round field.
    """
    y = (np.arange(height, dtype=np.float32) + 0.5) / height * 2.0 - 1.0
    x = (np.arange(width, dtype=np.float32) + 0.5) / width * 2.0 - 1.0
    radius = np.sqrt(y[:, None] ** 2 + x[None, :] ** 2) / math.sqrt(2.0)
    ramp = np.clip((radius - start) / max(1.0 - start, 1e-6), 0.0, 1.0)
    return (1.0 - strength * ramp**2).astype(np.float32)


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------- the shift report's corruptions


@CORRUPTIONS.register("colour_cast")
def _colour_cast(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A white-balance cast of fixed strength (up to +-20% on a channel) in a random hue direction."""
    gains = _cast_gains(rng.uniform(0.0, 2.0 * math.pi), 0.25)
    return _to_image(_to_array(image) * gains.astype(np.float32))


@CORRUPTIONS.register("gamma")
def _gamma(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A tone curve ``x ** gamma`` with gamma in [1.4, 1.8] (darker) or its inverse (lighter), at random."""
    gamma = rng.uniform(1.4, 1.8)
    if rng.random() < 0.5:
        gamma = 1.0 / gamma
    return _to_image(_to_array(image) ** gamma)


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    """``image`` encoded as a JPEG of ``quality`` by Pillow (libjpeg) and decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


@CORRUPTIONS.register("jpeg30")
def _jpeg30(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded as JPEG at quality 30 (heavy compression, as by messaging apps and some PACS exports)."""
    return _jpeg(image, 30)


@CORRUPTIONS.register("blur")
def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian defocus of 1-2 px at 224 px, scaled to the image's short side."""
    scale = max(1.0, min(image.size) / _BLUR_REFERENCE_SIDE)
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 2.0) * scale))


@CORRUPTIONS.register("squash_1to1")
def _squash_1to1(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The long side resized to the short one (600x450 -> 450x450): a camera or export that stores squares."""
    side = min(image.size)
    if image.size == (side, side):
        return image.copy()
    return image.resize((side, side), Image.Resampling.BICUBIC)


@CORRUPTIONS.register("downscale100")
def _downscale100(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Short side down to 100 px, then back to the original size: a low-resolution camera or thumbnail."""
    width, height = image.size
    short = min(width, height)
    if short <= _DOWNSCALE_SIDE:
        return image.copy()
    small = (max(1, round(width * _DOWNSCALE_SIDE / short)), max(1, round(height * _DOWNSCALE_SIDE / short)))
    return image.resize(small, Image.Resampling.BICUBIC).resize((width, height), Image.Resampling.BICUBIC)


@CORRUPTIONS.register("vignette")
def _vignette(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Dark corners: 60-90% darker at the corners, starting 40-60% of the way out from the centre."""
    width, height = image.size
    factor = _vignette_factor(height, width, rng.uniform(0.6, 0.9), rng.uniform(0.4, 0.6))
    return _to_image(_to_array(image) * factor[:, :, None])


# ------------------------------------------------------------------------------- random training transforms


class _PixelTransform(v2.Transform):
    """A random v2 transform computed on 0-1 float pixels ``(..., 3, H, W)``; returns the input's kind and dtype."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image):
            tensor = F.pil_to_tensor(inpt.convert("RGB"))
            return F.to_pil_image(self._apply_dtype(tensor, params))
        out = self._apply_dtype(inpt.as_subclass(torch.Tensor), params)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out

    def _apply_dtype(self, tensor: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        integer = not tensor.is_floating_point()
        pixels = tensor.to(torch.float32) / 255.0 if integer else tensor
        out = self._apply(pixels, params).clamp(0.0, 1.0)
        return (out * 255.0).round().to(tensor.dtype) if integer else out.to(tensor.dtype)

    def _apply(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _check_range(name: str, values: Sequence[float], low: float, high: float) -> tuple[float, float]:
    if len(values) != 2 or not low <= values[0] <= values[1] <= high:
        raise ConfigError(f"{name} must be (min, max) within [{low}, {high}], got {tuple(values)}")
    return float(values[0]), float(values[1])


class RandomColorCast(_PixelTransform):
    """Per-channel gains in a random hue direction, of magnitude up to ``strength`` (a white-balance shift)."""

    def __init__(self, strength: float = 0.25) -> None:
        super().__init__()
        if not 0.0 <= strength <= 1.0:
            raise ConfigError(f"RandomColorCast strength must be within [0, 1], got {strength!r}")
        self.strength = float(strength)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gains": _cast_gains(_uniform(0.0, 2.0 * math.pi), _uniform(0.0, self.strength))}

    def _apply(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        gains = torch.as_tensor(params["gains"], dtype=pixels.dtype, device=pixels.device)
        return pixels * gains[:, None, None]


class RandomGamma(_PixelTransform):
    """A tone curve ``x ** gamma`` with gamma log-uniform in ``gamma`` (a camera's tone mapping)."""

    def __init__(self, gamma: Sequence[float] = (0.6, 1.6)) -> None:
        super().__init__()
        self.gamma = _check_range("RandomGamma gamma", gamma, 1e-3, 1e3)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"gamma": math.exp(_uniform(math.log(self.gamma[0]), math.log(self.gamma[1])))}

    def _apply(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return pixels.clamp_min(0.0) ** params["gamma"]


class RandomVignette(_PixelTransform):
    """Dark corners: ``strength`` darker at the corners, starting at radius ``start`` (corners at 1)."""

    def __init__(self, strength: Sequence[float] = (0.3, 0.9), start: Sequence[float] = (0.4, 0.8)) -> None:
        super().__init__()
        self.strength = _check_range("RandomVignette strength", strength, 0.0, 1.0)
        self.start = _check_range("RandomVignette start", start, 0.0, 1.0)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"strength": _uniform(*self.strength), "start": _uniform(*self.start)}

    def _apply(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        factor = torch.from_numpy(_vignette_factor(height, width, params["strength"], params["start"]))
        return pixels * factor.to(pixels.device, pixels.dtype)


class RandomHair(_PixelTransform):
    """``count`` dark, thin, gently curved strokes across the image, like hairs over a lesion.

    Each hair is a quadratic Bezier curve (random start, direction, length of 30-100% of the long side, bend),
    1 or 2 px wide, in a dark brown of random depth.
    """

    def __init__(self, count: Sequence[int] = (1, 6)) -> None:
        super().__init__()
        low, high = _check_range("RandomHair count", count, 0, 1000)
        self.count = (int(low), int(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        hairs = int(torch.randint(self.count[0], self.count[1] + 1, ()))
        # per hair: start y, start x, angle, length, bend, darkness, width; all in [0, 1), scaled in _apply
        return {"hairs": torch.rand(hairs, 7)}

    def _apply(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        hairs: torch.Tensor = params["hairs"]
        if len(hairs) == 0:
            return pixels
        height, width = pixels.shape[-2:]
        out = pixels.clone()
        long_side = max(height, width)
        for y0, x0, angle, length, bend, darkness, thick in hairs.tolist():
            start = torch.tensor([y0 * height, x0 * width])
            length = (0.3 + 0.7 * length) * long_side
            angle *= 2.0 * math.pi
            direction = torch.tensor([math.sin(angle), math.cos(angle)])
            normal = torch.tensor([math.cos(angle), -math.sin(angle)])
            end = start + length * direction
            control = (start + end) / 2 + (bend - 0.5) * 0.6 * length * normal
            t = torch.linspace(0.0, 1.0, int(2 * length) + 2)[:, None]
            points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
            offsets = [(0, 0)] if thick < 0.5 else [(0, 0), (1, 0), (0, 1)]
            points = torch.cat([points.round().long() + torch.tensor(o) for o in offsets])
            inside = (points[:, 0] >= 0) & (points[:, 0] < height) & (points[:, 1] >= 0) & (points[:, 1] < width)
            ys, xs = points[inside, 0], points[inside, 1]
            colour = (0.05 + 0.2 * darkness) * torch.tensor([1.0, 0.8, 0.65])
            out[..., :, ys, xs] = colour.to(out.dtype)[:, None]
        return out


class RandomDownscale(_PixelTransform):
    """Down to ``factor`` of the size and back (bilinear, antialiased): the blur of a low-resolution camera."""

    def __init__(self, factor: Sequence[float] = (0.25, 0.75)) -> None:
        super().__init__()
        self.factor = _check_range("RandomDownscale factor", factor, 1e-3, 1.0)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"factor": _uniform(*self.factor)}

    def _apply(self, pixels: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        small = [max(1, round(height * params["factor"])), max(1, round(width * params["factor"]))]
        bilinear = InterpolationMode.BILINEAR
        down = F.resize(pixels, small, interpolation=bilinear, antialias=True)
        return F.resize(down, [height, width], interpolation=bilinear, antialias=True)


class RandomJpeg(v2.Transform):
    """JPEG compression at a quality drawn uniformly from ``quality`` (inclusive), on uint8 images.

    Uses Pillow, the codec of the ``jpeg30`` corruption, rather than ``v2.JPEG``: its ``torchvision.io``
    encoder is deprecated since torchvision 0.29.
    """

    def __init__(self, quality: Sequence[int] = (30, 95)) -> None:
        super().__init__()
        low, high = _check_range("RandomJpeg quality", quality, 1, 100)
        self.quality = (int(low), int(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"quality": int(torch.randint(self.quality[0], self.quality[1] + 1, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, Image.Image):
            return _jpeg(inpt.convert("RGB"), params["quality"])
        tensor = inpt.as_subclass(torch.Tensor)
        if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[0] != 3:
            raise ConfigError(f"RandomJpeg needs a uint8 (3, H, W) image, got {tensor.dtype} {tuple(tensor.shape)}")
        compressed = _jpeg(F.to_pil_image(tensor.cpu()), params["quality"])
        out = F.pil_to_tensor(compressed).to(tensor.device)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
