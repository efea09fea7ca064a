"""Making an ensemble run folder from trained runs (``dermlab ensemble``).

The folder is an ordinary run folder: ``config.yaml`` (the first member's, with ``model.name: ensemble``),
``classes.json``, the members' shared ``splits.csv``, ``lineage.json`` and ``checkpoints/best.ckpt`` holding an
:class:`~dermlab.models.ensemble.EnsembleClassifier`; ``summarise_run`` then scores it like any run.

An ensemble has no single backbone, so no feature or level statistics: its config keeps the members' logit
abstention scores and drops ``mahalanobis`` and ``level`` (:attr:`EnsembleRun.dropped_scores`, which the CLI
prints); with none left, its abstention is off (``evaluation.abstain_false_rejection: 0``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dermlab.config import Config, config_to_dict, save_config
from dermlab.errors import ConfigError, DataError
from dermlab.evaluation.abstention import needs_features, needs_levels
from dermlab.evaluation.inference import checkpoint_temperature
from dermlab.io import atomic_write_bytes, atomic_write_json
from dermlab.models.checkpoint import load_checkpoint, run_dir_of, save_checkpoint
from dermlab.models.ensemble import ENSEMBLE_NAME, EnsembleClassifier

__all__ = ["EnsembleRun", "create_ensemble_run"]


@dataclass
class EnsembleRun:
    config: Config
    members: list[str]
    member_wall_times: list[float]
    dropped_scores: tuple[str, ...] = ()  # the members' abstention scores an ensemble cannot read


def create_ensemble_run(runs: list[str], out: str | Path) -> EnsembleRun:
    """Write the ensemble of ``runs`` into ``out`` (see the module docstring); it is not scored here."""
    out = Path(out)
    if (out / "checkpoints").exists() or (out / "config.yaml").exists():
        raise ConfigError(f"{out}: this folder already holds a run; pick a new --out")
    loaded = [load_checkpoint(path) for path in runs]
    run_dirs = [run_dir_of(path) for path in runs]
    classes = loaded[0].classes
    for path, member in zip(runs, loaded):
        if member.classes != classes:
            raise DataError(f"{path}: classes {member.classes} differ from {runs[0]}'s {classes}; an ensemble needs the same classes in the same order")
    splits = [run_dir / "splits.csv" for run_dir in run_dirs]
    for path, split in zip(runs, splits):
        if not split.is_file():
            raise DataError(f"{path}: no splits.csv beside the checkpoint, so it cannot be checked that no member trained on another's test images")
    if any(split.read_bytes() != splits[0].read_bytes() for split in splits[1:]):
        different = next(path for path, split in zip(runs, splits) if split.read_bytes() != splits[0].read_bytes())
        raise DataError(f"{different}: its splits.csv differs from {runs[0]}'s; members trained on other splits may have seen each other's test images")
    for path, member in zip(runs[1:], loaded[1:]):
        _check_same_pixels(path, member.preprocessing, runs[0], loaded[0].preprocessing)
    entries = [member_entry(str(path), member) for path, member in zip(runs, loaded)]
    model = EnsembleClassifier([m.model for m in loaded], [m.preprocessing for m in loaded], [e["temperature"] for e in entries])
    first = loaded[0].config
    evaluation, dropped = _logit_scores_only(first.evaluation)
    config = replace(first, model=replace(first.model, name=ENSEMBLE_NAME, weights="none", pretrained=False), evaluation=evaluation)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    atomic_write_json(out / "classes.json", classes)
    atomic_write_bytes(out / "splits.csv", splits[0].read_bytes())
    wall_times = [_wall_time(run_dir) for run_dir in run_dirs]
    atomic_write_json(out / "lineage.json", {"made_with": "dermlab ensemble", "members": [str(p) for p in runs], "member_wall_time_s": wall_times})
    save_checkpoint(out / "checkpoints" / "best.ckpt", model, config, classes, loaded[0].preprocessing, ensemble={"members": entries})
    return EnsembleRun(config=config, members=[str(p) for p in runs], member_wall_times=wall_times, dropped_scores=dropped)


def _check_same_pixels(path: str, preprocessing: Any, first_path: str, first: Any) -> None:
    """Refuse a member whose pixels differ from the first member's in more than size and normalisation.

    The ensemble feeds every member the first member's preprocessed input, resized and re-normalised: it cannot
    add or undo colour constancy, nor turn a crop into a squash, so such a member would see pixels it never trained on.
    """
    if preprocessing.pixel_pipeline() != first.pixel_pipeline():
        def said(p: Any) -> str:
            constancy = f"{p.color_constancy} (p {p.color_constancy_p:g})" if p.color_constancy else "none"
            return f"colour constancy {constancy}, resize mode {p.resize_mode}"

        raise ConfigError(
            f"{path}: {said(preprocessing)}, but {first_path} has {said(first)}; an ensemble feeds every member the "
            "first member's pixels (resized and re-normalised only), so its members must share colour constancy and resize mode"
        )


def _logit_scores_only(evaluation: Any) -> tuple[Any, tuple[str, ...]]:
    """The evaluation settings without the abstention scores that read one backbone's features or levels."""
    dropped = tuple(name for name in evaluation.abstain_scores if needs_features([name]) or needs_levels([name]))
    if not dropped:
        return evaluation, ()
    kept = [name for name in evaluation.abstain_scores if name not in dropped]
    return replace(evaluation, abstain_scores=kept, abstain_false_rejection=evaluation.abstain_false_rejection if kept else 0.0), dropped


def _wall_time(run_dir: Path) -> float:
    """A member's recorded wall time (``metrics.json``), 0 when it has none."""
    try:
        return float(json.loads((run_dir / "metrics.json").read_text()).get("wall_time_s") or 0.0)
    except (OSError, ValueError, AttributeError):
        return 0.0


def member_entry(run: str, loaded: Any) -> dict[str, Any]:
    """What an ensemble checkpoint keeps of one member (a :class:`~dermlab.models.checkpoint.LoadedModel`)."""
    return {
        "run": str(run),
        "config": config_to_dict(loaded.config),
        "classes": list(loaded.classes),
        "preprocessing": loaded.preprocessing.to_dict(),
        "temperature": checkpoint_temperature(loaded.extras, str(loaded.path)),
    }
