"""Class-balanced and square-root samplers: frequencies, determinism, DDP sharding."""

import math
from collections import Counter

import pytest
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from dermlab.errors import ConfigError
from dermlab.training.samplers import ClassPowerSampler, class_sampling_probabilities, create_sampler

LABELS = [0] * 80 + [1] * 16 + [2] * 4


def _class_shares(sampler: ClassPowerSampler) -> list[float]:
    counts = Counter(LABELS[index] for index in sampler)
    return [counts[c] / len(sampler) for c in range(3)]


def test_none_gives_no_sampler() -> None:
    assert create_sampler(LABELS, "none") is None


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("balanced", [1 / 3, 1 / 3, 1 / 3]),
        ("sqrt", [math.sqrt(n) / (math.sqrt(80) + 4 + 2) for n in (80, 16, 4)]),
    ],
)
def test_class_frequencies_match_the_target(kind: str, target: list[float]) -> None:
    sampler = create_sampler(LABELS, kind, num_samples=20_000, seed=3)
    assert isinstance(sampler, ClassPowerSampler) and len(sampler) == 20_000
    assert _class_shares(sampler) == pytest.approx(target, abs=0.015)
    assert list(class_sampling_probabilities(LABELS, sampler.power).values()) == pytest.approx(target)


def test_samples_within_a_class_are_uniform() -> None:
    sampler = create_sampler(LABELS, "balanced", num_samples=20_000)
    counts = Counter(index for index in sampler if LABELS[index] == 2)
    assert sorted(counts) == [96, 97, 98, 99]
    assert max(counts.values()) / min(counts.values()) < 1.3


def test_default_epoch_length_and_determinism() -> None:
    first, second = create_sampler(LABELS, "sqrt", seed=5), create_sampler(LABELS, "sqrt", seed=5)
    assert len(first) == len(LABELS)
    assert list(first) == list(second) == list(first)  # iterating twice repeats the epoch
    first.set_epoch(1)
    assert list(first) != list(second)
    second.set_epoch(1)
    assert list(first) == list(second)
    assert list(create_sampler(LABELS, "sqrt", seed=6)) != list(create_sampler(LABELS, "sqrt", seed=5))


def test_distributed_wrapper_splits_the_epoch_between_two_ranks() -> None:
    sampler = create_sampler(LABELS, "balanced", seed=1)
    shards = [list(DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(LABELS) // 2
    assert Counter(shards[0]) + Counter(shards[1]) == Counter(sampler)


def test_distributed_wrapper_forwards_set_epoch() -> None:
    sampler = create_sampler(LABELS, "balanced", seed=1)
    wrapper = DistributedSamplerWrapper(sampler, num_replicas=2, rank=0)
    wrapper.set_epoch(4)
    assert sampler.epoch == 4


def test_unknown_kind_and_empty_labels_raise() -> None:
    with pytest.raises(ConfigError, match="valid names: balanced, none, sqrt"):
        create_sampler(LABELS, "inverse")
    with pytest.raises(ConfigError, match="non-empty"):
        create_sampler([], "balanced")
