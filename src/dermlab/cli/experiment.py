"""``dermlab experiment GRID.yaml``: train several configs on one split and write the comparison table.

The grid format and how runs share their split: :mod:`dermlab.training.grid`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="train several configs on the same split and write a comparison table",
        description="Train each run of GRID.yaml on one shared lesion-disjoint split, then write "
        "OUT/comparison.md and OUT/comparison.csv (accuracy, macro precision/recall/F1, balanced accuracy, "
        "macro AUC, and per-class recall). Finished runs are skipped, so the command can be re-run to continue.",
    )
    parser.add_argument("grid", help="grid YAML file (see the module docstring or docs)")
    parser.add_argument("--data", help="dataset (overrides the grid's data:)")
    parser.add_argument("--out", help="output folder (overrides the grid's out:)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="train only these runs of the grid")
    parser.add_argument("--classes", nargs="+", default=None, help="classes whose recall is added to the table")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dermlab.cli._common import print_metrics_table
    from dermlab.errors import ConfigError
    from dermlab.evaluation.compare import compare_with_intervals, comparison_markdown, write_comparison
    from dermlab.training.grid import load_grid, run_grid

    grid = load_grid(args.grid)
    data = args.data or grid.get("data")
    out = Path(args.out or grid.get("out") or "")
    if not data:
        raise ConfigError(f"{args.grid}: no dataset: give 'data:' in the grid or --data")
    if not str(out):
        raise ConfigError(f"{args.grid}: no output folder: give 'out:' in the grid or --out")
    run_dirs = run_grid(grid, data, out, only=args.only, on_finished=lambda name, summary: print_metrics_table(summary, title=name))
    classes = args.classes or grid.get("classes")
    comparison = compare_with_intervals(run_dirs, split="test", classes=classes)
    write_comparison(comparison, out / "comparison")
    print(comparison_markdown(comparison))
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.csv'}")
    return 0
