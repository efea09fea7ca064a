"""Perceptual and pixel hashes of images, computed once per file content and cached (for the copy finder
of :mod:`dermlab.data.duplicates`).

Per image: the SHA-256 of its size and decoded RGB pixels, imagehash's pHash of its 8 flips and rotations and
of those of its central 90% crop (16 hashes), and 16x16 colour thumbnails of the image and of that crop.

The 8 dihedral hashes come from one DCT per thumbnail: flipping a signal negates its odd DCT frequencies
and transposing an image transposes its DCT, so the views are sign changes and a transpose of the 8x8 block,
with the median taken afresh for each; ``tests/data/test_duplicates.py`` checks the result equals
``imagehash.phash`` of each transposed thumbnail bit for bit. Vectorised over all images this costs a few
microseconds per image, where eight ``imagehash.phash`` calls cost over a millisecond, more than the decode.

Cache: ``<cache_dir>/duplicates/hashes-<fingerprint>.npz`` (``data.cache_dir``, beside the image cache, or the
run folder's ``cache/``) holds, per file content (the blake2b key of the file's bytes that the image cache
uses), the pixel digest, the 16 pHashes and the colour thumbnails. A dataset whose files were all hashed
before is read back without decoding; a changed dataset decodes only its new files.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dermlab.data.cache import content_key
from dermlab.data.images import read_image
from dermlab.io import atomic_save

__all__ = ["DIHEDRAL_TRANSPOSES", "FORMAT_VERSION", "ImageHashes", "compute_image_hashes", "dihedral_phashes", "hash_images"]

FORMAT_VERSION = 1
_HASH_SIZE = 8  # imagehash.phash defaults: an 8x8 hash of a 32x32 thumbnail
_THUMBNAIL = 32
_CROP = 0.9  # the central crop also hashed, so a copy cropped to about 85-95% still matches
_COLOUR = 16  # colour thumbnails (16x16 RGB) that confirm a pHash match
_HASHES = 16  # 8 flips and rotations of the image, then of its central crop
_PROGRESS_FROM = 500  # a progress bar only when at least this many images are to be decoded
_PROCESSES_FROM = 1000  # worker processes only for this many images or more: starting them takes ~1 s

DIHEDRAL_TRANSPOSES: tuple[Image.Transpose | None, ...] = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
)
"""The 8 flips and rotations, in the order of the columns of :attr:`ImageHashes.phash` (``None``: as it is)."""

_U = (-1.0) ** np.arange(_HASH_SIZE)[:, None]  # flipping rows (top-bottom) negates odd vertical frequencies
_V = (-1.0) ** np.arange(_HASH_SIZE)[None, :]  # flipping columns (left-right) negates odd horizontal ones


@dataclass
class ImageHashes:
    """Per image (in the order asked for): ``pixels`` digests (str); ``phash`` ``(N, 16)`` uint64 hashes, column
    ``t`` the image under :data:`DIHEDRAL_TRANSPOSES` ``[t]``, column ``8 + t`` its central 90% crop under it;
    ``colour`` ``(N, 2, 16, 16, 3)`` uint8 thumbnails of the image and of that crop."""

    pixels: np.ndarray
    phash: np.ndarray
    colour: np.ndarray
    decoded: int = 0  # images decoded to compute these (0 when every one came from the cache)

    def __len__(self) -> int:
        return len(self.pixels)

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageHashes:
        index = np.asarray(index, dtype=np.int64)
        return ImageHashes(self.pixels[index], self.phash[index], self.colour[index], self.decoded)




def compute_image_hashes(
    paths: Iterable[str | Path],
    cache_dir: str | Path | None = None,
    *,
    workers: int = 0,
    progress: bool = False,
) -> ImageHashes:
    """Pixel digests, dihedral pHashes and colour thumbnails of ``paths``, from ``cache_dir/duplicates`` where
    already there (``cache_dir=None``: computed, not stored).

    ``workers`` processes decode when there are at least 1,000 images to decode on Linux (else this process
    does);
    ``progress`` shows a bar for large datasets (the caller decides: commands pass
    ``dermlab.training.progress.show_bars()``, so a log file gets no bar). An unreadable image raises
    :class:`~dermlab.errors.DataError` naming it.
    """
    paths = [str(p) for p in paths]
    workers = max(1, int(workers))
    with ThreadPoolExecutor(workers) as pool:  # reading and hashing file bytes releases the GIL
        keys = list(pool.map(content_key, paths))
    unique = sorted(set(keys))
    root = Path(cache_dir) / "duplicates" if cache_dir else None
    known = _load_stores(root, set(unique)) if root is not None else {}
    missing = [key for key in unique if key not in known]
    if missing:
        first_path: dict[str, str] = {}
        for path, key in zip(paths, keys):
            first_path.setdefault(key, path)
        computed = _hash_files([first_path[key] for key in missing], workers, progress)
        known.update(zip(missing, computed))
        if root is not None:
            _write_store(root, unique, known)
    if not keys:
        return ImageHashes(
            np.zeros(0, dtype=str),
            np.zeros((0, _HASHES), dtype=np.uint64),
            np.zeros((0, 2, _COLOUR, _COLOUR, 3), dtype=np.uint8),
        )
    return ImageHashes(
        pixels=np.array([known[key][0] for key in keys], dtype=str),
        phash=np.stack([known[key][1] for key in keys]).astype(np.uint64),
        colour=np.stack([known[key][2] for key in keys]).astype(np.uint8),
        decoded=len(missing),
    )


def dihedral_phashes(thumbnails: np.ndarray) -> np.ndarray:
    """imagehash's pHash of each ``(N, 32, 32)`` grey thumbnail under the 8 :data:`DIHEDRAL_TRANSPOSES`,
    as ``(N, 8)`` uint64 (bits in imagehash's order: ``f"{h:016x}" == str(imagehash.phash(...))``)."""
    import scipy.fftpack  # the very DCT imagehash.phash uses, so the bits agree

    thumbnails = np.asarray(thumbnails)
    if thumbnails.ndim != 3 or thumbnails.shape[1:] != (_THUMBNAIL, _THUMBNAIL):
        raise ValueError(f"thumbnails must be (N, {_THUMBNAIL}, {_THUMBNAIL}), got {thumbnails.shape}")
    if len(thumbnails) == 0:
        return np.zeros((0, len(DIHEDRAL_TRANSPOSES)), dtype=np.uint64)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(thumbnails, axis=1), axis=2)[:, :_HASH_SIZE, :_HASH_SIZE]
    transposed = dct.transpose(0, 2, 1)
    variants = np.stack(
        [
            dct,  # as it is
            dct * _V,  # FLIP_LEFT_RIGHT
            dct * _U,  # FLIP_TOP_BOTTOM
            dct * _U * _V,  # ROTATE_180
            transposed,  # TRANSPOSE
            transposed * _U,  # ROTATE_90 (counter-clockwise): transpose, then flip top-bottom
            transposed * _V,  # ROTATE_270: transpose, then flip left-right
            transposed * _U * _V,  # TRANSVERSE
        ],
        axis=1,
    ).reshape(len(dct), len(DIHEDRAL_TRANSPOSES), _HASH_SIZE * _HASH_SIZE)
    bits = variants > np.median(variants, axis=2, keepdims=True)
    packed = np.packbits(bits, axis=2, bitorder="big")  # (N, 8, 8) bytes, first bit most significant
    return packed.view(">u8")[..., 0].astype(np.uint64)


def _thumbnails_of(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Grey ``(2, 32, 32)`` and colour ``(2, 16, 16, 3)`` thumbnails of the image and of its central crop.

    The grey ones are imagehash.phash's first step (grey, then 32x32 with its Lanczos filter); first the image
    is box-reduced by a whole factor to no less than 64 px a side (Pillow's ``reducing_gap`` idea), which makes
    the Lanczos step cheap at any size. The crop is resampled straight from its box: no copy.
    """
    factor = max(1, min(image.size) // (2 * _THUMBNAIL))
    small = image.reduce(factor) if factor > 1 else image
    width, height = small.size
    dx, dy = width * (1 - _CROP) / 2, height * (1 - _CROP) / 2
    crop = (dx, dy, width - dx, height - dy)
    grey = small.convert("L")
    lanczos, box = Image.Resampling.LANCZOS, Image.Resampling.BOX
    grey_size, colour_size = (_THUMBNAIL, _THUMBNAIL), (_COLOUR, _COLOUR)
    greys = [
        np.asarray(grey.resize(grey_size, lanczos)),
        np.asarray(grey.resize(grey_size, lanczos, box=crop)),
    ]
    colours = [
        np.asarray(small.resize(colour_size, box)),
        np.asarray(small.resize(colour_size, box, box=crop)),
    ]
    return np.stack(greys), np.stack(colours)


def _pixel_digest(image: Image.Image) -> str:
    """SHA-256 (hardware-accelerated on current CPUs: 3x blake2b's speed here) of the size and RGB pixels."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()[:32]


_Record = tuple[str, np.ndarray, np.ndarray]  # pixel digest, (16,) pHashes, (2, 16, 16, 3) colour thumbnails


def hash_images(images: Sequence[Image.Image]) -> ImageHashes:
    """:class:`ImageHashes` of RGB images in memory (e.g. copies made by a benchmark); nothing is cached."""
    records = _records([_thumbnails(image) for image in images])
    if not records:
        return compute_image_hashes([])
    return ImageHashes(
        np.array([r[0] for r in records], dtype=str),
        np.stack([r[1] for r in records]),
        np.stack([r[2] for r in records]),
    )


def _thumbnails(image: Image.Image) -> tuple[str, np.ndarray, np.ndarray]:
    """Pixel digest, grey (2, 32, 32) and colour (2, 16, 16, 3) thumbnails of the image and its central crop."""
    return (_pixel_digest(image), *_thumbnails_of(image))


def _records(decoded: list[tuple[str, np.ndarray, np.ndarray]]) -> list[_Record]:
    """The pHashes of every image's thumbnails at once (one vectorised DCT), as cache records."""
    if not decoded:
        return []
    grey = np.stack([item[1] for item in decoded])  # (N, 2, 32, 32): the image and its central crop
    phash = dihedral_phashes(grey.reshape(-1, _THUMBNAIL, _THUMBNAIL)).reshape(len(decoded), _HASHES)
    return [(digest, phash[index], colour) for index, (digest, _, colour) in enumerate(decoded)]


def _hash_file(path: str) -> tuple[str, np.ndarray, np.ndarray]:
    return _thumbnails(read_image(path))


def _hash_files(paths: Sequence[str], workers: int, progress: bool) -> list[_Record]:
    """Decode and thumbnail ``paths``: in ``workers`` forked processes for a large batch on Linux (as torch's
    DataLoader does), else in this process.

    Not threads: between the thumbnails' many short Pillow and numpy calls the GIL passes back and forth, and
    two threads measured slower than one (828 vs 1,009 images/s on HAM10000; two processes 1,517). Not spawned
    processes: they re-import the caller's main module, which a script without a ``__main__`` guard breaks.
    """
    show = bool(progress) and len(paths) >= _PROGRESS_FROM
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="copy hashes", unit="img", leave=False)
    decoded = []
    if workers > 1 and len(paths) >= _PROCESSES_FROM and sys.platform == "linux":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = pool.map(_hash_file, paths, chunksize=64)
            for item in results:
                decoded.append(item)
                if bar is not None:
                    bar.update(1)
    else:
        for path in paths:
            decoded.append(_hash_file(path))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return _records(decoded)


def _load_stores(root: Path, wanted: set[str]) -> dict[str, _Record]:
    """``content key -> record`` for the wanted keys found in any complete store of this format."""
    found: dict[str, _Record] = {}
    if not root.is_dir():
        return found
    for store in sorted(root.glob("hashes-*.npz")):
        try:
            with np.load(store, allow_pickle=False) as data:
                if int(data["format_version"]) != FORMAT_VERSION:
                    continue
                keys, pixels, phash, colour = data["keys"], data["pixels"], data["phash"], data["colour"]
                n = len(keys)
                if (
                    len(pixels) != n
                    or phash.shape != (n, _HASHES)
                    or colour.shape != (n, 2, _COLOUR, _COLOUR, 3)
                ):
                    continue
                for index in np.flatnonzero(np.isin(keys, list(wanted - set(found)))):
                    found[str(keys[index])] = (
                        str(pixels[index]),
                        phash[index].astype(np.uint64),
                        colour[index],
                    )
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            continue  # a damaged or foreign file is never trusted
        if len(found) == len(wanted):
            break
    return found


def _write_store(root: Path, keys: list[str], known: dict[str, _Record]) -> None:
    fingerprint = hashlib.blake2b("\n".join(keys).encode(), digest_size=10).hexdigest()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as stream:  # a file object: np.savez would append ".npz" to a name
            np.savez(
                stream,
                format_version=np.array(FORMAT_VERSION),
                keys=np.array(keys, dtype=str),
                pixels=np.array([known[key][0] for key in keys], dtype=str),
                phash=np.stack([known[key][1] for key in keys]).astype(np.uint64),
                colour=np.stack([known[key][2] for key in keys]).astype(np.uint8),
            )

    atomic_save(root / f"hashes-{fingerprint}.npz", write)
