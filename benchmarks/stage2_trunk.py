"""Stage 2 over a cached frozen trunk against running the frozen blocks every epoch: speed and memory.

With ``train.unfreeze: N`` (a number) only the last N modules of the backbone learn in stage 2; everything
before them (the trunk, :mod:`dermlab.models.trunk`) is a fixed function of the augmented image. With
``train.stage2_cached_views: K`` dermlab runs the trunk once over K augmented views of every training image
(and once over val), keeps its output maps in float16, and trains only the tail on them. This runs stage 2
twice through :func:`dermlab.training.run.train_run`, side by side, with the same recipe:

- ``recomputed``: ``train.stage2_cached_views=0``: every epoch decodes, augments and runs the whole backbone;
- ``cached trunk``: ``train.stage2_cached_views=K``: the trunk maps are computed first (timed on their own as
  ``caching``), then every epoch trains the tail over them.

Figures: the caching speed (trunk passes per second: train images x K views + val images), each stage-2
epoch's time (train and validation) and training images/s (train batches only, after ``--warmup`` epochs),
what one pass of the trunk over the training images costs at the caching speed (what every recomputed epoch
pays on top, before decoding and augmenting), the size of the cached maps (MiB for train and for all, and KiB
per image and view, to scale to another dataset), and the trunk's share of one forward pass of the backbone
(eval mode, one batch). Stage 1 is skipped (``stage1_epochs=0``):
it does not differ between the two. Default: ``efficientnet_lite0`` (random init) at 144x192 with the last 9
modules (blocks 4-6 and ``conv_head``) unfrozen and 4 views, as ``configs/ham10000.yaml``, on synthetic
200x150 images (the shared HAM10000 copy's size).

    python benchmarks/stage2_trunk.py            # synthetic 200x150 images
    python benchmarks/stage2_trunk.py --data ../shared/data/HAM10000   # the recipe's own data (long)
    python benchmarks/stage2_trunk.py --quick    # seconds
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
    print_table,
    quiet_libraries,
    set_threads,
    write_results,
)


def _overrides(args, data_path: Path, cached_views: int) -> list[str]:
    height, width = args.size
    return [
        f"data.path={data_path}", f"model.name={args.model}", "model.weights=none", f"model.input_size=[{height},{width}]",
        f"data.batch_size={args.batch_size}", f"data.eval_batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"data.augmentation={args.augmentation}", "data.cache_dir=null", "train.stage1_epochs=0",
        f"train.stage2_epochs={args.epochs}", f"train.unfreeze={args.unfreeze}", f"train.stage2_cached_views={cached_views}",
        f"train.precision={args.precision}", f"train.channels_last={str(args.channels_last).lower()}",
    ]


def run_stage2(args, data_path: Path, run_dir: Path, cached_views: int) -> dict:
    """One stage-2-only run; returns its caching time and maps, and per-epoch times and training images/s."""
    import lightning as L
    import torch

    import dermlab.training.run as run_module
    from dermlab.config import Config, apply_overrides

    epochs: list[dict] = []
    cuda = torch.cuda.is_available()

    class Timing(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            now = time.perf_counter()
            epochs.append({"start": now, "last_batch": now, "images": 0})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            epochs[-1]["last_batch"] = time.perf_counter()
            epochs[-1]["images"] += len(batch[1])

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # after this epoch's validation
            epochs[-1]["end"] = time.perf_counter()

    caching: list[dict] = []
    original_compute = run_module.compute_features

    def timed_compute(model, frame, *a, **k):
        started = time.perf_counter()
        maps = original_compute(model, frame, *a, **k)
        caching.append({"split": str(k.get("description", "")).rsplit(" ", 1)[-1], "images": len(frame), "views": int(k.get("views", 1)),
                        "passes": len(frame) * int(k.get("views", 1)), "seconds": round(time.perf_counter() - started, 3),
                        "bytes": maps.numel() * maps.element_size(), "shape": list(maps.shape), "dtype": str(maps.dtype)})
        return maps

    config = apply_overrides(Config(), _overrides(args, data_path, cached_views))
    run_module.compute_features = timed_compute
    try:
        with extra_trainer_callbacks(Timing()):
            started = time.perf_counter()
            run_module.train_run(config, run_dir)
            wall = time.perf_counter() - started
    finally:
        run_module.compute_features = original_compute
    timed = [e for e in epochs[args.warmup:] if e["images"]]
    train_s = sum(e["last_batch"] - e["start"] for e in timed)
    result = {
        "epoch_s_median": round(statistics.median(e["end"] - e["start"] for e in timed), 3),
        "train_images_per_s": round(sum(e["images"] for e in timed) / train_s, 2) if train_s else 0.0,
        "epochs_s": [round(e["end"] - e["start"], 3) for e in epochs],
        "train_run_wall_s": round(wall, 2),
    }
    if caching:
        passes, seconds = sum(c["passes"] for c in caching), sum(c["seconds"] for c in caching)
        maps_bytes = sum(c["bytes"] for c in caching)
        rate = passes / seconds if seconds else 0.0
        train = next((c for c in caching if c["split"] == "train"), caching[0])
        result.update({
            "caching_s": round(seconds, 3),
            "caching_passes_per_s": round(rate, 2),
            # what running the frozen trunk over the training images once (one epoch) costs at the caching speed
            "trunk_pass_per_epoch_s": round(train["images"] / rate, 2) if rate else None,
            "maps_mib": round(maps_bytes / 2**20, 2),
            "maps_mib_train": round(train["bytes"] / 2**20, 2),
            "maps_kib_per_image_view": round(maps_bytes / passes / 2**10, 2),
            "maps": caching,
        })
    return result


def trunk_share(args, num_classes: int, repeats: int) -> dict:
    """Median time of the trunk and of the whole backbone on one batch (eval mode, no gradients)."""
    import torch

    from dermlab.config import ModelConfig
    from dermlab.models.factory import create_model
    from dermlab.models.freezing import unfreeze_last_blocks
    from dermlab.models.trunk import split_frozen_trunk

    torch.manual_seed(0)
    model = create_model(ModelConfig(name=args.model, weights="none", input_size=list(args.size)), num_classes).eval()
    unfreeze_last_blocks(model, args.unfreeze)
    split = split_frozen_trunk(model)
    images = torch.randn(args.batch_size, 3, *args.size)
    if args.channels_last:  # as the trainer and the caching pass run it
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    times = {"trunk": [], "backbone": []}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round is a warm-up
            for name, forward in (("trunk", split.trunk), ("backbone", model.backbone.forward_features)):
                started = time.perf_counter()
                forward(images)
                times[name].append(time.perf_counter() - started)
    trunk, backbone = (statistics.median(times[n][1:]) for n in ("trunk", "backbone"))
    return {"trunk_ms": round(1000 * trunk, 2), "backbone_ms": round(1000 * backbone, 2), "share": round(trunk / backbone, 3),
            "cut_index": split.index, "modules": split.length}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--images", type=int, default=300, help="synthetic images (default 300; 60/20/20 split)")
    parser.add_argument("--image-size", type=int, default=150, help="synthetic image height (default 150: 200x150)")
    parser.add_argument("--size", type=int, nargs=2, default=[144, 192], metavar=("H", "W"), help="input (default 144 192)")
    parser.add_argument("--unfreeze", default="9", help="train.unfreeze, a number of modules (default 9: blocks 4-6 + conv_head)")
    parser.add_argument("--views", type=int, default=4, help="train.stage2_cached_views (default 4)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="stage-2 epochs, the first --warmup left out (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="first epochs left out of the figures (default 1)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default 1, as configs/ham10000.yaml)")
    parser.add_argument("--augmentation", default="derm", help="augmentation preset (default derm)")
    parser.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (GPU default)")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="train.channels_last (default on, as configs/ham10000.yaml and cpu-small.yaml)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.size, args.batch_size, args.epochs, args.workers = 40, 48, [32, 32], 8, 2, 0
        args.unfreeze, args.views = "2", 2
        args.model = "test_efficientnet" if args.model == "efficientnet_lite0" else args.model
    if args.epochs <= args.warmup:
        parser.error("--epochs must be larger than --warmup")

    import torch

    os.environ.setdefault("DERMLAB_PROGRESS", "0")
    quiet_libraries()
    args.threads = set_threads(args.threads, 0 if torch.cuda.is_available() else args.workers)
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    data_path, table = dataset_table(args, args.images, args.image_size)
    print(
        f"{len(table.frame)} images ({data_path}), {args.model} at {args.size[0]}x{args.size[1]}, unfreeze {args.unfreeze}, "
        f"{args.views} cached views, {args.epochs} stage-2 epochs, {args.workers} workers, torch threads {args.threads}",
        flush=True,
    )
    share = trunk_share(args, len(table.classes), repeats=2 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="dermlab-bench-") as tmp:
        results = {}
        for name, views in (("recomputed", 0), ("cached_trunk", args.views)):
            print(f"stage 2, {name.replace('_', ' ')} ...", flush=True)
            results[name] = run_stage2(args, data_path, Path(tmp) / name, views)

    recomputed, cached = results["recomputed"], results["cached_trunk"]
    saved_per_epoch = recomputed["epoch_s_median"] - cached["epoch_s_median"]
    ratios = {
        "epoch_recomputed_vs_cached": round(recomputed["epoch_s_median"] / cached["epoch_s_median"], 2),
        "train_images_per_s_cached_vs_recomputed": round(cached["train_images_per_s"] / recomputed["train_images_per_s"], 2),
        # epochs after which the one-off caching has paid for itself
        "break_even_epochs": round(cached["caching_s"] / saved_per_epoch, 2) if saved_per_epoch > 0 else None,
    }
    print_table(
        f"stage 2 ({args.epochs} epochs, the first {args.warmup} left out)",
        [
            ("recomputed every epoch", recomputed["epoch_s_median"], recomputed["train_images_per_s"], "", "", "", ""),
            (f"cached trunk, {args.views} views", cached["epoch_s_median"], cached["train_images_per_s"], cached["caching_s"],
             cached["caching_passes_per_s"], cached["trunk_pass_per_epoch_s"], f"{cached['maps_mib_train']} / {cached['maps_mib']}"),
        ],
        ["run", "epoch s (median)", "train images/s", "caching s", "caching passes/s", "trunk pass s/epoch", "maps MiB train / all"],
    )
    print_table(
        "trunk share of one forward pass (eval, one batch)",
        [(f"modules 0-{share['cut_index'] - 1} of {share['modules']}", share["trunk_ms"], share["backbone_ms"], share["share"])],
        ["trunk", "trunk ms", "backbone ms", "share"],
    )
    print_table("ratios", list(ratios.items()), ["ratio", "value"])
    print(f"\nmaps: {cached['maps_kib_per_image_view']} KiB per image and view (float16)")
    write_results(
        "stage2_trunk",
        args,
        {"runs": results, "ratios": ratios, "trunk_share": share, "images": len(table.frame), "data": str(data_path)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
