"""Checkpoints that carry everything needed to rebuild a model: config, classes and preprocessing.

Loading never executes code: ``torch.load(..., weights_only=True)`` only accepts tensors and plain data.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermlab.config import Config, config_from_dict
from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import CheckpointError, ConfigError

__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "load_checkpoint",
    "save_checkpoint",
    "resolve_checkpoint_path",
    "run_folder_of",
    "run_dir_of",
    "checkpoint_metadata",
    "update_checkpoint_metadata",
    "RAW_WEIGHTS_KEY",
]

FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint, in eval mode, with what it needs to preprocess its inputs."""

    model: nn.Module
    classes: list[str]
    preprocessing: Preprocessing
    config: Config
    path: Path
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return f"{self.config.model.name}:{self.path.parent.parent.name if self.path.parent.name == 'checkpoints' else self.path.stem}"


def checkpoint_metadata(config: Config, classes: list[str], preprocessing: Preprocessing, **extras: Any) -> dict:
    """The ``checkpoint["dermlab"]`` entry: plain data only, so ``weights_only=True`` can read it back."""
    from dermlab.config import config_to_dict

    return {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        **extras,
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: Config,
    classes: list[str],
    preprocessing: Preprocessing,
    **extras: Any,
) -> Path:
    """Write a minimal dermlab checkpoint (the same keys a training run's checkpoints hold), atomically."""
    from dermlab.io import atomic_save

    path = Path(path)
    payload = {
        "state_dict": {f"model.{key}": value.detach().cpu() for key, value in model.state_dict().items()},
        "dermlab": checkpoint_metadata(config, classes, preprocessing, **extras),
    }
    atomic_save(path, lambda tmp: torch.save(payload, tmp))
    return path


def update_checkpoint_metadata(path: str | Path, **entries: Any) -> Path:
    """Set entries of ``checkpoint["dermlab"]`` (plain data, e.g. ``temperature=1.7``) in place, atomically.

    The file is read with ``weights_only=True`` and written back whole; everything else stays as it was.
    """
    from dermlab.io import atomic_save

    path = resolve_checkpoint_path(path)
    checkpoint = _read_checkpoint(path)
    if any(key in {"config", "classes", "preprocessing", "format_version"} for key in entries):
        raise CheckpointError(f"{path}: config, classes, preprocessing and format_version are not updatable")
    checkpoint["dermlab"] = {**checkpoint["dermlab"], **entries}
    atomic_save(path, lambda tmp: torch.save(checkpoint, tmp))
    return path


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A run folder resolves to its best checkpoint (else its last); a file is taken as it is."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.ckpt", path / "checkpoints" / "last.ckpt", path / "best.ckpt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path}: no checkpoints/best.ckpt or checkpoints/last.ckpt in this run folder")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def run_folder_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint file belongs to: ``RUN/checkpoints/x.ckpt`` -> ``RUN``, else its folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def run_dir_of(run_or_checkpoint: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file (the checkpoint is resolved first)."""
    return run_folder_of(resolve_checkpoint_path(run_or_checkpoint))


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused to load, the file holds more than weights ({first})") from None
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways (zip, pickle, storage)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(checkpoint, dict) or "dermlab" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path}: not a dermlab checkpoint (no 'dermlab' metadata or 'state_dict')")
    if not isinstance(checkpoint["dermlab"], dict) or not isinstance(checkpoint["state_dict"], dict):
        raise CheckpointError(f"{path}: damaged dermlab checkpoint ('dermlab' and 'state_dict' must be mappings)")
    return checkpoint


#: where a checkpoint trained with ``train.ema`` keeps the raw weights (its ``state_dict`` holds the average)
RAW_WEIGHTS_KEY = "current_model_state"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, raw_weights: bool = False) -> LoadedModel:
    """Rebuild the network of a run folder or checkpoint file, strictly, in eval mode (channels-last memory,
    faster convolutions on CPU and GPU alike; the values are the same).

    ``raw_weights``: a checkpoint trained with ``train.ema`` holds the averaged weights (the default, what is
    served) and the raw ones of the same step; this loads the raw ones (an ablation).
    """
    from dermlab.models.factory import create_model

    path = resolve_checkpoint_path(path)
    checkpoint = _read_checkpoint(path)
    if raw_weights:
        if not isinstance(checkpoint.get(RAW_WEIGHTS_KEY), dict):
            raise CheckpointError(f"{path}: holds one set of weights only (not trained with train.ema); there are no raw weights to load")
        checkpoint["state_dict"] = checkpoint[RAW_WEIGHTS_KEY]
    meta = checkpoint["dermlab"]
    try:
        config = config_from_dict(meta["config"])
        classes = meta["classes"]
        if not isinstance(classes, list) or not classes or len(set(map(str, classes))) != len(classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {classes!r}")
        classes = [str(c) for c in classes]
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, ConfigError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: damaged dermlab metadata ({error})") from None
    model_config = config.model
    # the weights come from the checkpoint: never reach for the hub, a package or a weights file again
    try:
        if model_config.name == "ensemble":
            from dermlab.models.ensemble import ensemble_from_metadata

            model = ensemble_from_metadata(meta.get("ensemble"), len(classes), str(path))
        else:
            model = create_model(model_config, len(classes), load_weights=False)
    except (ConfigError, RuntimeError, ValueError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot rebuild {model_config.name!r} ({detail})") from None
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not match {model_config.name} ({str(error).splitlines()[0]})") from None
    model.eval().to(map_location)
    model.to(memory_format=torch.channels_last)
    extras = {k: v for k, v in meta.items() if k not in {"config", "classes", "preprocessing", "format_version"}}
    return LoadedModel(model, classes, preprocessing, config, path, extras)

