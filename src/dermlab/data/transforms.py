"""Augmentation presets by name and the train / eval transforms built from a model's :class:`Preprocessing`.

Every transform takes a PIL RGB image and returns a normalised float32 tensor ``(3, h, w)``:

    resize to (h, w) -> uint8 tensor -> colour constancy (if any) -> [train: the preset's augmentation]
    -> float32 in [0, 1] -> normalise with the backbone's mean / std

The resize is to ``input_size`` exactly, so an image of another aspect ratio (600x450 dermoscopy into a
square input) is squashed, identically at train and eval time; letterboxing comes in a later issue. Train
and eval share this prefix, so a preset only adds random steps on the resized ``(3, h, w)`` uint8 image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import InterpolationMode, v2

from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = ["AUGMENTATIONS", "COLOR_CONSTANCY", "create_transform", "create_color_constancy"]

Transform = Callable[[torch.Tensor], torch.Tensor]

#: Augmentation presets: ``preset(preprocessing) -> list of random transforms`` on the resized uint8 image.
AUGMENTATIONS: Registry[Callable[[Preprocessing], list[Transform]]] = Registry("augmentation preset")

#: Colour-constancy methods: ``factory() -> transform`` on the resized uint8 image. Filled by a later issue.
COLOR_CONSTANCY: Registry[Callable[[], Transform]] = Registry("colour constancy method")


def create_transform(preset: str, preprocessing: Preprocessing, train: bool) -> v2.Compose:
    """The transform for ``preset`` (ignored at eval time except that it must exist)."""
    augment = AUGMENTATIONS.get(preset)
    height, width = preprocessing.input_size
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps: list[Transform] = [
        v2.Resize((height, width), interpolation=interpolation, antialias=True),
        v2.ToImage(),
    ]
    color_constancy = create_color_constancy(preprocessing.color_constancy)
    if color_constancy is not None:
        steps.append(color_constancy)
    if train:
        steps.extend(augment(preprocessing))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(preprocessing.mean), std=list(preprocessing.std)),
        v2.ToPureTensor(),  # a plain torch.Tensor, not a tv_tensors.Image
    ]
    return v2.Compose(steps)


def create_color_constancy(name: str | None) -> Transform | None:
    """The colour-constancy step for ``name``; ``None`` means no step. An unknown name raises."""
    if name is None:
        return None
    if len(COLOR_CONSTANCY) == 0:
        raise ConfigError(f"unknown colour constancy method {name!r}; none is available yet (use null)")
    return COLOR_CONSTANCY.get(name)()


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
