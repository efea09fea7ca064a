"""Decoded-image cache: each image decoded and resized once, then read from one memory-mapped uint8 array.

Decoding a JPEG and resizing it costs milliseconds per image, every epoch, in every run; reading a resized
row from a memory-mapped file costs about a tenth of a millisecond. The cache stores every image of a dataset
resized (with the same torchvision call the transforms use) to the input size times ``1 + margin``:

    <cache_dir>/images/<H>x<W>-<filter>-<fingerprint>.npy    uint8 array (N, H, W, 3), read with mmap
    <cache_dir>/images/<H>x<W>-<filter>-<fingerprint>.json   index: geometry, shape, content key -> row

Rows are keyed by the blake2b hash of the file's bytes (so a moved dataset still hits and an edited file
misses), and a store's fingerprint hashes its sorted content keys plus the geometry (size, margin, filter).
The array is written to a temporary file and renamed into place, and the index is written (atomically)
only after that: a store without its index, or whose array disagrees with it, is never trusted. When a
dataset changes, rows already decoded in another store of the same geometry are copied rather than decoded.

With ``margin=0`` (the default) an eval transform gives bit-identical tensors from the cache and from the
file: the cached image already has the input size, so the transform's own resize returns it unchanged.
Every transform resizes the whole image to the input size first (see :mod:`dermlab.data.transforms`), so a
margin adds pixels no augmentation can use; it is there for pipelines that crop before they resize.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dermlab.data.images import read_image
from dermlab.data.preprocessing import INTERPOLATIONS
from dermlab.errors import ConfigError, DataError
from dermlab.io import atomic_save, atomic_write_json

__all__ = [
    "FORMAT_VERSION",
    "ImageCache",
    "build_image_cache",
    "cached_size",
    "content_key",
    "create_image_loader",
    "resize_geometry",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_RESIZE_POLICY = "squash"  # the whole image resized to (h, w), ignoring its aspect, as the transforms do
_KEY_MEMO: dict[tuple[str, int, int, int], str] = {}  # per process: (path, size, mtime, inode) -> content key


def content_key(path: str | Path) -> str:
    """The blake2b hash (32 hex digits) of a file's bytes; raises ``DataError`` naming an unreadable file."""
    path = str(path)
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    memo = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    key = _KEY_MEMO.get(memo)
    if key is None:
        digest = hashlib.blake2b(digest_size=16)
        try:
            with open(path, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
        key = _KEY_MEMO[memo] = digest.hexdigest()
    return key


def cached_size(input_size: Sequence[int], margin: float = 0.0) -> tuple[int, int]:
    """Stored ``(height, width)``: the input size times ``1 + margin``, at the input's aspect ratio."""
    if len(input_size) != 2 or any(int(s) <= 0 for s in input_size):
        raise ConfigError(f"image cache: input size must be (height, width) > 0, got {input_size!r}")
    if not 0.0 <= margin <= 4.0:
        raise ConfigError(f"image cache: margin must be in [0, 4], got {margin}")
    return tuple(int(round(int(s) * (1.0 + margin))) for s in input_size)  # type: ignore[return-value]


class ImageCache:
    """Decoded images by file path, read from a memory-mapped store; call it like :func:`read_image`.

    Picklable: the memory map is opened lazily in each process (DataLoader workers open their own).
    A path that is not in the cache is read from its file, so the cache can never change which images load.
    """

    def __init__(self, store: Path | None, rows: dict[str, int], size: tuple[int, int], decoded: int = 0) -> None:
        self.store = store
        self.rows = rows
        self.size = size
        self.decoded = decoded  # images decoded while building (0 when every row came from disk)
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, path: object) -> bool:
        return str(path) in self.rows

    def _rows_array(self) -> np.ndarray:
        if self._array is None:
            assert self.store is not None
            self._array = np.load(self.store, mmap_mode="r")
        return self._array

    def array(self, path: str | Path) -> np.ndarray:
        """The cached ``(H, W, 3)`` uint8 pixels of ``path`` (a read-only view of the memory map)."""
        row = self.rows.get(str(path))
        if row is None:
            raise KeyError(f"{path}: not in the image cache")
        return self._rows_array()[row]

    def read(self, path: str | Path) -> Image.Image:
        """The image of ``path`` as an RGB PIL image: from the cache when present, else from the file."""
        row = self.rows.get(str(path))
        if row is None:
            return read_image(path)
        return Image.fromarray(np.ascontiguousarray(self._rows_array()[row]))

    __call__ = read


def build_image_cache(
    paths: Iterable[str | Path],
    cache_dir: str | Path,
    input_size: Sequence[int],
    *,
    margin: float = 0.0,
    interpolation: str = "bicubic",
    workers: int = 0,
    progress: bool = False,
) -> ImageCache:
    """The cache of ``paths`` under ``cache_dir/images``: loaded when it exists, else built once, atomically.

    ``workers`` threads decode (Pillow releases the GIL while decoding and resampling); ``progress`` shows a
    bar while building (the caller decides: training passes ``dermlab.training.progress.show_bars()``).
    """
    if interpolation not in INTERPOLATIONS:
        valid = ", ".join(INTERPOLATIONS)
        raise ConfigError(f"image cache: interpolation must be one of {valid}, got {interpolation!r}")
    height, width = cached_size(input_size, margin)
    paths = [str(p) for p in paths]
    threads = max(1, int(workers))
    with ThreadPoolExecutor(threads) as pool:  # hashing releases the GIL too
        keys = list(pool.map(content_key, paths))
    unique = sorted(set(keys))
    geometry = {
        "format_version": FORMAT_VERSION,
        "size": [height, width],
        "margin": float(margin),
        "interpolation": interpolation,
        "resize": _RESIZE_POLICY,
    }
    fingerprint = hashlib.blake2b(
        (json.dumps(geometry, sort_keys=True) + "\n" + "\n".join(unique)).encode(), digest_size=10
    ).hexdigest()
    root = Path(cache_dir) / "images"
    name = f"{height}x{width}-{interpolation}-{fingerprint}"
    if not unique:
        return ImageCache(None, {}, (height, width))
    index = _load_index(root / f"{name}.json", root / f"{name}.npy", geometry, len(unique), unique)
    decoded = 0
    if index is None:
        first_path = {}
        for path, key in zip(paths, keys):
            first_path.setdefault(key, path)
        decoded = _build_store(root, name, geometry, unique, first_path, interpolation, threads, progress)
        index = _load_index(root / f"{name}.json", root / f"{name}.npy", geometry, len(unique), unique)
        if index is None:  # pragma: no cover - only if the files vanish between the write and this read
            raise DataError(f"{root / name}.npy: the image cache could not be read back after building it")
    rows = {path: index[key] for path, key in zip(paths, keys)}
    return ImageCache(root / f"{name}.npy", rows, (height, width), decoded=decoded)


def _load_index(
    index_path: Path, store: Path, geometry: dict[str, Any], count: int, keys: Sequence[str] | None = None
) -> dict[str, int] | None:
    """The key -> row map of a complete store (holding exactly ``keys`` when given), or ``None`` if anything
    about it is missing or inconsistent."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shape = [count, *geometry["size"], 3]
        if index.get("geometry") != geometry or index.get("shape") != shape or len(index.get("rows", {})) != count:
            return None
        rows = {str(k): int(v) for k, v in index["rows"].items()}
        if (keys is not None and set(rows) != set(keys)) or sorted(rows.values()) != list(range(count)):
            return None
        array = np.load(store, mmap_mode="r")
        if list(array.shape) != shape or array.dtype != np.uint8:
            return None
        return rows
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _donor_stores(root: Path, geometry: dict[str, Any]) -> list[tuple[np.ndarray, dict[str, int]]]:
    """Other complete stores of the same geometry, whose rows can be copied instead of decoded."""
    donors = []
    height, width = geometry["size"]
    for index_path in sorted(root.glob(f"{height}x{width}-{geometry['interpolation']}-*.json")):
        try:
            count = len(json.loads(index_path.read_text(encoding="utf-8"))["rows"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
        rows = _load_index(index_path, index_path.with_suffix(".npy"), geometry, count)
        if rows is not None:
            donors.append((np.load(index_path.with_suffix(".npy"), mmap_mode="r"), rows))
    return donors


def _build_store(
    root: Path,
    name: str,
    geometry: dict[str, Any],
    keys: list[str],
    first_path: dict[str, str],
    interpolation: str,
    threads: int,
    progress: bool,
) -> int:
    """Write ``name.npy`` (rows in ``keys`` order) then ``name.json``; returns how many images were decoded."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    height, width = geometry["size"]
    root.mkdir(parents=True, exist_ok=True)
    donors = _donor_stores(root, geometry)
    mode = InterpolationMode(interpolation)

    def decode(key: str) -> np.ndarray:
        for array, rows in donors:
            if key in rows:
                return np.asarray(array[rows[key]])
        # the very call the transforms make, so that with margin 0 their resize is then a no-op
        image = F.resize(read_image(first_path[key]), [height, width], interpolation=mode, antialias=True)
        return np.asarray(image, dtype=np.uint8)

    to_decode = sum(1 for key in keys if not any(key in rows for _, rows in donors))
    show = progress
    log.info("image cache: %d images (%d to decode) into %s", len(keys), to_decode, root / f"{name}.npy")

    def write(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keys), height, width, 3))
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(keys), desc="image cache", unit="img", leave=False)
        with ThreadPoolExecutor(threads) as pool:
            for row, pixels in enumerate(pool.map(decode, keys)):
                array[row] = pixels
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        array.flush()
        del array

    # np.load checks the .npy header; atomic_save writes to a temporary name, fsyncs and renames
    atomic_save(root / f"{name}.npy", write)
    atomic_write_json(
        root / f"{name}.json",
        {"geometry": geometry, "shape": [len(keys), height, width, 3], "rows": {key: i for i, key in enumerate(keys)}},
    )
    return to_decode


def resize_geometry(transform: Any) -> tuple[tuple[int, int], str] | None:
    """``((h, w), interpolation)`` of the resize a transform starts with, or ``None`` if it starts otherwise.

    The cache copies the transform's own first step, so the two can never disagree about size or filter.
    """
    from torchvision.transforms import v2

    steps = getattr(transform, "transforms", None)
    first = steps[0] if steps else transform
    if not isinstance(first, v2.Resize) or first.size is None or len(first.size) != 2 or first.max_size is not None:
        return None
    interpolation = getattr(first.interpolation, "value", first.interpolation)
    if interpolation not in INTERPOLATIONS or first.antialias is False:
        return None
    return (int(first.size[0]), int(first.size[1])), str(interpolation)


def create_image_loader(
    paths: Iterable[str | Path],
    cache_dir: str | Path | None,
    transform: Any,
    *,
    margin: float = 0.0,
    workers: int = 0,
    progress: bool = False,
) -> Callable[[str], Image.Image]:
    """An image loader for :class:`~dermlab.data.datamodule.ImageDataset`: the cache of ``paths`` sized for
    ``transform`` when ``cache_dir`` is set and ``transform`` starts with a resize, else :func:`read_image`.
    """
    if not cache_dir:
        return read_image
    geometry = resize_geometry(transform)
    if geometry is None:
        log.warning("image cache: off, the transform does not start with a resize to a fixed (h, w)")
        return read_image
    size, interpolation = geometry
    return build_image_cache(
        paths, cache_dir, size, margin=margin, interpolation=interpolation, workers=workers, progress=progress
    )
