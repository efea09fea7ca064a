"""Curricula: the ramp shapes, instance weights, and the growing class-balanced subset."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dermlab.config import Config, apply_overrides
from dermlab.errors import ConfigError
from dermlab.training.curriculum import (
    BalancedSubsetSampler,
    create_curriculum_sampler,
    curriculum_ramp,
    instance_weights,
)
from dermlab.training.samplers import ClassPowerSampler


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # 10 epochs, fraction 0.4: the ramp spans epochs 0..4, t = epoch / 4
        ("linear", [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]),
        # LFME's schedules: 1 - cos(pi t / 2) and log2(1 + t)
        ("convex", [0.0, 0.07612, 0.29289, 0.61732, 1.0, 1.0, 1.0]),
        ("concave", [0.0, 0.32193, 0.58496, 0.80735, 1.0, 1.0, 1.0]),
    ],
)
def test_ramp_shapes_reach_uniform_after_the_fraction(shape: str, expected: list[float]) -> None:
    values = [curriculum_ramp(epoch, 10, fraction=0.4, shape=shape) for epoch in range(7)]
    assert values == pytest.approx(expected, abs=1e-5)


def test_convex_stays_below_linear_and_concave_above() -> None:
    for epoch in range(1, 5):
        linear = curriculum_ramp(epoch, 10, 0.5, "linear")
        assert curriculum_ramp(epoch, 10, 0.5, "convex") < linear < curriculum_ramp(epoch, 10, 0.5, "concave")


def test_ramp_rejects_a_bad_fraction_and_shape() -> None:
    with pytest.raises(ConfigError, match="curriculum_fraction"):
        curriculum_ramp(0, 10, fraction=0.0)
    with pytest.raises(ConfigError, match="curriculum shape"):
        curriculum_ramp(0, 10, shape="wavy")


def test_instance_weights_go_from_easiness_to_uniform() -> None:
    easiness = torch.tensor([0.9, 0.5, 0.1, 1.2])  # out-of-range values are clipped
    assert instance_weights(easiness, 0.0).tolist() == pytest.approx([0.9, 0.5, 0.1, 1.0])
    assert instance_weights(easiness, 0.5).tolist() == pytest.approx([0.95, 0.75, 0.55, 1.0])
    assert instance_weights(easiness, 1.0).tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    # easy first: the order of the weights is the order of the easiness until the ramp ends
    weights = instance_weights(easiness[:3], 0.3)
    assert weights[0] > weights[1] > weights[2]


LABELS = [0] * 20 + [1] * 8 + [2] * 4  # 32 images, the smallest class has 4


def test_balanced_subset_starts_balanced_and_grows_to_everything() -> None:
    sampler = BalancedSubsetSampler(LABELS, total_epochs=10, fraction=0.5, shape="linear", seed=3)
    assert sampler.subset_sizes(0) == {0: 4, 1: 4, 2: 4}
    # epoch 2 of a 5-epoch ramp: 4 + 0.4 * (n - 4)
    assert sampler.subset_sizes(2) == {0: round(4 + 0.4 * 16), 1: round(4 + 0.4 * 4), 2: 4}
    assert sampler.subset_sizes(5) == {0: 20, 1: 8, 2: 4}
    previous: set[int] = set()
    for epoch in range(10):
        current = set(sampler.subset(epoch).tolist())
        assert previous <= current  # the subset only grows
        previous = current
    assert previous == set(range(len(LABELS)))


def test_balanced_subset_epochs_draw_only_the_subset_with_a_constant_length() -> None:
    sampler = BalancedSubsetSampler(LABELS, total_epochs=10, fraction=0.5, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    assert len(first) == len(sampler) == len(LABELS)
    assert set(first) <= set(sampler.subset(0).tolist())
    counts = Counter(LABELS[i] for i in first)
    assert max(counts.values()) - min(counts.values()) <= 1  # a balanced epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # reproducible from seed and epoch
    sampler.set_epoch(7)
    assert sorted(sampler) == list(range(len(LABELS)))  # after the ramp: every image once


def test_stage_two_continues_the_ramp() -> None:
    stage2 = BalancedSubsetSampler(LABELS, total_epochs=4, fraction=1.0, epoch_offset=2, seed=0)
    stage1 = BalancedSubsetSampler(LABELS, total_epochs=4, fraction=1.0, seed=0)
    assert stage2.subset_sizes(0) == stage1.subset_sizes(2)


def test_create_curriculum_sampler_replaces_only_for_balanced_subset() -> None:
    base = ClassPowerSampler(LABELS, 0.5)
    plain = apply_overrides(Config(), ["data.sampler=sqrt"])
    assert create_curriculum_sampler(plain, LABELS, base) is base
    subset = apply_overrides(Config(), ["distill.curriculum=balanced_subset", "train.stage1_epochs=3", "train.stage2_epochs=2"])
    sampler = create_curriculum_sampler(subset, LABELS, None, epoch_offset=3)
    assert isinstance(sampler, BalancedSubsetSampler)
    assert (sampler.total_epochs, sampler.epoch_offset) == (5, 3)
    clash = apply_overrides(subset, ["data.sampler=balanced"])
    with pytest.raises(ConfigError, match="data.sampler=none"):
        create_curriculum_sampler(clash, LABELS, base)


def test_instance_curriculum_needs_a_teacher() -> None:
    with pytest.raises(ConfigError, match="distill.method"):
        apply_overrides(Config(), ["distill.curriculum=instance"])
