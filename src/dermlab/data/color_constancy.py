"""Colour constancy: remove the colour cast of the light source and camera before the network sees an image.

Shades of Gray (Finlayson & Trezzi, 2004) estimates the illuminant of channel ``c`` as the Minkowski mean
``e_c = mean(I_c ** p) ** (1 / p)`` and scales channel ``c`` by ``mean(e) / e_c``: the estimated illuminant
becomes gray and the overall brightness stays. ``p = 1`` is Gray World (the average colour is gray); a large
``p`` tends to max-RGB (white patch). ``p = 6`` is the value Barata et al. (2015) found best for dermoscopy,
and the one ISIC challenge entries commonly use.

A pure per-channel cast (``I_c = g_c * J``, the von Kries model of a camera's white balance) is removed
exactly, for any ``p``. Black pixels (letterbox padding, a dermoscope's dark corners) scale every channel's
Minkowski mean by the same factor, so they do not bias the estimate.

The functions take ``uint8`` tensors (0-255), float tensors (0-1) of shape ``(..., 3, H, W)`` or RGB PIL
images, and return the same kind. They are deterministic and vectorised.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dermlab.errors import ConfigError, DataError

__all__ = ["DEFAULT_P", "ShadesOfGray", "shades_of_gray", "gray_world"]

DEFAULT_P = 6.0

ImageLike = TypeVar("ImageLike", torch.Tensor, Image.Image)

# A channel whose Minkowski mean is below this (on 0-1 pixels) is treated as empty and keeps a gain of 1:
# amplifying a channel with almost no signal would only amplify noise.
_EMPTY_CHANNEL = 1e-6


def shades_of_gray(image: ImageLike, p: float = DEFAULT_P) -> ImageLike:
    """``image`` with its Shades of Gray illuminant estimate mapped to gray, clipped to the valid range."""
    _check_p(p)
    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return Image.fromarray(_shades_of_gray_tensor(pixels, p).permute(1, 2, 0).numpy(), "RGB")
    return _shades_of_gray_tensor(image, p)


def gray_world(image: ImageLike) -> ImageLike:
    """Shades of Gray with ``p = 1``: the mean colour of the image becomes gray."""
    return shades_of_gray(image, 1.0)


class ShadesOfGray(v2.Transform):
    """Shades of Gray as a torchvision v2 transform (tensors, ``tv_tensors.Image`` and PIL images)."""

    def __init__(self, p: float = DEFAULT_P) -> None:
        super().__init__()
        _check_p(p)
        self.p = float(p)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = shades_of_gray(inpt, self.p)
        if isinstance(inpt, tv_tensors.TVTensor):
            return tv_tensors.wrap(out, like=inpt)
        return out


def _check_p(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not np.isfinite(p) or p < 1:
        raise ConfigError(f"colour constancy p must be a finite number >= 1, got {p!r}")


def _shades_of_gray_tensor(image: torch.Tensor, p: float) -> torch.Tensor:
    tensor = image.as_subclass(torch.Tensor)  # plain ops, no tv_tensors dispatch
    if tensor.ndim < 3 or tensor.shape[-3] != 3:
        raise DataError(f"colour constancy needs an RGB image of shape (..., 3, H, W), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        top = 255.0
    elif tensor.is_floating_point():
        top = 1.0
    else:
        raise DataError(f"colour constancy needs uint8 (0-255) or float (0-1) pixels, got {tensor.dtype}")
    pixels = tensor.to(torch.float32) / top
    illuminant = pixels.pow(p).mean(dim=(-2, -1)).pow(1.0 / p)  # (..., 3)
    empty = illuminant < _EMPTY_CHANNEL
    present = (~empty).to(illuminant.dtype)
    gray = (illuminant * present).sum(dim=-1, keepdim=True) / present.sum(dim=-1, keepdim=True).clamp_min(1.0)
    gain = torch.where(empty, torch.ones_like(illuminant), gray / illuminant.clamp_min(_EMPTY_CHANNEL))
    balanced = (pixels * gain[..., None, None]).clamp_(0.0, 1.0)
    if tensor.dtype == torch.uint8:
        return (balanced * 255.0).round_().to(torch.uint8)
    return balanced.to(tensor.dtype)
