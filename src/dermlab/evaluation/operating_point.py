"""The target class's operating points fitted on val, carried in the checkpoint and scored on other images.

A split's ``target`` metrics hold, for the target class (e.g. mel), the threshold on its probability that gives
the fixed specificity (and the one that gives the fixed sensitivity) on that split. Re-fitting that threshold on
every evaluated set answers "how good could a threshold be here"; a clinic gets the threshold fitted before it
saw its images. So the run stores the val split's thresholds in its best checkpoint
(``checkpoint["dermlab"]["operating_points"]``), and every later evaluation (the test split, ``evaluate --data``
on another clinic's images) reports the sensitivity and specificity it gets *at those thresholds*: whether the
operating point travels. Off its home data it often does not: the whole score distribution moves.

This module stays light (numpy only), like :mod:`dermlab.evaluation.decision`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dermlab.errors import CheckpointError

__all__ = ["OperatingPoints", "checkpoint_operating_points"]

#: the operating points of a split's ``target`` metrics, and what each fixes
_POINTS = (("sensitivity_at_specificity", "specificity"), ("specificity_at_sensitivity", "sensitivity"))


@dataclass(frozen=True)
class OperatingPoints:
    """The target class's thresholds fitted on one split: ``{"specificity 0.8": {"threshold", "sensitivity",
    "specificity"}, ...}``, the last two the values achieved on the split they were fitted on."""

    target: str
    fitted_on: str
    points: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def from_target_metrics(cls, target: Mapping[str, Any] | None, fitted_on: str) -> OperatingPoints | None:
        """From a split's ``metrics["target"]``; None without a target class or without any finite threshold."""
        if not target or not target.get("class"):
            return None
        points = {}
        for key, fixed in _POINTS:
            point = target.get(key) or {}
            if point.get("threshold") is not None:
                points[f"{fixed} {point['requested']:g}"] = {
                    "threshold": float(point["threshold"]),
                    "sensitivity": float(point["sensitivity"]),
                    "specificity": float(point["specificity"]),
                }
        return cls(str(target["class"]), fitted_on, points) if points else None

    def score(self, truth: Sequence[int] | np.ndarray, probabilities: np.ndarray, classes: Sequence[str]) -> dict[str, Any] | None:
        """Sensitivity and specificity of ``positive if p(target) >= threshold`` on these images at each point;
        either is None where the images hold no positives (no negatives). None when the model lacks the target."""
        if self.target not in classes:
            return None
        positive = np.asarray(truth) == list(classes).index(self.target)
        flagged = np.asarray(probabilities, dtype=np.float64)[:, list(classes).index(self.target)][:, None] >= np.array(
            [point["threshold"] for point in self.points.values()]
        )
        scored = {}
        for k, (name, point) in enumerate(self.points.items()):
            scored[name] = {
                "threshold": point["threshold"],
                f"{self.fitted_on}_sensitivity": point["sensitivity"],
                f"{self.fitted_on}_specificity": point["specificity"],
                "sensitivity": float(flagged[positive, k].mean()) if positive.any() else None,
                "specificity": float(1.0 - flagged[~positive, k].mean()) if (~positive).any() else None,
            }
        return {"class": self.target, "fitted_on": self.fitted_on, "positives": int(positive.sum()),
                "negatives": int((~positive).sum()), "points": scored}

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.target, "fitted_on": self.fitted_on, "points": {k: dict(v) for k, v in self.points.items()}}

    @classmethod
    def from_dict(cls, value: Mapping[str, Any], source: str) -> OperatingPoints:
        try:
            points = {str(name): {key: float(point[key]) for key in ("threshold", "sensitivity", "specificity")}
                      for name, point in dict(value["points"]).items()}
            result = cls(str(value["class"]), str(value["fitted_on"]), points)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: damaged operating points (needs class, fitted_on and points with "
                                  f"threshold, sensitivity, specificity), got {value!r}") from None
        if not points or not all(np.isfinite(p["threshold"]) for p in points.values()):
            raise CheckpointError(f"{source}: operating points need at least one finite threshold, got {value!r}")
        return result


def checkpoint_operating_points(extras: Mapping[str, Any], source: str) -> OperatingPoints | None:
    """The ``operating_points`` of a checkpoint's extras, or None (a run trained before they were stored)."""
    value = extras.get("operating_points")
    return OperatingPoints.from_dict(value, source) if value else None
