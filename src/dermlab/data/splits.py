"""Train / val / test splits: grouped by lesion, stratified by class, deterministic from a seed.

:func:`create_splits` never puts one ``group`` (lesion) in two splits. It peels the splits off one at a time
(test, then val; train is what remains) with scikit-learn's ``StratifiedGroupKFold``: the fraction wanted is
approximated by ``k`` of ``n`` folds (``n <= 10``); seeded fold assignments are tried until one has every
class share within half a point of the pool's (real HAM10000: the first), and the combination of folds
closest in class shares and size is kept. Where the dataset ships a fixed test (or val) part, that part stays
as it is and only the rest is split, with the remaining ratios renormalised.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from dermlab.config import DataConfig
from dermlab.data.datasets import DatasetTable
from dermlab.errors import ConfigError, DataError
from dermlab.io import atomic_write_text

__all__ = ["SPLIT_NAMES", "SPLITS_FILE", "create_splits", "save_splits", "load_splits", "split_count_table", "split_rows"]

SPLIT_NAMES = ("train", "val", "test")
SPLITS_FILE = "splits.csv"

_MAX_FOLDS = 10
_ATTEMPTS = 8  # at most this many seeded fold assignments per split; the best one is kept
_GOOD_ENOUGH = 0.005  # stop trying once every class share is within half a point (real HAM10000: first try)
_SPLITS_COLUMNS = ["image_id", "path", "label", "group", "split"]

_log = logging.getLogger(__name__)


def split_rows(frame: pd.DataFrame, split: str, whole_if_unsplit: bool = False) -> pd.DataFrame:
    """The rows of ``split`` (``"all"``: every row), re-indexed from 0: the one place rows are filtered by split.

    A frame without a ``split`` column has no rows in any split. ``whole_if_unsplit``: a dataset with no row in
    ``split`` (a plain folder given to evaluate or explain) gives all its rows instead.
    """
    if split == "all":
        return frame.reset_index(drop=True)
    rows = frame[frame["split"] == split] if "split" in frame else frame.iloc[:0]
    if whole_if_unsplit and len(rows) == 0:
        rows = frame
    return rows.reset_index(drop=True)


def create_splits(
    table: DatasetTable, ratios: Sequence[float] | None = None, seed: int | None = None
) -> pd.Series:
    """A ``train`` / ``val`` / ``test`` value for every row of ``table.frame`` (same index), named ``split``.

    ``ratios`` and ``seed`` default to ``data.split_ratios`` and ``data.split_seed``'s defaults (6:2:2, 42).

    Raises ``DataError`` naming the class when a class has too few groups to appear in every non-empty split.
    """
    defaults = DataConfig()
    ratios = _check_ratios(defaults.split_ratios if ratios is None else ratios)
    seed = defaults.split_seed if seed is None else seed
    frame = table.frame
    fixed = frame["fixed_split"] if "fixed_split" in frame else pd.Series("", index=frame.index)
    splits = pd.Series("", index=frame.index, dtype=str, name="split")
    fixed_names = [name for name in ("val", "test") if (fixed == name).any()]
    for name in fixed_names:
        splits[fixed == name] = name
    pool = splits == ""
    targets = [
        (name, ratio) for name, ratio in zip(SPLIT_NAMES, ratios) if ratio > 0 and name not in fixed_names
    ]
    if not targets:  # everything else is fixed: the rest can only be training data
        targets = [("train", 1.0)]
    _check_class_sizes(table, pool, [name for name, _ in targets], fixed_names)
    labels = frame["label"][pool]
    groups = frame["group"][pool]
    splits[pool] = _grouped_stratified_split(labels, groups, targets, seed)
    return splits


def save_splits(table: DatasetTable, splits: pd.Series, path: str | Path) -> Path:
    """Write ``splits.csv`` (image_id, path, label, group, split) atomically; ``path`` may be a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLITS_FILE
    values = splits.reindex(table.frame.index)
    if values.isna().any() or not values.isin(SPLIT_NAMES).all():
        raise DataError(f"{path}: every image needs a split of train / val / test before saving")
    frame = table.frame[["image_id", "path", "label", "group"]].assign(split=values.to_numpy())
    atomic_write_text(path, frame.to_csv(index=False, lineterminator="\n"))
    return path


def load_splits(path: str | Path, table: DatasetTable, left_out: Iterable[str] = ()) -> pd.Series:
    """Read a ``splits.csv`` back as a Series on ``table.frame``'s index; every image id must be in both.

    ``left_out``: image ids the file may still list although the table no longer holds them (copies that
    :func:`dermlab.data.duplicates.resolve_copies` excluded after the file was written); they are dropped.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPLITS_FILE
    saved = _read_splits_file(path)
    line = pd.Series(np.arange(len(saved)) + 2, index=saved.index)  # header is line 1
    dropped = saved["image_id"].isin(set(left_out)) & ~saved["image_id"].isin(table.frame["image_id"])
    if dropped.any():
        first = saved["image_id"][dropped].iloc[0]
        _log.warning("%s: %d image(s) now left out as copies, e.g. %r", path, int(dropped.sum()), first)
        saved = saved[~dropped]
    _check_saved_rows(path, saved, line, table)
    known = pd.Series(table.frame.index, index=table.frame["image_id"].to_numpy())
    splits = pd.Series(saved["split"].to_numpy(), index=known[saved["image_id"]].to_numpy(), name="split")
    splits = splits.reindex(table.frame.index).astype(str)
    leaked = _groups_in_several_splits(table, splits)
    if leaked:
        _log.warning("%s: %d group(s) appear in more than one split, e.g. %r", path, len(leaked), leaked[0])
    return splits


def _read_splits_file(path: Path) -> pd.DataFrame:
    """A splits file as strings, with its ``image_id`` and ``split`` columns."""
    try:
        saved = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(f"{path}: splits file not found") from None
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise DataError(f"{path}: cannot read splits file ({error})") from None
    absent = [column for column in ("image_id", "split") if column not in saved.columns]
    if absent:
        raise DataError(f"{path}: missing column {absent[0]!r} (columns: {', '.join(saved.columns)})")
    return saved


def _check_saved_rows(path: Path, saved: pd.DataFrame, line: pd.Series, table: DatasetTable) -> None:
    """Refuse the first problem of a splits file against the dataset (one line, with the file's line number):
    an unknown split, an image listed twice or not in the dataset, a dataset image not listed, a changed label."""
    bad_split = ~saved["split"].isin(SPLIT_NAMES)
    if bad_split.any():
        row = bad_split.idxmax()
        raise DataError(f"{path} line {line[row]}: split {saved['split'][row]!r} is not one of train, val, test")
    duplicated = saved["image_id"].duplicated()
    if duplicated.any():
        row = duplicated.idxmax()
        raise DataError(f"{path} line {line[row]}: image id {saved['image_id'][row]!r} appears twice")
    unknown = ~saved["image_id"].isin(table.frame["image_id"])
    if unknown.any():
        row = unknown.idxmax()
        raise DataError(
            f"{path} line {line[row]}: image id {saved['image_id'][row]!r} is not in the dataset at {table.root}"
        )
    unlisted = ~table.frame["image_id"].isin(saved["image_id"])
    if unlisted.any():
        first = table.frame["image_id"][unlisted].iloc[0]
        raise DataError(f"{path}: {int(unlisted.sum())} image(s) of the dataset have no split, e.g. {first!r}")
    if "label" in saved.columns:
        current = table.frame.set_index("image_id")["label"]
        changed = saved["label"] != current[saved["image_id"]].to_numpy()
        if changed.any():
            row = changed.idxmax()
            raise DataError(
                f"{path} line {line[row]}: image {saved['image_id'][row]!r} has label "
                f"{saved['label'][row]!r} here but {current[saved['image_id'][row]]!r} in the dataset"
            )


def split_count_table(table: DatasetTable, splits: pd.Series) -> pd.DataFrame:
    """Images per class (rows, in class order, plus ``total``) and split (``train, val, test, total``)."""
    counts = pd.crosstab(table.frame["label"], splits.reindex(table.frame.index))
    counts = counts.reindex(index=table.classes, columns=list(SPLIT_NAMES), fill_value=0).astype(int)
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    counts.index.name = "class"
    counts.columns.name = None
    return counts


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    values = [float(r) for r in ratios]
    if len(values) != 3 or any(not np.isfinite(r) or r < 0 for r in values) or sum(values) <= 0:
        raise ConfigError(
            f"split ratios must be three non-negative numbers (train val test), got {list(ratios)}"
        )
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)


def _check_class_sizes(
    table: DatasetTable, pool: pd.Series, targets: list[str], fixed_names: list[str]
) -> None:
    """Every class needs one group per split it is spread over (and at least one image at all)."""
    frame = table.frame
    groups_per_class = frame[pool].groupby("label")["group"].nunique()
    where = f" outside the fixed {' and '.join(fixed_names)} part" if fixed_names else ""
    for name in table.classes:
        if not (frame["label"] == name).any():
            raise DataError(f"class {name!r} has no images; add images or leave it out of data.classes")
        count = int(groups_per_class.get(name, 0))
        if count < len(targets):
            raise DataError(
                f"class {name!r} has {count} lesion group(s){where}, too few to split: at least "
                f"{len(targets)} needed, one for each of {', '.join(targets)}"
            )


def _grouped_stratified_split(
    labels: pd.Series, groups: pd.Series, targets: list[tuple[str, float]], seed: int
) -> np.ndarray:
    """Split names for ``labels``, in order: peel off the last target, repeat; train gets the rest."""
    codes = pd.factorize(labels)[0]
    group_codes = pd.factorize(groups)[0]
    result = np.full(len(labels), targets[0][0], dtype=object)
    remaining = np.arange(len(labels))
    rest = list(targets)
    rng = np.random.default_rng(seed)
    while len(rest) > 1:
        name, ratio = rest.pop()
        fraction = ratio / (ratio + sum(r for _, r in rest))
        chosen = _pick_subset(codes[remaining], group_codes[remaining], fraction, len(rest), rng)
        result[remaining[chosen]] = name
        remaining = remaining[~chosen]
    return result


def _pick_subset(
    codes: np.ndarray, groups: np.ndarray, fraction: float, splits_after: int, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of whole groups holding about ``fraction`` of the rows with the pool's class shares."""
    n_classes = int(codes.max()) + 1
    whole = np.bincount(codes, minlength=n_classes) / len(codes)
    n_groups = len(np.unique(groups))
    largest_class = int(np.bincount(codes).max())
    folds, take = _fold_plan(fraction, min(_MAX_FOLDS, n_groups, largest_class))
    best_score: tuple[int, float] | None = None
    best = np.zeros(len(codes), dtype=bool)
    for random_state in rng.integers(0, 2**31 - 1, size=_ATTEMPTS):
        fold_of = np.empty(len(codes), dtype=int)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=int(random_state))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class" - checked by the caller
            for fold, (_, test_index) in enumerate(splitter.split(codes, codes, groups)):
                fold_of[test_index] = fold
        for combination in itertools.combinations(range(folds), take):
            mask = np.isin(fold_of, combination)
            score = _score(mask, codes, whole, fraction)
            if best_score is None or score < best_score:
                best_score, best = score, mask
        if best_score is not None and best_score[0] == 0 and best_score[1] < _GOOD_ENOUGH:
            break
    return _ensure_every_class(best, codes, groups, splits_after)


def _fold_plan(fraction: float, max_folds: int) -> tuple[int, int]:
    """``(n, k)`` with ``k / n`` closest to ``fraction`` (fewest folds on ties), ``2 <= n <= max_folds``."""
    max_folds = max(2, max_folds)
    plans = [(n, k) for n in range(2, max_folds + 1) for k in range(1, n)]
    return min(plans, key=lambda plan: (round(abs(plan[1] / plan[0] - fraction), 9), plan[0]))


def _score(mask: np.ndarray, codes: np.ndarray, whole: np.ndarray, fraction: float) -> tuple[int, float]:
    """(classes missing on one side, worst class-share gap of either side + size gap); lower is better."""
    inside = np.bincount(codes[mask], minlength=len(whole))
    outside = np.bincount(codes[~mask], minlength=len(whole))
    missing = int(np.sum(inside == 0) + np.sum(outside == 0))
    gap_in = np.abs(inside / max(inside.sum(), 1) - whole).max()
    gap_out = np.abs(outside / max(outside.sum(), 1) - whole).max()
    return missing, float(max(gap_in, gap_out) + abs(mask.mean() - fraction))


def _ensure_every_class(
    mask: np.ndarray, codes: np.ndarray, groups: np.ndarray, splits_after: int
) -> np.ndarray:
    """Move whole groups so each class has one group inside and ``splits_after`` outside (tiny datasets)."""
    mask = mask.copy()
    for code in np.unique(codes):
        of_class = codes == code
        while True:
            inside = np.unique(groups[of_class & mask])
            outside = np.unique(groups[of_class & ~mask])
            if len(inside) == 0 and len(outside) > splits_after:
                mask |= groups == _smallest_group(outside, groups)
            elif len(outside) < splits_after and len(inside) > 1:
                mask &= ~(groups == _smallest_group(inside, groups))
            else:
                break
    return mask


def _smallest_group(candidates: np.ndarray, groups: np.ndarray) -> int:
    sizes = [(int(np.sum(groups == g)), int(g)) for g in candidates]
    return min(sizes)[1]


def _groups_in_several_splits(table: DatasetTable, splits: pd.Series) -> list[str]:
    frame = pd.DataFrame({"group": table.frame["group"], "split": splits})
    per_group = frame.groupby("group")["split"].nunique()
    return list(per_group[per_group > 1].index)
