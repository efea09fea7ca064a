"""Pieces shared by several subcommands: config assembly and the metric tables they print."""

from __future__ import annotations

import argparse
from typing import Any

from dermlab.config import Config, apply_overrides, load_config

__all__ = ["add_config_arguments", "resolve_config", "print_metrics_table"]


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


def resolve_config(args: argparse.Namespace, flag_overrides: list[str]) -> Config:
    """Defaults < --config FILE < explicit flags < --set KEY=VALUE."""
    config = load_config(args.config) if getattr(args, "config", None) else Config()
    return apply_overrides(config, [*flag_overrides, *getattr(args, "overrides", [])])


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def print_metrics_table(summary: dict[str, Any], splits: tuple[str, ...] = ("val", "test"), title: str = "") -> None:
    """One row per headline metric, one column per split."""
    from rich.console import Console
    from rich.table import Table

    present = [s for s in splits if isinstance(summary.get(s), dict)]
    table = Table(title=title or None)
    table.add_column("metric")
    for split in present:
        table.add_column(split, justify="right")
    rows = [
        ("accuracy", "accuracy"),
        ("balanced accuracy", "balanced_accuracy"),
        ("macro precision", "precision_macro"),
        ("macro recall", "recall_macro"),
        ("macro F1", "f1_macro"),
        ("macro AUC", "auc_macro"),
        ("ECE", "ece"),
        ("images", "n"),
    ]
    for label, key in rows:
        table.add_row(label, *[_fmt(summary[s].get(key)) for s in present])
    for split in present:
        target = summary[split].get("target")
        if isinstance(target, dict) and target.get("sensitivity_at_specificity"):
            at = target["sensitivity_at_specificity"]
            table.add_row(
                f"{target.get('class')} sensitivity @ spec {_fmt(at.get('specificity'))} ({split})",
                *[_fmt(at.get("sensitivity")) if s == split else "" for s in present],
            )
    Console().print(table)

