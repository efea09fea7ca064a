"""Preprocessing: a frozen, validated record that survives a JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import ConfigError


def test_json_round_trip_and_tuple_coercion() -> None:
    preprocessing = Preprocessing(input_size=[300, 400], mean=[0.5, 0.5, 0.5], std=(0.25, 0.25, 0.25))
    assert preprocessing.input_size == (300, 400) and isinstance(preprocessing.mean, tuple)
    assert (preprocessing.height, preprocessing.width) == (300, 400)
    data = json.loads(json.dumps(preprocessing.to_dict()))
    assert data == {
        "input_size": [300, 400],
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bicubic",
        "color_constancy": None,
        "color_constancy_p": 6.0,
        "resize_mode": "squash",
    }
    assert Preprocessing.from_dict(data) == preprocessing


def test_frozen() -> None:
    preprocessing = Preprocessing((224, 224), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preprocessing.input_size = (1, 1)  # type: ignore[misc]


VALID = {"input_size": [224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"input_size": [224], "mean": [0.5] * 3, "std": [0.5] * 3}, "input_size must be 2 numbers"),
        ({"input_size": [0, 224], "mean": [0.5] * 3, "std": [0.5] * 3}, "two positive integers"),
        ({"input_size": [224, 224.5], "mean": [0.5] * 3, "std": [0.5] * 3}, "two positive integers"),
        ({"input_size": [224, 224], "mean": "0.5", "std": [0.5] * 3}, "mean must be 3 numbers"),
        ({"input_size": [224, 224], "mean": [0.5] * 3, "std": [0.5, 0.0, 0.5]}, "std must be > 0"),
        ({"input_size": [224, 224], "mean": [0.5, None, 0.5], "std": [0.5] * 3}, "finite numbers"),
        ({**VALID, "interpolation": "cubic"}, "bicubic"),
        ({**VALID, "color_constancy": 3}, "color_constancy"),
        ({**VALID, "crop_pct": 0.9}, "unknown .*crop_pct"),
        ({"input_size": [224, 224], "mean": [0.5] * 3}, "missing std"),
        ([224, 224], "must be a mapping"),
    ],
)
def test_invalid_values_are_config_errors(values: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Preprocessing.from_dict(values)  # type: ignore[arg-type]


def test_pixel_pipeline_ignores_what_a_resize_and_renormalisation_convert() -> None:
    base = Preprocessing(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    convertible = Preprocessing(input_size=(40, 48), mean=(0.4, 0.5, 0.6), std=(0.3, 0.2, 0.1), interpolation="bilinear",
                                color_constancy_p=2.0)  # the exponent matters only with colour constancy on
    assert convertible.pixel_pipeline() == base.pixel_pipeline()
    for change in ({"color_constancy": "shades_of_gray"}, {"resize_mode": "crop"}):
        assert dataclasses.replace(base, **change).pixel_pipeline() != base.pixel_pipeline()
    gray = dataclasses.replace(base, color_constancy="shades_of_gray")
    assert dataclasses.replace(gray, color_constancy_p=2.0).pixel_pipeline() != gray.pixel_pipeline()
