"""``dermlab experiment GRID.yaml``: train several configs on one split and write the comparison table.

A grid file::

    data: ../shared/data/HAM10000          # dataset (or pass --data)
    base: configs/ham10000.yaml            # optional base config file (relative to the grid file)
    set: {train.stage2_epochs: 2}          # optional overrides for every run
    out: runs/imbalance                    # optional (or pass --out)
    runs:
      - name: cross_entropy
      - name: focal
        set: {loss.name: focal, loss.options: {gamma: 2.0}}

Every run reuses the first run's ``splits.csv`` (one lesion-disjoint split for all), and a run whose
``metrics.json`` already exists is skipped, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import yaml

__all__ = ["register", "run", "load_grid"]

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


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


def _flatten(values: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"loss": {"name": "focal"}}`` and ``{"loss.name": "focal"}`` both become ``["loss.name=focal"]``."""
    items = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not path.endswith("options"):
            items += _flatten(value, f"{path}.")
        else:
            items.append(f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return items


def load_grid(path: str | Path) -> dict[str, Any]:
    from dermlab.errors import ConfigError

    path = Path(path)
    try:
        grid = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the grid ({error})") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("runs"), list) or not grid["runs"]:
        raise ConfigError(f"{path}: a grid needs a non-empty 'runs:' list")
    unknown = set(grid) - {"data", "base", "set", "out", "runs", "classes"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid key {sorted(unknown)[0]}; valid: base, classes, data, out, runs, set")
    names = set()
    for index, entry in enumerate(grid["runs"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not _NAME.match(entry["name"]):
            raise ConfigError(f"{path}: runs[{index}] needs a 'name' made of letters, digits, _ . + -")
        if entry["name"] in names:
            raise ConfigError(f"{path}: run name {entry['name']!r} appears twice")
        names.add(entry["name"])
        if set(entry) - {"name", "set"}:
            raise ConfigError(f"{path}: runs[{index}] has unknown keys {sorted(set(entry) - {'name', 'set'})}")
    grid["_dir"] = path.parent
    return grid


def run(args: argparse.Namespace) -> int:
    from dermlab.cli._common import print_metrics_table
    from dermlab.config import Config, apply_overrides, load_config
    from dermlab.errors import ConfigError
    from dermlab.evaluation.compare import compare_with_intervals, comparison_markdown, write_comparison
    from dermlab.evaluation.run_summary import summarise_run
    from dermlab.io import atomic_write_bytes
    from dermlab.training.run import prepare_run_data, train_run

    grid = load_grid(args.grid)
    data = args.data or grid.get("data")
    out = Path(args.out or grid.get("out") or "")
    if not data:
        raise ConfigError(f"{args.grid}: no dataset: give 'data:' in the grid or --data")
    if not str(out):
        raise ConfigError(f"{args.grid}: no output folder: give 'out:' in the grid or --out")
    base = load_config(grid["_dir"] / grid["base"]) if grid.get("base") else Config()
    common = _flatten(grid.get("set") or {})
    out.mkdir(parents=True, exist_ok=True)
    shared_splits = out / "splits.csv"
    selected = [entry for entry in grid["runs"] if not args.only or entry["name"] in args.only]
    run_dirs = []
    for entry in selected:
        run_dir = out / entry["name"]
        overrides = [f"data.path={data}", *common, *_flatten(entry.get("set") or {})]
        if shared_splits.is_file():
            overrides.append(f"data.splits_file={shared_splits}")
        config = apply_overrides(base, overrides)
        if (run_dir / "metrics.json").is_file():
            print(f"[{entry['name']}] already finished, skipped")
            run_dirs.append(run_dir)
            continue
        resume = (run_dir / "config.yaml").is_file()
        print(f"[{entry['name']}] training into {run_dir}" + (" (resuming)" if resume else ""))
        started = time.perf_counter()
        result = train_run(config, run_dir, resume=resume)
        if not result.is_global_zero:
            continue
        if not shared_splits.is_file():
            atomic_write_bytes(shared_splits, (run_dir / "splits.csv").read_bytes())
        frame = prepare_run_data(config, run_dir).frame
        summary = summarise_run(
            run_dir,
            frame,
            extras={"label": entry["name"], "wall_time_s": round(time.perf_counter() - started, 1)},
            num_workers=config.data.num_workers,
        )
        print_metrics_table(summary, title=entry["name"])
        run_dirs.append(run_dir)
    classes = args.classes or grid.get("classes")
    comparison = compare_with_intervals(run_dirs, split="test", classes=classes)
    write_comparison(comparison, out / "comparison")
    print(comparison_markdown(comparison))
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.csv'}")
    return 0
