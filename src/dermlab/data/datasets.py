"""Dataset readers: one table of images, labels and lesion groups from any supported on-disk layout.

Layouts (registered by name in :data:`LAYOUTS`, chosen by :func:`detect_layout` when ``data.layout: auto``):

- ``ham10000``: a folder holding ``HAM10000_metadata.csv``; images are looked up by ``image_id`` (``.jpg``,
  ``.jpeg`` or ``.png``) in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/``, ``HAM10000_images/`` or
  ``images/``. ``lesion_id`` becomes ``group``; ``age``, ``sex``, ``localization`` and a mask column
  (``mask_path`` or ``data.csv_mask_column``) are kept. ``dx_type`` is left out of the table on purpose: it is
  correlated with the label and must never become a feature. The class list is always all seven
  :data:`HAM10000_CLASSES` (a class without images is an error only when splitting) unless ``data.classes``.
- ``folders``: ``root/<class>/<images>`` or ``root/<split>/<class>/<images>`` where ``<split>`` is
  train / training, val / valid / validation or test / testing (any case); the latter sets ``fixed_split``.
  Classes are sorted alphabetically unless ``data.classes``. ``image_id`` is the path relative to the root.
- ``csv``: a CSV file (or a folder holding exactly one CSV) with a path and a label column
  (``data.csv_path_column`` / ``data.csv_label_column``; a missing default ``label`` column falls back to
  ``dx``), an optional group column (``data.csv_group_column``, else ``group`` or ``lesion_id`` when present),
  an optional mask column (``data.csv_mask_column``, else ``mask_path`` when present) and an optional
  ``image_id`` column (else the path as written is the id). Paths are relative to the CSV's folder and may not
  leave it. UTF-8 with or without BOM; the delimiter (``,`` ``;`` or tab) is taken from the header line.

Problems name the file and, for CSV files, the **line number in the file** (the header is line 1, so the first
data row is line 2). With ``data.skip_bad`` the offending image or row is left out and the message is appended
to :attr:`DatasetTable.skipped` instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dermlab.config import DataConfig
from dermlab.data.dataset_rows import (
    FRAME_COLUMNS,
    DatasetTable,
    RowProblems,
    attach_masks,
    contains_image,
    copy_metadata,
    csv_files,
    drop_duplicate_ids,
    drop_empty,
    finish_table,
    iter_images,
    read_csv_rows,
    require_columns,
    resolve_inside,
    subfolders,
)
from dermlab.errors import ConfigError, DataError
from dermlab.registry import Registry

__all__ = [
    "HAM10000_CLASSES",
    "HAM10000_METADATA",
    "HAM10000_IMAGE_FOLDERS",
    "SPLIT_FOLDER_NAMES",
    "DatasetTable",
    "DatasetReader",
    "LAYOUTS",
    "detect_layout",
    "AUTO_LAYOUT",
    "layout_choices",
    "load_dataset",
]

HAM10000_CLASSES = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
HAM10000_METADATA = "HAM10000_metadata.csv"
HAM10000_IMAGE_FOLDERS = ("HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images", "images")
SPLIT_FOLDER_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
"""Folder names (compared in lower case) that mark a dataset's own split, and the split each one means."""

_HAM_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


DatasetReader = Callable[[Path, DataConfig, bool], DatasetTable]
"""``reader(path, config, verify_images) -> DatasetTable``."""

LAYOUTS: Registry[DatasetReader] = Registry("dataset layout")
AUTO_LAYOUT = "auto"
"""``data.layout`` value that detects the layout from the folder (:func:`detect_layout`)."""


def layout_choices() -> list[str]:
    """What ``data.layout`` (and ``--layout``) accepts: ``auto`` and every registered layout."""
    return [AUTO_LAYOUT, *LAYOUTS.list()]


def load_dataset(
    path: str | Path | None, config: DataConfig | None = None, *, verify_images: bool | None = None
) -> DatasetTable:
    """Read the dataset at ``path`` (default ``config.path``) with ``config.layout`` or the detected layout.

    Image files are always checked to exist; ``verify_images=True`` also decodes every one of them (about
    0.2 ms per 200x150 JPEG; used by ``dermlab info``), so unreadable files are reported or skipped up front.
    The default ``None`` verifies exactly when ``config.skip_bad`` is set, so ``--skip-bad`` also drops
    undecodable images.
    """
    config = config if config is not None else DataConfig()
    if verify_images is None:
        verify_images = config.skip_bad
    if path is None:
        path = config.path
    if path is None:
        raise ConfigError("no dataset given: pass the DATA path or set data.path")
    path = Path(os.path.normpath(Path(path).expanduser().absolute()))  # "a/../b" spelled out, symlinks kept
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if config.classes is not None and len(set(config.classes)) != len(config.classes):
        raise ConfigError(f"data.classes lists a class twice: {config.classes}")
    layout = detect_layout(path) if config.layout == AUTO_LAYOUT else config.layout
    return LAYOUTS.get(layout)(path, config, verify_images)


def detect_layout(path: str | Path) -> str:
    """``ham10000`` when ``HAM10000_metadata.csv`` is there, ``csv`` for a CSV file or a folder with exactly
    one CSV, ``folders`` for a folder of class (or split) folders holding images."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset not found")
    if path.is_file():
        if path.name == HAM10000_METADATA:
            return "ham10000"
        if path.suffix.lower() in (".csv", ".tsv", ".txt"):
            return "csv"
        raise DataError(f"{path}: not a dataset folder or CSV file")
    if (path / HAM10000_METADATA).is_file():
        return "ham10000"
    tables = csv_files(path)
    if len(tables) == 1:
        return "csv"
    if any(contains_image(child) for child in subfolders(path)):
        return "folders"
    if tables:
        names = ", ".join(f.name for f in tables)
        raise DataError(f"{path}: {len(tables)} CSV files ({names}); pass the CSV file to use")
    raise DataError(
        f"{path}: cannot tell the dataset layout (no {HAM10000_METADATA}, no CSV file, no class folders "
        "with images)"
    )


# --- ham10000 -----------------------------------------------------------------------------------------------


@LAYOUTS.register("ham10000")
def _read_ham10000(path: Path, config: DataConfig, verify_images: bool) -> DatasetTable:
    """HAM10000 as distributed: metadata CSV plus one or more image folders."""
    root = path.parent if path.is_file() else path
    metadata = root / HAM10000_METADATA
    if not metadata.is_file():
        raise DataError(f"{root}: no {HAM10000_METADATA}")
    problems = RowProblems(config.skip_bad)
    frame = read_csv_rows(metadata)
    require_columns(frame, metadata, ["image_id", "dx"])
    classes = list(config.classes) if config.classes is not None else list(HAM10000_CLASSES)

    folders = [root / name for name in HAM10000_IMAGE_FOLDERS if (root / name).is_dir()]
    if not folders:
        wanted = ", ".join(f"{name}/" for name in HAM10000_IMAGE_FOLDERS)
        raise DataError(f"{root}: no image folder (looked for {wanted})")
    index = _index_images_by_stem(folders)
    searched = ", ".join(f"{folder.name}/" for folder in folders)

    frame = drop_empty(frame, metadata, ["image_id", "dx"], problems)
    frame = problems.drop(
        frame,
        ~frame["dx"].isin(classes),
        lambda row: f"{metadata} line {row['_line']}: label {row['dx']!r} is not one of the classes "
        f"({', '.join(classes)})",
    )
    frame = drop_duplicate_ids(frame, "image_id", metadata, problems)
    paths = frame["image_id"].map(index)
    frame = problems.drop(
        frame,
        paths.isna(),
        lambda row: f"{metadata} line {row['_line']}: image {row['image_id']} not found in {searched}",
    )
    frame = frame.assign(path=paths[frame.index].astype(str))

    group = frame["lesion_id"] if "lesion_id" in frame else pd.Series(pd.NA, index=frame.index)
    table = pd.DataFrame(
        {
            "_line": frame["_line"],
            "image_id": frame["image_id"],
            "path": frame["path"],
            "label": frame["dx"],
            "group": group.fillna(frame["image_id"]),
            "fixed_split": "",
        }
    )
    copy_metadata(frame, table)
    mask_column = config.csv_mask_column or ("mask_path" if "mask_path" in frame else None)
    if mask_column is not None:
        require_columns(frame, metadata, [mask_column])
        table = attach_masks(table, frame[mask_column], root, metadata, problems)
    return finish_table(root, "ham10000", table, classes, problems, verify_images)


def _index_images_by_stem(folders: list[Path]) -> dict[str, str]:
    """``image_id -> absolute path`` for every image file in ``folders`` (the first folder wins)."""
    index: dict[str, str] = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            for entry in entries:
                stem, suffix = os.path.splitext(entry.name)
                if suffix.lower() in _HAM_IMAGE_SUFFIXES and stem not in index and entry.is_file():
                    index[stem] = os.path.join(folder, entry.name)
    return index


# --- folders ------------------------------------------------------------------------------------------------


@LAYOUTS.register("folders")
def _read_folders(path: Path, config: DataConfig, verify_images: bool) -> DatasetTable:
    """``root/<class>/...`` or ``root/<split>/<class>/...`` (split folders set ``fixed_split``)."""
    root = path
    if not root.is_dir():
        raise DataError(f"{root}: the folders layout needs a folder of class folders")
    problems = RowProblems(config.skip_bad)
    children = subfolders(root)
    split_folders = [child for child in children if child.name.lower() in SPLIT_FOLDER_NAMES]
    if split_folders:
        others = [child.name for child in children if child not in split_folders]
        if others:
            raise DataError(
                f"{root}: folder {others[0]!r} is not a split folder (train / val / test) although "
                f"{split_folders[0].name!r} is"
            )
        parts: list[tuple[Path, str]] = []
        seen: dict[str, Path] = {}
        for folder in split_folders:
            split = SPLIT_FOLDER_NAMES[folder.name.lower()]
            if split in seen:
                raise DataError(f"{root}: both {seen[split].name!r} and {folder.name!r} are {split} folders")
            seen[split] = folder
            parts.append((folder, split))
    else:
        parts = [(root, "")]

    wanted = set(config.classes) if config.classes is not None else None
    rows: list[dict[str, str]] = []
    for base, split in parts:
        class_folders = subfolders(base)
        if not class_folders:
            problems.report(f"{base}: no class folders in this split folder")
        for class_folder in class_folders:
            label = class_folder.name
            if wanted is not None and label not in wanted:
                problems.report(
                    f"{class_folder}: class {label!r} is not one of the classes "
                    f"({', '.join(config.classes or [])})"
                )
                continue
            images = sorted(iter_images(class_folder))
            if not images:
                problems.report(f"{class_folder}: class folder {label!r} holds no images")
                continue
            for image in images:
                image_id = image.relative_to(root).as_posix()
                rows.append(
                    {
                        "image_id": image_id,
                        "path": str(image),
                        "label": label,
                        "group": image_id,
                        "fixed_split": split,
                    }
                )
    table = pd.DataFrame(rows, columns=FRAME_COLUMNS)
    table.insert(0, "_line", 0)
    classes = list(config.classes) if config.classes is not None else sorted(table["label"].unique())
    return finish_table(root, "folders", table, classes, problems, verify_images)


# --- csv ----------------------------------------------------------------------------------------------------


@LAYOUTS.register("csv")
def _read_csv_layout(path: Path, config: DataConfig, verify_images: bool) -> DatasetTable:
    """A CSV of image paths (relative to the CSV's folder) and labels."""
    csv_file = _the_csv_file(path)
    root = csv_file.parent
    problems = RowProblems(config.skip_bad)
    frame = read_csv_rows(csv_file)
    columns = _CsvColumns.of(frame, config)
    require_columns(frame, csv_file, columns.required)
    frame = drop_empty(frame, csv_file, columns.not_empty, problems)
    label_column = columns.label
    if config.classes is not None:
        classes = list(config.classes)
        frame = problems.drop(
            frame,
            ~frame[label_column].isin(classes),
            lambda row: f"{csv_file} line {row['_line']}: label {row[label_column]!r} is not one of the "
            f"classes ({', '.join(classes)})",
        )
    ids = frame[columns.image_id] if columns.image_id else frame[columns.path].map(lambda p: Path(p).as_posix())
    frame = drop_duplicate_ids(frame.assign(_image_id=ids), "_image_id", csv_file, problems)
    frame, resolved = _resolve_csv_paths(frame, columns.path, root, csv_file, problems)
    table = pd.DataFrame(
        {
            "_line": frame["_line"],
            "image_id": frame["_image_id"],
            "path": resolved,
            "label": frame[label_column],
            "group": frame[columns.group] if columns.group else frame["_image_id"],
            "fixed_split": "",
        }
    )
    copy_metadata(frame, table)
    if columns.mask is not None:
        table = attach_masks(table, frame[columns.mask], root, csv_file, problems)
    if config.classes is None:
        classes = sorted(table["label"].unique())
    return finish_table(root, "csv", table, classes, problems, verify_images)


def _the_csv_file(path: Path) -> Path:
    """``path`` itself, or the one CSV file of the folder ``path``."""
    if not path.is_dir():
        return path
    candidates = csv_files(path)
    if len(candidates) != 1:
        raise DataError(f"{path}: expected exactly one CSV file, found {len(candidates)}; pass the CSV file")
    return candidates[0]


@dataclass(frozen=True)
class _CsvColumns:
    """Which columns of a dataset CSV hold what: the configured names, else the HAM10000 / common ones."""

    path: str
    label: str
    group: str | None
    mask: str | None
    image_id: str | None

    @classmethod
    def of(cls, frame: pd.DataFrame, config: DataConfig) -> _CsvColumns:
        label = config.csv_label_column
        if label == "label" and "label" not in frame and "dx" in frame:
            label = "dx"
        return cls(
            path=config.csv_path_column,
            label=label,
            group=config.csv_group_column or next((c for c in ("group", "lesion_id") if c in frame), None),
            mask=config.csv_mask_column or ("mask_path" if "mask_path" in frame else None),
            image_id="image_id" if "image_id" in frame else None,
        )

    @property
    def required(self) -> list[str]:
        return [self.path, self.label] + [c for c in (self.group, self.mask) if c is not None]

    @property
    def not_empty(self) -> list[str]:
        return [c for c in (self.path, self.label, self.group, self.image_id) if c is not None]


def _resolve_csv_paths(
    frame: pd.DataFrame, path_column: str, root: Path, csv_file: Path, problems: RowProblems
) -> tuple[pd.DataFrame, pd.Series]:
    """The rows whose image path stays inside ``root`` and names a file, and those files' absolute paths."""
    resolved = frame[path_column].map(lambda p: resolve_inside(root, p))
    frame = problems.drop(
        frame,
        resolved.isna(),
        lambda row: f"{csv_file} line {row['_line']}: path {row[path_column]!r} points outside the dataset "
        f"folder {root}",
    )
    resolved = resolved[frame.index]
    exists = resolved.map(os.path.isfile)
    frame = problems.drop(
        frame,
        ~exists,
        lambda row: f"{csv_file} line {row['_line']}: image file not found: {resolved[row.name]}",
    )
    return frame, resolved[frame.index]
