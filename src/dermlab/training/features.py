"""Stage 1 from cached features: with the backbone frozen, its pooled features are computed once.

Exact when augmentation is off (one view); otherwise ``views`` augmented views per training image are cached
and the epochs cycle through them, so stage 1 costs ``views`` backbone passes instead of one per epoch. The
loaders over the cached outputs are the data's: :class:`dermlab.data.datamodule.FeatureDataModule`.
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
from torch.utils.data import DataLoader

from dermlab.data.datamodule import ImageDataset, KeyedSampler, draw_seed
from dermlab.io import atomic_save
from dermlab.training.progress import step_progress

__all__ = ["compute_features", "feature_cache_key", "load_or_compute_features", "weights_fingerprint"]


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
