"""The loaders over cached backbone outputs: views cycle epoch by epoch, the run's sampler order is kept,
metadata rides along, and a last batch of one image is dropped as on images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dermlab.data.datamodule import CachedSplit, FeatureDataModule


def _split(views: int, n: int, keep: list[bool] | None = None) -> CachedSplit:
    keep_mask = np.array(keep if keep is not None else [True] * n)
    kept = int(keep_mask.sum())
    # feature value = 100 * view + row, so a batch tells which view and row it came from
    features = torch.stack([torch.arange(kept, dtype=torch.float32) + 100 * v for v in range(views)]).unsqueeze(-1)
    frame = pd.DataFrame({"age": [float(i) for i in range(n)], "sex": ["male"] * n, "localization": ["back"] * n})
    return CachedSplit(features, [i % 2 for i in range(kept)], frame, keep_mask)


def _epoch(module: FeatureDataModule, epoch: int) -> list[torch.Tensor]:
    loader = module.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [inputs for inputs, _ in loader]


def test_each_epoch_reads_the_next_cached_view_in_the_samplers_order() -> None:
    order = [4, 0, 3, 1, 2]
    module = FeatureDataModule(_split(views=2, n=5), _split(views=1, n=3), batch_size=5, train_sampler=order)
    first, second, third = (torch.cat(_epoch(module, e)).flatten().tolist() for e in range(3))
    assert first == [float(i) for i in order]
    assert second == [100.0 + i for i in order]
    assert third == first
    val = torch.cat([inputs for inputs, _ in module.val_dataloader()]).flatten().tolist()
    assert val == [0.0, 1.0, 2.0]


def test_a_last_batch_of_one_image_is_dropped_and_metadata_follows_the_kept_rows() -> None:
    encoded_ages = []

    def encoder(frame: pd.DataFrame) -> torch.Tensor:
        encoded_ages.append(frame["age"].tolist())
        return torch.tensor(frame["age"].to_numpy(), dtype=torch.float32).unsqueeze(1)

    train = _split(views=1, n=6, keep=[True, False, True, True, True, True])  # 5 kept rows: batches of 4 + 1
    module = FeatureDataModule(train, _split(views=1, n=2), batch_size=4, train_sampler=list(range(5)), metadata_encoder=encoder)
    batches = list(module.train_dataloader())
    assert [len(labels) for _, labels in batches] == [4]
    (features, metadata), _ = batches[0]
    assert encoded_ages[0] == [0.0, 2.0, 3.0, 4.0, 5.0]  # the excluded row's metadata never reaches the loader
    assert metadata.flatten().tolist() == [0.0, 2.0, 3.0, 4.0]
    assert features.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_wrap_train_wraps_only_the_training_dataset() -> None:
    wrapped = []

    def wrap(dataset):
        wrapped.append(len(dataset))
        return dataset

    module = FeatureDataModule(_split(views=3, n=4), _split(views=1, n=2), batch_size=2, wrap_train=wrap)
    assert sum(len(labels) for _, labels in module.train_dataloader()) == 4
    module.val_dataloader()
    assert wrapped == [12]  # 3 views x 4 images, once
