"""Data loading (images/s): decoding JPEG files against reading the decoded-image cache.

The same images go through the same transforms, read either from their files (``read_image``: open, decode,
EXIF, RGB) or from :mod:`dermlab.data.cache` (decoded and resized once into a memory-mapped uint8 array):

- ``decode only``: ``read_image`` alone (one process);
- ``eval`` / ``train``: ``ImageDataset`` items with the eval transform (resize + normalise) or the ``derm``
  augmentation, in this process on one thread (as in a DataLoader worker): the per-core cost of one image;
- ``DataLoader``: batches from ``--workers`` worker processes, as training reads them.

The cache's one-off build (decode + resize of every image) and its warm open (hash the files, read the index)
are timed too. Two more sections:

- ``augmentation profile``: each step of the ``derm`` training transform timed on its own (one thread, on the
  cached images, seeded per image): milliseconds per image and share of the whole transform;
- ``cache margin``: eval tensors from a cache stored with ``--margin`` (1 + margin times the input size, so a
  second resampling) against those from the files: max and mean absolute difference in normalised units
  (and the same for the margin-0 cache, which must be 0.0).

Default data: 600x450 synthetic JPEGs (HAM10000's full resolution) at a 224x224 input.

    python benchmarks/data_loading.py            # about 2 minutes (plus ~35 s once to generate the images)
    python benchmarks/data_loading.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_arguments, dataset_table, print_table, write_results  # noqa: E402


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def time_items(dataset, passes: int) -> float:
    """Images/s fetching every item of ``dataset`` ``passes`` times in this process on one thread, as a
    DataLoader worker does (seeded like training); a few untimed items first."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index in range(min(5, len(dataset))):
            dataset[(index, index)]
        started = time.perf_counter()
        for repeat in range(passes):
            for index in range(len(dataset)):
                dataset[(index, 1000 * (repeat + 1) + index)]
        return _rate(len(dataset) * passes, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def time_loader(dataset, batch_size: int, workers: int, passes: int) -> float:
    """Images/s through a DataLoader with persistent workers; the first pass (workers starting) is not timed."""
    from torch.utils.data import DataLoader

    from dermlab.data.datamodule import KeyedSampler

    sampler = KeyedSampler(range(len(dataset)), seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up pass
        pass
    started = time.perf_counter()
    count = 0
    for _ in range(passes):
        for images, _labels in loader:
            count += len(images)
    seconds = time.perf_counter() - started
    del loader
    return _rate(count, seconds)


def profile_transform(transform, images: list, passes: int) -> dict[str, dict[str, float]]:
    """Milliseconds per image of each step of ``transform`` (a ``Compose``), on one thread, seeded per image."""
    import torch

    steps = list(transform.transforms)
    names = [type(step).__name__ for step in steps]
    names = [f"{name} ({i})" if names.count(name) > 1 else name for i, name in enumerate(names)]
    seconds = [0.0] * len(steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for repeat in range(passes + 1):  # the first pass is a warm-up
            for index, image in enumerate(images):
                torch.manual_seed(1000 * repeat + index)
                value = image
                for position, step in enumerate(steps):
                    started = time.perf_counter()
                    value = step(value)
                    if repeat:
                        seconds[position] += time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    total = sum(seconds)
    count = len(images) * passes
    return {name: {"ms_per_image": round(1000 * s / count, 4), "share": round(s / total, 4)} for name, s in zip(names, seconds)}


def margin_error(frame, classes, transform, cache_dir: Path, paths: list[str], input_size, margin: float) -> dict[str, float]:
    """Max and mean absolute difference of eval tensors from a ``margin`` cache and from the files."""
    from dermlab.data.cache import build_image_cache
    from dermlab.data.datamodule import ImageDataset

    cache = build_image_cache(paths, cache_dir, input_size, margin=margin, progress=False)
    from_files = ImageDataset(frame, classes, transform)
    from_cache = ImageDataset(frame, classes, transform, image_loader=cache)
    differences = [(from_files[i][0] - from_cache[i][0]).abs() for i in range(len(frame))]
    return {
        "margin": margin,
        "stored_size": list(cache.size),
        "max_abs": round(max(float(d.max()) for d in differences), 5),
        "mean_abs": round(sum(float(d.mean()) for d in differences) / len(differences), 5),
        "images": len(differences),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--images", type=int, default=200, help="synthetic images (default 200)")
    parser.add_argument("--image-size", type=int, default=450, help="synthetic image height (default 450: 600x450)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the images (default 2)")
    parser.add_argument("--margin", type=float, default=0.25, help="the cache margin whose error is measured (default 0.25)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.size, args.passes, args.workers = 40, 96, 64, 1, 1

    from dermlab.data.cache import build_image_cache
    from dermlab.data.datamodule import ImageDataset
    from dermlab.data.images import read_image
    from dermlab.data.preprocessing import Preprocessing
    from dermlab.data.transforms import create_transform

    data_path, table = dataset_table(args, args.images, args.image_size)
    frame, classes = table.frame, table.classes
    paths = frame["path"].tolist()
    from PIL import Image

    with Image.open(paths[0]) as first:
        print(f"{len(paths)} images like {first.width}x{first.height} ({data_path}), input {args.size}x{args.size}", flush=True)
    preprocessing = Preprocessing((args.size, args.size), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    eval_transform = create_transform("none", preprocessing, train=False)
    train_transform = create_transform("derm", preprocessing, train=True)
    for path in paths:  # files into the page cache first, so neither side pays for the disk
        Path(path).read_bytes()

    figures: dict[str, float] = {}
    started = time.perf_counter()
    for path in paths:
        read_image(path)
    figures["decode_only_jpeg"] = _rate(len(paths), time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="dermlab-bench-") as tmp:
        cache_dir = Path(tmp) / "cache"
        started = time.perf_counter()
        build_image_cache(paths, cache_dir, preprocessing.input_size, workers=1, progress=False)
        build_s = time.perf_counter() - started
        import dermlab.data.cache as cache_module

        cache_module._KEY_MEMO.clear()  # a new process would hash every file again
        started = time.perf_counter()
        cache = build_image_cache(paths, cache_dir, preprocessing.input_size, progress=False)
        open_s = time.perf_counter() - started
        figures["cache_build_images_per_s"] = _rate(len(paths), build_s)

        started = time.perf_counter()
        for path in paths:
            cache.read(path)
        figures["decode_only_cache"] = _rate(len(paths), time.perf_counter() - started)
        for name, transform in (("eval", eval_transform), ("train", train_transform)):
            for source, loader in (("jpeg", read_image), ("cache", cache)):
                dataset = ImageDataset(frame, classes, transform, image_loader=loader)
                figures[f"{name}_{source}"] = time_items(dataset, args.passes)
                print(f"  {name} transform from {source}: {figures[f'{name}_{source}']} images/s", flush=True)
        for name, transform in (("eval", eval_transform), ("train", train_transform)):
            for source, loader in (("jpeg", read_image), ("cache", cache)):
                dataset = ImageDataset(frame, classes, transform, image_loader=loader)
                key = f"loader_{name}_{source}"
                figures[key] = time_loader(dataset, args.batch_size, args.workers, args.passes)
                print(f"  DataLoader ({args.workers} workers), {name} transform from {source}: {figures[key]} images/s", flush=True)
        store_mib = cache.store.stat().st_size / 2**20
        profile = profile_transform(train_transform, [cache.read(path) for path in paths], args.passes)
        margins = {
            f"margin_{margin:g}": margin_error(frame, classes, eval_transform, cache_dir, paths, preprocessing.input_size, margin)
            for margin in (0.0, args.margin)
        }

    ratios = {
        "decode_cache_vs_jpeg": round(figures["decode_only_cache"] / figures["decode_only_jpeg"], 2),
        "eval_cache_vs_jpeg": round(figures["eval_cache"] / figures["eval_jpeg"], 2),
        "train_cache_vs_jpeg": round(figures["train_cache"] / figures["train_jpeg"], 2),
        "loader_eval_cache_vs_jpeg": round(figures["loader_eval_cache"] / figures["loader_eval_jpeg"], 2),
        "loader_train_cache_vs_jpeg": round(figures["loader_train_cache"] / figures["loader_train_jpeg"], 2),
    }
    print_table(
        "data loading (images/s)",
        [
            ("decode only (read_image / cache row)", figures["decode_only_jpeg"], figures["decode_only_cache"], ratios["decode_cache_vs_jpeg"]),
            ("eval transform, 1 thread", figures["eval_jpeg"], figures["eval_cache"], ratios["eval_cache_vs_jpeg"]),
            ("derm augmentation, 1 thread", figures["train_jpeg"], figures["train_cache"], ratios["train_cache_vs_jpeg"]),
            (f"DataLoader eval, {args.workers} workers", figures["loader_eval_jpeg"], figures["loader_eval_cache"], ratios["loader_eval_cache_vs_jpeg"]),
            (f"DataLoader derm, {args.workers} workers", figures["loader_train_jpeg"], figures["loader_train_cache"], ratios["loader_train_cache_vs_jpeg"]),
        ],
        ["path", "from JPEG", "from cache", "cache / JPEG"],
    )
    print(
        f"\ncache: built in {build_s:.2f} s ({figures['cache_build_images_per_s']} images/s, once), "
        f"opened warm in {open_s:.3f} s (hashing {len(paths)} files), {store_mib:.1f} MiB on disk"
    )
    print_table(
        f"derm augmentation profile at {args.size}x{args.size}, 1 thread (from cached images)",
        [(name, entry["ms_per_image"], f"{100 * entry['share']:.1f}%") for name, entry in profile.items()],
        ["step", "ms/image", "share"],
    )
    print_table(
        "eval tensors from the cache against the files (normalised units)",
        [(f"margin {m['margin']:g}", "x".join(map(str, m["stored_size"])), m["max_abs"], m["mean_abs"], m["images"]) for m in margins.values()],
        ["cache", "stored size", "max abs difference", "mean abs difference", "images"],
    )
    write_results(
        "data_loading",
        args,
        {
            "images_per_s": figures,
            "ratios": ratios,
            "cache_build_s": round(build_s, 3),
            "cache_open_warm_s": round(open_s, 4),
            "cache_mib": round(store_mib, 2),
            "augmentation_profile": profile,
            "cache_margin_error": margins,
            "images": len(paths),
            "data": str(data_path),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
