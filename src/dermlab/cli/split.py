"""``dermlab split DATA --out RUN_DIR``: lesion-grouped, stratified train / val / test to ``splits.csv``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dermlab.config import DataConfig, literal_choices
from dermlab.data.datasets import layout_choices

__all__ = ["register", "run"]



def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "split",
        help="write lesion-grouped, class-stratified train/val/test splits to RUN_DIR/splits.csv",
        description="Split a dataset by group (lesion), stratified by class and deterministic from the seed. "
        "A test folder shipped with the dataset stays the test set.",
    )
    parser.add_argument("data", metavar="DATA", help="dataset folder or CSV file")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder that receives splits.csv")
    parser.add_argument(
        "--ratios", type=float, nargs=3, default=DataConfig().split_ratios, metavar=("TRAIN", "VAL", "TEST"),
        help=f"split proportions (default: {' '.join(f'{r:g}' for r in DataConfig().split_ratios)})",
    )
    parser.add_argument("--seed", type=int, default=DataConfig.split_seed, help=f"split seed (default: {DataConfig.split_seed})")
    parser.add_argument(
        "--layout", choices=layout_choices(), default="auto", help="dataset layout (default: auto)"
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="decode every image first; leave out bad images and rows"
    )
    parser.add_argument(
        "--copies", choices=literal_choices(DataConfig, "duplicates"), default=DataConfig.duplicates,
        help="copies kept in one group (data.duplicates): near (pixel-identical and near copies), exact, or none "
        f"(default: {DataConfig.duplicates}); copies of test-folder images and copies with conflicting labels "
        "are left out and listed in RUN_DIR/excluded_copies.csv",
    )
    parser.add_argument(
        "--keep-test-copies", action="store_true",
        help="keep train/val images that copy an image of the dataset's own test (or val) folder",
    )
    parser.add_argument(
        "--cache-dir", metavar="DIR", help="keep the copy hashes under DIR/duplicates (default RUN_DIR/cache)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dermlab.data.datasets import load_dataset
    from dermlab.data.duplicates import duplicates_cache_dir, record_excluded_copies, resolve_copies
    from dermlab.data.splits import SPLITS_FILE, create_splits, save_splits, split_count_table
    from dermlab.training.progress import show_bars

    config = DataConfig(
        layout=args.layout, skip_bad=args.skip_bad, split_ratios=list(args.ratios), split_seed=args.seed,
        duplicates=args.copies, keep_test_copies=args.keep_test_copies, cache_dir=args.cache_dir,
    )
    table = load_dataset(args.data, config)  # decodes every image when --skip-bad
    copies = resolve_copies(
        table, config, cache_dir=duplicates_cache_dir(config, args.out), workers=config.num_workers, progress=show_bars()
    )
    table = copies.table
    splits = create_splits(table, config.split_ratios, seed=config.split_seed)
    path = save_splits(table, splits, Path(args.out) / SPLITS_FILE)
    copy_lines = record_excluded_copies(copies, args.out)

    counts = split_count_table(table, splits)
    shares = counts.drop(index="total").div(counts.loc["total"].replace(0, 1), axis=1) * 100
    gaps = shares[["train", "val", "test"]].sub(shares["total"], axis=0).abs().max()
    console = Console(soft_wrap=True)  # long paths stay on one line
    view = Table(title=f"images per class and split ({table.layout}, seed {config.split_seed})")
    view.add_column("class")
    for column in counts.columns:
        view.add_column(column, justify="right")
    for name, row in counts.iterrows():
        view.add_row(str(name), *(str(int(v)) for v in row), end_section=name == table.classes[-1])
    total = counts.loc["total", "total"]
    view.add_row("share", *(f"{100 * counts.loc['total', c] / total:.1f}%" for c in counts.columns))
    view.add_row("max class-share gap", *(f"{gaps[c]:.2f} pt" for c in ("train", "val", "test")), "")
    console.print(view)
    groups = table.frame["group"].nunique()
    for line in copy_lines:
        console.print(line, markup=False, highlight=False)
    console.print(f"{groups} groups, none in two splits; wrote {path}")
    for message in table.skipped:
        console.print(f"skipped: {message}", markup=False, highlight=False)
    return 0
