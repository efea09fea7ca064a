"""A training epoch never ends with a batch of one image (a training BatchNorm layer cannot normalise it)."""

from __future__ import annotations

from dermlab.data.datamodule import leaves_a_lone_sample


def test_only_a_last_batch_of_exactly_one_image_is_dropped() -> None:
    assert leaves_a_lone_sample(33, 32) and leaves_a_lone_sample(9, 4)
    assert not leaves_a_lone_sample(32, 32) and not leaves_a_lone_sample(34, 32) and not leaves_a_lone_sample(31, 32)
    assert not leaves_a_lone_sample(1, 32)  # a one-image dataset keeps its image (nothing else to train on)
