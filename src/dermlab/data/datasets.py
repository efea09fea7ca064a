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

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermlab.config import DataConfig
from dermlab.data.images import IMAGE_EXTENSIONS, read_image
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

_FRAME_COLUMNS = ["image_id", "path", "label", "group", "fixed_split"]
_OPTIONAL_COLUMNS = ["age", "sex", "localization", "mask_path"]
_HAM_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_DELIMITERS = (",", ";", "\t")
_MISSING_CELLS = {"": pd.NA, "nan": pd.NA, "NaN": pd.NA, "NA": pd.NA, "N/A": pd.NA, "null": pd.NA}
_OUTSIDE = "\0outside"  # marks a path that leaves the dataset folder


@dataclass
class DatasetTable:
    """Every usable image of a dataset, one row each (see ``docs/architecture.md`` for the columns)."""

    root: Path
    layout: str
    frame: pd.DataFrame
    classes: list[str]
    skipped: list[str] = field(default_factory=list)

    def class_counts(self) -> pd.Series:
        """Images per class, in class order (zero for a class without images)."""
        return self.frame["label"].value_counts().reindex(self.classes, fill_value=0).astype(int)


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
    csv_files = _csv_files(path)
    if len(csv_files) == 1:
        return "csv"
    if any(_contains_image(child) for child in _subfolders(path)):
        return "folders"
    if csv_files:
        names = ", ".join(f.name for f in csv_files)
        raise DataError(f"{path}: {len(csv_files)} CSV files ({names}); pass the CSV file to use")
    raise DataError(
        f"{path}: cannot tell the dataset layout (no {HAM10000_METADATA}, no CSV file, no class folders "
        "with images)"
    )


class _Problems:
    """Raise on the first problem, or collect the messages when bad items are to be skipped."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.messages: list[str] = []

    def report(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.messages.append(message)

    def drop(self, frame: pd.DataFrame, bad: pd.Series, message: Callable[[pd.Series], str]) -> pd.DataFrame:
        """Report every row where ``bad`` holds (``message(row)``) and return the other rows."""
        bad = bad.fillna(False).astype(bool)
        for _, row in frame[bad].iterrows():
            self.report(message(row))
        return frame[~bad]


# --- ham10000 -----------------------------------------------------------------------------------------------


@LAYOUTS.register("ham10000")
def _read_ham10000(path: Path, config: DataConfig, verify_images: bool) -> DatasetTable:
    """HAM10000 as distributed: metadata CSV plus one or more image folders."""
    root = path.parent if path.is_file() else path
    metadata = root / HAM10000_METADATA
    if not metadata.is_file():
        raise DataError(f"{root}: no {HAM10000_METADATA}")
    problems = _Problems(config.skip_bad)
    frame = _read_csv(metadata)
    _require_columns(frame, metadata, ["image_id", "dx"])
    classes = list(config.classes) if config.classes is not None else list(HAM10000_CLASSES)

    folders = [root / name for name in HAM10000_IMAGE_FOLDERS if (root / name).is_dir()]
    if not folders:
        wanted = ", ".join(f"{name}/" for name in HAM10000_IMAGE_FOLDERS)
        raise DataError(f"{root}: no image folder (looked for {wanted})")
    index = _index_images_by_stem(folders)
    searched = ", ".join(f"{folder.name}/" for folder in folders)

    frame = _drop_empty(frame, metadata, ["image_id", "dx"], problems)
    frame = problems.drop(
        frame,
        ~frame["dx"].isin(classes),
        lambda row: f"{metadata} line {row['_line']}: label {row['dx']!r} is not one of the classes "
        f"({', '.join(classes)})",
    )
    frame = _drop_duplicate_ids(frame, "image_id", metadata, problems)
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
    _copy_metadata(frame, table)
    mask_column = config.csv_mask_column or ("mask_path" if "mask_path" in frame else None)
    if mask_column is not None:
        _require_columns(frame, metadata, [mask_column])
        table = _attach_masks(table, frame[mask_column], root, metadata, problems)
    return _finish(root, "ham10000", table, classes, problems, verify_images)


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
    problems = _Problems(config.skip_bad)
    children = _subfolders(root)
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
        class_folders = _subfolders(base)
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
            images = sorted(_iter_images(class_folder))
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
    table = pd.DataFrame(rows, columns=_FRAME_COLUMNS)
    table.insert(0, "_line", 0)
    classes = list(config.classes) if config.classes is not None else sorted(table["label"].unique())
    return _finish(root, "folders", table, classes, problems, verify_images)


# --- csv ----------------------------------------------------------------------------------------------------


@LAYOUTS.register("csv")
def _read_csv_layout(path: Path, config: DataConfig, verify_images: bool) -> DatasetTable:
    """A CSV of image paths (relative to the CSV's folder) and labels."""
    if path.is_dir():
        candidates = _csv_files(path)
        if len(candidates) != 1:
            raise DataError(
                f"{path}: expected exactly one CSV file, found {len(candidates)}; pass the CSV file"
            )
        csv_file = candidates[0]
    else:
        csv_file = path
    root = csv_file.parent
    problems = _Problems(config.skip_bad)
    frame = _read_csv(csv_file)

    path_column = config.csv_path_column
    label_column = config.csv_label_column
    if label_column == "label" and "label" not in frame and "dx" in frame:
        label_column = "dx"
    group_column = config.csv_group_column or next((c for c in ("group", "lesion_id") if c in frame), None)
    mask_column = config.csv_mask_column or ("mask_path" if "mask_path" in frame else None)
    id_column = "image_id" if "image_id" in frame else None
    required = [path_column, label_column] + [c for c in (group_column, mask_column) if c is not None]
    _require_columns(frame, csv_file, required)

    not_empty = [c for c in (path_column, label_column, group_column, id_column) if c is not None]
    frame = _drop_empty(frame, csv_file, not_empty, problems)
    if config.classes is not None:
        classes = list(config.classes)
        frame = problems.drop(
            frame,
            ~frame[label_column].isin(classes),
            lambda row: f"{csv_file} line {row['_line']}: label {row[label_column]!r} is not one of the "
            f"classes ({', '.join(classes)})",
        )
    ids = frame[id_column] if id_column else frame[path_column].map(lambda p: Path(p).as_posix())
    frame = frame.assign(_image_id=ids)
    frame = _drop_duplicate_ids(frame, "_image_id", csv_file, problems)

    resolved = frame[path_column].map(lambda p: _resolve_inside(root, p))
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
    table = pd.DataFrame(
        {
            "_line": frame["_line"],
            "image_id": frame["_image_id"],
            "path": resolved[frame.index],
            "label": frame[label_column],
            "group": frame[group_column] if group_column else frame["_image_id"],
            "fixed_split": "",
        }
    )
    _copy_metadata(frame, table)
    if mask_column is not None:
        table = _attach_masks(table, frame[mask_column], root, csv_file, problems)
    if config.classes is None:
        classes = sorted(table["label"].unique())
    return _finish(root, "csv", table, classes, problems, verify_images)


# --- shared helpers -----------------------------------------------------------------------------------------


def _read_csv(csv_file: Path) -> pd.DataFrame:
    """Read a UTF-8 CSV (BOM allowed, delimiter from the header line) as strings; empty cells become NA.

    Parsed with the :mod:`csv` module so every row keeps its true line number in ``_line``.
    """
    try:
        raw = csv_file.read_bytes()
    except OSError as error:
        raise DataError(f"{csv_file}: cannot read ({error.strerror or error})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{csv_file}: not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise DataError(f"{csv_file}: empty CSV file")
    header_line = text.lstrip().splitlines()[0]
    delimiter = max(_DELIMITERS, key=header_line.count)
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header: list[str] | None = None
        rows: list[list[str]] = []
        lines: list[int] = []
        start = 1
        for record in reader:
            if any(cell.strip() for cell in record):
                if header is None:
                    header = [cell.strip() for cell in record]
                else:
                    if len(record) != len(header):
                        raise DataError(
                            f"{csv_file} line {start}: {len(record)} fields where the header has "
                            f"{len(header)}"
                        )
                    rows.append(record)
                    lines.append(start)
            start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{csv_file} line {reader.line_num}: not valid CSV ({error})") from None
    if header is None:
        raise DataError(f"{csv_file}: no header row with column names (the file holds only empty cells)")
    if not rows:
        raise DataError(f"{csv_file}: no data rows below the header")
    if len(set(header)) != len(header):
        duplicated = next(name for name in header if header.count(name) > 1)
        raise DataError(f"{csv_file}: column {duplicated!r} appears twice in the header")
    frame = pd.DataFrame(rows, columns=header, dtype=object)
    frame = frame.apply(lambda column: column.str.strip()).replace(_MISSING_CELLS)
    frame["_line"] = np.asarray(lines, dtype=int)
    return frame


def _require_columns(frame: pd.DataFrame, csv_file: Path, columns: list[str]) -> None:
    present = [c for c in frame.columns if c != "_line"]
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{csv_file}: missing column {column!r} (columns: {', '.join(present)})")


def _drop_empty(frame: pd.DataFrame, csv_file: Path, columns: list[str], problems: _Problems) -> pd.DataFrame:
    for column in columns:
        frame = problems.drop(
            frame,
            frame[column].isna(),
            lambda row, c=column: f"{csv_file} line {row['_line']}: empty {c!r} cell",
        )
    return frame


def _drop_duplicate_ids(
    frame: pd.DataFrame, column: str, csv_file: Path, problems: _Problems
) -> pd.DataFrame:
    first_line = frame.groupby(column)["_line"].transform("first")
    return problems.drop(
        frame,
        frame.duplicated(column, keep="first"),
        lambda row: f"{csv_file} line {row['_line']}: duplicate image id {row[column]!r} "
        f"(first on line {first_line[row.name]})",
    )


def _resolve_inside(root: Path, value: str) -> str | None:
    """Absolute normalised path of ``value`` (relative to ``root``), or None when it leaves ``root``.

    Lexical (``normpath``), not ``resolve()``: a dataset may legitimately hold symlinks to elsewhere.
    """
    full = os.path.normpath(os.path.join(root, value))
    base = os.path.normpath(root)
    return full if os.path.commonpath([full, base]) == base else None


def _attach_masks(
    table: pd.DataFrame, masks: pd.Series, root: Path, csv_file: Path, problems: _Problems
) -> pd.DataFrame:
    """Add ``mask_path`` (absolute; "" for an empty cell); a named mask must exist inside ``root``."""
    masks = masks[table.index]
    resolved = masks.map(lambda m: "" if pd.isna(m) else (_resolve_inside(root, m) or _OUTSIDE))
    bad = resolved.map(lambda p: p == _OUTSIDE or (p != "" and not os.path.isfile(p)))

    def message(row: pd.Series) -> str:
        where = f"{csv_file} line {row['_line']}"
        if resolved[row.name] == _OUTSIDE:
            return f"{where}: mask {masks[row.name]!r} points outside the dataset folder {root}"
        return f"{where}: mask file not found: {resolved[row.name]}"

    table = problems.drop(table, bad, message)
    return table.assign(mask_path=resolved[table.index])


def _copy_metadata(source: pd.DataFrame, table: pd.DataFrame) -> None:
    """Keep ``age`` (float) and ``sex`` / ``localization`` (str, "" when missing) where present."""
    if "age" in source:
        table["age"] = pd.to_numeric(source["age"], errors="coerce").astype(float)
    for column in ("sex", "localization"):
        if column in source:
            table[column] = source[column].fillna("").astype(str)


def _finish(
    root: Path, layout: str, table: pd.DataFrame, classes: list[str], problems: _Problems, verify_images: bool
) -> DatasetTable:
    """Optionally decode every image, order the columns and build the :class:`DatasetTable`."""
    if verify_images and len(table):
        readable = []
        for index, image_path in table["path"].items():
            try:
                read_image(image_path)
            except DataError as error:
                problems.report(str(error))
                continue
            readable.append(index)
        table = table.loc[readable]
    if table.empty:
        detail = f" ({len(problems.messages)} skipped)" if problems.messages else ""
        raise DataError(f"{root}: no usable images found{detail}")
    columns = _FRAME_COLUMNS + [c for c in _OPTIONAL_COLUMNS if c in table.columns]
    frame = table[columns].reset_index(drop=True)
    for column in columns:
        if column != "age":
            frame[column] = frame[column].astype(str)
    return DatasetTable(
        root=root, layout=layout, frame=frame, classes=list(classes), skipped=problems.messages
    )


def _subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted(
        (entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda p: p.name,
    )


def _csv_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.suffix.lower() == ".csv" and not entry.name.startswith(".")
    )


def _iter_images(folder: Path) -> Iterator[Path]:
    """Image files (by suffix) anywhere below ``folder``, hidden files and folders left out."""
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(directory) / name


def _contains_image(folder: Path) -> bool:
    return next(_iter_images(folder), None) is not None
