"""``dermlab info DATA``: what a dataset holds (layout, classes, counts, groups, image sizes, metadata)."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from dermlab.config import DataConfig, literal_choices
from dermlab.data.datasets import layout_choices

__all__ = ["register", "run"]

_SHOWN_SKIPPED = 10
_SHOWN_EXAMPLES = 3


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe a dataset: layout, classes, counts, lesion groups, image sizes",
        description="Read a dataset (HAM10000 folder, folder per class, or CSV), decode every image and "
        "describe it. Stops at the first bad image or row unless --skip-bad.",
    )
    parser.add_argument("data", metavar="DATA", help="dataset folder or CSV file")
    parser.add_argument(
        "--layout", choices=layout_choices(), default="auto", help="dataset layout (default: auto)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out bad images and rows (and list them) instead of stopping",
    )
    parser.add_argument(
        "--sample", type=int, default=200, metavar="N", help="images whose sizes are reported (default: 200)"
    )
    parser.add_argument(
        "--copies", choices=literal_choices(DataConfig, "duplicates"), default=DataConfig.duplicates,
        help="copies to look for: near (pixel-identical and near copies), exact (pixel-identical only) or none "
        f"(default: {DataConfig.duplicates})",
    )
    parser.add_argument(
        "--near-copy-threshold", type=int, default=DataConfig.near_copy_threshold, metavar="BITS",
        help=f"pHash bits a near copy may differ by (default: {DataConfig.near_copy_threshold}; docs/duplicates.md)",
    )
    parser.add_argument(
        "--duplicates", metavar="FILE.csv", help="write every copy group, one row per image, to FILE.csv"
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR",
        help="keep the copy hashes under DIR/duplicates (as data.cache_dir does), so a second look decodes nothing",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console

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

    console.print(_class_count_table(table))

    sample_size = min(max(args.sample, 0), len(frame))
    picked = np.random.default_rng(0).choice(len(frame), size=sample_size, replace=False)
    sizes = Counter(read_image(frame["path"].iloc[i]).size for i in sorted(picked))
    described = ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes.most_common(5))
    more = f", and {len(sizes) - 5} other sizes" if len(sizes) > 5 else ""
    console.print(
        f"image sizes (width x height) in a random sample of {sample_size} of {len(frame)}: {described}{more}"
    )

    if args.copies != "none":
        config = DataConfig(duplicates=args.copies, near_copy_threshold=args.near_copy_threshold, cache_dir=args.cache_dir)
        _print_copies(console, table, config, args.duplicates)

    if table.skipped:
        console.print(f"[yellow]skipped {len(table.skipped)} item(s):[/yellow]")
        for message in table.skipped[:_SHOWN_SKIPPED]:
            console.print(f"  {message}", markup=False, highlight=False)
        if len(table.skipped) > _SHOWN_SKIPPED:
            console.print(f"  ... and {len(table.skipped) - _SHOWN_SKIPPED} more")
    return 0


def _class_count_table(table: Any) -> Any:
    """Images, share and groups per class, and the images of each shipped split folder."""
    from rich.table import Table

    frame = table.frame
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
    return counts


def _print_copies(console: Any, table: Any, config: DataConfig, csv_path: str | None) -> None:
    """Exact and near copies, copies with conflicting labels and copies across the dataset's own folders."""
    from pathlib import Path

    from dermlab.data.duplicates import copy_group_table, group_copies
    from dermlab.data.image_hashes import compute_image_hashes
    from dermlab.io import atomic_write_text
    from dermlab.training.progress import show_bars

    frame = table.frame
    hashes = compute_image_hashes(frame["path"], config.cache_dir, workers=2, progress=show_bars())
    copies = group_copies(
        frame, hashes, config.duplicates, config.near_copy_threshold, config.near_copy_color_tolerance
    )
    groups = copy_group_table(copies)
    if config.duplicates == "near":
        how = (
            f"near: pHash within {config.near_copy_threshold} of 64 bits over the 8 flips/rotations and a 90% "
            f"crop, colour within {config.near_copy_color_tolerance:g} levels"
        )
    else:
        how = "exact: identical decoded pixels"
    console.print(f"copies   {how}", markup=False, highlight=False)
    exact_sizes = copies.loc[copies["exact_group"] >= 0, "exact_group"].value_counts()
    near, conflicting = groups[groups["kind"] == "near"], groups[groups["conflicting_labels"]]
    rows = [
        ("exact copies", len(exact_sizes), int(exact_sizes.sum()), groups[groups["kind"] == "exact"]),
        ("near copies", len(near), int(near["size"].sum()), near),
        ("conflicting labels", len(conflicting), int(conflicting["size"].sum()), conflicting),
    ]
    if config.duplicates == "exact":
        rows.pop(1)
    if frame["fixed_split"].ne("").any():  # the dataset ships train / val / test folders
        crossing = groups[groups["crosses_folders"]]
        exact_crossing = copies[copies["exact_group"] >= 0].groupby("exact_group")["fixed_split"].nunique()
        detail = f" ({int((exact_crossing > 1).sum())} pixel-identical)" if config.duplicates == "near" else ""
        rows.append(("across folders", f"{len(crossing)} group(s){detail}", int(crossing["size"].sum()), crossing))
    for name, count, images, examples in rows:
        groups_text = count if isinstance(count, str) else f"{count} group(s)"
        console.print(f"  {name:<19} {groups_text}, {images} images", markup=False, highlight=False)
        for number in examples["copy_group"].head(_SHOWN_EXAMPLES):
            members = copies[copies["copy_group"] == number]
            shown = " = ".join(
                f"{_relative(path, table.root)} ({label})" for path, label in zip(members["path"][:3], members["label"])
            )
            more = f" and {len(members) - 3} more" if len(members) > 3 else ""
            console.print(f"      e.g. {shown}{more}", markup=False, highlight=False)
    if csv_path:
        listed = copies[copies["copy_group"] >= 0].merge(
            groups[["copy_group", "size", "kind", "conflicting_labels", "crosses_folders"]], on="copy_group"
        )
        listed = listed.rename(columns={"size": "group_size"})[
            ["copy_group", "kind", "group_size", "exact_group", "image_id", "path", "label", "fixed_split",
             "conflicting_labels", "crosses_folders", "phash"]
        ].sort_values(["copy_group", "image_id"], kind="stable")
        atomic_write_text(Path(csv_path), listed.to_csv(index=False, lineterminator="\n"))
        wrote = f"  wrote {len(groups)} copy group(s), {len(listed)} images, to {csv_path}"
        console.print(wrote, markup=False, highlight=False)


def _relative(path: str, root: Any) -> str:
    import os

    relative = os.path.relpath(path, root)
    return path if relative.startswith("..") else relative
