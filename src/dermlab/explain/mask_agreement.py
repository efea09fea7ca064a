"""How well a CAM agrees with a lesion segmentation mask: energy inside the mask and the pointing game.

Masks: any 2-D array or PIL image; nonzero pixels are lesion (so 0/1, bool and 0/255 masks all work). CAMs:
2-D non-negative maps of any size, resized bilinearly to the mask's size before comparison.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from dermlab.errors import ConfigError
from dermlab.explain.gradcam import _resize_map

__all__ = ["cam_energy_in_mask", "mask_area_share", "pointing_game_hit", "summarise_mask_agreement"]


def _as_mask(mask: np.ndarray | Image.Image) -> np.ndarray:
    array = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):  # a mask saved as an RGB(A) image
        array = array[:, :, 0]
    if array.ndim != 2 or array.size == 0:
        raise ConfigError(f"lesion mask must be a non-empty 2-D array, got shape {array.shape}")
    return array != 0


def _cam_on_mask(cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    resized = _resize_map(np.nan_to_num(np.asarray(cam, dtype=np.float32)), mask.shape[0], mask.shape[1])
    return np.clip(resized, 0.0, None)


def mask_area_share(mask: np.ndarray | Image.Image) -> float:
    """Fraction of the image covered by the mask: the energy share a uniform (uninformative) CAM would get."""
    return float(_as_mask(mask).mean())


def cam_energy_in_mask(cam: np.ndarray, mask: np.ndarray | Image.Image) -> float:
    """Share of the CAM's total mass that falls inside the lesion mask, in ``[0, 1]``.

    A CAM with no mass (all zeros, which is what a constant map becomes after min-max scaling) carries no
    localisation; it is scored as a uniform map, i.e. the mask's area share, rather than NaN.
    """
    mask_array = _as_mask(mask)
    values = _cam_on_mask(cam, mask_array)
    total = float(values.sum(dtype=np.float64))
    if total <= 0.0:
        return float(mask_array.mean())
    return float(values[mask_array].sum(dtype=np.float64) / total)


def pointing_game_hit(cam: np.ndarray, mask: np.ndarray | Image.Image, tolerance_px: int = 0) -> bool:
    """Whether the CAM's maximum lies inside the mask, or within ``tolerance_px`` pixels of it (Euclidean).

    The maximum is taken on the CAM resized to the mask's size (first one in row-major order on ties). A
    constant CAM has no peak and counts as a miss; so does an empty mask.
    """
    if tolerance_px < 0:
        raise ConfigError(f"pointing game tolerance_px must be >= 0, got {tolerance_px}")
    mask_array = _as_mask(mask)
    values = _cam_on_mask(cam, mask_array)
    if not mask_array.any() or float(values.max()) <= float(values.min()):
        return False
    row, column = np.unravel_index(int(np.argmax(values)), values.shape)
    if mask_array[row, column]:
        return True
    if tolerance_px == 0:
        return False
    mask_rows, mask_columns = np.nonzero(mask_array)
    squared = (mask_rows - row) ** 2 + (mask_columns - column) ** 2
    return bool(squared.min() <= tolerance_px**2)


def summarise_mask_agreement(
    cams: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray | Image.Image] | np.ndarray,
    tolerance_px: int = 0,
) -> dict[str, float | int]:
    """Mean agreement over paired CAMs and masks.

    Returns ``n``, ``mean_energy_in_mask``, ``mean_mask_area_share`` (the chance level for the energy share
    and for the pointing game: what a uniform map / a random point would score), ``energy_over_chance``
    (``mean_energy_in_mask / mean_mask_area_share``; NaN when every mask is empty) and
    ``pointing_game_hit_rate``.
    """
    if len(cams) != len(masks):
        raise ConfigError(f"mask agreement: {len(cams)} CAMs but {len(masks)} masks")
    if len(cams) == 0:
        raise ConfigError("mask agreement: no CAM / mask pairs to summarise")
    energies, areas, hits = [], [], []
    for cam, mask in zip(cams, masks):
        mask_array = _as_mask(mask)
        energies.append(cam_energy_in_mask(cam, mask_array))
        areas.append(float(mask_array.mean()))
        hits.append(pointing_game_hit(cam, mask_array, tolerance_px))
    mean_energy = float(np.mean(energies))
    mean_area = float(np.mean(areas))
    return {
        "n": len(energies),
        "mean_energy_in_mask": mean_energy,
        "mean_mask_area_share": mean_area,
        "energy_over_chance": mean_energy / mean_area if mean_area > 0 else float("nan"),
        "pointing_game_hit_rate": float(np.mean(hits)),
    }
