"""What a network expects of its input pixels; stored in every checkpoint so inference rebuilds it exactly."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from dermlab.errors import ConfigError

__all__ = ["INTERPOLATIONS", "RESIZE_MODES", "Preprocessing"]

# The resampling filters torchvision's ``InterpolationMode`` accepts, by their string value.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")

# How an image of another aspect ratio meets ``input_size`` (see ``dermlab.data.transforms``).
RESIZE_MODES = ("squash", "letterbox", "crop")


@dataclass(frozen=True)
class Preprocessing:
    """Input size ``(height, width)``, per-channel mean / std on 0-1 pixels, resize filter, colour constancy.

    ``color_constancy_p`` is the Minkowski exponent of ``shades_of_gray`` (other methods ignore it);
    ``resize_mode`` is ``squash`` (stretch to ``input_size``), ``letterbox`` (fit, pad black) or ``crop``
    (cover, centre crop). Lists are accepted and stored as tuples, so a value read back from JSON compares
    equal to the original; keys added after a checkpoint was written take their defaults when read back.
    """

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    color_constancy: str | None = None
    color_constancy_p: float = 6.0
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        size = _numbers("preprocessing.input_size", self.input_size, 2)
        if any(s != int(s) or s <= 0 for s in size):
            raise ConfigError(
                f"preprocessing.input_size must be two positive integers, got {self.input_size!r}"
            )
        mean = _numbers("preprocessing.mean", self.mean, 3)
        std = _numbers("preprocessing.std", self.std, 3)
        if any(s <= 0 for s in std):
            raise ConfigError(f"preprocessing.std must be > 0, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            valid = ", ".join(INTERPOLATIONS)
            raise ConfigError(f"preprocessing.interpolation: one of {valid}; got {self.interpolation!r}")
        if self.color_constancy is not None and not isinstance(self.color_constancy, str):
            raise ConfigError(
                f"preprocessing.color_constancy must be a name or null, got {self.color_constancy!r}"
            )
        p = self.color_constancy_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1:
            raise ConfigError(f"preprocessing.color_constancy_p must be a finite number >= 1, got {p!r}")
        if self.resize_mode not in RESIZE_MODES:
            valid = ", ".join(RESIZE_MODES)
            raise ConfigError(f"preprocessing.resize_mode: one of {valid}; got {self.resize_mode!r}")
        object.__setattr__(self, "color_constancy_p", float(p))
        object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "mean", tuple(float(m) for m in mean))
        object.__setattr__(self, "std", tuple(float(s) for s in std))

    @property
    def height(self) -> int:
        return self.input_size[0]

    @property
    def width(self) -> int:
        return self.input_size[1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (lists, not tuples)."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "color_constancy": self.color_constancy,
            "color_constancy_p": self.color_constancy_p,
            "resize_mode": self.resize_mode,
        }

    def pixel_pipeline(self) -> dict[str, Any]:
        """What a resize and a re-normalisation of another preprocessing's output cannot reproduce: colour
        constancy (with its exponent when it has one) and the resize mode. Two preprocessings with equal pipelines
        differ only in size, filter and normalisation, so one's tensors convert to the other's."""
        return {
            "color_constancy": self.color_constancy,
            "color_constancy_p": self.color_constancy_p if self.color_constancy else None,
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError`."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"preprocessing must be a mapping, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"unknown preprocessing key {unknown[0]!r}; valid keys: {', '.join(names)}")
        missing = [name for name in ("input_size", "mean", "std") if name not in values]
        if missing:
            raise ConfigError(f"preprocessing is missing {', '.join(missing)}")
        return cls(**dict(values))


def _numbers(where: str, value: Any, count: int) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        raise ConfigError(f"{where} must be {count} numbers, got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value):
        raise ConfigError(f"{where} must be {count} finite numbers, got {value!r}")
    return tuple(value)
