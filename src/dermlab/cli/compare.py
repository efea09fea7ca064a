"""``dermlab compare RUN_DIR...``: the headline metrics of several runs with intervals, tested against the first."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from dermlab.evaluation.compare import (
    RunComparison,
    compare_with_intervals,
    comparison_caption,
    write_comparison,
)

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
        description="Print a table of accuracy, macro precision / recall / F1, balanced accuracy, macro AUC "
        "and the target class's sensitivity at the fixed specificity for each run folder (read from its "
        "metrics.json, with its bootstrap 95% intervals), and write it as PREFIX.md and PREFIX.csv. The first "
        "run is the baseline: every other run's difference from it gets a paired-bootstrap 95% interval from "
        "both runs' eval/SPLIT/predictions.csv (resampling lesions), and a * where that interval excludes 0. "
        "Runs scored on different data or splits are not tested, with a warning.",
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
    parser.add_argument(
        "--resamples",
        type=int,
        default=1000,
        metavar="N",
        help="paired-bootstrap resamples of the differences from the first run (default 1000; 0 = no tests)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the paired bootstrap (default 0)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dermlab.errors import DataError

    if args.resamples < 0:
        raise DataError(f"--resamples must be >= 0, got {args.resamples}")
    comparison = compare_with_intervals(
        args.run_dirs, split=args.split, classes=args.classes, resamples=args.resamples, seed=args.seed
    )
    for warning in comparison.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    tables = [_values_table(comparison)]
    tested = comparison.difference.drop(index=comparison.baseline).dropna(how="all")
    if len(tested):
        tables.append(_differences_table(comparison, tested))
    console = Console()
    # rich drops columns that do not fit; print wider than the terminal rather than lose a run's numbers
    needed = max(Console(width=1000).measure(table).maximum for table in tables)
    if needed > console.width:
        console = Console(width=needed)
    for table in tables:
        console.print(table)
    markdown_path, csv_path = write_comparison(comparison, args.out)
    console.print(f"wrote {markdown_path} and {csv_path}")
    return 0


def _values_table(comparison: RunComparison) -> Any:
    """Each run's value (``*``: differs from the baseline) over its bootstrap interval."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    frame = comparison.values
    table = Table(
        title=f"{comparison.split} metrics",
        caption="prec / rec / f1 / auc: macro averages; bal acc: balanced accuracy (ISIC); sens@spec: target "
        "class sensitivity at the fixed specificity\n"
        + escape(comparison_caption(comparison, "low-high (second line)")),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column(frame.index.name or "run", overflow="fold")
    for column in frame.columns:
        table.add_column(_short_name(str(column)), justify="right", min_width=5)
    for name, values in zip(frame.index, frame.to_numpy()):
        cells = []
        for column, value in zip(frame.columns, values):
            cell = (
                "-"
                if math.isnan(value)
                else f"{value:.3f}" + (" *" if comparison.significant.loc[name, column] else "")
            )
            low, high = comparison.low.loc[name, column], comparison.high.loc[name, column]
            if not (math.isnan(low) or math.isnan(high)):
                cell += f"\n{low:.3f}-{high:.3f}"
            cells.append(cell)
        table.add_row(escape(str(name)), *cells)
    return table


def _differences_table(comparison: RunComparison, tested: Any) -> Any:
    """Each run's difference from the baseline over its paired-bootstrap interval."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=escape(f"difference from {comparison.baseline} (paired bootstrap); * = interval excludes 0"),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("run", overflow="fold")
    for column in tested.columns:
        table.add_column(_short_name(str(column)), justify="right", min_width=5)
    for name, values in zip(tested.index, tested.to_numpy()):
        cells = []
        for column, value in zip(tested.columns, values):
            if math.isnan(value):
                cells.append("-")
                continue
            mark = " *" if comparison.significant.loc[name, column] else ""
            low, high = (
                comparison.difference_low.loc[name, column],
                comparison.difference_high.loc[name, column],
            )
            cells.append(f"{value:+.3f}{mark}\n{low:+.3f} to {high:+.3f}")
        table.add_row(escape(str(name)), *cells)
    return table


def _short_name(column: str) -> str:
    if column.startswith("recall_") and column not in _SHORT_NAMES:
        return "rec " + column.removeprefix("recall_")
    if column.startswith("sensitivity_at_specificity_"):
        return column.removeprefix("sensitivity_at_specificity_") + " sens@spec"
    return _SHORT_NAMES.get(column, column)
