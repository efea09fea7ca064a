"""Copies and near-copies: how fast they are found, and how well each method separates copies from lesions.

Three measurements, side by side in one run:

1. **Speed** (``--workers``, 2 by default): images/s decoding alone (``read_image`` in that many threads),
   computing every hash (``compute_image_hashes`` with that many workers, nothing cached) and reading them back
   from the cache, plus the time to find the pairs. Hashing should stay close to the decode: the ratio
   hash/decode is the figure to watch.
2. **Lesions** (a dataset with lesion ids, e.g. ``--data ../shared/data/HAM10000``): for each method and
   threshold, the image pairs it calls copies against the pairs of images of one lesion: precision, recall,
   the pairs of *different* lesions it links and how many distinct lesions end up merged with another one
   (after grouping). Images of one lesion are different photographs, not copies, so recall is low by nature;
   the wrong merges decide the threshold.
3. **Copies** (``--copies N`` images of the dataset): each copied as a resize, JPEG quality 60, flips, a
   90-degree rotation, a 90% crop and a combination; the share of copies each method finds.

Optionally (``--features N``) cosine similarity of the pooled features of the packaged ``efficientnet_lite0``
on N images and their copies, for comparison. Without ``--data`` a synthetic HAM10000-layout dataset is used
(its lesions have several rotated, zoomed, relit views). Results go to ``benchmarks/results/duplicates.json``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, dataset_table, print_table, write_results  # noqa: E402

from dermlab.data.duplicates import close_hash_pairs, colour_differences  # noqa: E402
from dermlab.data.image_hashes import compute_image_hashes, hash_images  # noqa: E402
from dermlab.data.images import read_image  # noqa: E402

COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {}


def _copy(name: str) -> Callable:
    def register(function: Callable[[Image.Image], Image.Image]) -> Callable[[Image.Image], Image.Image]:
        COPIES[name] = function
        return function

    return register


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _crop(image: Image.Image, keep: float) -> Image.Image:
    width, height = image.size
    dx, dy = int(width * (1 - keep) / 2), int(height * (1 - keep) / 2)
    return image.crop((dx, dy, width - dx, height - dy))


_copy("png re-save")(lambda image: image.copy())
_copy("resize 0.5")(
    lambda image: image.resize((image.width // 2, image.height // 2), Image.Resampling.BICUBIC)
)
_copy("resize 1.5")(
    lambda image: image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.Resampling.BICUBIC)
)
_copy("jpeg 60")(lambda image: _jpeg(image, 60))
_copy("hflip")(lambda image: image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
_copy("rot90")(lambda image: image.transpose(Image.Transpose.ROTATE_90))
_copy("crop 90%")(lambda image: _crop(image, 0.9))
_copy("crop 95% + jpeg 60 + rot270")(
    lambda image: _jpeg(_crop(image, 0.95), 60).transpose(Image.Transpose.ROTATE_270)
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--images", type=int, default=2000, help="synthetic images without --data (default 2000)"
    )
    parser.add_argument("--size", type=int, default=150, help="synthetic image height (default 150)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads / hashing workers (default 2)")
    parser.add_argument(
        "--thresholds", type=int, nargs="+", default=[0, 2, 4, 6, 8, 10, 12], help="pHash bits"
    )
    parser.add_argument(
        "--colour-thresholds",
        type=int,
        nargs="+",
        default=[4, 6, 8, 10],
        help="pHash bits with the colour check",
    )
    parser.add_argument("--tolerances", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="colour levels")
    parser.add_argument("--copies", type=int, default=300, help="images copied for the copy-recall table")
    parser.add_argument(
        "--features", type=int, default=0, help="images for the backbone-cosine comparison (0 = off)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.size, args.copies = 80, 48, 20
        args.features = min(args.features, 8)
    return args


def _speed(paths: list[str], workers: int, work: Path) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: read_image(p).size, paths))
    decode = time.perf_counter() - started
    started = time.perf_counter()
    hashes = compute_image_hashes(paths, None, workers=workers, progress=False)
    hashing = time.perf_counter() - started
    with tempfile.TemporaryDirectory(dir=work) as cache:
        compute_image_hashes(paths, cache, workers=workers, progress=False)
        started = time.perf_counter()
        cached = compute_image_hashes(paths, cache, workers=workers, progress=False)
        warm = time.perf_counter() - started
        assert cached.decoded == 0
    started = time.perf_counter()
    close_hash_pairs(hashes.phash, max_distance=8)
    pairs = time.perf_counter() - started
    return {
        "images": len(paths),
        "workers": workers,
        "decode_images_per_s": round(len(paths) / decode, 1),
        "hash_images_per_s": round(len(paths) / hashing, 1),
        "cached_images_per_s": round(len(paths) / warm, 1),
        "hash_over_decode": round(decode / hashing, 3),
        "pairs_s": round(pairs, 2),
    }, hashes


def _methods(
    thresholds: list[int], colour_thresholds: list[int], tolerances: list[float]
) -> list[dict[str, Any]]:
    methods: list[dict[str, Any]] = [{"method": "exact (decoded pixels)", "kind": "exact"}]
    for dihedral, crops, name in (
        (False, False, "pHash"),
        (True, False, "pHash x8"),
        (True, True, "pHash x8 + crop"),
    ):
        methods += [
            {"method": name, "kind": "phash", "bits": t, "dihedral": dihedral, "crops": crops}
            for t in thresholds
        ]
    methods += [
        {
            "method": "pHash x8 + crop + colour",
            "kind": "phash",
            "bits": t,
            "dihedral": True,
            "crops": True,
            "tolerance": c,
        }
        for c in tolerances
        for t in colour_thresholds
    ]
    return methods


class _Candidates:
    """Pairs within the largest threshold, per hash variant, found once; each method then filters them."""

    def __init__(self, hashes, other=None, max_bits: int = 12) -> None:
        self.hashes, self.other, self.max_bits = hashes, other, max_bits
        self._found: dict[tuple[bool, bool], tuple[np.ndarray, ...]] = {}
        self._colour: dict[tuple, np.ndarray] = {}

    def pairs(self, method: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Index pairs the method calls copies (within ``hashes``, or row i of ``hashes`` vs row j of ``other``)."""
        hashes, other = self.hashes, self.other
        if method["kind"] == "exact":
            if other is None:
                codes = pd.factorize(pd.Series(hashes.pixels, dtype=object))[0]
                frame = pd.DataFrame({"code": codes, "row": np.arange(len(codes))})
                merged = frame.merge(frame, on="code")
                merged = merged[merged["row_x"] < merged["row_y"]]
                return merged["row_x"].to_numpy(), merged["row_y"].to_numpy()
            same = np.flatnonzero(hashes.pixels == other.pixels)
            return same, same
        key = (method["dihedral"], method["crops"])
        if key not in self._found:
            second = None if other is None else other.phash
            self._found[key] = close_hash_pairs(
                hashes.phash, second, self.max_bits, dihedral=key[0], crops=key[1]
            )
        i, j, d = self._found[key]
        keep = d <= method["bits"]
        if "tolerance" not in method:
            return i[keep], j[keep]
        i, j, d = i[keep], j[keep], d[keep]
        colour_key = (key, method["bits"])  # the colour check only on the pairs of this threshold
        if colour_key not in self._colour:
            self._colour[colour_key] = colour_differences(
                hashes.colour, i, j, None if other is None else other.colour
            )
        keep = self._colour[colour_key] <= method["tolerance"]
        return i[keep], j[keep]


def _lesion_table(methods: list[dict[str, Any]], hashes, groups: np.ndarray) -> list[dict[str, Any]]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    sizes = pd.Series(groups).value_counts()
    lesion_pairs = int((sizes * (sizes - 1) // 2).sum())
    lesion_codes = pd.factorize(pd.Series(groups))[0]
    rows = []
    candidates = _Candidates(hashes, max_bits=max(m.get("bits", 0) for m in methods))
    for method in methods:
        i, j = candidates.pairs(method)
        same = groups[i] == groups[j]
        # lesions linked by the found pairs: components of the lesion graph
        a, b = lesion_codes[i[~same]], lesion_codes[j[~same]]
        n = int(lesion_codes.max()) + 1
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
        _, component = connected_components(graph, directed=False)
        per_component = np.bincount(component)
        merged = int(per_component[per_component > 1].sum())
        found = len(i)
        rows.append(
            {
                **{k: v for k, v in method.items() if k not in ("kind", "dihedral", "crops")},
                "pairs": found,
                "same_lesion": int(same.sum()),
                "precision": round(float(same.mean()), 3) if found else None,
                "recall": round(float(same.sum()) / lesion_pairs, 4) if lesion_pairs else None,
                "wrong_pairs": int((~same).sum()),
                "lesions_merged_wrongly": merged,
                "largest_merge_lesions": int(per_component.max()) if len(per_component) else 0,
            }
        )
    return rows


def _copy_table(
    methods: list[dict[str, Any]], paths: list[str], count: int, seed: int = 0
) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(paths), size=min(count, len(paths)), replace=False))
    originals = [read_image(paths[i]) for i in picked]
    source = hash_images(originals)
    max_bits = max(m.get("bits", 0) for m in methods)
    copies = {
        name: _Candidates(source, hash_images([make(im) for im in originals]), max_bits)
        for name, make in COPIES.items()
    }
    rows = []
    for method in methods:
        row = {k: v for k, v in method.items() if k not in ("kind", "dihedral", "crops")}
        for name, candidates in copies.items():
            i, j = candidates.pairs(method)
            row[name] = round(float(np.mean(np.isin(np.arange(len(originals)), i[i == j]))), 3)
        rows.append(row)
    return rows, {"images": len(originals)}


def _features(paths: list[str], groups: np.ndarray, count: int, seed: int = 0) -> dict[str, Any]:
    """Cosine similarity of pooled ImageNet features: copies vs the most similar other lesion."""
    import torch

    from dermlab.config import ModelConfig
    from dermlab.data.transforms import create_transform
    from dermlab.models.factory import create_model, resolve_preprocessing

    config = ModelConfig(name="efficientnet_lite0.packaged")
    model = create_model(config, 2).eval()
    transform = create_transform("none", resolve_preprocessing(model, config), train=False)
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(paths), size=min(count, len(paths)), replace=False))
    originals = [read_image(paths[i]) for i in picked]

    @torch.inference_mode()
    def features(images: list[Image.Image]) -> torch.Tensor:
        out = [
            model.forward_features(torch.stack([transform(im) for im in images[s : s + 32]]))
            for s in range(0, len(images), 32)
        ]
        return torch.nn.functional.normalize(torch.cat(out), dim=1)

    started = time.perf_counter()
    base = features(originals)
    seconds = time.perf_counter() - started
    similarity = (base @ base.T).numpy()
    lesion = groups[picked]
    other = lesion[:, None] != lesion[None, :]
    nearest_other = np.where(other, similarity, -1).max(axis=1)
    result: dict[str, Any] = {
        "images": len(originals),
        "images_per_s": round(len(originals) / seconds, 2),
        "other_lesion_max_similarity": {
            "p50": round(float(np.percentile(nearest_other, 50)), 3),
            "p99": round(float(np.percentile(nearest_other, 99)), 3),
            "max": round(float(nearest_other.max()), 3),
        },
        "copy_similarity_min": {},
    }
    for name in ("resize 0.5", "jpeg 60", "rot90", "crop 90%"):
        copied = features([COPIES[name](image) for image in originals])
        result["copy_similarity_min"][name] = round(float((base * copied).sum(dim=1).min()), 3)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    path, table = dataset_table(args, args.images, args.size)
    frame = table.frame
    paths = frame["path"].tolist()
    groups = frame["group"].to_numpy()
    print(f"{len(paths)} images of {frame['group'].nunique()} lesions in {path}", flush=True)

    speed, hashes = _speed(paths, args.workers, args.work)
    print_table(
        f"speed, {len(paths)} images: decode in {args.workers} threads, hashes in {args.workers} workers",
        [
            [
                speed["decode_images_per_s"],
                speed["hash_images_per_s"],
                speed["cached_images_per_s"],
                speed["hash_over_decode"],
                speed["pairs_s"],
            ]
        ],
        ["decode img/s", "hash img/s", "cached img/s", "hash / decode", "pairs (s)"],
    )

    methods = _methods(args.thresholds, args.colour_thresholds, args.tolerances)
    lesions = _lesion_table(methods, hashes, groups)
    header = [
        "method",
        "bits",
        "tolerance",
        "pairs",
        "same_lesion",
        "precision",
        "recall",
        "wrong_pairs",
        "lesions_merged_wrongly",
        "largest_merge_lesions",
    ]
    print_table(
        "pairs found vs images of one lesion", [[row.get(k, "") for k in header] for row in lesions], header
    )

    copies, copy_info = _copy_table(methods, paths, args.copies)
    copy_header = ["method", "bits", "tolerance", *COPIES]
    print_table(
        f"share of {copy_info['images']} copies found",
        [[row.get(k, "") for k in copy_header] for row in copies],
        copy_header,
    )

    payload: dict[str, Any] = {"data": str(path), "speed": speed, "lesions": lesions, "copies": copies}
    if args.features:
        payload["features"] = _features(paths, groups, args.features)
        print_table(
            "backbone cosine (efficientnet_lite0.packaged)",
            [[k, v] for k, v in payload["features"].items()],
            ["figure", "value"],
        )
    write_results("duplicates", args, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
