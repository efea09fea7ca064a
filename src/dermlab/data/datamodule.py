"""Datasets and the LightningDataModules that feed a run's stages: images (:class:`DermDataModule`) or backbone
outputs cached once per run (:class:`FeatureDataModule`: pooled features or frozen-trunk maps, computed by
:mod:`dermlab.training.features`). Both draw training batches the same way (the run's sampler, the lone last
batch dropped) from one loader builder.

Augmentation randomness is keyed per draw: the sampler yields ``(index, seed)`` pairs and the dataset seeds
torch's generator from that key before transforming. The same seed and epoch therefore give the same
augmented batch whichever worker decodes it and whether or not the run was interrupted and resumed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dermlab.data.images import read_image
from dermlab.data.splits import split_rows
from dermlab.errors import DataError

__all__ = [
    "CachedSplit",
    "DermDataModule",
    "FeatureDataModule",
    "FeatureDataset",
    "ImageDataset",
    "KeyedSampler",
    "SeededRandomSampler",
    "ViewCyclingSampler",
    "draw_seed",
    "leaves_a_lone_sample",
]


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


class _SplitLoaders(L.LightningDataModule):
    """What the two data modules share: how loaders are built and how a training epoch is drawn."""

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int, pin_memory: bool) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

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

    def _train_loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        """Batches of ``batch_size`` in ``sampler``'s order; a last batch of one image per process is dropped."""
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        per_process = math.ceil(len(sampler) / world)  # Lightning's distributed sampler pads to equal shares
        return self._loader(dataset, self.batch_size, sampler, drop_last=leaves_a_lone_sample(per_process, self.batch_size))


class DermDataModule(_SplitLoaders):
    """Train / val / test loaders of images over a dataset frame that carries a ``split`` column."""

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
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        self.frame = frame
        self.classes = list(classes)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.seed = seed
        self.train_sampler = train_sampler
        self.image_loader = image_loader  # e.g. a dermlab.data.cache.ImageCache instead of decoding files
        self.metadata_encoder = metadata_encoder  # metadata fusion: frame -> (N, D) tensor; None = images only

    def split_frame(self, split: str) -> pd.DataFrame:
        return split_rows(self.frame, split)

    def _dataset(self, split: str, transform: Callable[[Any], torch.Tensor]) -> ImageDataset:
        frame = self.split_frame(split)
        metadata = self.metadata_encoder(frame) if self.metadata_encoder is not None else None
        return ImageDataset(frame, self.classes, transform, self.image_loader, metadata=metadata)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", self.train_transform)
        base = self.train_sampler or SeededRandomSampler(len(dataset), seed=self.seed)
        return self._train_loader(dataset, KeyedSampler(base, seed=self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val", self.eval_transform), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test", self.eval_transform), self.eval_batch_size)


# --------------------------------------------------------------------------------------------- cached outputs
class FeatureDataset(Dataset):
    """``(features, label)`` pairs over a ``(views, N, F)`` tensor, indexed flat as ``view * N + i``.

    With ``metadata`` (``(N, D)``, for metadata fusion) items are ``((features, metadata_row), label)``.
    """

    def __init__(self, features: torch.Tensor, labels: Sequence[int], metadata: torch.Tensor | None = None) -> None:
        if features.dim() == 2:
            features = features.unsqueeze(0)
        self.features = features
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.num_items = features.shape[1]
        self.metadata = metadata

    def __len__(self) -> int:
        return self.features.shape[0] * self.num_items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        view, item = divmod(int(index), self.num_items)
        if self.metadata is not None:
            return (self.features[view, item], self.metadata[item]), self.labels[item]  # type: ignore[return-value]
        return self.features[view, item], self.labels[item]


class ViewCyclingSampler(Sampler[int]):
    """Epoch ``e`` draws the images of ``base`` (or a seeded permutation) in view ``e % views``."""

    def __init__(self, num_items: int, views: int, seed: int = 0, base: Sampler[int] | None = None) -> None:
        self.num_items = num_items
        self.views = views
        self.seed = seed
        self.base = base
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.base is not None and hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base) if self.base is not None else self.num_items  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        offset = (self.epoch % self.views) * self.num_items
        if self.base is not None:
            order = list(self.base)
        else:
            generator = torch.Generator().manual_seed(draw_seed(self.seed, 3, self.epoch))
            order = torch.randperm(self.num_items, generator=generator).tolist()
        return iter([offset + int(i) for i in order])


@dataclass
class CachedSplit:
    """One split's cached backbone outputs: ``features`` ``(views, N, ...)`` of the kept rows, their label
    indices, the split's ``frame`` the outputs were computed on and ``keep``, the mask of its rows the run uses
    (a class-subset run caches the whole split, so experts and their student share one cache)."""

    features: torch.Tensor
    labels: list[int]
    frame: pd.DataFrame
    keep: np.ndarray

    @property
    def kept_frame(self) -> pd.DataFrame:
        return self.frame[self.keep].reset_index(drop=True)


class FeatureDataModule(_SplitLoaders):
    """Train / val loaders over cached backbone outputs (the cached stage 1, the cached-trunk stage 2).

    A training epoch draws ``train_sampler``'s order (the run's sampler and curriculum over the training images,
    or a seeded permutation) in one cached view, cycling through the views epoch by epoch. ``metadata_encoder``
    adds each kept row's encoded metadata (metadata fusion); ``wrap_train`` wraps the training dataset (e.g. with
    the teachers' logits of the same cached views, for distillation).
    """

    def __init__(
        self,
        train: CachedSplit,
        val: CachedSplit,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        train_sampler: Sampler[int] | None = None,
        metadata_encoder: Callable[[pd.DataFrame], torch.Tensor] | None = None,
        wrap_train: Callable[[FeatureDataset], Dataset] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers=0, pin_memory=False)  # tensors in memory already
        self.train = train
        self.val = val
        self.seed = seed
        self.train_sampler = train_sampler
        self.metadata_encoder = metadata_encoder
        self.wrap_train = wrap_train

    def _dataset(self, split: CachedSplit) -> FeatureDataset:
        metadata = self.metadata_encoder(split.kept_frame) if self.metadata_encoder is not None else None
        return FeatureDataset(split.features, split.labels, metadata=metadata)

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset(self.train)
        views = self.train.features.shape[0]
        sampler = ViewCyclingSampler(len(self.train.labels), views, seed=self.seed, base=self.train_sampler)
        return self._train_loader(self.wrap_train(dataset) if self.wrap_train is not None else dataset, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset(self.val), self.eval_batch_size)
