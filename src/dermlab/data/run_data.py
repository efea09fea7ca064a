"""A run's data: the dataset read once, its copies resolved, its split made or reused, its class subset applied.

:func:`prepare_run_data` is what training, evaluation, explanation and the benchmarks read a run's images
through; :class:`RunData` gives each split's rows, labels and class counts, so no caller filters rows by split
or builds the label map itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dermlab.config import Config
from dermlab.data.datasets import DatasetTable, load_dataset
from dermlab.data.duplicates import duplicates_cache_dir, record_excluded_copies, resolve_copies
from dermlab.data.splits import create_splits, load_splits, save_splits, split_rows
from dermlab.errors import ConfigError, DataError

__all__ = ["RunData", "prepare_run_data"]

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """A run's dataset with its split: every row kept has ``split`` in train / val / test and a class of ``classes``."""

    table: DatasetTable
    frame: pd.DataFrame  # the dataset frame with a ``split`` column
    classes: list[str]
    unfiltered: pd.DataFrame | None = None  # with data.class_subset: the frame before other classes were dropped

    @property
    def class_index(self) -> dict[str, int]:
        """Class name -> label index (the model's output column)."""
        return {name: i for i, name in enumerate(self.classes)}

    def rows(self, split: str) -> pd.DataFrame:
        """The rows of one split, re-indexed from 0."""
        return split_rows(self.frame, split)

    def labels(self, split: str) -> list[int]:
        """The label indices of one split's rows, in :meth:`rows` order."""
        index = self.class_index
        return [index[label] for label in self.rows(split)["label"]]

    def class_counts(self, split: str = "train") -> list[int]:
        """Images per class of one split, in ``classes`` order (0 for a class without any)."""
        counts = self.rows(split)["label"].value_counts()
        return [int(counts.get(name, 0)) for name in self.classes]


def read_split_frame(config: Config, splits_file: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """The rows of ``config.data`` with the split of ``splits_file`` in a ``split`` column, as
    :func:`prepare_run_data` reads them (copies resolved, the left-out ones dropped), and the dataset's classes;
    writes nothing."""
    if not config.data.path:
        raise ConfigError("data.path is not set: pass the dataset folder")
    splits_file = Path(splits_file)
    table = load_dataset(config.data.path, config.data)
    copies = resolve_copies(table, config.data, cache_dir=duplicates_cache_dir(config.data, splits_file.parent),
                            workers=config.data.num_workers)
    splits = load_splits(splits_file, copies.table, left_out=copies.excluded["image_id"])
    frame = copies.table.frame.copy()
    frame["split"] = splits.reindex(frame.index).fillna("").to_numpy()
    return frame[frame["split"].isin(["train", "val", "test"])].reset_index(drop=True), list(table.classes)


def prepare_run_data(config: Config, run_dir: str | Path, *, progress: bool = False) -> RunData:
    """Read the dataset and the split: reuse ``run_dir/splits.csv`` (or ``data.splits_file``), else make it.

    ``progress``: draw a bar while near-copies are searched for (the first time only; then it is cached).
    """
    run_dir = Path(run_dir)
    if not config.data.path:
        raise ConfigError("data.path is not set: pass the dataset folder (dermlab train DATA ...)")
    table = load_dataset(config.data.path, config.data)
    # copies (data.duplicates): merged into the split groups; test-folder copies and label conflicts left out
    copies = resolve_copies(
        table,
        config.data,
        cache_dir=duplicates_cache_dir(config.data, run_dir),
        workers=config.data.num_workers,
        progress=progress,
    )
    table = copies.table
    splits_path = run_dir / "splits.csv"
    source = splits_path if splits_path.is_file() else (Path(config.data.splits_file) if config.data.splits_file else None)
    if source is not None:
        splits = load_splits(source, table, left_out=copies.excluded["image_id"])
    else:
        splits = create_splits(table, ratios=tuple(config.data.split_ratios), seed=config.data.split_seed)
    if source != splits_path:
        save_splits(table, splits, splits_path)
        for line in record_excluded_copies(copies, run_dir):  # counted once, when the split is made
            log.warning(line)
    frame = table.frame.copy()
    frame["split"] = splits.reindex(frame.index).fillna("").to_numpy()
    frame = frame[frame["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    classes, unfiltered = list(table.classes), None
    if config.data.class_subset is not None:
        subset = config.data.class_subset
        unknown = [name for name in subset if name not in classes]
        if unknown:
            raise ConfigError(f"data.class_subset: class {unknown[0]!r} is not in {config.data.path} (classes: {', '.join(classes)})")
        unfiltered = frame
        classes = [name for name in classes if name in subset]
        frame = frame[frame["label"].isin(classes)].reset_index(drop=True)
    for split in ("train", "val"):
        if not (frame["split"] == split).any():
            raise DataError(f"{config.data.path}: the {split} split is empty; check data.split_ratios")
    return RunData(table=table, frame=frame, classes=classes, unfiltered=unfiltered)
