"""``dermlab compare RUN_DIR...``: one table of the headline metrics of several runs."""

from __future__ import annotations

import argparse
import math
from typing import Any

from dermlab.evaluation.compare import compare_runs, write_comparison

__all__ = ["register", "run"]

# Short headers keep the table within an 80-column terminal; the files keep the full names.
_SHORT_NAMES = {
    "accuracy": "acc",
    "precision_macro": "prec",
    "recall_macro": "rec",
    "f1_macro": "f1",
    "balanced_accuracy": "bal acc",
    "auc_macro": "auc",
}


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare the metrics of several runs side by side",
        description="Print a table of accuracy, macro precision / recall / F1, balanced accuracy and macro "
        "AUC for each run folder (read from its metrics.json), and write it as PREFIX.md and PREFIX.csv.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.json")
    parser.add_argument("--split", default="test", help="which split's metrics to compare (default: test)")
    parser.add_argument(
        "--out",
        default="comparison",
        metavar="PREFIX",
        help="write PREFIX.md and PREFIX.csv (default: comparison)",
    )
    parser.add_argument(
        "--classes",
        nargs="+",
        metavar="CLASS",
        default=None,
        help="also show the recall of these classes, e.g. --classes mel df vasc akiec",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    frame = compare_runs(args.run_dirs, split=args.split, classes=args.classes)
    table = Table(
        title=f"{args.split} metrics",
        caption="prec / rec / f1 / auc: macro averages; bal acc: balanced accuracy (ISIC)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column(frame.index.name or "run", overflow="fold")
    for column in frame.columns:
        table.add_column(_short_name(str(column)), justify="right", min_width=5)
    for name, values in zip(frame.index, frame.to_numpy()):
        table.add_row(str(name), *("-" if math.isnan(v) else f"{v:.3f}" for v in values))
    console = Console()
    # rich drops columns that do not fit; print wider than the terminal rather than lose a run's numbers
    needed = Console(width=1000).measure(table).maximum
    if needed > console.width:
        console = Console(width=needed)
    console.print(table)
    markdown_path, csv_path = write_comparison(frame, args.out)
    console.print(f"wrote {markdown_path} and {csv_path}")
    return 0


def _short_name(column: str) -> str:
    if column.startswith("recall_") and column not in _SHORT_NAMES:
        return "rec " + column.removeprefix("recall_")
    return _SHORT_NAMES.get(column, column)
