"""Grids of runs on one split (``dermlab experiment GRID.yaml``): several configs trained and compared.

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

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from dermlab.config import Config, apply_overrides, config_to_dict, load_config
from dermlab.errors import ConfigError
from dermlab.io import atomic_write_bytes
from dermlab.training.run import train_and_summarise

__all__ = ["config_differences", "load_grid", "grid_overrides", "run_config", "run_grid"]

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def load_grid(path: str | Path) -> dict[str, Any]:
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


def grid_overrides(values: dict[str, Any], prefix: str = "") -> list[str]:
    """``{"loss": {"name": "focal"}}`` and ``{"loss.name": "focal"}`` both become ``["loss.name=focal"]``."""
    items = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not path.endswith("options"):
            items += grid_overrides(value, f"{path}.")
        else:
            items.append(f"{path}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return items


def run_config(grid: dict[str, Any], entry: dict[str, Any], data: str | Path, splits_file: Path | None = None) -> Config:
    """The config of one run of ``grid`` (its base, the grid's ``set``, the run's ``set``) on ``data``."""
    base = load_config(grid["_dir"] / grid["base"]) if grid.get("base") else Config()
    overrides = [f"data.path={data}", *grid_overrides(grid.get("set") or {}), *grid_overrides(entry.get("set") or {})]
    if splits_file is not None:
        overrides.append(f"data.splits_file={splits_file}")
    return apply_overrides(base, overrides)


#: config keys that may differ between a finished run and its grid row without changing what was trained
_RUN_LOCAL_KEYS = {("data", "path"), ("data", "splits_file"), ("data", "num_workers"), ("data", "cache_dir")}


def config_differences(saved: Config, wanted: Config) -> list[str]:
    """``"section.key: saved -> wanted"`` for each setting (beyond paths, workers and caches) that differs."""
    have, want = config_to_dict(saved), config_to_dict(wanted)
    return [
        f"{section}.{key}: {have.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in want.items() if isinstance(values, dict)
        for key, value in values.items()
        if (section, key) not in _RUN_LOCAL_KEYS and have.get(section, {}).get(key) != value
    ]


def run_grid(
    grid: dict[str, Any],
    data: str | Path,
    out: str | Path,
    only: Sequence[str] | None = None,
    on_finished: Callable[[str, dict[str, Any]], None] | None = None,
) -> list[Path]:
    """Train and score each run of ``grid`` (or those in ``only``) into ``out/<name>``; returns their folders.

    The first run's ``splits.csv`` becomes ``out/splits.csv``, which every later run reuses; a run with a
    ``metrics.json`` is skipped as finished, one with a ``config.yaml`` resumed. ``on_finished(name, summary)``
    is called after each newly scored run.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shared_splits = out / "splits.csv"
    run_dirs = []
    for entry in grid["runs"]:
        if only and entry["name"] not in only:
            continue
        run_dir = out / entry["name"]
        config = run_config(grid, entry, data, shared_splits if shared_splits.is_file() else None)
        if (run_dir / "metrics.json").is_file():
            print(f"[{entry['name']}] already finished, skipped")
            saved = run_dir / "config.yaml"
            changed = config_differences(load_config(saved), config) if saved.is_file() else []
            if changed:  # said, not silent: its figures are of the saved config, not of the row as it reads now
                print(f"[{entry['name']}] warning: it finished with a config the grid row no longer gives "
                      f"({'; '.join(changed)}); move {run_dir} away to train the row as it reads now", file=sys.stderr)
            run_dirs.append(run_dir)
            continue
        resume = (run_dir / "config.yaml").is_file()
        print(f"[{entry['name']}] training into {run_dir}" + (" (resuming)" if resume else ""))
        finished = train_and_summarise(config, run_dir, resume=resume, extras={"label": entry["name"]})
        if finished.summary is None:  # another process of a DDP run
            continue
        if not shared_splits.is_file():
            atomic_write_bytes(shared_splits, (run_dir / "splits.csv").read_bytes())
        if on_finished is not None:
            on_finished(entry["name"], finished.summary)
        run_dirs.append(run_dir)
    return run_dirs
