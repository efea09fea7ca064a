"""``dermlab predict``: class probabilities for image files and folders, written to a CSV."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["register", "run", "expand_image_paths"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="predict image files or folders with a run or checkpoint; writes predictions.csv",
        description="One CSV row per readable image: image_id, path, predicted, prob_<class>... Folders are "
        "searched recursively for image files; unreadable files are reported on stderr and skipped. "
        "When the checkpoint holds an abstention rule, an 'uncertain' column says which images it rejects (they "
        "may not be skin lesions). Exit code 0 when at least one image was predicted, 2 otherwise. "
        "A research tool, not a medical device.",
    )
    parser.add_argument("run", help="run folder or checkpoint file (with --engine onnx: a .onnx file or a run folder)")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders")
    parser.add_argument("--out", default="predictions.csv", help="output CSV (default predictions.csv)")
    parser.add_argument("--tta", action="store_true", help="average over horizontal and vertical flips")
    parser.add_argument(
        "--tta-views",
        metavar="A,B",
        help="test-time augmentation views or presets, comma-separated (implies --tta), e.g. identity,hflip,rot180",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="inference engine (default torch)")
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
    tta = args.tta_views if args.tta_views else args.tta
    predictor = Predictor.from_path(args.run, engine=args.engine, tta=tta, batch_size=args.batch_size)

    console = Console(stderr=True)
    results = []
    skipped = 0
    columns = (TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("predict", total=len(paths))

        def report(path: Path, error: DataError) -> None:
            nonlocal skipped
            skipped += 1
            progress.console.print(f"skipped {error}", markup=False, highlight=False, soft_wrap=True)
            progress.advance(task)

        for result in predictor.predict_paths(paths, batch_size=args.batch_size, on_error=report):
            results.append(result)
            progress.advance(task)

    if not results:
        print(f"error: none of the {len(paths)} files could be read as an image", file=sys.stderr)
        return 2
    table = _predictions_table(results, predictor.classes, abstention=predictor.abstention is not None)
    out = Path(args.out)
    atomic_save(out, lambda tmp: table.to_csv(tmp, index=False))
    note = f", {skipped} skipped" if skipped else ""
    count = f"{len(results)} image{'' if len(results) == 1 else 's'}"
    if predictor.abstention is not None:
        note += f", {int(table['uncertain'].sum())} uncertain"
    print(f"wrote {out} ({count}{note}; model {predictor.model_id}, {predictor.engine})")
    return 0


def _predictions_table(results: list, classes: list[str], abstention: bool = False) -> pd.DataFrame:
    """``image_id, path, predicted, prob_<class>...``: the columns of ``evaluation.predictions_frame`` less ``true``.

    With ``abstention``, an ``uncertain`` column follows (True where the checkpoint's rule abstains).

    Built here rather than with ``predictions_frame``, whose module imports the training stack (Lightning)
    and would add seconds to every ``dermlab predict``.
    """
    import numpy as np
    import pandas as pd

    probabilities = np.stack([result.probabilities for result in results])
    table = pd.DataFrame(
        {
            "image_id": [result.path.stem for result in results],
            "path": [str(result.path) for result in results],
            "predicted": [classes[i] for i in probabilities.argmax(axis=1)],
        }
    )
    for index, name in enumerate(classes):
        table[f"prob_{name}"] = probabilities[:, index]
    if abstention:
        table["uncertain"] = [bool(result.uncertain) for result in results]
    return table
