"""Class weights: inverse frequency and effective number, normalised to mean 1."""

import math

import pytest
import torch

from dermlab.errors import ConfigError
from dermlab.losses import class_priors, compute_class_weights, resolve_class_weights

COUNTS = [50, 10, 5]


def test_inverse_weights_are_total_over_count_with_mean_one() -> None:
    weights = compute_class_weights(COUNTS, "inverse")
    raw = [sum(COUNTS) / n for n in COUNTS]
    expected = [value / (sum(raw) / len(raw)) for value in raw]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(weights.mean()) == pytest.approx(1.0, rel=1e-6)


def test_effective_number_weights_follow_cui_et_al() -> None:
    beta = 0.9
    weights = compute_class_weights(COUNTS, "effective", beta=beta)
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    expected = [value * len(raw) / sum(raw) for value in raw]
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(weights.mean()) == pytest.approx(1.0, rel=1e-6)


def test_effective_weights_interpolate_between_equal_and_inverse() -> None:
    assert compute_class_weights(COUNTS, "effective", beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    nearly_inverse = compute_class_weights(COUNTS, "effective", beta=1 - 1e-9)
    inverse = compute_class_weights(COUNTS, "inverse")
    assert nearly_inverse.tolist() == pytest.approx(inverse.tolist(), rel=1e-4)


def test_explicit_weights_are_used_as_given_and_checked() -> None:
    assert resolve_class_weights([1.0, 2.0, 3.0], COUNTS).tolist() == [1.0, 2.0, 3.0]
    assert resolve_class_weights(None, COUNTS) is None
    with pytest.raises(ConfigError, match="one weight per class"):
        resolve_class_weights([1.0, 2.0], COUNTS)


def test_bad_method_and_empty_class_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="valid: inverse, effective"):
        compute_class_weights(COUNTS, "sqrt")
    with pytest.raises(ConfigError, match=r"\[1\]"):
        compute_class_weights([4, 0, 2], "inverse")
    with pytest.raises(ConfigError, match="beta"):
        compute_class_weights(COUNTS, "effective", beta=1.0)


def test_priors_sum_to_one() -> None:
    priors = class_priors(COUNTS)
    assert priors.tolist() == pytest.approx([n / 65 for n in COUNTS])
    assert math.isclose(float(priors.sum()), 1.0, rel_tol=1e-6)
    assert priors.dtype == torch.float32
