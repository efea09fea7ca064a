"""Patient metadata (age, sex, localization): parsing, checking and the fixed encoding a fused head reads.

``model.metadata_fusion: true`` builds a :class:`~dermlab.models.classifier.MetadataFusionClassifier` whose head
also sees these encodings. The encoding is fixed (nothing is fitted, so a checkpoint needs no extra state):

- ``age``: ``age / 100`` and a missing flag (missing: NaN, negative, or no ``age`` column);
- ``sex``: one-hot ``male`` / ``female`` and a missing flag (anything else, e.g. HAM10000's ``unknown``);
- ``localization``: one-hot over HAM10000's 14 body sites and a missing flag (``unknown``, empty, other).

A value that is missing sets only its flag, so a model trained with some missing values handles images with
none at all (``metadata=None``: every flag set). ``predict --metadata FILE.csv`` and the service's form fields
give the same three values per image (:func:`read_metadata_csv`, :func:`parse_patient_metadata`), checked
against the vocabulary here; what is still missing is said per image (:attr:`PatientMetadata.status`). The
diagnosis method (HAM10000's ``dx_type``) is never read: it is a property of the label, not of the patient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dermlab.errors import DataError

__all__ = [
    "METADATA_COLUMNS",
    "SEXES",
    "LOCALIZATIONS",
    "METADATA_WIDTH",
    "metadata_layout",
    "PatientMetadata",
    "parse_patient_metadata",
    "read_metadata_csv",
    "encode_patient_metadata",
    "encode_metadata",
    "missing_metadata",
]

METADATA_COLUMNS = ("age", "sex", "localization")
"""The frame columns the encoder reads; ``dx_type`` is deliberately not among them."""
SEXES = ("male", "female")
LOCALIZATIONS = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)
_AGE_SCALE = 100.0
_SEX_OFFSET = 2  # [age, age missing, male, female, sex missing, localizations..., localization missing]
_LOCALIZATION_OFFSET = _SEX_OFFSET + len(SEXES) + 1
METADATA_WIDTH = _LOCALIZATION_OFFSET + len(LOCALIZATIONS) + 1
_MISSING_FLAGS = (1, _SEX_OFFSET + len(SEXES), METADATA_WIDTH - 1)
_UNKNOWN_WORDS = ("", "unknown", "nan", "na", "n/a", "none")  # what a CSV cell or form field may say for "missing"
_MAX_AGE = 120.0
_COLUMN_ALIASES = {"site": "localization"}  # accepted in a metadata CSV for the body site


def metadata_layout() -> list[str]:
    """What each of the ``METADATA_WIDTH`` encoded columns means, in order (stored in ONNX exports)."""
    return [
        f"age/{_AGE_SCALE:g}",
        "age missing",
        *(f"sex={name}" for name in SEXES),
        "sex missing",
        *(f"localization={name}" for name in LOCALIZATIONS),
        "localization missing",
    ]


@dataclass(frozen=True)
class PatientMetadata:
    """Age (years), sex and body site of one image's patient; ``None`` where unknown."""

    age: float | None = None
    sex: str | None = None
    localization: str | None = None

    @property
    def missing(self) -> tuple[str, ...]:
        """The fields that are unknown, in :data:`METADATA_COLUMNS` order."""
        return tuple(name for name in METADATA_COLUMNS if getattr(self, name) is None)

    @property
    def status(self) -> str:
        """``used`` (all three known), ``partial`` (some) or ``missing`` (none): what the fused head got."""
        missing = len(self.missing)
        return "used" if missing == 0 else "missing" if missing == len(METADATA_COLUMNS) else "partial"


def _is_unknown(raw: object) -> bool:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return True
    return str(raw).strip().lower() in _UNKNOWN_WORDS


def _parse_age(raw: object, where: str) -> float | None:
    if _is_unknown(raw):
        return None
    try:
        age = float(str(raw).strip())
    except ValueError:
        age = math.nan
    if not (math.isfinite(age) and 0.0 <= age <= _MAX_AGE):
        raise DataError(f"{where} age: {str(raw)!r} is not an age in years (0-{_MAX_AGE:g}; leave it empty when unknown)")
    return age


def _parse_word(raw: object, field: str, vocabulary: Sequence[str], where: str) -> str | None:
    if _is_unknown(raw):
        return None
    value = str(raw).strip().lower()
    if value not in vocabulary:
        raise DataError(
            f"{where} {field}: {str(raw)!r} is not one of {', '.join(vocabulary)} (leave it empty when unknown)"
        )
    return value


def parse_patient_metadata(
    age: object = None, sex: object = None, localization: object = None, *, where: str = "metadata"
) -> PatientMetadata:
    """Check one image's age / sex / localization (strings or numbers; empty or ``unknown`` = missing).

    A value outside the vocabulary raises :class:`DataError` naming ``where`` and the field, so a typo such as
    ``lower-extremity`` is never silently taken as missing.
    """
    return PatientMetadata(
        age=_parse_age(age, where),
        sex=_parse_word(sex, "sex", SEXES, where),
        localization=_parse_word(localization, "localization", LOCALIZATIONS, where),
    )


def read_metadata_csv(path: str | Path) -> dict[str, PatientMetadata]:
    """``image_id -> PatientMetadata`` from a CSV with ``image_id`` and any of ``age``, ``sex``, ``localization``.

    ``site`` is accepted for ``localization``; other columns (HAM10000's ``lesion_id``, ``dx``, ``dx_type``) are
    ignored, so HAM10000's own metadata file works as it is. Empty cells and ``unknown`` are missing values.
    A bad file, a repeated image id or a bad value raises :class:`DataError` naming the file, row and column.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise DataError(f"{path}: metadata CSV not found") from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot read the metadata CSV ({reason})") from None
    columns = _metadata_columns(table, path)
    records: dict[str, PatientMetadata] = {}
    first_row: dict[str, int] = {}
    for position, row in enumerate(table.itertuples(index=False)):
        line = position + 2  # the header is line 1
        values = dict(zip(table.columns, row))
        image_id = str(values[columns["image_id"]]).strip()
        if not image_id:
            raise DataError(f"{path} row {line} column image_id: empty")
        if image_id in records:
            raise DataError(f"{path} row {line} column image_id: {image_id!r} repeats row {first_row[image_id]}")
        fields = {name: values[column] for name, column in columns.items() if name != "image_id"}
        records[image_id] = parse_patient_metadata(**fields, where=f"{path} row {line} column")
        first_row[image_id] = line
    return records


def _metadata_columns(table: pd.DataFrame, path: Path) -> dict[str, str]:
    """Field name -> the CSV's column for it (names compared without case and spaces; ``site`` = localization)."""
    found: dict[str, str] = {}
    for column in table.columns:
        name = str(column).strip().lower()
        name = _COLUMN_ALIASES.get(name, name)
        if name not in ("image_id", *METADATA_COLUMNS):
            continue
        if name in found:
            raise DataError(f"{path}: columns {found[name]!r} and {column!r} both give {name}; keep one")
        found[name] = str(column)
    header = ", ".join(map(str, table.columns)) or "none"
    if "image_id" not in found:
        raise DataError(f"{path}: no image_id column (columns: {header})")
    if len(found) == 1:
        raise DataError(f"{path}: none of the columns age, sex, localization (or site) (columns: {header})")
    return found


def encode_patient_metadata(records: Sequence[PatientMetadata | None]) -> torch.Tensor:
    """``(len(records), METADATA_WIDTH)`` encodings; ``None`` (no record for an image) is all missing."""
    frame = pd.DataFrame(
        {
            name: [getattr(record, name) if record is not None else None for record in records]
            for name in METADATA_COLUMNS
        }
    )
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    return encode_metadata(frame)


def missing_metadata(count: int) -> torch.Tensor:
    """``(count, METADATA_WIDTH)`` encodings of images whose age, sex and localization are all unknown."""
    encoded = torch.zeros(count, METADATA_WIDTH)
    encoded[:, list(_MISSING_FLAGS)] = 1.0
    return encoded


def encode_metadata(frame: pd.DataFrame) -> torch.Tensor:
    """Float32 ``(len(frame), METADATA_WIDTH)`` encodings of the ``age``, ``sex`` and ``localization`` columns.

    Absent columns count as missing for every row; text is compared case-insensitively.
    """
    count = len(frame)
    encoded = missing_metadata(count).numpy()
    if "age" in frame:
        age = pd.to_numeric(frame["age"], errors="coerce").to_numpy(dtype=float)
        known = np.isfinite(age) & (age >= 0)
        encoded[known, 0] = np.minimum(age[known], 120.0) / _AGE_SCALE
        encoded[known, 1] = 0.0
    for column, vocabulary, offset in (("sex", SEXES, _SEX_OFFSET), ("localization", LOCALIZATIONS, _LOCALIZATION_OFFSET)):
        if column not in frame:
            continue
        values = frame[column].fillna("").astype(str).str.strip().str.lower().to_numpy()
        for position, name in enumerate(vocabulary):
            rows = values == name
            encoded[rows, offset + position] = 1.0
            encoded[rows, offset + len(vocabulary)] = 0.0  # the missing flag
    return torch.from_numpy(encoded)
