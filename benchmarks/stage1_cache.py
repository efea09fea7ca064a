"""Stage 1 (frozen backbone) from cached features against recomputing the backbone every epoch.

With the backbone frozen its pooled features only change with the input, so ``dermlab train`` computes them
once (``train.cached_features``; one exact view when augmentation is off, ``train.feature_views`` augmented
views otherwise) and trains the head on them. This runs stage 1 three times through
:func:`dermlab.training.run.train_run`, side by side:

- ``recomputed``: ``train.cached_features=false``, every epoch runs the backbone over train and val;
- ``cached, cold``: features computed (and stored under ``data.cache_dir/features``), then head-only epochs;
- ``cached, warm``: the same run again (a new run folder): the features come from the cache, as in a
  hyper-parameter sweep of the head or a re-run with another loss.

Torch threads: ``--threads``, default the usable cores minus the DataLoader workers (at least one).
Stage time = feature computation + all epochs (train and validation). Goal: cached >= 10x faster.

    python benchmarks/stage1_cache.py            # about 3 minutes on 2 busy CPU cores
    python benchmarks/stage1_cache.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_arguments,
    dataset_table,
    extra_trainer_callbacks,
    goal,
    print_table,
    quiet_libraries,
    set_threads,
    write_results,
)


def run_stage1(args, data_path: Path, run_dir: Path, cached: bool, cache_dir: Path) -> dict[str, float]:
    """One stage-1-only training run; returns its stage time, feature time and per-epoch times."""
    import lightning as L

    import dermlab.training.run as run_module
    from dermlab.config import Config, apply_overrides

    epochs: list[float] = []
    fit: dict[str, float] = {}

    class Timing(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            fit["start"] = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.epoch_started = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # after this epoch's validation
            epochs.append(time.perf_counter() - self.epoch_started)

        def on_fit_end(self, trainer, pl_module) -> None:
            fit["end"] = time.perf_counter()

    feature_seconds = [0.0]
    original_features = run_module.load_or_compute_features

    def timed_features(*a, **k):
        started = time.perf_counter()
        try:
            return original_features(*a, **k)
        finally:
            feature_seconds[0] += time.perf_counter() - started

    overrides = [
        f"data.path={data_path}", f"model.name={args.model}", "model.weights=none", f"model.input_size=[{args.size},{args.size}]",
        f"data.batch_size={args.batch_size}", f"data.eval_batch_size={args.batch_size}",
        f"data.num_workers={args.workers}", f"data.augmentation={args.augmentation}",
        f"train.stage1_epochs={args.epochs}", "train.stage2_epochs=0", f"train.cached_features={str(cached).lower()}",
        f"train.feature_views={args.views}", f"data.cache_dir={cache_dir}", f"train.precision={args.precision}",
    ]
    config = apply_overrides(Config(), overrides)
    run_module.load_or_compute_features = timed_features
    try:
        with extra_trainer_callbacks(Timing()):
            started = time.perf_counter()
            run_module.train_run(config, run_dir)
            wall = time.perf_counter() - started
    finally:
        run_module.load_or_compute_features = original_features
    fit_s = fit["end"] - fit["start"]
    return {
        "stage_s": round(feature_seconds[0] + fit_s, 3),
        "features_s": round(feature_seconds[0], 3),
        "epochs_s": round(fit_s, 3),
        "epoch_mean_s": round(statistics.fmean(epochs), 4),
        "epoch_median_s": round(statistics.median(epochs), 4),
        "train_run_wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--images", type=int, default=300, help="synthetic images (default 300; 60/20/20 split)")
    parser.add_argument("--image-size", type=int, default=150, help="synthetic image height (default 150: 200x150)")
    parser.add_argument("--size", type=int, default=128, help="input resolution (default 128)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10, help="stage-1 epochs (default 10; reference A ran up to 20)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument(
        "--augmentation", default="none",
        help="augmentation preset (default none: one exact view; with a preset, --views augmented views are cached)",
    )
    parser.add_argument("--views", type=int, default=4, help="augmented views cached per image (default 4)")
    parser.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (GPU default)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.size, args.batch_size, args.epochs, args.workers = 35, 48, 32, 16, 2, 0
        args.model = "test_efficientnet" if args.model == "efficientnet_lite0" else args.model

    import torch

    os.environ.setdefault("DERMLAB_PROGRESS", "0")
    quiet_libraries()
    args.threads = set_threads(args.threads, 0 if torch.cuda.is_available() else args.workers)
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    data_path, table = dataset_table(args, args.images, args.image_size)
    views = 1 if args.augmentation == "none" else args.views
    print(
        f"{len(table.frame)} images ({data_path}), {args.model} at {args.size}px, {args.epochs} stage-1 epochs, "
        f"augmentation {args.augmentation} ({views} cached view{'s' if views > 1 else ''}), {args.workers} workers, "
        f"torch threads {args.threads}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="dermlab-bench-") as tmp:
        tmp = Path(tmp)
        results = {}
        for name, cached in (("recomputed", False), ("cached_cold", True), ("cached_warm", True)):
            print(f"stage 1, {name.replace('_', ', ')} ...", flush=True)
            results[name] = run_stage1(args, data_path, tmp / name, cached, tmp / "cache")

    recomputed = results["recomputed"]
    ratios = {
        "stage_cached_cold_vs_recomputed": goal(recomputed["stage_s"] / results["cached_cold"]["stage_s"], 10),
        "stage_cached_warm_vs_recomputed": goal(recomputed["stage_s"] / results["cached_warm"]["stage_s"], 10),
        "epoch_cached_vs_recomputed": round(recomputed["epoch_median_s"] / results["cached_cold"]["epoch_median_s"], 1),
    }
    labels = {"recomputed": "recomputed every epoch", "cached_cold": "cached features, cold", "cached_warm": "cached features, warm"}
    print_table(
        f"stage 1 ({args.epochs} epochs)",
        [
            (labels[n], r["stage_s"], r["features_s"], r["epoch_median_s"], r["train_run_wall_s"])
            for n, r in results.items()
        ],
        ["run", "stage s", "features s", "epoch s (median)", "train_run wall s"],
    )
    print_table("ratios (recomputed time / cached time)", list(ratios.items()), ["ratio", "value"])
    write_results(
        "stage1_cache",
        args,
        {"runs": results, "ratios": ratios, "views": views, "images": len(table.frame), "data": str(data_path)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
