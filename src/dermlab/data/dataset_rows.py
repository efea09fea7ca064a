"""What every dataset layout reader does to its rows, so that each layout is one reader in
:mod:`dermlab.data.datasets`: CSV files read with their line numbers, bad rows refused or skipped
(:class:`RowProblems`, ``data.skip_bad``) with a message naming file and line, paths kept inside the dataset
folder, masks and patient metadata attached, and the :class:`DatasetTable` finished in one column order.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dermlab.data.images import IMAGE_EXTENSIONS, read_image
from dermlab.errors import DataError

__all__ = [
    "FRAME_COLUMNS",
    "OPTIONAL_COLUMNS",
    "DatasetTable",
    "RowProblems",
    "attach_masks",
    "contains_image",
    "copy_metadata",
    "csv_files",
    "drop_duplicate_ids",
    "drop_empty",
    "finish_table",
    "iter_images",
    "read_csv_rows",
    "require_columns",
    "resolve_inside",
    "subfolders",
]

FRAME_COLUMNS = ["image_id", "path", "label", "group", "fixed_split"]
"""The columns of every dataset table, in order; then those of :data:`OPTIONAL_COLUMNS` a layout has."""
OPTIONAL_COLUMNS = ["age", "sex", "localization", "mask_path"]
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


class RowProblems:
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




def read_csv_rows(csv_file: Path) -> pd.DataFrame:
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


def require_columns(frame: pd.DataFrame, csv_file: Path, columns: list[str]) -> None:
    present = [c for c in frame.columns if c != "_line"]
    for column in columns:
        if column not in frame.columns:
            raise DataError(f"{csv_file}: missing column {column!r} (columns: {', '.join(present)})")


def drop_empty(frame: pd.DataFrame, csv_file: Path, columns: list[str], problems: RowProblems) -> pd.DataFrame:
    for column in columns:
        frame = problems.drop(
            frame,
            frame[column].isna(),
            lambda row, c=column: f"{csv_file} line {row['_line']}: empty {c!r} cell",
        )
    return frame


def drop_duplicate_ids(
    frame: pd.DataFrame, column: str, csv_file: Path, problems: RowProblems
) -> pd.DataFrame:
    first_line = frame.groupby(column)["_line"].transform("first")
    return problems.drop(
        frame,
        frame.duplicated(column, keep="first"),
        lambda row: f"{csv_file} line {row['_line']}: duplicate image id {row[column]!r} "
        f"(first on line {first_line[row.name]})",
    )


def resolve_inside(root: Path, value: str) -> str | None:
    """Absolute normalised path of ``value`` (relative to ``root``), or None when it leaves ``root``.

    Lexical (``normpath``), not ``resolve()``: a dataset may legitimately hold symlinks to elsewhere.
    """
    full = os.path.normpath(os.path.join(root, value))
    base = os.path.normpath(root)
    return full if os.path.commonpath([full, base]) == base else None


def attach_masks(
    table: pd.DataFrame, masks: pd.Series, root: Path, csv_file: Path, problems: RowProblems
) -> pd.DataFrame:
    """Add ``mask_path`` (absolute; "" for an empty cell); a named mask must exist inside ``root``."""
    masks = masks[table.index]
    resolved = masks.map(lambda m: "" if pd.isna(m) else (resolve_inside(root, m) or _OUTSIDE))
    bad = resolved.map(lambda p: p == _OUTSIDE or (p != "" and not os.path.isfile(p)))

    def message(row: pd.Series) -> str:
        where = f"{csv_file} line {row['_line']}"
        if resolved[row.name] == _OUTSIDE:
            return f"{where}: mask {masks[row.name]!r} points outside the dataset folder {root}"
        return f"{where}: mask file not found: {resolved[row.name]}"

    table = problems.drop(table, bad, message)
    return table.assign(mask_path=resolved[table.index])


def copy_metadata(source: pd.DataFrame, table: pd.DataFrame) -> None:
    """Keep ``age`` (float) and ``sex`` / ``localization`` (str, "" when missing) where present."""
    if "age" in source:
        table["age"] = pd.to_numeric(source["age"], errors="coerce").astype(float)
    for column in ("sex", "localization"):
        if column in source:
            table[column] = source[column].fillna("").astype(str)


def finish_table(
    root: Path, layout: str, table: pd.DataFrame, classes: list[str], problems: RowProblems, verify_images: bool
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
    columns = FRAME_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in table.columns]
    frame = table[columns].reset_index(drop=True)
    for column in columns:
        if column != "age":
            frame[column] = frame[column].astype(str)
    return DatasetTable(
        root=root, layout=layout, frame=frame, classes=list(classes), skipped=problems.messages
    )


def subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted(
        (entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda p: p.name,
    )


def csv_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and entry.suffix.lower() == ".csv" and not entry.name.startswith(".")
    )


def iter_images(folder: Path) -> Iterator[Path]:
    """Image files (by suffix) anywhere below ``folder``, hidden files and folders left out."""
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(directory) / name


def contains_image(folder: Path) -> bool:
    return next(iter_images(folder), None) is not None
