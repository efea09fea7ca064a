"""Energy-in-mask and pointing game on hand-made CAMs and masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from dermlab.errors import ConfigError
from dermlab.explain import cam_energy_in_mask, mask_area_share, pointing_game_hit, summarise_mask_agreement


def _mask() -> np.ndarray:
    mask = np.zeros((20, 20), dtype=np.uint8)
    mask[5:10, 5:10] = 255  # 0/255 like a saved PNG mask; a quarter-of-a-quarter = 6.25 % of the image
    return mask


def _cam_peak_at(row: int, column: int, size: int = 20) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[row, column] = 1.0
    return cam


def test_energy_inside_and_outside() -> None:
    mask = _mask()
    assert cam_energy_in_mask(_cam_peak_at(7, 7), mask) == pytest.approx(1.0)
    assert cam_energy_in_mask(_cam_peak_at(15, 15), mask) == pytest.approx(0.0)
    half = _cam_peak_at(7, 7) + _cam_peak_at(15, 15)
    assert cam_energy_in_mask(half, mask) == pytest.approx(0.5)


def test_energy_resizes_the_cam_and_handles_zero_mass() -> None:
    mask = _mask()
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[1:2, 1:2] = 1.0  # the cell over rows/cols 5-9 of the 20x20 mask
    assert cam_energy_in_mask(cam, mask) > 0.5
    uniform_share = cam_energy_in_mask(np.zeros((4, 4)), mask)  # no mass: scored like a uniform map
    assert uniform_share == pytest.approx(mask_area_share(mask)) == pytest.approx(25 / 400)
    assert cam_energy_in_mask(np.ones((4, 4)), mask) == pytest.approx(25 / 400)
    assert cam_energy_in_mask(np.full((4, 4), np.nan), mask) == pytest.approx(25 / 400)


def test_pointing_game() -> None:
    mask = _mask()
    assert pointing_game_hit(_cam_peak_at(6, 6), mask)
    assert not pointing_game_hit(_cam_peak_at(15, 15), mask)
    assert not pointing_game_hit(_cam_peak_at(12, 7), mask)  # 3 px below the mask
    assert pointing_game_hit(_cam_peak_at(12, 7), mask, tolerance_px=3)
    assert not pointing_game_hit(_cam_peak_at(12, 12), mask, tolerance_px=3)  # diagonal: ~4.2 px away
    assert not pointing_game_hit(np.zeros((5, 5)), mask)  # no peak, no hit
    assert not pointing_game_hit(_cam_peak_at(6, 6), np.zeros((20, 20)))  # empty mask
    assert pointing_game_hit(_cam_peak_at(6, 6), Image.fromarray(mask))  # PIL masks work
    with pytest.raises(ConfigError, match="tolerance_px"):
        pointing_game_hit(_cam_peak_at(6, 6), mask, tolerance_px=-1)


def test_summary() -> None:
    mask = _mask()
    summary = summarise_mask_agreement([_cam_peak_at(7, 7), _cam_peak_at(15, 15)], [mask, mask])
    assert summary["n"] == 2
    assert summary["mean_energy_in_mask"] == pytest.approx(0.5)
    assert summary["pointing_game_hit_rate"] == pytest.approx(0.5)
    assert summary["mean_mask_area_share"] == pytest.approx(25 / 400)
    assert summary["energy_over_chance"] == pytest.approx(0.5 / (25 / 400))
    empty = summarise_mask_agreement([_cam_peak_at(7, 7)], [np.zeros((20, 20))])
    assert math.isnan(empty["energy_over_chance"])


def test_summary_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="2 CAMs but 1 masks"):
        summarise_mask_agreement([np.zeros((4, 4))] * 2, [_mask()])
    with pytest.raises(ConfigError, match="no CAM"):
        summarise_mask_agreement([], [])
    with pytest.raises(ConfigError, match="2-D"):
        cam_energy_in_mask(np.zeros((4, 4)), np.zeros((2, 2, 2, 2)))
