"""Copies and near-copies in a dataset: found once per image content, cached, grouped, and kept out of splits.

Public skin-image collections hold the same file saved twice, the same photo resized or re-encoded, and the
same image filed under two classes. Two relations are found:

- **exact copies**: the same decoded pixels (SHA-256 of the size and the RGB pixels after
  :func:`~dermlab.data.images.read_image`), so a PNG re-saved from a JPEG still matches its source;
- **near copies**: two tests, both needed. (1) imagehash's pHash (the 8x8 lowest DCT frequencies of the
  32x32 grey thumbnail, each bit "above their median") of one image as it is lies within
  ``data.near_copy_threshold`` bits of one of the 16 views of the other: its 8 flips and rotations and those
  of its central 90% crop (or the other way round). (2) Their 16x16 colour thumbnails, under the best of
  the same views, differ by at most ``data.near_copy_color_tolerance`` levels (0-255) on average. The pHash
  alone cannot tell dermoscopy lesions apart: it is grey and coarse, and different lesions that share a
  layout (a dark oval in the middle of pink skin) hash alike; on HAM10000 it links 2 pairs of different
  lesions at distance 0 and 130 at distance 2. The colour test removes them all (``docs/duplicates.md``).

Groups are the connected components (:func:`scipy.sparse.csgraph.connected_components`, i.e. union-find) of
the copy pairs. :func:`resolve_copies` applies them to a :class:`~dermlab.data.datasets.DatasetTable` the way
``data.duplicates`` and the keys after it say: copy groups are merged into the ``group`` column (together
with the lesion ids already there), copies of an image of a shipped test (or val) folder leave the other
folders, and copy groups whose images carry different labels are left out.

The hashes of each image content are computed once and cached: :mod:`dermlab.data.image_hashes`.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from dermlab.config import DataConfig, literal_choices
from dermlab.data.datasets import DatasetTable
from dermlab.data.image_hashes import DIHEDRAL_TRANSPOSES, ImageHashes, compute_image_hashes
from dermlab.errors import ConfigError, DataError
from dermlab.io import atomic_write_text

__all__ = [
    "DUPLICATE_MODES",
    "CopyResolution",
    "close_hash_pairs",
    "colour_differences",
    "near_copy_pairs",
    "copy_pairs",
    "group_copies",
    "copy_group_table",
    "duplicates_cache_dir",
    "resolve_copies",
    "record_excluded_copies",
    "EXCLUDED_COLUMNS",
    "EXCLUDED_FILE",
    "copies_of_reference",
    "copies_of_run_training",
]

DUPLICATE_MODES: tuple[str, ...] = literal_choices(DataConfig, "duplicates")
"""``near``: exact and near copies; ``exact``: pixel-identical images only; ``none``: no detection."""

_BLOCK_ELEMENTS = 1 << 18  # hash comparisons per pass (2 MiB of uint64; measured fastest), for any N
_SHOWN_IDS = 3

@dataclass
class CopyResolution:
    """What :func:`resolve_copies` did to a dataset table.

    ``table``: the table to split (copy groups merged into ``group``, excluded images removed); ``copies``: the
    copy groups of the original table, one row per image (see :func:`group_copies`; ``None`` with ``none``);
    ``excluded``: the images left out (``image_id, path, label, fixed_split, reason, copy_of``);
    ``merged_groups``: how many groups of the original ``group`` column were joined to another one.
    """

    table: DatasetTable
    copies: pd.DataFrame | None
    excluded: pd.DataFrame
    merged_groups: int = 0
    mode: str = "none"
    threshold: int = 0
    kept_test_copies: int = 0  # train/val copies of test-folder images kept by data.keep_test_copies


# --- pairs and groups ---------------------------------------------------------------------------------------


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1, dtype=np.uint8)


def close_hash_pairs(
    first: np.ndarray,
    second: np.ndarray | None = None,
    max_distance: int = 8,
    *,
    dihedral: bool = True,
    crops: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, distance)`` of every pair of images whose pHashes lie within ``max_distance`` bits.

    ``first`` and ``second`` are ``(N, 16)`` hash arrays (:attr:`ImageHashes.phash`); without ``second`` the
    pairs within ``first`` come once each (``i < j``). The distance is the smallest between either image as it
    is and any view of the other: its 8 flips and rotations and those of its central crop (``dihedral=False``:
    only the image as it is; ``crops=False``: not the crops).
    """
    same = second is None
    a = np.asarray(first, dtype=np.uint64)
    b = a if second is None else np.asarray(second, dtype=np.uint64)
    views = [t for t in range(len(DIHEDRAL_TRANSPOSES)) if dihedral or t == 0]
    columns = views + ([len(DIHEDRAL_TRANSPOSES) + t for t in views] if crops else [])
    # column-major copies, so each view of every image is one contiguous row of len(b) hashes
    b_views = np.ascontiguousarray(b[:, columns].T)
    a_views = np.ascontiguousarray(a[:, columns])
    rows_i, rows_j, distances = [], [], []
    rows = max(1, _BLOCK_ELEMENTS // max(1, len(b)))
    for start in range(0, len(a), rows):
        first_j = start if same else 0  # within one set only the pairs j > i are needed
        part, others = a_views[start : start + rows], b_views[:, first_j:]
        xor = np.empty((len(part), others.shape[1]), dtype=np.uint64)  # one buffer for every pass
        distance = _popcount(np.bitwise_xor(part[:, :1], others[None, 0], out=xor))  # both as they are
        for view in range(1, len(columns)):
            np.minimum(distance, _popcount(np.bitwise_xor(part[:, :1], others[None, view], out=xor)), out=distance)
            np.minimum(distance, _popcount(np.bitwise_xor(part[:, view, None], others[None, 0], out=xor)), out=distance)
        i, j = np.nonzero(distance <= max_distance)
        keep = i + start < j + first_j if same else np.ones(len(i), dtype=bool)
        rows_i.append(i[keep] + start)
        rows_j.append(j[keep] + first_j)
        distances.append(distance[i[keep], j[keep]])
    if not rows_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.uint8)
    return np.concatenate(rows_i), np.concatenate(rows_j), np.concatenate(distances)


def _dihedral_views(images: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 flips and rotations of ``(P, H, W, C)`` arrays (square H = W)."""
    for base in (images, images.transpose(0, 2, 1, 3)):
        yield base
        yield base[:, :, ::-1]
        yield base[:, ::-1, :]
        yield base[:, ::-1, ::-1]


def colour_differences(
    first: np.ndarray, i: np.ndarray, j: np.ndarray, second: np.ndarray | None = None
) -> np.ndarray:
    """Mean absolute difference (0-255 levels) between the colour thumbnails of images ``i`` of ``first`` and
    ``j`` of ``second`` (default ``first``): the smallest between either as it is and any of the 16 views of the
    other (8 flips and rotations, of it and of its central crop)."""
    second = first if second is None else second
    result = np.empty(len(i), dtype=np.float32)
    chunk = 512
    for start in range(0, len(i), chunk):
        a, b = i[start : start + chunk], j[start : start + chunk]
        best = np.full(len(a), np.inf, dtype=np.float32)
        for plain, other in ((first[a, 0], second[b]), (second[b, 0], first[a])):
            plain = plain.astype(np.float32)
            for scale in range(other.shape[1]):
                for view in _dihedral_views(other[:, scale].astype(np.float32)):
                    np.minimum(best, np.abs(plain - view).mean(axis=(1, 2, 3)), out=best)
        result[start : start + chunk] = best
    return result


def near_copy_pairs(
    hashes: ImageHashes,
    threshold: int = DataConfig.near_copy_threshold,
    tolerance: float = DataConfig.near_copy_color_tolerance,
    other: ImageHashes | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, distance)`` of near copies: pHashes within ``threshold`` bits whose colour thumbnails also
    differ by at most ``tolerance`` levels (within ``hashes`` with ``i < j``, or from ``hashes`` to ``other``)."""
    second = None if other is None else other.phash
    i, j, distance = close_hash_pairs(hashes.phash, second, max_distance=threshold)
    if len(i):
        close = colour_differences(hashes.colour, i, j, None if other is None else other.colour) <= tolerance
        i, j, distance = i[close], j[close], distance[close]
    return i, j, distance


def copy_pairs(
    hashes: ImageHashes,
    mode: str = "near",
    threshold: int = DataConfig.near_copy_threshold,
    tolerance: float = DataConfig.near_copy_color_tolerance,
) -> np.ndarray:
    """``(P, 2)`` index pairs (``i < j``) of copies: same pixels, plus (``near``) near copies."""
    _check_mode(mode)
    n = len(hashes)
    codes = pd.factorize(pd.Series(hashes.pixels, dtype=object))[0] if n else np.zeros(0, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    same = codes[order[:-1]] == codes[order[1:]]  # a chain through each set of equal digests links it
    pairs = np.stack([order[:-1][same], order[1:][same]], axis=1).astype(np.int64).reshape(-1, 2)
    if mode == "near" and n > 1:
        i, j, _ = near_copy_pairs(hashes, threshold, tolerance)
        pairs = np.concatenate([pairs, np.stack([i, j], axis=1).astype(np.int64)])
    return np.sort(pairs, axis=1) if len(pairs) else pairs


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component number of each of ``n`` nodes linked by ``pairs`` (union-find, by scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _numbered_groups(components: np.ndarray) -> np.ndarray:
    """Components of two or more members numbered 0, 1, ... in order of first appearance; -1 for the rest."""
    sizes = np.bincount(components) if len(components) else np.zeros(0, dtype=np.int64)
    result = np.full(len(components), -1, dtype=np.int64)
    numbers: dict[int, int] = {}
    for index, component in enumerate(components):
        if sizes[component] > 1:
            result[index] = numbers.setdefault(int(component), len(numbers))
    return result


def group_copies(
    frame: pd.DataFrame,
    hashes: ImageHashes,
    mode: str = "near",
    threshold: int = DataConfig.near_copy_threshold,
    tolerance: float = DataConfig.near_copy_color_tolerance,
) -> pd.DataFrame:
    """One row per image of ``frame`` (same index): its ``image_id, path, label, fixed_split`` plus
    ``exact_group`` (pixel-identical images) and ``copy_group`` (the copies of ``mode``: exact and near, or
    exact only), each numbered from 0 in the order of ``frame``, ``-1`` for an image without copies, and
    ``pixels`` (the digest) and ``phash`` (hex of the image's own pHash)."""
    _check_mode(mode)
    n = len(frame)
    if len(hashes) != n:
        raise ValueError(f"{len(hashes)} hashes for {n} images")
    exact = _numbered_groups(_components(n, copy_pairs(hashes, "exact")))
    copies = (
        exact
        if mode == "exact"
        else _numbered_groups(_components(n, copy_pairs(hashes, mode, threshold, tolerance)))
    )
    fixed = frame["fixed_split"] if "fixed_split" in frame else pd.Series("", index=frame.index)
    return pd.DataFrame(
        {
            "image_id": frame["image_id"].to_numpy(),
            "path": frame["path"].to_numpy(),
            "label": frame["label"].to_numpy(),
            "fixed_split": fixed.to_numpy(),
            "exact_group": exact,
            "copy_group": copies,
            "pixels": hashes.pixels,
            "phash": [f"{int(h):016x}" for h in hashes.phash[:, 0]],
        },
        index=frame.index,
    )


def copy_group_table(copies: pd.DataFrame) -> pd.DataFrame:
    """One row per copy group of :func:`group_copies`: ``copy_group, size, kind`` (``exact`` when every image
    is pixel-identical, else ``near``), ``labels`` and ``folders`` (``|``-joined, sorted), ``conflicting_labels``
    and ``crosses_folders`` (the dataset's own train / val / test folders), and ``paths`` (a list)."""
    columns = [
        "copy_group",
        "size",
        "kind",
        "labels",
        "folders",
        "conflicting_labels",
        "crosses_folders",
        "paths",
    ]
    rows = []
    for number, members in copies[copies["copy_group"] >= 0].groupby("copy_group", sort=True):
        labels = sorted(set(members["label"]))
        folders = sorted(set(members["fixed_split"]) - {""})
        rows.append(
            {
                "copy_group": int(number),
                "size": len(members),
                "kind": "exact" if members["pixels"].nunique() == 1 else "near",
                "labels": "|".join(labels),
                "folders": "|".join(folders),
                "conflicting_labels": len(labels) > 1,
                "crosses_folders": len(folders) > 1,
                "paths": list(members["path"]),
            }
        )
    types = {"copy_group": int, "size": int, "conflicting_labels": bool, "crosses_folders": bool}
    return pd.DataFrame(rows, columns=columns).astype(types)


# --- applying them to a dataset -------------------------------------------------------------------------------


def duplicates_cache_dir(config: DataConfig, run_dir: str | Path | None = None) -> Path | None:
    """Where the hashes are kept: ``data.cache_dir`` (beside the image cache), else the run's ``cache/``."""
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(run_dir) / "cache" if run_dir is not None else None


def resolve_copies(
    table: DatasetTable,
    config: DataConfig,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = False,
) -> CopyResolution:
    """``table`` ready to split, as ``config`` says (``data.duplicates`` and the keys after it): copy groups
    merged into ``group``; copies of images of the dataset's own test (or val) folder dropped from the other
    folders unless ``keep_test_copies``; copy groups with conflicting labels dropped if
    ``drop_conflicting_copies``. With ``duplicates: none`` the table comes back unchanged."""
    mode, threshold = config.duplicates, config.near_copy_threshold
    empty = pd.DataFrame(columns=EXCLUDED_COLUMNS)
    if mode == "none":
        return CopyResolution(table=table, copies=None, excluded=empty, mode=mode, threshold=threshold)
    frame = table.frame
    hashes = compute_image_hashes(frame["path"], cache_dir, workers=workers, progress=progress)
    copies = group_copies(frame, hashes, mode, threshold, config.near_copy_color_tolerance)
    reasons: dict[int, tuple[str, str]] = {}  # frame index -> (reason, copy_of)
    if config.drop_conflicting_copies:
        reasons.update(_conflicting_label_rows(copies))
    fixed_copies = _copies_of_fixed_folders(copies.drop(index=list(reasons)))
    if not config.keep_test_copies:
        reasons.update(fixed_copies)
    kept = frame.drop(index=list(reasons))
    if kept.empty:
        raise DataError(
            f"{table.root}: every image is a copy with a conflicting label or a copy of a test-folder image "
            "(dermlab info DATA --duplicates FILE.csv lists them)"
        )
    groups, merged = _merged_groups(kept, copies.loc[kept.index, "copy_group"])
    excluded = empty
    if reasons:
        order = sorted(reasons)
        excluded = (
            copies.loc[order, ["image_id", "path", "label", "fixed_split"]]
            .assign(reason=[reasons[i][0] for i in order], copy_of=[reasons[i][1] for i in order])
            .reset_index(drop=True)
        )
    return CopyResolution(
        table=replace(table, frame=kept.assign(group=groups).reset_index(drop=True)),
        copies=copies,
        excluded=excluded,
        merged_groups=merged,
        mode=mode,
        threshold=threshold,
        kept_test_copies=len(fixed_copies) if config.keep_test_copies else 0,
    )


EXCLUDED_COLUMNS = ["image_id", "path", "label", "fixed_split", "reason", "copy_of"]
EXCLUDED_FILE = "excluded_copies.csv"


def record_excluded_copies(resolution: CopyResolution, folder: str | Path) -> list[str]:
    """Write ``folder/excluded_copies.csv`` (the images :func:`resolve_copies` left out; a stale one is removed
    when none are) and return the lines that say what was done, for the console."""
    path = Path(folder) / EXCLUDED_FILE
    excluded = resolution.excluded
    if len(excluded):
        atomic_write_text(path, excluded.to_csv(index=False, lineterminator="\n"))
    else:
        path.unlink(missing_ok=True)
    lines = []
    if len(excluded):
        reasons = excluded["reason"].map(lambda r: "with conflicting labels" if r.startswith("conflicting") else r)
        reasons = reasons.str.replace(r"^copy of a (\w+)-folder image$", r"copies of \1-folder images", regex=True)
        counts = ", ".join(f"{n} {reason}" for reason, n in reasons.value_counts().sort_index().items())
        lines.append(
            f"copies: {len(excluded)} image(s) left out ({counts}); listed in {path} "
            "(data.keep_test_copies / data.drop_conflicting_copies keep them)"
        )
    if resolution.kept_test_copies:
        lines.append(
            f"copies: {resolution.kept_test_copies} train/val image(s) copy a test-folder image and were kept "
            "(data.keep_test_copies): their groups span two splits"
        )
    if resolution.merged_groups:
        lines.append(
            f"copies: {resolution.merged_groups} group(s) merged into another because their images are "
            f"{resolution.mode} copies, so no copy is in two splits"
        )
    return lines


def _conflicting_label_rows(copies: pd.DataFrame) -> dict[int, tuple[str, str]]:
    rows: dict[int, tuple[str, str]] = {}
    for _, members in copies[copies["copy_group"] >= 0].groupby("copy_group"):
        labels = sorted(set(members["label"]))
        if len(labels) < 2:
            continue
        for index in members.index:
            others = [i for i in members["image_id"] if i != members.at[index, "image_id"]]
            rows[index] = (f"conflicting labels ({', '.join(labels)})", _ids(others))
    return rows


_FOLDER_RANK = {"test": 2, "val": 1}


def _copies_of_fixed_folders(copies: pd.DataFrame) -> dict[int, tuple[str, str]]:
    """Images that copy an image of a "later" shipped folder (test over val over train): they leave."""
    rows: dict[int, tuple[str, str]] = {}
    for _, members in copies[copies["copy_group"] >= 0].groupby("copy_group"):
        ranks = members["fixed_split"].map(lambda s: _FOLDER_RANK.get(s, 0))
        top = int(ranks.max())
        if top == 0:
            continue
        folder = "test" if top == 2 else "val"
        originals = list(members["image_id"][ranks == top])
        for index in members.index[ranks < top]:
            rows[index] = (f"copy of a {folder}-folder image", _ids(originals))
    return rows


def _merged_groups(frame: pd.DataFrame, copy_group: pd.Series) -> tuple[pd.Series, int]:
    """The ``group`` column with copy groups joined in: each connected set of groups takes the smallest of its
    names (so a dataset without copies keeps its groups as they were); returns it and how many groups merged."""
    n = len(frame)
    group_codes = pd.factorize(frame["group"])[0]
    copy_codes = copy_group.to_numpy()
    pairs = []
    for codes in (group_codes, np.where(copy_codes >= 0, copy_codes, -1 - np.arange(n))):
        order = np.argsort(codes, kind="stable")
        same = codes[order[:-1]] == codes[order[1:]]
        pairs.append(np.stack([order[:-1][same], order[1:][same]], axis=1))
    components = _components(n, np.concatenate(pairs))
    names = pd.Series(frame["group"].to_numpy()).groupby(components).transform("min")
    merged = int(frame["group"].nunique() - names.nunique())
    return pd.Series(names.to_numpy(), index=frame.index), merged


def _ids(image_ids: Sequence[str]) -> str:
    shown = ", ".join(image_ids[:_SHOWN_IDS])
    return shown + (f" and {len(image_ids) - _SHOWN_IDS} more" if len(image_ids) > _SHOWN_IDS else "")


# --- across datasets -------------------------------------------------------------------------------------------


def copies_of_reference(
    paths: Sequence[str | Path],
    reference_paths: Sequence[str | Path],
    config: DataConfig,
    *,
    cache_dir: str | Path | None = None,
    workers: int = 0,
) -> pd.DataFrame:
    """The images of ``paths`` that copy one of ``reference_paths`` (e.g. a run's training images), by
    ``config.duplicates`` and its thresholds: one row each, ``index`` (position in ``paths``), ``path``,
    ``copy_of`` (the closest reference image), ``distance`` (pHash bits) and ``exact`` (same pixels)."""
    columns = ["index", "path", "copy_of", "distance", "exact"]
    mode = config.duplicates
    if mode == "none" or not len(paths) or not len(reference_paths):
        return pd.DataFrame(columns=columns)
    both = compute_image_hashes([*paths, *reference_paths], cache_dir, workers=workers)
    n = len(paths)
    query, reference = both.subset(np.arange(n)), both.subset(np.arange(n, len(both)))
    first_of: dict[str, int] = {}
    for index, digest in enumerate(reference.pixels):
        first_of.setdefault(str(digest), index)
    rows = {i: (first_of[str(d)], 0, True) for i, d in enumerate(query.pixels) if str(d) in first_of}
    if mode == "near":
        i, j, distance = near_copy_pairs(
            query, config.near_copy_threshold, config.near_copy_color_tolerance, reference
        )
        order = np.lexsort((j, distance))  # the closest reference image first
        for a, b, d in zip(i[order], j[order], distance[order]):
            rows.setdefault(int(a), (int(b), int(d), False))
    records = [
        (index, str(paths[index]), str(reference_paths[match]), distance, exact)
        for index, (match, distance, exact) in sorted(rows.items())
    ]
    return pd.DataFrame(records, columns=columns)


def copies_of_run_training(
    frame: pd.DataFrame, run_dir: str | Path, config: DataConfig, *, workers: int = 0
) -> pd.DataFrame | None:
    """The rows of ``frame`` (``path`` column) that copy an image of the run's training split, as
    :func:`copies_of_reference` lists them; ``None`` when the run folder has no ``splits.csv`` to say which
    images it trained on. Training images no longer on disk are left out of the comparison."""
    from dermlab.data.splits import SPLITS_FILE, split_rows

    splits_path = Path(run_dir) / SPLITS_FILE
    if not splits_path.is_file():
        return None
    try:
        splits = pd.read_csv(splits_path, dtype=str, keep_default_na=False, usecols=["path", "split"])
    except (OSError, ValueError) as error:
        raise DataError(f"{splits_path}: cannot read splits file ({error})") from None
    training = [p for p in split_rows(splits, "train")["path"] if os.path.isfile(p)]
    cache_dir = duplicates_cache_dir(config, run_dir)
    return copies_of_reference(list(frame["path"]), training, config, cache_dir=cache_dir, workers=workers)


def _check_mode(mode: str) -> None:
    if mode not in DUPLICATE_MODES:
        raise ConfigError(f"data.duplicates must be one of {', '.join(DUPLICATE_MODES)}, got {mode!r}")
