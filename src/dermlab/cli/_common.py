"""Pieces shared by several subcommands: config assembly and the metric tables they print."""

from __future__ import annotations

import argparse
from typing import Any

from dermlab.config import Config, apply_overrides, load_config
from dermlab.evaluation.decision import RULES

__all__ = ["add_config_arguments", "resolve_config", "print_metrics_table", "add_behaviour_arguments", "behaviour_options"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML config (see configs/); flags below override it")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.stage2_epochs=3 --set loss.name=focal (repeatable)",
    )


def add_behaviour_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tta``, ``--tta-views`` and ``--uncalibrated``: overrides of the run's own inference behaviour."""
    parser.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips instead of the run's views")
    parser.add_argument(
        "--tta-views",
        metavar="A,B",
        help="test-time augmentation views or presets, comma-separated, e.g. identity (no TTA), hflip,vflip or "
        "dihedral; default: the run's own (evaluation.tta)",
    )
    parser.add_argument(
        "--uncalibrated", action="store_true", help="ignore the checkpoint's temperature (and its abstention rule)"
    )
    parser.add_argument(
        "--rule",
        choices=RULES,
        help="decision rule: argmax (accuracy first) or balanced (the run's logit adjustment, fitted on val for "
        "balanced accuracy); default: the run's own (evaluation.decision_rule). Both are reported",
    )


def behaviour_options(args: argparse.Namespace) -> dict:
    """Keyword arguments of :meth:`Predictor.from_path` from :func:`add_behaviour_arguments`' flags."""
    tta = args.tta_views if args.tta_views else (True if args.tta else None)
    return {"tta": tta, "calibrated": not args.uncalibrated, "abstain": not args.uncalibrated, "rule": args.rule}


def resolve_config(args: argparse.Namespace, flag_overrides: list[str]) -> Config:
    """Defaults < --config FILE < explicit flags < --set KEY=VALUE."""
    config = load_config(args.config) if getattr(args, "config", None) else Config()
    return apply_overrides(config, [*flag_overrides, *getattr(args, "overrides", [])])


def print_metrics_table(summary: dict[str, Any], splits: tuple[str, ...] = ("val", "test"), title: str = "") -> None:
    """One row per headline metric, one column per split, with bootstrap intervals where metrics.json has them."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from dermlab.evaluation.run_summary import interval_note, metrics_table

    header, rows = metrics_table(summary, splits)
    table = Table(title=escape(title) or None, caption=escape(interval_note(summary, splits)) or None)
    table.add_column(header[0])
    for split in header[1:]:
        table.add_column(split, justify="right")
    for row in rows:
        table.add_row(*map(escape, row))
    Console().print(table)

