"""``dermlab predict``: class probabilities for image files and folders, written to a CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dermlab.cli._common import add_behaviour_arguments, behaviour_options

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["expand_image_paths", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict image files or folders with a run or checkpoint; writes predictions.csv",
        description="One CSV row per readable image: image_id, path, predicted, prob_<class>... Folders are "
        "searched recursively for image files; unreadable files are reported on stderr and skipped. "
        "By default the model behaves as `dermlab evaluate` scores it: the run's own TTA views, the "
        "checkpoint's temperature and its abstention rule (flags below override them). "
        "When the checkpoint holds an abstention rule, an 'uncertain' column says which images it rejects (they "
        "may not be skin lesions). A metadata-fusion model takes each image's age, sex and localization from "
        "--metadata; its 'metadata' column says per image whether they were used, partly or not at all. "
        "Exit code 0 when at least one image was predicted, 2 otherwise. "
        "A research tool, not a medical device.",
    )
    parser.add_argument("run", help="run folder or checkpoint file (with --engine onnx: a .onnx file or a run folder)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    parser.add_argument("--out", default="predictions.csv", help="output CSV (default predictions.csv)")
    parser.add_argument(
        "--metadata",
        metavar="FILE.csv",
        help="age, sex and localization (or site) per image_id (the file name without suffix), for a "
        "metadata-fusion model; empty cells or 'unknown' = missing. HAM10000's metadata CSV works as it is",
    )
    add_behaviour_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="inference engine (default torch)")
    parser.add_argument(
        "--adapt", metavar="METHOD",
        help="first adapt the model to these very images, without labels: adabn, tent or prior (see dermlab adapt, which "
        "keeps the adapted run); for this prediction only, torch engine; a metadata-fusion model adapts on its answers "
        "with --metadata when it is given",
    )
    parser.set_defaults(handler=run)


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given (any suffix, so unreadable ones get reported); folders -> their image files, recursively."""
    from dermlab.data.images import IMAGE_EXTENSIONS

    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            paths.extend(sorted(found, key=lambda p: str(p.relative_to(path))))
        else:
            paths.append(path)  # missing files are reported by the reader
    return list(dict.fromkeys(paths))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dermlab.errors import ConfigError, DataError
    from dermlab.io import atomic_save
    from dermlab.serving.predictor import Predictor

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    paths = expand_image_paths(args.inputs)
    if not paths:
        print("error: no image files found in " + ", ".join(map(str, args.inputs)), file=sys.stderr)
        return 2
    records = None  # --metadata, once read
    if args.adapt:
        predictor, records = _adapted_predictor(args, paths)
    else:
        predictor = Predictor.from_path(args.run, engine=args.engine, batch_size=args.batch_size, **behaviour_options(args))
    metadata = _read_metadata(args, predictor, records)
    print(predictor.behaviour.describe(), file=sys.stderr)

    console = Console(stderr=True)
    results = []
    skipped = 0
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("predict", total=len(paths))

        def report(path: Path, error: DataError) -> None:
            nonlocal skipped
            skipped += 1
            progress.console.print(f"skipped {error}", markup=False, highlight=False, soft_wrap=True)
            progress.advance(task)

        for result in predictor.predict_paths(paths, batch_size=args.batch_size, on_error=report, metadata=metadata):
            results.append(result)
            progress.advance(task)

    if not results:
        print(f"error: none of the {len(paths)} files could be read as an image", file=sys.stderr)
        return 2
    import numpy as np

    table = _predictions_table(
        results, predictor.classes, abstention=predictor.abstention is not None, metadata=predictor.takes_metadata,
        rule=predictor.decision_rule, by_rule=predictor.classes_by_rule(np.stack([r.probabilities for r in results])),
    )
    out = Path(args.out)
    atomic_save(out, lambda tmp: table.to_csv(tmp, index=False))
    note = f", {skipped} skipped" if skipped else ""
    count = f"{len(results)} image{'' if len(results) == 1 else 's'}"
    if predictor.abstention is not None:
        note += f", {int(table['uncertain'].sum())} uncertain"
    if predictor.takes_metadata:
        note += "; metadata " + _metadata_counts(table["metadata"], args.metadata)
    rules = " (predicted_argmax and predicted_balanced give both rules)" if "predicted_balanced" in table else ""
    print(f"wrote {out} ({count}{note}; model {predictor.model_id}, {predictor.engine}; column predicted: {predictor.decision_rule} rule{rules})")
    _print_familiarity(predictor, results)
    return 0


def _print_familiarity(predictor: Any, results: list) -> None:
    """The dataset-level verdicts of the predicted images (2+ images): the shift of their pooled features and
    how many look unlike the training images at the feature levels, for a model with those statistics."""
    import numpy as np

    levels = getattr(predictor, "level_statistics", None)
    if predictor.statistics is None and levels is None:
        print("note: this model has no feature statistics (an ensemble, an adabn/tent adaptation, a run trained before "
              "they existed or without a train and val split): no check of how familiar these images are", file=sys.stderr)
        return
    if len(results) < 2:
        return
    if predictor.statistics is not None:
        print(predictor.statistics.shift(np.stack([result.features for result in results])).describe(), file=sys.stderr)
    if levels is not None:
        print(levels.verdict_of_scores(np.asarray([result.level_score for result in results])).describe(), file=sys.stderr)


def _read_metadata(args: argparse.Namespace, predictor: Any, records: Any = None) -> Any:
    """``--metadata FILE.csv`` read (unless ``records`` holds it already) and checked (only a fusion model takes it);
    a note when a fusion model has none."""
    if args.metadata:
        from dermlab.data.metadata import read_metadata_csv

        predictor.refuse_metadata_unless_fused(True)
        return records if records is not None else read_metadata_csv(args.metadata)
    if predictor.takes_metadata:
        from dermlab.models.classifier import unknown_metadata_caveat

        loaded = getattr(predictor, "loaded", None)  # the ONNX engine has no torch model to ask
        caveat = unknown_metadata_caveat(loaded.model) if loaded is not None else ""
        print(
            f"note: {predictor.model_id} fuses age, sex and localization with the image; without --metadata FILE.csv "
            f"every image is predicted with all three unknown (column metadata = missing){caveat}",
            file=sys.stderr,
        )
    return None


def _adapted_predictor(args: argparse.Namespace, paths: list[Path]) -> tuple[Any, Any]:
    """``--adapt``: the run's model adapted (AdaBN, TENT or prior) on the images to predict, held in memory only;
    and the ``--metadata`` records it adapted with (None without), so they are read once."""
    from dermlab.errors import ConfigError
    from dermlab.models.checkpoint import load_checkpoint
    from dermlab.serving.predictor import Predictor
    from dermlab.training.adapt import ADAPTATION_METHODS, adapt_model, class_mix_line, metadata_rows

    if args.engine != "torch":
        raise ConfigError("--adapt changes the torch network's BatchNorm layers; it does not work with --engine onnx")
    if args.adapt not in ADAPTATION_METHODS:
        raise ConfigError(f"--adapt {args.adapt!r}: valid methods are {', '.join(ADAPTATION_METHODS.list())}")
    if len(paths) < 2:
        raise ConfigError("--adapt needs at least 2 images (BatchNorm statistics of one image are not statistics)")
    loaded = load_checkpoint(args.run)
    records = None
    if args.metadata:  # adapt on the answers the model will give: with the metadata it is given
        from dermlab.data.metadata import read_metadata_csv

        records = read_metadata_csv(args.metadata)
    metadata = metadata_rows(paths, records) if records is not None else None
    details = adapt_model(loaded, paths, args.adapt, batch_size=max(2, args.batch_size), metadata=metadata)
    print(f"adapted with {args.adapt} on the {details['images_seen']} images given, for this prediction only", file=sys.stderr)
    if mix := class_mix_line(loaded.classes, details):
        print(mix, file=sys.stderr)
    return Predictor(loaded, batch_size=args.batch_size, **behaviour_options(args)), records


def _metadata_counts(statuses: pd.Series, source: str | None) -> str:
    """E.g. ``used for 3, partial for 1, missing for 2 (no row in meta.csv or all unknown)``."""
    counts = statuses.value_counts()
    parts = [f"{status} for {int(counts[status])}" for status in ("used", "partial", "missing") if status in counts]
    missing = " (no row in " + source + " or all unknown)" if source and "missing" in counts else ""
    return ", ".join(parts) + missing


def _predictions_table(
    results: list,
    classes: list[str],
    abstention: bool = False,
    metadata: bool = False,
    rule: str = "argmax",
    by_rule: dict[str, list[str]] | None = None,
) -> pd.DataFrame:
    """``image_id, path, predicted, prob_<class>...``: the columns of ``evaluation.predictions_frame`` less ``true``.

    ``predicted`` is the choice of ``rule``; with ``by_rule`` holding two rules (a run with a fitted logit
    adjustment), ``predicted_argmax`` and ``predicted_balanced`` give both.

    With ``abstention``, an ``uncertain`` column follows (True where the checkpoint's rule abstains); with
    feature statistics in the checkpoint, ``feature_distance`` (to the training images; typical about 1); with
    level statistics, ``level_score`` (how unlike the training images' look, about 0 at home). With
    ``metadata`` (a fusion model), ``metadata`` (``used``, ``partial`` or ``missing``) and ``metadata_missing``
    (the unknown fields, ``;``-separated) say what the model was given for each image.

    Built here rather than with ``predictions_frame``, whose module imports the training stack (Lightning)
    and would add seconds to every ``dermlab predict``.
    """
    import numpy as np
    import pandas as pd

    probabilities = np.stack([result.probabilities for result in results])
    by_rule = by_rule or {"argmax": [classes[i] for i in probabilities.argmax(axis=1)]}
    table = pd.DataFrame(
        {
            "image_id": [result.path.stem for result in results],
            "path": [str(result.path) for result in results],
            "predicted": by_rule[rule],
        }
    )
    if len(by_rule) > 1:
        for name, picked in by_rule.items():
            table[f"predicted_{name}"] = picked
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = probabilities[:, index]
    if abstention:
        table["uncertain"] = [bool(result.uncertain) for result in results]
    if all(result.feature_distance is not None for result in results):
        table["feature_distance"] = [result.feature_distance for result in results]
    if all(result.level_score is not None for result in results):
        table["level_score"] = [result.level_score for result in results]
    if metadata:
        from dermlab.data.metadata import PatientMetadata

        given = [result.metadata or PatientMetadata() for result in results]
        table["metadata"] = [record.status for record in given]
        table["metadata_missing"] = [";".join(record.missing) for record in given]
    return table
