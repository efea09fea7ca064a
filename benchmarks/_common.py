"""Shared pieces of the benchmarks: arguments, the machine's description, data, timing and the JSON results.

Each benchmark is one script (``python benchmarks/<name>.py``) that measures its alternatives side by side
in one run, prints a table of figures and ratios against the goals, and writes ``benchmarks/results/<name>.json``
(``<name>-quick.json`` with ``--quick``, so a smoke test never overwrites real figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RESULTS_DIR",
    "add_common_arguments",
    "machine_info",
    "synthetic_dataset",
    "dataset_table",
    "percentile",
    "summarise_latencies",
    "goal",
    "print_table",
    "write_results",
    "quiet_libraries",
    "extra_trainer_callbacks",
    "set_threads",
    "QUICK_RECIPE",
    "add_grid_arguments",
    "resolve_grid",
    "run_grid",
    "quick_grid",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
_DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dermlab" / "benchmarks"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) for CI smoke tests")
    parser.add_argument("--data", metavar="PATH", help="a dataset folder (e.g. HAM10000) instead of synthetic images")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N images of --data")
    parser.add_argument(
        "--work", type=Path, default=_DEFAULT_WORK,
        help=f"where generated synthetic datasets are kept between runs (default {_DEFAULT_WORK})",
    )
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"folder for the JSON (default {RESULTS_DIR})")
    parser.add_argument("--tag", help="suffix for the JSON's name (<name>-<tag>.json), to keep runs with other settings")
    parser.add_argument("--model", default="efficientnet_lite0", help="timm backbone, random init (default efficientnet_lite0)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads in the measuring process (default: see the benchmark's description)",
    )


def set_threads(requested: int | None, workers: int = 0) -> int:
    """Set torch's intra-op threads: ``requested``, else ``$OMP_NUM_THREADS``, else the usable cores minus the
    DataLoader workers (>= 1).

    Leaving the workers their cores matters on small machines: with every core given to torch's OpenMP pool
    and workers on the same cores, the pool's threads spin waiting for descheduled peers (measured on 2 busy
    cores: a training step 10-50x slower and far noisier than with one thread).
    """
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    from_environment = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)  # e.g. the smoke test's 1
    threads = requested or from_environment or max(1, usable - workers)
    torch.set_num_threads(threads)
    return threads


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, GPU, library versions, load."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "lightning", "onnxruntime", "numpy", "PIL"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - an optional library may be missing
            pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": memory_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "os": platform.platform(),
        # 1, 5 and 15 minute load averages when the benchmark started and ended: other work on the machine
        "load_average_start": _LOAD_AT_START,
        "load_average_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": versions,
    }


def synthetic_dataset(work: Path, images: int, size: int, seed: int = 0) -> Path:
    """A synthetic HAM10000-layout dataset (``size`` high, 4:3), generated once and kept under ``work``."""
    from dermlab.data.synthetic import generate_synthetic_dataset

    root = Path(work) / f"synthetic-{images}-{size}-{seed}"
    if (root / ".complete").is_file():
        return root
    started = time.perf_counter()
    print(f"generating {images} synthetic images at {round(size * 4 / 3)}x{size} into {root} (once) ...", flush=True)
    # into a private folder, then renamed: benchmarks running side by side never see half a dataset
    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    generate_synthetic_dataset(tmp, images=images, size=size, seed=seed, overwrite=True)
    (tmp / ".complete").write_text("")
    try:
        if root.exists() and not (root / ".complete").is_file():
            shutil.rmtree(root)  # an interrupted earlier generation
        tmp.rename(root)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    return root


def dataset_table(args: argparse.Namespace, images: int, size: int):
    """The benchmark's dataset as ``(path, table)``: ``--data`` (about ``--limit`` images of it, every class
    kept) or a synthetic one of ``images`` images ``size`` pixels high."""
    from dermlab.data.datasets import load_dataset

    path = Path(args.data) if args.data else synthetic_dataset(args.work, images, size)
    table = load_dataset(path)
    if args.data and args.limit and args.limit < len(table.frame):
        path = _limited_copy(table, Path(args.work), args.limit)
        table = load_dataset(path)
    return path, table


def _limited_copy(table, work: Path, limit: int) -> Path:
    """A folder-per-class dataset of symbolic links to about ``limit`` of ``table``'s images (at least five per
    class, so that every split gets every class), drawn with a fixed seed. Content, hence cache keys, is the same."""
    import hashlib

    frame = table.frame
    share = limit / len(frame)
    picked = frame.groupby("label", group_keys=False).apply(
        lambda rows: rows.sample(min(len(rows), max(5, round(len(rows) * share))), random_state=0)
    )
    digest = hashlib.blake2b("\n".join(sorted(picked["path"])).encode(), digest_size=6).hexdigest()
    root = work / f"limited-{limit}-{digest}"
    if (root / ".complete").is_file():
        return root
    for row in picked.itertuples():
        link = root / str(row.label) / f"{row.image_id}{Path(row.path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(row.path)
    (root / ".complete").write_text("")
    return root


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise_latencies(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean in milliseconds, and the sample count."""
    ms = [s * 1000 for s in seconds]
    return {
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
        "samples": len(ms),
    }


def goal(value: float, at_least: float) -> dict[str, Any]:
    """A ratio with its goal, and whether it was met."""
    return {"value": round(value, 3), "goal": f">= {at_least}", "met": bool(value >= at_least)}


def print_table(title: str, rows: Iterable[Sequence[Any]], header: Sequence[str]) -> None:
    rows = [[_cell(c) for c in row] for row in rows]
    header = list(header)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  " + "  ".join("-" * w for w in widths))
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, dict) and "value" in value:
        return f"{value['value']:.2f}x ({'met' if value['met'] else 'MISSED'}, goal {value['goal']})"
    return str(value)


def write_results(name: str, args: argparse.Namespace, payload: dict[str, Any]) -> Path:
    """``<results>/<name>[-quick][-<tag>].json`` with the machine, the arguments and ``payload``."""
    results = Path(getattr(args, "results", RESULTS_DIR))
    results.mkdir(parents=True, exist_ok=True)
    quick, tag = getattr(args, "quick", False), getattr(args, "tag", None)  # scripts without these options too
    suffix = "".join(f"-{part}" for part in ("quick" if quick else None, tag) if part)
    path = results / f"{name}{suffix}.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in {"results", "work"}}
    document = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings,
        "machine": machine_info(),
        **payload,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)
    print(f"\nwrote {path}")
    return path


def quiet_libraries() -> None:
    """Lightning's banners and known-harmless warnings off, as ``dermlab`` itself does, so the figures stand out."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its own log level on import: set ours after it)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        r".*module\(s\) in eval mode.*",
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*smaller than the logging interval.*",
        r".*does not have many workers.*",
        r".*exists and is not empty.*",
        r".*litlogger.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def extra_trainer_callbacks(*callbacks: Any) -> Iterator[None]:
    """Every Lightning trainer that ``train_run`` makes inside the block also gets ``callbacks`` (timers).

    Benchmarks only: it swaps ``dermlab.training.run._make_trainer`` for a wrapper and puts it back after.
    It also undoes Lightning's process-wide ``torch.use_deterministic_algorithms(True)`` on the way out.
    """
    import torch

    import dermlab.training.run as run_module

    original = run_module._make_trainer

    def make_trainer(config, stage_dir, epochs, loggers, extra_callbacks):
        return original(config, stage_dir, epochs, loggers, [*extra_callbacks, *callbacks])

    run_module._make_trainer = make_trainer
    try:
        yield
    finally:
        run_module._make_trainer = original
        torch.use_deterministic_algorithms(False)


#: What ``--quick`` sets on every run of a real-data grid: a tiny network, one epoch per stage, one cached view
#: for stage 1, stage 2 on images (a grid run that asks for cached trunk maps keeps its own setting).
QUICK_RECIPE: dict[str, Any] = {
    "model.name": "test_efficientnet", "model.input_size": [32, 32], "model.weights": "none",
    "train.stage1_epochs": 1, "train.stage2_epochs": 1, "train.feature_views": 1, "train.unfreeze": "2",
    "train.stage2_cached_views": 0, "data.num_workers": 0, "data.cache_dir": None, "evaluation.tta": [],
}


def add_grid_arguments(parser: argparse.ArgumentParser, grid: Path) -> None:
    """The options of a real-data grid benchmark (``accuracy.py``, ``robustness.py``); ``grid``: the default grid."""
    import tempfile

    parser.add_argument("--data", help="dataset folder (HAM10000 layout); required without --quick")
    parser.add_argument("--out", type=Path, default=Path("runs/ham10000"), help="runs folder (default runs/ham10000)")
    parser.add_argument("--grid", type=Path, default=grid, help=f"the grid of runs (default {grid.name})")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these runs of the grid")
    parser.add_argument("--quick", action="store_true", help="synthetic images, tiny model, seconds (CI smoke test)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dermlab-benchmarks")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"folder for the JSON (default {RESULTS_DIR})")
    parser.add_argument("--tag", help="suffix for the JSON's name")


def resolve_grid(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The grid file to run. With ``--quick``: ``--data`` and ``--out`` become a synthetic dataset and a folder
    under ``--work``, and the grid a copy with :data:`QUICK_RECIPE` on every run. Without it ``--data`` is required."""
    grid_path = args.grid.resolve()
    if args.quick:
        args.data = str(synthetic_dataset(args.work, images=140, size=48))
        args.out = args.work / f"quick-{grid_path.stem}"
        return quick_grid(grid_path, args.work, QUICK_RECIPE)
    if not args.data:
        parser.error("--data is required (or --quick)")
    return grid_path


def run_grid(grid_path: Path, data: str, out: Path, only: Sequence[str] | None = None) -> list[str]:
    """The runs of a grid trained and scored as ``dermlab experiment`` does (finished ones skipped); their names."""
    from dermlab.training.grid import load_grid
    from dermlab.training.grid import run_grid as train_grid

    grid = load_grid(grid_path)
    print(f"grid {grid_path}: {', '.join(only) if only else 'every run'} on {data} into {out}", flush=True)
    train_grid(grid, data, out, only=only)
    return [entry["name"] for entry in grid["runs"] if not only or entry["name"] in only]


def quick_grid(grid_path: Path, work: Path, overrides: dict[str, Any]) -> Path:
    """A copy of a grid for ``--quick``: ``overrides`` on every run, and the run settings a tiny net cannot take dropped.

    Unfreeze counts, input sizes and backbones of a real recipe may not fit the tiny test network.
    """
    import yaml

    grid = yaml.safe_load(Path(grid_path).read_text())
    base = (Path(grid_path).parent / grid["base"]).resolve() if grid.get("base") else None
    grid["base"] = str(base) if base else None
    grid["set"] = {**(grid.get("set") or {}), **overrides}
    for entry in grid["runs"]:
        entry_set = entry.get("set") or {}
        entry["set"] = {k: v for k, v in entry_set.items() if k not in ("train.unfreeze", "model.input_size", "model.name")}
    grid = {k: v for k, v in grid.items() if v is not None}
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{Path(grid_path).stem}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path
