"""LFME's expert workflow: one ordinary run per class group, all on the student's split (``dermlab distill experts``).

Each expert is trained by :func:`dermlab.training.run.train_run` with ``data.class_subset`` = its group's classes
and ``data.splits_file`` = the student's split; ``OUT/experts.json`` lists the groups, their runs and the split,
and :func:`read_experts` gives them back to the student (``distill.teachers``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dermlab.config import Config, apply_overrides
from dermlab.data.run_data import read_split_frame
from dermlab.data.splits import split_rows
from dermlab.errors import ConfigError
from dermlab.io import atomic_write_json
from dermlab.models.checkpoint import resolve_checkpoint_path
from dermlab.training.class_groups import group_classes_by_count
from dermlab.training.run import train_run

__all__ = ["EXPERTS_FILE", "resolve_splits_file", "train_class_counts", "train_experts", "read_experts"]

log = logging.getLogger(__name__)

#: the file in an experts folder that lists the groups, their runs and the split they were trained on
EXPERTS_FILE = "experts.json"


def resolve_splits_file(path: str | Path) -> Path:
    """A run folder resolves to its ``splits.csv``; a file is taken as it is."""
    path = Path(path)
    candidate = path / "splits.csv" if path.is_dir() else path
    if not candidate.is_file():
        raise ConfigError(f"{path}: no splits.csv here (give a run folder or a splits file)")
    return candidate.resolve()


def train_class_counts(config: Config, splits_file: str | Path) -> dict[str, int]:
    """Training images per class of ``config.data.path`` under the split in ``splits_file``, read as training
    reads it (copies left out of the split, e.g. a publisher's test images copied into train, are not counted)."""
    frame, classes = read_split_frame(config, splits_file)
    train = split_rows(frame, "train")["label"]
    return {name: int((train == name).sum()) for name in classes}


def train_experts(
    config: Config,
    student_split: str | Path,
    out_dir: str | Path,
    groups: int = 3,
    thresholds: Sequence[int] | None = None,
    on_trained: Any = None,
) -> list[Path]:
    """Train one ordinary run per class group into ``out_dir/<group>``, all on ``student_split``'s split.

    ``config`` is the experts' recipe (``data.path`` set); each expert gets ``data.splits_file`` = the student's
    split and ``data.class_subset`` = its group. Finished experts are reused, unfinished ones resumed.
    ``on_trained(result, config)`` is called after each newly trained expert with its
    :class:`~dermlab.training.run.TrainingResult` (the CLI scores it there).
    Writes ``out_dir/experts.json`` and returns the expert run folders, most frequent group first.
    """


    out_dir = Path(out_dir)
    splits_file = resolve_splits_file(student_split)
    counts = train_class_counts(config, splits_file)
    class_groups = group_classes_by_count(counts, groups=groups, thresholds=thresholds)
    plan = {
        "splits_file": str(splits_file),
        "groups": [{"name": g.name, "classes": g.classes, "train_counts": g.counts} for g in class_groups],
    }
    manifest = out_dir / EXPERTS_FILE
    if manifest.is_file():
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous.get("groups") != plan["groups"] or previous.get("splits_file") != plan["splits_file"]:
            raise ConfigError(f"{manifest}: this folder holds experts of another grouping or split; pick a new --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, plan)
    runs = []
    for group in class_groups:
        run_dir = out_dir / group.name
        expert_config = apply_overrides(
            config,
            [
                f"data.splits_file={json.dumps(str(splits_file))}",
                f"data.class_subset={json.dumps(group.classes)}",
                "distill.method=none",
                "distill.teachers=[]",
                "distill.curriculum=none",
            ],
        )
        runs.append(run_dir)
        if (run_dir / "checkpoints" / "best.ckpt").is_file():
            log.info("expert %s: reusing %s", group.name, run_dir)
            continue
        log.info("expert %s: training on %s", group.name, ", ".join(group.classes))
        result = train_run(expert_config, run_dir, resume=(run_dir / "config.yaml").is_file())
        if on_trained is not None and result.is_global_zero:
            on_trained(result, expert_config)
    return runs


def read_experts(experts_dir: str | Path) -> tuple[list[Path], Path | None]:
    """The expert runs of an experts folder (from its ``experts.json``) and the split they were trained on."""

    experts_dir = Path(experts_dir)
    manifest = experts_dir / EXPERTS_FILE
    if not manifest.is_file():
        raise ConfigError(f"{experts_dir}: no {EXPERTS_FILE}; create the experts with `dermlab distill experts`")
    plan = json.loads(manifest.read_text(encoding="utf-8"))
    runs = [experts_dir / group["name"] for group in plan.get("groups", [])]
    for run in runs:
        resolve_checkpoint_path(run)
    splits = plan.get("splits_file")
    return runs, Path(splits) if splits else None
