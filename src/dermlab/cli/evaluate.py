"""``dermlab evaluate``: score a run or checkpoint on a split of its data, or on another dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from dermlab.cli._common import add_behaviour_arguments, behaviour_options, print_metrics_table
from dermlab.data.splits import split_rows

if TYPE_CHECKING:
    import pandas as pd

    from dermlab.models.checkpoint import LoadedModel

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
    parser.add_argument(
        "--shift",
        action="store_true",
        help="instead: the shift report, the metrics under seeded camera / clinic corruptions next to the clean "
        "ones (default out RUN/eval/shift)",
    )
    parser.add_argument(
        "--corruptions",
        metavar="A,B",
        help="comma-separated corruptions for --shift (implies it); default: all seven (colour cast, gamma, "
        "JPEG 30, blur, 4:3 squashed to 1:1, downscale to 100 px, vignette); a wrong name lists the valid ones",
    )
    parser.add_argument("--shift-seed", type=int, default=0, help="seed of the corruptions (default 0)")
    parser.add_argument(
        "--external", metavar="DIR", action="append", default=[],
        help="for --shift (implies it): one more row scoring the labelled images of DIR (another clinic; its "
        "classes may be a subset of the run's, e.g. mel/ and nv/), uncorrupted: the real shift beside the "
        "imitated ones; repeatable",
    )
    parser.add_argument(
        "--weights",
        choices=["averaged", "raw"],
        default="averaged",
        help="a run trained with train.ema: its averaged weights (default; what predict, serve and export use) "
        "or the raw weights of the same step (an ablation)",
    )
    add_behaviour_arguments(parser)  # the same flags and defaults as predict and serve
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dermlab.data.datasets import load_dataset
    from dermlab.data.run_data import prepare_run_data
    from dermlab.errors import DataError
    from dermlab.evaluation.evaluate import evaluate_frame
    from dermlab.models.checkpoint import load_checkpoint, resolve_checkpoint_path, run_folder_of

    loaded = load_checkpoint(args.run, raw_weights=args.weights == "raw")
    checkpoint = resolve_checkpoint_path(args.run)
    run_dir = run_folder_of(checkpoint)
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
    rows = split_rows(frame, args.split, whole_if_unsplit=bool(args.data))  # a plain folder has no splits: all of it
    training_copies = _warn_training_copies(args, loaded, run_dir, rows) if args.data else None
    if args.shift or args.corruptions or args.external:
        shift_out = run_dir / "eval" / "shift" if not args.data and args.split == "test" else Path(f"{default_out}-shift")
        _save_training_copies(training_copies, Path(args.out) if args.out else shift_out)
        return _run_shift(args, loaded, rows.reset_index(drop=True), Path(args.out) if args.out else shift_out)
    out = Path(args.out) if args.out else default_out
    _save_training_copies(training_copies, out)
    _note_missing_metadata(loaded, rows)
    metrics = evaluate_frame(
        loaded, rows.reset_index(drop=True), out, loaded.config.evaluation, batch_size=args.batch_size,
        **behaviour_options(args),
    )
    print_metrics_table({args.split: metrics}, splits=(args.split,), title=f"{loaded.path}")
    adapted = loaded.extras.get("adaptation")
    if isinstance(adapted, dict):
        print(f"this model was adapted with {adapted.get('method')} on {adapted.get('images')} unlabelled images "
              f"({', '.join(adapted.get('inputs') or [])}): scoring it on those same images measures the adapted model there")
    calibration, abstention = metrics.get("calibration") or {}, metrics.get("abstention")
    print(
        f"TTA views: {', '.join(metrics.get('tta') or ['identity'])}; temperature {calibration.get('temperature', 1.0):.4g}: "
        f"ECE {calibration.get('ece_before', float('nan')):.4f} -> {calibration.get('ece_after', float('nan')):.4f}"
        + (f"; uncertain: {100 * abstention['rejected']:.1f}% of the images" if abstention else "")
    )
    if metrics.get("present_classes"):
        print(present_classes_line(metrics["present_classes"]))
    if metrics.get("at_fitted_thresholds"):
        print(fitted_thresholds_line(metrics["at_fitted_thresholds"]))
    if metrics.get("familiarity"):
        from dermlab.evaluation.familiarity import ShiftVerdict

        print(ShiftVerdict(**metrics["familiarity"]).describe())
    if metrics.get("level_familiarity"):
        from dermlab.evaluation.level_statistics import LevelVerdict

        print(LevelVerdict(**metrics["level_familiarity"]).describe())
    print(f"wrote {out / 'metrics.json'} and {out / 'predictions.csv'}")
    return 0


def fitted_thresholds_line(scored: dict) -> str:
    """One line on the target's operating points fitted on val, as these images meet them."""

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    fitted_on = scored["fitted_on"]
    points = "; ".join(
        f"{name} ({fitted_on} threshold {point['threshold']:.4g}): sensitivity {share(point['sensitivity'])}, "
        f"specificity {share(point['specificity'])} (on {fitted_on} {point[f'{fitted_on}_sensitivity']:.3f} / "
        f"{point[f'{fitted_on}_specificity']:.3f})" for name, point in scored["points"].items()
    )
    return (f"{scored['class']} at the operating points fitted on {fitted_on}, on these {scored['positives']} "
            f"{scored['class']} and {scored['negatives']} other images: {points}")


def present_classes_line(present: dict) -> str:
    """One paragraph on data holding some of the model's classes: both softmax views (see evaluation.present_classes)."""
    restricted, full = present["restricted_softmax"], present["full_softmax"]
    intervals = restricted.get("intervals") or {}

    def with_interval(key: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        interval = intervals.get(key)
        return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    names = present["classes"]
    # with two classes each one's AUC against the other is the same number, the macro AUC
    auc_name = f"AUC {names[0]} vs {names[1]}" if len(names) == 2 else "macro AUC"
    recalls = ", ".join(f"{name} {value:.3f}" for name, value in full["recall"].items())
    return (
        f"classes present: {', '.join(names)} ({len(names)} of the model's {len(present['of'])}). "
        f"Recall over all {len(present['of'])} classes: {recalls}. Softmax restricted to the classes present: "
        f"accuracy {with_interval('accuracy', restricted['accuracy'])}, balanced accuracy "
        f"{with_interval('balanced_accuracy', restricted['balanced_accuracy'])}, {auc_name} {with_interval('auc_macro', restricted['auc_macro'])}"
    )


def _note_missing_metadata(loaded: LoadedModel, rows: pd.DataFrame) -> None:
    """Say so when a metadata-fusion model is scored on images without age, sex and localization."""
    from dermlab.data.metadata import METADATA_COLUMNS
    from dermlab.models.classifier import unknown_metadata_caveat, uses_metadata

    if uses_metadata(loaded.model) and not any(column in rows for column in METADATA_COLUMNS):
        print(
            f"note: {loaded.model_id} fuses age, sex and localization with the image; this dataset has none of them, "
            f"so every image is scored with all three unknown{unknown_metadata_caveat(loaded.model)}"
        )


def _warn_training_copies(args: argparse.Namespace, loaded: LoadedModel, run_dir: Path, rows: pd.DataFrame) -> pd.DataFrame | None:
    """Warn, with a count, when images of ``--data`` are copies of the run's training images (their scores
    would be inflated); returns the copies (``None`` when the run has no splits.csv to compare with)."""
    import sys

    from dermlab.data.duplicates import copies_of_run_training

    copies = copies_of_run_training(rows, run_dir, loaded.config.data, workers=2)
    if copies is not None and len(copies):
        exact = int(copies["exact"].sum())
        print(
            f"warning: {len(copies)} of {len(rows)} images of {args.data} are copies of the run's training images "
            f"({exact} pixel-identical, {len(copies) - exact} near copies): their scores are inflated; "
            "listed in copies_of_training.csv beside the metrics",
            file=sys.stderr,
        )
    return copies


def _save_training_copies(copies: pd.DataFrame | None, out: Path) -> None:
    if copies is not None and len(copies):
        from dermlab.io import atomic_write_text

        atomic_write_text(out / "copies_of_training.csv", copies.to_csv(index=False, lineterminator="\n"))


def _external_rows(folders: list[str], loaded: LoadedModel) -> dict[str, pd.DataFrame]:
    """Each ``--external`` folder's labelled rows (read with the run's data settings and classes), by name."""
    from dataclasses import replace

    from dermlab.data.datasets import load_dataset

    out = {}
    for folder in folders:
        table = load_dataset(folder, replace(loaded.config.data, path=folder, classes=loaded.classes))
        out[Path(folder).name or folder] = table.frame
    return out


def _run_shift(args: argparse.Namespace, loaded: LoadedModel, rows: pd.DataFrame, out: Path) -> int:
    """The shift report of ``rows``: printed as a table, written as ``shift.json`` and ``shift.md`` in ``out``."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from dermlab.evaluation.shift import shift_report, shift_table, write_shift_report

    labels = {"balanced_accuracy": "bal. accuracy", "auc_macro": "macro AUC", "mel_vs_nv_auc": "mel vs nv AUC"}

    names = [name.strip() for name in args.corruptions.split(",") if name.strip()] if args.corruptions else None
    report = shift_report(loaded, rows, corruptions=names, seed=args.shift_seed, batch_size=args.batch_size,
                          external=_external_rows(args.external, loaded))
    json_path, markdown_path = write_shift_report(report, out)
    header, cells = shift_table(report)
    table = Table(
        title=f"{loaded.path}: {args.split}, {len(rows)} images, corruption seed {args.shift_seed}",
        box=box.SIMPLE_HEAD,  # fits 80 columns with the changes from clean in brackets
        pad_edge=False,
        collapse_padding=True,
    )
    for index, name in enumerate(header):
        table.add_column(labels.get(name, name), justify="left" if index == 0 else "right", no_wrap=True)
    for row in cells:
        table.add_row(*row)
    Console().print(table)
    print(f"wrote {json_path} and {markdown_path}")
    return 0
