"""``dermlab evaluate``: score a run or checkpoint on a split of its data, or on another dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from dermlab.cli._common import print_metrics_table

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a run or checkpoint: metrics.json, predictions.csv and plots",
        description="Accuracy, balanced accuracy (ISIC metric), macro/weighted precision, recall and F1, "
        "per-class report, one-vs-rest AUC, sensitivity at fixed specificity for a target class, and ECE.",
    )
    parser.add_argument("run", help="run folder or checkpoint file")
    parser.add_argument("--data", help="evaluate on this dataset instead of the run's own (same classes, any layout)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train", "all"], help="which split (default test)")
    parser.add_argument("--out", help="output folder (default RUN/eval/<split>, or RUN/eval/<data name>)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dermlab.data.datasets import load_dataset
    from dermlab.errors import DataError
    from dermlab.evaluation.evaluate import evaluate_frame
    from dermlab.models.checkpoint import load_checkpoint, resolve_checkpoint_path
    from dermlab.training.run import prepare_run_data

    loaded = load_checkpoint(args.run)
    checkpoint = resolve_checkpoint_path(args.run)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    if args.data:
        from dataclasses import replace

        table = load_dataset(args.data, replace(loaded.config.data, path=args.data, classes=loaded.classes))
        frame = table.frame.assign(split=table.frame["fixed_split"].replace("", "all"))
        missing = sorted(set(frame["label"]) - set(loaded.classes))
        if missing:
            raise DataError(f"{args.data}: classes {missing} are unknown to the model ({loaded.classes})")
        default_out = run_dir / "eval" / f"{Path(args.data).name}-{args.split}"
    else:
        if not (run_dir / "splits.csv").is_file():
            raise DataError(f"{run_dir}: no splits.csv; pass --data DATA to evaluate on a dataset")
        frame = prepare_run_data(loaded.config, run_dir).frame
        default_out = run_dir / "eval" / args.split
    rows = frame if args.split == "all" else frame[frame["split"] == args.split]
    if args.data and args.split != "all" and len(rows) == 0:
        rows = frame  # a plain folder has no splits: use all of it
    out = Path(args.out) if args.out else default_out
    metrics = evaluate_frame(loaded, rows.reset_index(drop=True), out, loaded.config.evaluation, batch_size=args.batch_size)
    print_metrics_table({args.split: metrics}, splits=(args.split,), title=f"{loaded.path}")
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.csv'}")
    return 0
