"""Datasets and the LightningDataModule that feed images to the model (cached features have their own loaders,
built by the stage that reads them: :mod:`dermlab.training.features`).

Augmentation randomness is keyed per draw: the sampler yields ``(index, seed)`` pairs and the dataset seeds
torch's generator from that key before transforming. The same seed and epoch therefore give the same
augmented batch whichever worker decodes it and whether or not the run was interrupted and resumed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dermlab.data.images import read_image
from dermlab.data.splits import split_rows
from dermlab.errors import DataError

__all__ = ["ImageDataset", "KeyedSampler", "SeededRandomSampler", "DermDataModule", "draw_seed", "leaves_a_lone_sample"]


def draw_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (base seed, epoch, position), stable across processes."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ImageDataset(Dataset):
    """Rows of a dataset frame as ``(image_tensor, label_index)``.

    ``frame`` needs ``path`` and ``label`` columns; ``classes`` fixes the label order. An index may be an int
    or an ``(index, seed)`` pair from :class:`KeyedSampler`. With ``metadata`` (one encoded row per frame row,
    for metadata fusion) items are ``((image_tensor, metadata_row), label_index)``.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        classes: Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        image_loader: Callable[[str], Any] = read_image,
        metadata: torch.Tensor | None = None,
    ) -> None:
        self.paths = frame["path"].astype(str).tolist()
        index = {name: i for i, name in enumerate(classes)}
        self.labels = np.array([index[label] for label in frame["label"]], dtype=np.int64)
        self.transform = transform
        self.image_loader = image_loader
        if metadata is not None and len(metadata) != len(self.paths):
            raise DataError(f"metadata has {len(metadata)} rows for {len(self.paths)} images")
        self.metadata = metadata

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, seed = key
            torch.manual_seed(seed)
        else:
            index = key
        image = self.image_loader(self.paths[index])
        if self.metadata is not None:
            return (self.transform(image), self.metadata[index]), int(self.labels[index])  # type: ignore[return-value]
        return self.transform(image), int(self.labels[index])


class SeededRandomSampler(Sampler[int]):
    """A random permutation per epoch, derived from ``seed`` and the epoch number alone."""

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(draw_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_items, generator=generator).tolist())


class KeyedSampler(Sampler[tuple[int, int]]):
    """Wraps an index sampler so each draw carries its own augmentation seed ``(index, seed)``."""

    def __init__(self, sampler: Sampler[int] | Sequence[int], seed: int = 0) -> None:
        self.sampler = sampler
        self.seed = seed
        self.epoch = 0
        self._explicit_epoch = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._explicit_epoch = True
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        if not self._explicit_epoch:  # nobody calls set_epoch: count passes instead
            self.epoch += 1
        for position, index in enumerate(self.sampler):
            yield int(index), draw_seed(self.seed, epoch, position)


def leaves_a_lone_sample(samples: int, batch_size: int) -> bool:
    """Whether an epoch of ``samples`` in batches of ``batch_size`` ends with a batch of one image, which a
    training BatchNorm layer cannot normalise (a 1x1 map of one image has no variance): that batch is dropped."""
    return samples > 1 and samples % batch_size == 1


class DermDataModule(L.LightningDataModule):
    """Train / val / test loaders over a dataset frame that carries a ``split`` column."""

    def __init__(
        self,
        frame: pd.DataFrame,
        classes: Sequence[str],
        train_transform: Callable[[Any], torch.Tensor],
        eval_transform: Callable[[Any], torch.Tensor],
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        seed: int = 0,
        train_sampler: Sampler[int] | None = None,
        pin_memory: bool = False,
        image_loader: Callable[[str], Any] = read_image,
        metadata_encoder: Callable[[pd.DataFrame], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.frame = frame
        self.classes = list(classes)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_sampler = train_sampler
        self.pin_memory = pin_memory
        self.image_loader = image_loader  # e.g. a dermlab.data.cache.ImageCache instead of decoding files
        self.metadata_encoder = metadata_encoder  # metadata fusion: frame -> (N, D) tensor; None = images only

    def split_frame(self, split: str) -> pd.DataFrame:
        return split_rows(self.frame, split)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
        )

    def _dataset(self, split: str, transform: Callable[[Any], torch.Tensor]) -> ImageDataset:
        frame = self.split_frame(split)
        metadata = self.metadata_encoder(frame) if self.metadata_encoder is not None else None
        return ImageDataset(frame, self.classes, transform, self.image_loader, metadata=metadata)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", self.train_transform)
        base = self.train_sampler or SeededRandomSampler(len(dataset), seed=self.seed)
        sampler = KeyedSampler(base, seed=self.seed)
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        per_process = math.ceil(len(sampler) / world)  # Lightning's distributed sampler pads to equal shares
        return self._loader(dataset, self.batch_size, sampler, drop_last=leaves_a_lone_sample(per_process, self.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.eval_transform), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", self.eval_transform), self.eval_batch_size)
