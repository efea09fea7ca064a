"""``dermlab info DATA``: what a dataset holds (layout, classes, counts, groups, image sizes, metadata)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

__all__ = ["register", "run"]

_LAYOUT_CHOICES = ("auto", "ham10000", "folders", "csv")
_SHOWN_SKIPPED = 10


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a dataset: layout, classes, counts, lesion groups, image sizes",
        description="Read a dataset (HAM10000 folder, folder per class, or CSV), decode every image and "
        "describe it. Stops at the first bad image or row unless --skip-bad.",
    )
    parser.add_argument("data", metavar="DATA", help="dataset folder or CSV file")
    parser.add_argument(
        "--layout", choices=_LAYOUT_CHOICES, default="auto", help="dataset layout (default: auto)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out bad images and rows (and list them) instead of stopping",
    )
    parser.add_argument(
        "--sample", type=int, default=200, metavar="N", help="images whose sizes are reported (default: 200)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from dermlab.config import DataConfig
    from dermlab.data.datasets import load_dataset
    from dermlab.data.images import read_image

    config = DataConfig(layout=args.layout, skip_bad=args.skip_bad)
    table = load_dataset(args.data, config, verify_images=True)
    frame = table.frame
    console = Console(soft_wrap=True)  # long paths stay on one line
    console.print(f"dataset  {table.root}")
    console.print(f"layout   {table.layout}")
    ungrouped = bool((frame["group"] == frame["image_id"]).all())
    console.print(
        f"images   {len(frame)} in {len(table.classes)} classes, {frame['group'].nunique()} groups"
        f"{' (no group column: one per image)' if ungrouped else ''}; every image decoded"
    )
    metadata = [c for c in ("age", "sex", "localization", "mask_path") if c in frame.columns]
    if "mask_path" in frame.columns:
        metadata[-1] = f"mask_path ({int((frame['mask_path'] != '').sum())} with a mask)"
    console.print(f"metadata {', '.join(metadata) if metadata else 'none'}")

    fixed = sorted(s for s in frame["fixed_split"].unique() if s)
    counts = Table(title="images per class")
    counts.add_column("class")
    counts.add_column("images", justify="right")
    counts.add_column("share", justify="right")
    counts.add_column("groups", justify="right")
    for split in fixed:
        counts.add_column(f"{split} folder", justify="right")
    groups = frame.groupby("label")["group"].nunique()
    by_split = frame.groupby(["label", "fixed_split"]).size()
    for name, count in table.class_counts().items():
        cells = [name, str(count), f"{100 * count / len(frame):.1f}%", str(int(groups.get(name, 0)))]
        cells += [str(int(by_split.get((name, split), 0))) for split in fixed]
        counts.add_row(*cells)
    console.print(counts)

    sample_size = min(max(args.sample, 0), len(frame))
    picked = np.random.default_rng(0).choice(len(frame), size=sample_size, replace=False)
    sizes = Counter(read_image(frame["path"].iloc[i]).size for i in sorted(picked))
    described = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))
    more = f", and {len(sizes) - 5} other sizes" if len(sizes) > 5 else ""
    console.print(
        f"image sizes (width x height) in a random sample of {sample_size} of {len(frame)}: {described}{more}"
    )

    if table.skipped:
        console.print(f"[yellow]skipped {len(table.skipped)} item(s):[/yellow]")
        for message in table.skipped[:_SHOWN_SKIPPED]:
            console.print(f"  {message}", markup=False, highlight=False)
        if len(table.skipped) > _SHOWN_SKIPPED:
            console.print(f"  ... and {len(table.skipped) - _SHOWN_SKIPPED} more")
    return 0
