"""Training throughput (images/s): ``dermlab train`` against a plain PyTorch + timm loop and the model alone.

All of them train the same network (random init) on the same training images at the same resolution and
batch size, with AdamW, cross-entropy and the same augmentation (the identical torchvision transform, so the
per-image work is equal and only the loop around it differs):

- ``model alone``: the training step on one batch held in memory, no data loading at all (the ceiling);
- ``plain PyTorch + timm``: a textbook loop (Dataset -> DataLoader -> forward/backward/step);
- ``dermlab train``: :func:`dermlab.training.run.train_run` (the engine of ``dermlab train``), stage 2 only
  (whole network trained), with its keyed sampler, Lightning loop, logging, metrics and checkpoints;
- ``dermlab train + image cache``: the same with ``data.cache_dir`` set (decoded-image cache built first).

Every loop runs in this process with the same torch thread count (``--threads``; default the usable cores
minus the DataLoader workers, so workers and the model do not fight over cores; on a GPU all of them).
Images/s count training batches only: the first warm-up batches and the validation between epochs are left
out of every loop alike. Ratios: dermlab / plain (goal >= 0.95) and dermlab / model alone (goal >= 0.9).

    python benchmarks/train_throughput.py            # about 4 minutes on 2 busy CPU cores
    python benchmarks/train_throughput.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import gc
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


class _Meter:
    """Training-batch timestamps per epoch; the figures leave out the first ``warmup`` epochs.

    A whole warm-up epoch, not a few batches: the first batch of each new shape (the last, smaller batch of an
    epoch included) pays for oneDNN / cuDNN kernel selection, which would otherwise land in the figures.
    Besides wall-clock images/s it records two figures that a busy machine disturbs less: the share of the
    loop's time spent waiting for the next batch (``data_wait_share``), and the training process's own CPU
    time per image (``cpu_ms_per_image``, all its threads, DataLoader workers not included).
    """

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup = warmup
        self.cuda = cuda
        self.epochs: list[dict] = []

    def epoch_start(self) -> None:
        now = time.perf_counter()
        self.epochs.append({"start": now, "cpu_start": time.process_time(), "last": now, "wait": 0.0, "batches": []})

    def batch_start(self) -> None:
        epoch = self.epochs[-1]
        epoch["wait"] += time.perf_counter() - epoch["last"]

    def batch_end(self, size: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        epoch = self.epochs[-1]
        epoch["last"] = time.perf_counter()
        epoch["batches"].append((epoch["last"], time.process_time(), size))

    def result(self) -> dict[str, float]:
        seconds = wait = cpu = 0.0
        images = 0
        for epoch in self.epochs[self.warmup :]:
            if epoch["batches"]:  # from the epoch's start (waiting for the first batch counts) to its last batch
                images += sum(size for _, _, size in epoch["batches"])
                seconds += epoch["batches"][-1][0] - epoch["start"]
                cpu += epoch["batches"][-1][1] - epoch["cpu_start"]
                wait += epoch["wait"]
        return {
            "images": images,
            "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 2) if seconds else 0.0,
            "data_wait_share": round(wait / seconds, 4) if seconds else 0.0,
            "cpu_ms_per_image": round(1000 * cpu / images, 2) if images else 0.0,
        }


def _training_step(model, optimizer, images, labels, autocast):
    import torch

    with autocast():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _plain_model(args, num_classes: int, device):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes, drop_rate=0.2).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    return model.train(), optimizer


def _autocast(args, device):
    import contextlib

    import torch

    if args.precision.startswith("bf16"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if args.precision.startswith("16"):
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext


def run_model_alone(args, num_classes: int, steps_per_epoch: int) -> dict[str, float]:
    """The training step on one in-memory batch: the most the rest of the pipeline could ever reach."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = _plain_model(args, num_classes, device)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (args.batch_size,), device=device)
    meter = _Meter(args.warmup, device.type == "cuda")
    for _ in range(args.epochs):
        meter.epoch_start()
        for _ in range(steps_per_epoch):
            meter.batch_start()
            _training_step(model, optimizer, images, labels, _autocast(args, device))
            meter.batch_end(args.batch_size)
    return meter.result()


class _PlainDataset:
    def __init__(self, paths, labels, transform) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


def run_plain_loop(args, train_frame, classes, transform) -> dict[str, float]:
    """A textbook PyTorch + timm training loop over the same images and transform."""
    import torch
    from torch.utils.data import DataLoader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer = _plain_model(args, len(classes), device)
    labels = [classes.index(label) for label in train_frame["label"]]
    dataset = _PlainDataset(train_frame["path"].tolist(), labels, transform)
    loader = DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
    )
    meter = _Meter(args.warmup, device.type == "cuda")
    autocast = _autocast(args, device)
    for _ in range(args.epochs):
        meter.epoch_start()
        for images, targets in loader:
            meter.batch_start()
            images = images.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            _training_step(model, optimizer, images, targets.to(device, non_blocking=True), autocast)
            meter.batch_end(len(targets))
    del loader
    return meter.result()


def run_dermlab(args, data_path: Path, run_dir: Path, cache_dir: Path | None) -> dict[str, float]:
    """``train_run`` (stage 2 only, every layer trained) with a timing callback slipped into its trainer."""
    import lightning as L
    import torch

    from dermlab.config import Config, apply_overrides
    from dermlab.training.run import train_run

    meter = _Meter(args.warmup, torch.cuda.is_available())

    class Timing(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            meter.epoch_start()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            meter.batch_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            meter.batch_end(len(batch[1]))

    overrides = [
        f"data.path={data_path}", f"model.name={args.model}", "model.weights=none", f"model.input_size=[{args.size},{args.size}]",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", "data.split_ratios=[0.8,0.1,0.1]",
        f"data.augmentation={args.augmentation}", "train.stage1_epochs=0", f"train.stage2_epochs={args.epochs}",
        "train.stage2_lr=0.0001", "train.unfreeze=all", f"train.precision={args.precision}",
        f"train.channels_last={str(args.channels_last).lower()}",
    ]
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={cache_dir}")
    config = apply_overrides(Config(), overrides)
    with extra_trainer_callbacks(Timing()):
        started = time.perf_counter()
        train_run(config, run_dir)
        wall = time.perf_counter() - started
    return {**meter.result(), "train_run_wall_s": round(wall, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--images", type=int, default=160, help="synthetic images (default 160; 80%% train)")
    parser.add_argument(
        "--image-size", type=int, default=450, help="synthetic image height (default 450: 600x450, HAM10000's own)"
    )
    parser.add_argument("--size", type=int, default=128, help="training resolution (default 128)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loop, the first one a warm-up (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="first epochs left out of the rate (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--augmentation", default="derm", help="augmentation preset (default derm)")
    parser.add_argument("--precision", default=None, help="32-true (CPU default) or bf16-mixed (GPU default)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format everywhere")
    parser.add_argument("--repeats", type=int, default=1, help="measure every loop this many times; medians reported")
    args = parser.parse_args(argv)
    if args.quick:  # a smoke test of every code path: timm's tiny test network, a few batches
        args.images, args.image_size, args.size, args.batch_size = 40, 48, 32, 8
        args.epochs, args.warmup, args.workers = 2, 1, 1
        args.model = "test_efficientnet" if args.model == "efficientnet_lite0" else args.model
    if args.epochs <= args.warmup:
        parser.error("--epochs must be larger than --warmup")

    import torch

    os.environ.setdefault("DERMLAB_PROGRESS", "0")
    quiet_libraries()
    args.threads = set_threads(args.threads, 0 if torch.cuda.is_available() else args.workers)
    if args.precision is None:
        args.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    from dermlab.config import ModelConfig
    from dermlab.data.splits import create_splits
    from dermlab.data.transforms import create_transform
    from dermlab.models.factory import create_model, resolve_preprocessing

    data_path, table = dataset_table(args, args.images, args.image_size)
    splits = create_splits(table, ratios=(0.8, 0.1, 0.1), seed=42)  # what train_run makes with these settings
    train_frame = table.frame[splits.reindex(table.frame.index).to_numpy() == "train"].reset_index(drop=True)
    model_config = ModelConfig(name=args.model, weights="none", input_size=[args.size, args.size])
    preprocessing = resolve_preprocessing(create_model(model_config, len(table.classes)), model_config)
    transform = create_transform(args.augmentation, preprocessing, train=True)
    steps_per_epoch = len(train_frame) // args.batch_size or 1
    print(
        f"{len(train_frame)} training images ({data_path}), {args.model} at {args.size}px, batch {args.batch_size}, "
        f"{args.epochs} epochs, {args.workers} workers, {args.precision}, torch threads {torch.get_num_threads()}",
        flush=True,
    )

    runs: dict[str, list[dict]] = {"model_alone": [], "plain": [], "dermlab": [], "dermlab_cache": []}
    cache_build_s = None
    with tempfile.TemporaryDirectory(prefix="dermlab-bench-") as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            print(f"[{repeat + 1}/{args.repeats}] model alone ...", flush=True)
            runs["model_alone"].append(run_model_alone(args, len(table.classes), steps_per_epoch))
            gc.collect()
            print(f"[{repeat + 1}/{args.repeats}] plain PyTorch + timm ...", flush=True)
            runs["plain"].append(run_plain_loop(args, train_frame, table.classes, transform))
            gc.collect()
            print(f"[{repeat + 1}/{args.repeats}] dermlab train ...", flush=True)
            runs["dermlab"].append(run_dermlab(args, data_path, tmp / f"run-{repeat}", None))
            gc.collect()
            if cache_build_s is None:  # build the image cache once, outside the timed loops
                from dermlab.data.cache import build_image_cache

                started = time.perf_counter()
                build_image_cache(table.frame["path"], tmp / "cache", preprocessing.input_size, workers=args.workers, progress=False)
                cache_build_s = round(time.perf_counter() - started, 2)
            print(f"[{repeat + 1}/{args.repeats}] dermlab train + image cache ...", flush=True)
            runs["dermlab_cache"].append(run_dermlab(args, data_path, tmp / f"run-cache-{repeat}", tmp / "cache"))
            gc.collect()

    rate = {name: statistics.median(r["images_per_s"] for r in results) for name, results in runs.items()}
    cpu = {name: statistics.median(r["cpu_ms_per_image"] for r in results) for name, results in runs.items()}
    wait = {name: statistics.median(r["data_wait_share"] for r in results) for name, results in runs.items()}
    ratios = {
        "dermlab_vs_plain": goal(rate["dermlab"] / rate["plain"], 0.95),
        "dermlab_vs_model_alone": goal(rate["dermlab"] / rate["model_alone"], 0.9),
        "dermlab_cache_vs_plain": goal(rate["dermlab_cache"] / rate["plain"], 0.95),
        "dermlab_cache_vs_model_alone": goal(rate["dermlab_cache"] / rate["model_alone"], 0.9),
        "plain_vs_model_alone": round(rate["plain"] / rate["model_alone"], 3),
        # the same comparisons in the training process's CPU time per image (less sensitive to other load)
        "cpu_dermlab_vs_plain": round(cpu["plain"] / cpu["dermlab"], 3),
        "cpu_dermlab_vs_model_alone": round(cpu["model_alone"] / cpu["dermlab"], 3),
        "cpu_dermlab_cache_vs_model_alone": round(cpu["model_alone"] / cpu["dermlab_cache"], 3),
    }
    labels = {
        "model_alone": "model alone (in-memory batch)",
        "plain": "plain PyTorch + timm loop",
        "dermlab": "dermlab train",
        "dermlab_cache": "dermlab train + image cache",
    }
    print_table(
        "training throughput",
        [
            (labels[name], rate[name], ", ".join(f"{r['images_per_s']:.1f}" for r in runs[name]), f"{100 * wait[name]:.1f}%", cpu[name])
            for name in runs
        ],
        ["loop", "images/s (median)", "each repeat", "waiting for data", "CPU ms/image (trainer process)"],
    )
    print_table("ratios", [(name, value) for name, value in ratios.items()], ["ratio", "value"])
    if cache_build_s is not None:
        print(f"\nimage cache built once in {cache_build_s} s for {len(table.frame)} images (not in the figures)")
    write_results(
        "train_throughput",
        args,
        {"images_per_s": rate, "cpu_ms_per_image": cpu, "data_wait_share": wait, "runs": runs, "ratios": ratios, "cache_build_s": cache_build_s,
         "train_images": len(train_frame), "data": str(data_path)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
