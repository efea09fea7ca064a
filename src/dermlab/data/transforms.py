"""Augmentation presets by name and the train / eval transforms built from a model's :class:`Preprocessing`.

Every transform takes a PIL RGB image and returns a normalised float32 tensor ``(3, h, w)``:

    resize to (h, w) -> uint8 tensor -> [train: the preset's augmentation] -> colour constancy (if any)
    -> float32 in [0, 1] -> normalise with the backbone's mean / std

``preprocessing.resize_mode`` decides how an image of another aspect ratio (600x450 dermoscopy into a square
input) meets ``input_size``, identically at train and eval time:

- ``squash`` (the default, so existing runs are unchanged): resized to (h, w) exactly, stretching it.
- ``letterbox``: resized to fit inside (h, w) keeping its aspect, centred, padded with black. Black is
  neutral for colour constancy (it scales every channel's Minkowski mean alike) and looks like a
  dermoscope's dark rim rather than a new colour.
- ``crop``: resized so it covers (h, w) keeping its aspect, then centre-cropped; never pads.

Which one a recipe should use is decided by the shift benchmark (``dermlab evaluate --shift``), not here.
Train and eval share this prefix, so a preset only adds random steps on the resized ``(3, h, w)`` uint8
image. Colour constancy comes after the augmentation so that, as at test time, it sees whatever a camera
(or an augmentation imitating one) delivered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from dermlab.data.color_constancy import DEFAULT_P, ShadesOfGray
from dermlab.data.corruptions import (
    RandomColorCast,
    RandomDownscale,
    RandomGamma,
    RandomHair,
    RandomJpeg,
    RandomVignette,
)
from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = ["AUGMENTATIONS", "COLOR_CONSTANCY", "create_transform", "create_color_constancy", "describe_transform"]

Transform = Callable[[torch.Tensor], torch.Tensor]

#: Augmentation presets: ``preset(preprocessing) -> list of random transforms`` on the resized uint8 image.
AUGMENTATIONS: Registry[Callable[[Preprocessing], list[Transform]]] = Registry("augmentation preset")

#: Colour-constancy methods: ``factory(p=...) -> transform`` on the resized uint8 image (see color_constancy.py).
COLOR_CONSTANCY: Registry[Callable[..., Transform]] = Registry("colour constancy method")
COLOR_CONSTANCY.add("shades_of_gray", lambda p=DEFAULT_P: ShadesOfGray(p))
COLOR_CONSTANCY.add("gray_world", lambda p=DEFAULT_P: ShadesOfGray(1.0))  # p is Gray World's own: 1


def describe_transform(transform: Any) -> str:
    """Text that changes whenever the pipeline's steps or their parameters do: the feature caches' key.

    The pipeline's ``repr`` (each step and its parameters) and every nested step's probability ``p`` (which
    ``RandomApply``'s ``repr`` leaves out), so an edited preset never reuses features cached with the old one.
    """
    parts = [repr(transform)]

    def walk(step: Any, where: str) -> None:
        if hasattr(step, "p"):
            parts.append(f"{where}{type(step).__name__}.p={step.p}")
        for position, child in enumerate(getattr(step, "transforms", None) or []):
            walk(child, f"{where}{position}.")

    walk(transform, "")
    return "\n".join(parts)


def create_transform(preset: str, preprocessing: Preprocessing, train: bool) -> v2.Compose:
    """The transform for ``preset`` (ignored at eval time except that it must exist)."""
    augment = AUGMENTATIONS.get(preset)
    height, width = preprocessing.input_size
    interpolation = InterpolationMode(preprocessing.interpolation)
    if preprocessing.resize_mode == "squash":
        resize: Transform = v2.Resize((height, width), interpolation=interpolation, antialias=True)
    else:
        resize = _AspectResize((height, width), preprocessing.resize_mode, interpolation)
    steps: list[Transform] = [resize, v2.ToImage()]
    if train:
        steps.extend(augment(preprocessing))
    color_constancy = create_color_constancy(preprocessing.color_constancy, preprocessing.color_constancy_p)
    if color_constancy is not None:
        steps.append(color_constancy)
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        v2.ToPureTensor(),  # a plain torch.Tensor, not a tv_tensors.Image
    ]
    return v2.Compose(steps)


def create_color_constancy(name: str | None, p: float = DEFAULT_P) -> Transform | None:
    """The colour-constancy step for ``name`` (``p``: Shades of Gray's exponent); ``None`` means no step.

    An unknown name raises :class:`ConfigError` listing the valid ones.
    """
    if name is None:
        return None
    return COLOR_CONSTANCY.get(name)(p=p)


class _AspectResize(v2.Transform):
    """Resize keeping the aspect ratio to fit inside (``letterbox``) or cover (``crop``) ``size``, then centre it.

    ``center_crop`` pads with zeros where the resized image is smaller than ``size`` (letterbox) and crops
    where it is larger (crop); in ``crop`` mode the resized sides are never below ``size``, so it never pads.
    """

    def __init__(self, size: tuple[int, int], mode: str, interpolation: InterpolationMode) -> None:
        super().__init__()
        if mode not in ("letterbox", "crop"):
            raise ConfigError(f"resize mode must be letterbox or crop here, got {mode!r}")
        self.size, self.mode, self.interpolation = size, mode, interpolation

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        height, width = F.get_size(inpt)
        target_h, target_w = self.size
        fit = min if self.mode == "letterbox" else max
        scale = fit(target_h / height, target_w / width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        if self.mode == "crop":
            new_h, new_w = max(new_h, target_h), max(new_w, target_w)
        else:
            new_h, new_w = min(new_h, target_h), min(new_w, target_w)
        resized = self._call_kernel(F.resize, inpt, [new_h, new_w], interpolation=self.interpolation, antialias=True)
        return self._call_kernel(F.center_crop, resized, [target_h, target_w])


@AUGMENTATIONS.register("none")
def _no_augmentation(preprocessing: Preprocessing) -> list[Transform]:
    """Resize and normalise only."""
    return []


@AUGMENTATIONS.register("reference-a")
def _reference_a(preprocessing: Preprocessing) -> list[Transform]:
    """Reference A's Keras ImageDataGenerator: rotation 5 degrees, shifts 0.1, shear 0.1, zoom 0.1, h-flip.

    Keras' ``shear_range`` is in degrees, as is RandomAffine's ``shear``, so 0.1 means 0.1 degrees.
    Differences: zoom is isotropic here (Keras draws x and y zoom apart), and uncovered corners are
    filled with black instead of Keras' ``fill_mode="nearest"``.
    """
    return [
        v2.RandomAffine(
            degrees=5,
            translate=(0.1, 0.1),
            scale=(0.9, 1.1),
            shear=0.1,
            interpolation=InterpolationMode.BILINEAR,
        ),
        v2.RandomHorizontalFlip(),
    ]


@AUGMENTATIONS.register("reference-b")
def _reference_b(preprocessing: Preprocessing) -> list[Transform]:
    """Reference B: horizontal and vertical flips and a random rotation (up to 15 degrees, black corners)."""
    return [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomRotation(degrees=15, interpolation=InterpolationMode.BILINEAR),
    ]


@AUGMENTATIONS.register("derm")
def _derm(preprocessing: Preprocessing) -> list[Transform]:
    """For dermoscopy, which has no up or down: any rotation, flips both ways, mild crops and colour jitter.

    The rotation is a full ``RandomRotation(180)`` of the image reflect-padded by enough that the centre
    crop back to (h, w) has no empty corners (needs ``max(h, w) / min(h, w)`` below about 2.4; beyond that
    the padding is clamped and corners may be black). The crop keeps 70-100% of the area at the input's
    own aspect ratio (+-10%), then resizes back to (h, w). Colour jitter stays mild because colour is
    diagnostic in skin lesions.
    """
    height, width = preprocessing.input_size
    aspect = width / height
    return [
        *_rotate_any_angle(height, width),
        v2.RandomResizedCrop(
            (height, width), scale=(0.7, 1.0), ratio=(aspect * 0.9, aspect / 0.9), antialias=True
        ),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
    ]


@AUGMENTATIONS.register("clinical")
def _clinical(preprocessing: Preprocessing) -> list[Transform]:
    """For clinical photos (any framing and distance, phone cameras, an up and a down): scale, tilt, light.

    Crops of 40-100% of the area at up to 4:3 either way of the input's aspect (a photo taken nearer or
    farther), a tilt of up to 15 degrees (black corners where the crop keeps them), horizontal flips
    only (a foot, a nail, a face have an up), and colour jitter stronger than ``derm``'s for phone cameras and
    room light.
    """
    height, width = preprocessing.input_size
    aspect = width / height
    return [
        v2.RandomRotation(degrees=15, interpolation=InterpolationMode.BILINEAR),
        v2.RandomResizedCrop(
            (height, width), scale=(0.4, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3), antialias=True
        ),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03),
    ]


@AUGMENTATIONS.register("derm-robust")
def _derm_robust(preprocessing: Preprocessing) -> list[Transform]:
    """``derm`` hardened against other cameras and clinics: each step imitates one shift of the shift report.

    Geometry as ``derm`` but with stronger rescaling (crops of 50-100% of the area) and aspect distortion
    (up to 4:3 either way). Then, each with its own probability: hair-like dark strokes (0.3), dark-corner
    vignette (0.3), Gaussian blur (0.3, sigma up to 2 px), a white-balance cast (0.5, up to +-20% on a
    channel), strong brightness / contrast / saturation / hue jitter (always), a gamma curve (0.5, 0.6-1.6),
    resolution loss (0.25, down to 25-75% and back) and JPEG compression (0.3, quality 30-95), in the order
    a scene passes through optics, sensor and storage. Random draws come from torch's global generator.
    """
    height, width = preprocessing.input_size
    aspect = width / height
    blur_kernel = max(3, min(13, (min(height, width) // 2) * 2 - 1))  # odd, and small enough to reflect-pad
    return [
        *_rotate_any_angle(height, width),
        v2.RandomResizedCrop(
            (height, width), scale=(0.5, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3), antialias=True
        ),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomApply([RandomHair()], p=0.3),
        v2.RandomApply([RandomVignette()], p=0.3),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.3),
        v2.RandomApply([RandomColorCast(0.25)], p=0.5),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05),
        v2.RandomApply([RandomGamma((0.6, 1.6))], p=0.5),
        v2.RandomApply([RandomDownscale((0.25, 0.75))], p=0.25),
        v2.RandomApply([RandomJpeg((30, 95))], p=0.3),
    ]


def _rotate_any_angle(height: int, width: int) -> list[Transform]:
    """Reflect-pad so a rotated (h, w) window stays inside real pixels, rotate, crop back to (h, w)."""
    diagonal = math.hypot(height, width)
    pad_h = min(math.ceil((diagonal - height) / 2), height - 1)
    pad_w = min(math.ceil((diagonal - width) / 2), width - 1)
    return [
        v2.Pad([pad_w, pad_h], padding_mode="reflect"),
        v2.RandomRotation(degrees=180, interpolation=InterpolationMode.BILINEAR),
        v2.CenterCrop((height, width)),
    ]
