"""``dermlab synth``: write the synthetic dermoscopy dataset (demo data and test fixture)."""

from __future__ import annotations

import argparse
import time

from dermlab.data.synthetic import MIN_IMAGES, MIN_SIZE, allocate_class_counts, generate_synthetic_dataset

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic dermoscopy dataset (HAM10000 classes and proportions)",
        description="Write synthetic dermoscopy images of the 7 HAM10000 classes in HAM10000's proportions, "
        "with 1-4 views per lesion, in the HAM10000 layout (metadata CSV + images) or one folder per class. "
        "Deterministic from --seed. Images are SIZE pixels high and SIZE*4/3 wide.",
    )
    parser.add_argument("--out", required=True, help="folder to write (must be missing or empty)")
    parser.add_argument(
        "--images", type=int, default=2000, help=f"number of images (at least {MIN_IMAGES}; default 2000)"
    )
    parser.add_argument(
        "--size", type=int, default=128, help=f"image height in pixels (at least {MIN_SIZE}; default 128)"
    )
    parser.add_argument(
        "--layout", choices=["ham10000", "folders"], default="ham10000", help="on-disk layout"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a synthetic dataset already in --out"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print the images per class, the folder and the time taken."""
    started = time.perf_counter()
    root = generate_synthetic_dataset(
        args.out,
        images=args.images,
        size=args.size,
        layout=args.layout,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - started
    counts = allocate_class_counts(args.images)
    width = max(len(name) for name in counts)
    for name, count in counts.items():
        print(f"  {name:<{width}}  {count:>6}")
    print(f"wrote {sum(counts.values())} images ({args.layout} layout) to {root} in {seconds:.1f} s")
    return 0
