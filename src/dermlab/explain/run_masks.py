"""How much of a run's CAMs falls on the lesion (``dermlab explain RUN --masks DATA``): the trained network, the
same network untrained and a fixed centre blob, scored against lesion masks with the metrics of
:mod:`dermlab.explain.mask_agreement`, batch by batch so only one batch of full-size images is held.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from dermlab.data.images import read_image
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError, DataError
from dermlab.explain.gradcam import CAM_METHODS, CamExplainer
from dermlab.explain.mask_agreement import cam_energy_in_mask, pointing_game_hit, summarise_mask_agreement
from dermlab.explain.run_explain import inference_device
from dermlab.io import atomic_save, atomic_write_json
from dermlab.models.checkpoint import LoadedModel, load_checkpoint, run_dir_of

__all__ = ["measure_mask_agreement"]


def _read_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A lesion mask as booleans at ``size`` (h, w): white (>= 128) is lesion; resized like the image."""
    if not str(path):
        raise DataError("a row has no mask (empty mask_path)")
    grey = read_image(path).convert("L")
    height, width = size
    # Nearest keeps the mask binary; the image is resized to the same (h, w) without cropping, so they align.
    return np.asarray(grey.resize((width, height), Image.Resampling.NEAREST)) >= 128


def _centre_prior(height: int, width: int) -> np.ndarray:
    """A fixed Gaussian blob at the image centre (sigma a quarter of each side): a CAM that knows nothing
    about the image but that dermoscopy centres the lesion."""
    rows = (np.arange(height) - (height - 1) / 2) / (height / 4)
    columns = (np.arange(width) - (width - 1) / 2) / (width / 4)
    return np.exp(-0.5 * (rows[:, None] ** 2 + columns[None, :] ** 2)).astype(np.float32)


def _untrained_twin(loaded: LoadedModel, seed: int) -> nn.Module:
    """The same architecture and head with random weights (no hub, package or weights file), in eval mode."""
    from dermlab.models.factory import create_model

    config = replace(loaded.config.model, pretrained=False, weights=None)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = create_model(config, len(loaded.classes), load_weights=False)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def _split_counts(run_dir: Path, image_ids: Sequence[str]) -> dict[str, int] | None:
    """How many of ``image_ids`` the run put in each split (``absent``: not in its splits.csv)."""
    path = run_dir / "splits.csv"
    if not path.is_file():
        return None
    splits = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=["image_id", "split"])
    lookup = dict(zip(splits["image_id"], splits["split"]))
    return dict(Counter(lookup.get(image_id, "absent") for image_id in image_ids))


def measure_mask_agreement(
    run_or_checkpoint: str | Path,
    data: str | Path,
    method: str = "gradcam",
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    out_path: str | Path | None = None,
) -> dict[str, Any]:
    """How much of each CAM falls on the lesion, for the trained model and for the same network untrained.

    ``data`` is any dataset with a mask column (``mask_path``; nonzero/white = lesion). Each image's CAM
    explains its true class when the model knows it, else the class the model predicts. CAMs are compared with
    the masks at the model's input size. Also scored: a fixed centre blob (``centre_prior``), the chance level
    being the mask's area share. Writes ``RUN/explain/mask_agreement.json`` (or ``out_path``) and a
    per-image CSV beside it; returns the JSON's content.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    loaded = load_checkpoint(run_or_checkpoint)
    run_dir = run_dir_of(run_or_checkpoint)
    CAM_METHODS.get(method)  # an unknown method fails before any image is read
    frame = _rows_with_masks(data, limit)
    size = tuple(loaded.preprocessing.input_size)
    classes = loaded.classes
    device = inference_device()
    models = {"trained": loaded.model.to(device), "untrained": _untrained_twin(loaded, seed).to(device)}
    parts, columns = _cams_against_masks(loaded, models, frame, method, batch_size, device)
    per_image = pd.DataFrame({"image_id": frame["image_id"].astype(str), "label": frame["label"].astype(str),
                              **columns})
    results: dict[str, Any] = {name: _merge_summaries(summaries) for name, summaries in parts.items()}
    known = per_image["label"].isin(classes)
    target_counts = {"true_class": int(known.sum()), "predicted_class": int((~known).sum())}
    results["trained_accuracy_on_known_labels"] = (
        float((per_image.loc[known, "trained_predicted"] == per_image.loc[known, "label"]).mean())
        if known.any() else None
    )

    summary = {
        "data": str(Path(data).resolve()),
        "checkpoint": str(loaded.path),
        "model": loaded.config.model.name,
        "method": method,
        "input_size": list(size),
        "n": len(frame),
        "cam_target": target_counts,
        "cam_target_rule": "the true class when it is among the model's classes, else the predicted class",
        "untrained_seed": seed,
        "images_by_run_split": _split_counts(run_dir, frame["image_id"].astype(str).tolist()),
        **results,
    }
    out = Path(out_path) if out_path is not None else run_dir / "explain" / "mask_agreement.json"
    atomic_write_json(out, _json_safe(summary))
    atomic_save(out.with_suffix(".csv"), lambda tmp: per_image.to_csv(tmp, index=False))
    return summary


def _rows_with_masks(data: str | Path, limit: int | None) -> pd.DataFrame:
    """The rows of ``data`` that have a lesion mask (the first ``limit``); a one-line error when none has."""
    from dermlab.data.datasets import load_dataset

    frame = load_dataset(data).frame
    if "mask_path" not in frame.columns:
        raise DataError(f"{data}: no lesion-mask column (mask_path, or data.csv_mask_column for CSV data)")
    frame = frame[frame["mask_path"].astype(str) != ""].reset_index(drop=True)
    if len(frame) == 0:
        raise DataError(f"{data}: every mask_path cell is empty")
    return frame.head(limit) if limit is not None else frame


def _cams_against_masks(
    loaded: LoadedModel, models: dict[str, nn.Module], frame: pd.DataFrame, method: str, batch_size: int, device: torch.device
) -> tuple[dict[str, list[dict[str, float | int]]], dict[str, list[Any]]]:
    """Per-batch mask-agreement summaries of each model's CAMs (and the centre prior's), and per-image columns.

    Batch by batch, so only one batch of full-size images is ever held; the summaries merge exactly.
    """
    size = tuple(loaded.preprocessing.input_size)
    classes = loaded.classes
    index = {name: i for i, name in enumerate(classes)}
    transform = create_transform("none", loaded.preprocessing, train=False)
    prior = _centre_prior(*size)
    parts: dict[str, list[dict[str, float | int]]] = {name: [] for name in (*models, "centre_prior")}
    columns: dict[str, list[Any]] = defaultdict(list)
    for start in range(0, len(frame), batch_size):
        rows = frame.iloc[start : start + batch_size]
        batch = torch.stack([transform(read_image(path)) for path in rows["path"]]).to(device)
        masks = [_read_mask(path, size) for path in rows["mask_path"]]
        columns["mask_area_share"] += [float(mask.mean()) for mask in masks]
        for name, model in models.items():
            with torch.inference_mode():
                predicted = model(batch).argmax(dim=1).cpu().tolist()
            targets = [index.get(label, guess) for label, guess in zip(rows["label"], predicted)]
            with CamExplainer(model, method=method) as explainer:
                cams = explainer(batch, targets)
            parts[name].append(summarise_mask_agreement(list(cams), masks))
            columns[f"{name}_predicted"] += [classes[p] for p in predicted]
            columns[f"{name}_target"] += [classes[t] for t in targets]
            columns[f"{name}_energy_in_mask"] += [cam_energy_in_mask(c, m) for c, m in zip(cams, masks)]
            columns[f"{name}_pointing_hit"] += [pointing_game_hit(c, m) for c, m in zip(cams, masks)]
        parts["centre_prior"].append(summarise_mask_agreement([prior] * len(masks), masks))
    return parts, dict(columns)


def _merge_summaries(parts: Sequence[dict[str, float | int]]) -> dict[str, float | int]:
    """One :func:`summarise_mask_agreement` result from those of consecutive batches (n-weighted means)."""
    n = sum(int(part["n"]) for part in parts)

    def mean(key: str) -> float:
        return float(sum(float(part[key]) * int(part["n"]) for part in parts) / n)

    energy, area = mean("mean_energy_in_mask"), mean("mean_mask_area_share")
    return {
        "n": n,
        "mean_energy_in_mask": energy,
        "mean_mask_area_share": area,
        "energy_over_chance": energy / area if area > 0 else float("nan"),
        "pointing_game_hit_rate": mean("pointing_game_hit_rate"),
    }


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None, so the file stays strict JSON."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
