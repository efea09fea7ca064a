"""Test-time augmentation: views of a normalised batch by name, and probabilities averaged over them.

Every view acts on the preprocessed tensor ``(N, 3, H, W)``, so evaluation, ``dermlab predict`` and the web
service average exactly the same views. Dermoscopy has no canonical orientation, so flips and rotations are
label-preserving. ``rot90``, ``rot270``, ``transpose`` and ``transverse`` turn an ``H x W`` input into ``W x H``:
fine for CNN backbones (global average pooling takes any size) and for square inputs, refused by backbones
that need a fixed input size (a ViT at its training size) when ``H != W``.

This module stays light (torch and numpy only): the serving stack imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dermlab.errors import ConfigError, DataError
from dermlab.registry import Registry

__all__ = [
    "TTA_VIEWS",
    "TTA_PRESETS",
    "DEFAULT_TTA_VIEWS",
    "resolve_tta_views",
    "view_logits",
    "average_probabilities",
    "fit_tta_temperature",
]

#: Views by name: ``view(batch (N, 3, H, W)) -> batch``. Register more here (crops, scales).
TTA_VIEWS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("TTA view")
TTA_VIEWS.add("identity", lambda batch: batch)
TTA_VIEWS.add("hflip", lambda batch: torch.flip(batch, dims=[-1]))
TTA_VIEWS.add("vflip", lambda batch: torch.flip(batch, dims=[-2]))
TTA_VIEWS.add("rot180", lambda batch: torch.rot90(batch, 2, dims=(-2, -1)))
TTA_VIEWS.add("rot90", lambda batch: torch.rot90(batch, 1, dims=(-2, -1)))
TTA_VIEWS.add("rot270", lambda batch: torch.rot90(batch, 3, dims=(-2, -1)))
TTA_VIEWS.add("transpose", lambda batch: batch.transpose(-2, -1))
TTA_VIEWS.add("transverse", lambda batch: torch.rot90(batch, 2, dims=(-2, -1)).transpose(-2, -1))



def _zoom(fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The central ``fraction`` of the batch (each side), resized back to the input size (bilinear)."""

    def view(batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        crop_h, crop_w = max(1, round(height * fraction)), max(1, round(width * fraction))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        crop = batch[..., top : top + crop_h, left : left + crop_w]
        return torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)

    return view


# multi-crop: central crops zoomed back to the input size (the lesion larger, the border cut off)
TTA_VIEWS.add("zoom90", _zoom(0.9))
TTA_VIEWS.add("zoom80", _zoom(0.8))

DEFAULT_TTA_VIEWS: tuple[str, ...] = ("identity", "hflip", "vflip")
"""The views ``tta=True`` uses (the three every backbone accepts at any input size)."""

#: Named sets of views, usable wherever a view name is: ``flips`` and the shape-keeping ``flips+rot180``
#: (any backbone), ``dihedral`` (all eight symmetries of the square), ``crops`` (a small multi-crop set: the
#: whole image and two central zooms).
TTA_PRESETS: dict[str, tuple[str, ...]] = {
    "flips": DEFAULT_TTA_VIEWS,
    "flips+rot180": ("identity", "hflip", "vflip", "rot180"),
    "dihedral": ("identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "transverse"),
    "crops": ("identity", "zoom90", "zoom80"),
}


def resolve_tta_views(tta: bool | str | Sequence[str] | None) -> tuple[str, ...]:
    """The view names of a TTA setting: ``True`` -> flips, ``False`` / ``None`` / ``[]`` -> identity only.

    A string is a comma-separated list; view names and preset names (:data:`TTA_PRESETS`) mix freely and
    repeats are dropped. Unknown names raise :class:`ConfigError` listing the valid ones.
    """
    if tta is True:
        return DEFAULT_TTA_VIEWS
    if tta is False or tta is None:
        return ("identity",)
    items = [part.strip() for part in tta.split(",")] if isinstance(tta, str) else [str(part) for part in tta]
    items = [item for item in items if item]
    if not items:
        return ("identity",)
    views: list[str] = []
    for item in items:
        if item in TTA_PRESETS:
            views.extend(TTA_PRESETS[item])
            continue
        if item not in TTA_VIEWS:
            valid = ", ".join([*TTA_VIEWS.list(), *TTA_PRESETS])
            raise ConfigError(f"unknown TTA view {item!r}; valid names: {valid}")
        views.append(item)
    return tuple(dict.fromkeys(views))


def view_logits(
    forward: Callable[[torch.Tensor], torch.Tensor] | nn.Module,
    batch: torch.Tensor,
    views: Sequence[str],
) -> torch.Tensor:
    """Logits ``(V, N, C)`` of ``forward`` on each view of ``batch`` (float32, on the batch's device)."""
    outputs = []
    for name in views:
        view = TTA_VIEWS.get(name)(batch)
        try:
            outputs.append(forward(view).float())
        except RuntimeError as error:
            if view.shape[-2:] == batch.shape[-2:]:
                raise
            height, width = batch.shape[-2:]
            raise ConfigError(
                f"TTA view {name!r} turns the {height}x{width} input into {width}x{height}, which this model does "
                f"not accept ({str(error).splitlines()[0][:120]}); use flips, flips+rot180 or a square input size"
            ) from None
    return torch.stack(outputs)


def average_probabilities(logits: torch.Tensor | np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``mean over views of softmax(logits / temperature)``: ``(V, N, C)`` -> ``(N, C)`` (``(N, C)`` passes as one view).

    The temperature scales each view before averaging, as serving does, so one stored temperature means the
    same thing with and without TTA.
    """
    scores = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    if scores.dim() == 2:
        scores = scores.unsqueeze(0)
    if scores.dim() != 3:
        raise ConfigError(f"logits must have shape (views, N, C) or (N, C), got {tuple(scores.shape)}")
    probabilities = torch.softmax(scores.double() / float(temperature), dim=-1).mean(dim=0)
    return probabilities.cpu().numpy()


def fit_tta_temperature(logits: torch.Tensor | np.ndarray, y_true: Sequence[int] | np.ndarray) -> float:
    """The temperature minimising the NLL of :func:`average_probabilities` on (validation) view logits.

    One view is ordinary temperature scaling (:func:`dermlab.evaluation.calibration.fit_temperature`); with
    several, the search is over ``log T`` in [0.01, 100] on the views' averaged probabilities, since those are
    what gets reported and served.
    """
    from scipy.optimize import minimize_scalar

    from dermlab.evaluation.calibration import fit_temperature

    scores = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).double()
    if scores.dim() == 2:
        scores = scores.unsqueeze(0)
    if scores.shape[0] == 1:
        return fit_temperature(scores[0].numpy(), y_true)
    raw = np.asarray(y_true)
    if raw.size and not np.all(np.mod(raw, 1) == 0):
        raise DataError("y_true must hold integer class indices")
    truth = torch.from_numpy(raw.astype(np.int64))
    if scores.dim() != 3 or truth.shape != (scores.shape[1],) or truth.numel() == 0:
        raise DataError(f"logits (views, N, C) {tuple(scores.shape)} and y_true {tuple(truth.shape)} do not match")
    if truth.min() < 0 or truth.max() >= scores.shape[2] or not torch.isfinite(scores).all():
        raise DataError("y_true holds class indices outside the logits' classes, or the logits are not finite")

    def nll(log_t: float) -> float:
        probabilities = torch.softmax(scores / float(np.exp(log_t)), dim=-1).mean(dim=0)
        picked = probabilities[torch.arange(truth.numel()), truth].clamp_min(1e-300)
        return float(-picked.log().mean())

    result = minimize_scalar(nll, bounds=(np.log(1e-2), np.log(1e2)), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))
