"""Stage 1 from cached features: with the backbone frozen, its pooled features are computed once.

Exact when augmentation is off (one view); otherwise ``views`` augmented views per training image are cached
and the epochs cycle through them, so stage 1 costs ``views`` backbone passes instead of one per epoch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from dermlab.data.datamodule import ImageDataset, KeyedSampler, draw_seed
from dermlab.io import atomic_save
from dermlab.training.progress import step_progress

__all__ = ["compute_features", "feature_cache_key", "load_or_compute_features", "weights_fingerprint", "FeatureDataset", "ViewCyclingSampler"]


@torch.inference_mode()
def compute_features(
    model: nn.Module,
    frame: pd.DataFrame,
    classes: Sequence[str],
    transform: Callable[[Any], torch.Tensor],
    *,
    views: int = 1,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    description: str | None = None,
) -> torch.Tensor:
    """Pooled backbone features of every row, shape ``(views, N, F)``; view ``v`` is seeded by ``(seed, v)``.

    ``forward`` replaces ``model.forward_features`` (e.g. a frozen trunk returning maps, then the shape is
    ``(views, N, C, H, W)``); ``dtype`` is the storage type (float16 halves the memory of large maps).
    ``description`` shows the progress of all views under that label (:func:`dermlab.training.progress.step_progress`:
    one bar on a terminal, one line in a log file).
    """
    forward = forward or model.forward_features
    dataset = ImageDataset(frame, classes, transform)
    was_training = model.training
    model.eval().to(device)
    outputs = []
    batches = -(-len(dataset) // batch_size)
    label = f"{description} ({views} view{'s' if views != 1 else ''})" if description else ""
    with _progress(label, views * batches) as progress:
        for view in range(views):
            sampler = KeyedSampler(range(len(dataset)), seed=draw_seed(seed, 2, view))
            sampler.set_epoch(0)
            loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
            chunks = []
            for images, _ in loader:
                chunks.append(forward(images.to(device)).to(dtype).cpu())
                progress.update(1)
            outputs.append(torch.cat(chunks) if chunks else torch.empty(0, model.num_features, dtype=dtype))
    model.train(was_training)
    return torch.stack(outputs)


@contextmanager
def _progress(description: str, total: int) -> Iterator[Any]:
    """:func:`step_progress` when there is a description, else a counter that shows nothing."""
    if not description:
        yield SimpleNamespace(update=lambda count=1: None)
        return
    with step_progress(description, total) as progress:
        yield progress


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def feature_cache_key(
    config: Any, preprocessing: Any, transform: Any, views: int, frame: Any, model: torch.nn.Module, trunk_cut: int | None = None
) -> dict[str, Any]:
    """What cached features of ``frame``'s images depend on: the backbone and its weights, the preprocessing,
    every step and parameter of ``transform`` (:func:`~dermlab.data.transforms.describe_transform`), the number
    of views and the seed; ``trunk_cut`` for cached trunk maps (the module the trunk stops before)."""
    from dermlab.data.transforms import describe_transform

    key = {
        "model": config.model.name,
        "weights": config.model.weights,
        "pretrained": config.model.pretrained,
        "preprocessing": preprocessing.to_dict(),
        "transform": describe_transform(transform),
        "views": views,
        "seed": config.train.seed,
        "images": frame["image_id"].tolist(),
        "state": weights_fingerprint(model),
    }
    if trunk_cut is not None:
        key["trunk_cut"] = trunk_cut
    return key


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the backbone weights, so a different initialisation never reuses a cache."""
    state = model.backbone.state_dict()
    digest = hashlib.sha256()
    for name, tensor in list(state.items())[:: max(1, len(state) // 16)]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().flatten()[:256].numpy().tobytes())
    return digest.hexdigest()[:16]


def load_or_compute_features(cache_dir: Path, key_parts: dict[str, Any], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Reuse ``cache_dir/<key>.pt`` when its key matches (model, weights, preprocessing, images, views)."""
    path = Path(cache_dir) / f"features-{_cache_key(key_parts)}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["features"]
        except Exception:  # a damaged cache is recomputed, never trusted
            path.unlink(missing_ok=True)
    features = compute()
    atomic_save(path, lambda tmp: torch.save({"features": features}, tmp))
    return features


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
