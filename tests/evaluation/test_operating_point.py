"""Operating points fitted on val, carried in the checkpoint and scored on other images: a hand-made case."""

from __future__ import annotations

import numpy as np
import pytest

from dermlab.errors import CheckpointError
from dermlab.evaluation.metrics import operating_points
from dermlab.evaluation.operating_point import OperatingPoints, checkpoint_operating_points

CLASSES = ("nv", "mel")


def _target(is_mel: np.ndarray, p_mel: np.ndarray) -> dict:
    return {"class": "mel", **operating_points(is_mel, p_mel, 0.75, 0.75)}


def test_val_thresholds_score_other_images_at_the_same_threshold() -> None:
    # val: 4 nevi (0.1, 0.2, 0.3, 0.6) and 4 melanomas (0.4, 0.7, 0.8, 0.9): specificity 0.75 allows one nevus flagged,
    # so the threshold is 0.4 (0.6 is the one nevus above it) with all 4 melanomas: sensitivity 1.0
    val = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    is_mel = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    points = OperatingPoints.from_target_metrics(_target(is_mel, val), "val")
    assert points is not None and points.target == "mel"
    assert points.points["specificity 0.75"] == {"threshold": 0.4, "sensitivity": 1.0, "specificity": 0.75}
    # another clinic: every score lower; at the val threshold 0.4 one of 4 melanomas and none of 2 nevi are flagged
    shifted = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.5])
    truth = np.array([0, 0, 1, 1, 1, 1])
    scored = points.score(truth, np.stack([1 - shifted, shifted], axis=1), CLASSES)
    at = scored["points"]["specificity 0.75"]
    assert (scored["positives"], scored["negatives"]) == (4, 2)
    assert (at["sensitivity"], at["specificity"], at["val_sensitivity"], at["val_specificity"]) == (0.25, 1.0, 1.0, 0.75)
    # re-fitted on the shifted images' own labels the same rule would look far better: that is what it hides
    refitted = operating_points(truth == 1, shifted, 0.75, 0.75)["sensitivity_at_specificity"]
    assert refitted["sensitivity"] == 1.0


def test_a_set_without_negatives_has_no_specificity_and_a_model_without_the_class_no_score() -> None:
    points = OperatingPoints("mel", "val", {"specificity 0.8": {"threshold": 0.5, "sensitivity": 0.9, "specificity": 0.8}})
    scored = points.score(np.array([1, 1]), np.array([[0.3, 0.7], [0.8, 0.2]]), CLASSES)
    assert scored["points"]["specificity 0.8"]["sensitivity"] == 0.5 and scored["points"]["specificity 0.8"]["specificity"] is None
    assert points.score(np.array([0]), np.array([[1.0, 0.0]]), ("nv", "bkl")) is None


def test_no_target_or_no_finite_threshold_gives_none_and_the_stored_form_round_trips() -> None:
    assert OperatingPoints.from_target_metrics(None, "val") is None
    undefined = {"requested": 0.8, "specificity": None, "sensitivity": None, "threshold": None}
    none_fitted = {"class": "mel", "sensitivity_at_specificity": undefined, "specificity_at_sensitivity": undefined}
    assert OperatingPoints.from_target_metrics(none_fitted, "val") is None
    points = OperatingPoints("mel", "val", {"sensitivity 0.8": {"threshold": 0.13, "sensitivity": 0.8, "specificity": 0.87}})
    assert checkpoint_operating_points({"operating_points": points.to_dict()}, "x.ckpt") == points
    assert checkpoint_operating_points({}, "x.ckpt") is None


def test_a_damaged_stored_entry_is_refused_naming_the_checkpoint() -> None:
    with pytest.raises(CheckpointError, match=r"x\.ckpt: damaged operating points"):
        checkpoint_operating_points({"operating_points": {"class": "mel", "points": {}}}, "x.ckpt")
    with pytest.raises(CheckpointError, match="at least one finite threshold"):
        checkpoint_operating_points({"operating_points": {"class": "mel", "fitted_on": "val", "points": {
            "specificity 0.8": {"threshold": float("inf"), "sensitivity": 1.0, "specificity": 0.8}}}}, "x.ckpt")
