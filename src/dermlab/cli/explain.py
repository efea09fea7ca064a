"""``dermlab explain``: Grad-CAM galleries of a run, one-image overlays, CAM agreement with lesion masks."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]

# Listed here rather than read from CAM_METHODS so that `dermlab --help` does not import grad-cam; an unknown
# name is still rejected by the registry, with the valid names.
_METHOD_NAMES = "gradcam, gradcam++, hirescam, scorecam, eigencam, layercam"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Grad-CAM galleries of a run, an overlay for one image, or CAM agreement with lesion masks",
        description="Three modes. (1) dermlab explain RUN: per-class galleries of correct and wrong test "
        "predictions with their class activation maps, written to RUN/gallery and embedded in "
        "RUN/report.html. "
        "(2) dermlab explain IMAGE --run RUN: one image and its CAM side by side in a PNG. "
        "(3) dermlab explain RUN --masks DATA: share of CAM energy inside the lesion masks of DATA and the "
        "pointing-game hit rate, for the trained model and the same network untrained, against the chance "
        "level (the masks' area share); writes RUN/explain/mask_agreement.json. "
        "A research tool, not a medical device.",
    )
    parser.add_argument("path", help="run folder or checkpoint file; or an image file (with --run)")
    parser.add_argument("--run", help="image mode: the run folder or checkpoint that explains the image")
    parser.add_argument("--method", default="gradcam", help=f"CAM method: {_METHOD_NAMES} (default gradcam)")
    parser.add_argument("--out", help="gallery folder (default RUN/gallery); image mode: the PNG (default "
                        "<image>_<method>.png); masks mode: the JSON "
                        "(default RUN/explain/mask_agreement.json)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per CAM batch (default 16)")
    gallery = parser.add_argument_group("gallery mode")
    gallery.add_argument("--data", help="pick examples from this dataset instead of the run's own split")
    gallery.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                         help="which split's predictions (default test)")
    gallery.add_argument("--per-class", type=int, default=4, metavar="N",
                         help="correct and wrong examples per true class, N of each (default 4)")
    image = parser.add_argument_group("image mode")
    image.add_argument("--target", metavar="CLASS", help="explain this class instead of the predicted one")
    masks = parser.add_argument_group("masks mode")
    masks.add_argument("--masks", metavar="DATA", help="dataset with a mask_path column (white = lesion)")
    masks.add_argument("--limit", type=int, metavar="N", help="use only the first N images with a mask")
    masks.add_argument("--seed", type=int, default=0, help="seed of the untrained network (default 0)")
    parser.set_defaults(handler=run)


def _is_image_file(path: Path) -> bool:
    from dermlab.data.images import IMAGE_EXTENSIONS

    return not path.is_dir() and path.suffix.lower() in IMAGE_EXTENSIONS


def run(args: argparse.Namespace) -> int:
    from dermlab.errors import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    path = Path(args.path)
    if _is_image_file(path):
        return _explain_image(args, path)
    if args.run:
        raise ConfigError(f"{path}: --run goes with an image file; to explain a run, pass its folder alone")
    if args.target:
        raise ConfigError("--target goes with an image file: dermlab explain IMAGE --run RUN --target CLASS")
    if args.masks:
        return _mask_agreement(args, path)
    return _gallery(args, path)


def _explain_image(args: argparse.Namespace, image: Path) -> int:
    from dermlab.errors import ConfigError
    from dermlab.explain.run_explain import explain_image

    if not args.run:
        raise ConfigError(f"{image}: an image needs a model: dermlab explain IMAGE --run RUN_FOLDER")
    if args.masks:
        raise ConfigError("--masks goes with a run folder: dermlab explain RUN --masks DATA")
    result = explain_image(args.run, image, target=args.target, method=args.method, out_path=args.out)
    note = ""
    if result.target != result.predicted:
        note = f"; CAM for {result.target} (p={result.target_probability:.2f})"
    if result.empty_map:
        note += f"; the map is empty: no positive evidence for {result.target}"
    print(f"predicted {result.predicted} (p={result.predicted_probability:.2f}){note}")
    print(f"wrote {result.path}")
    return 0


def _gallery(args: argparse.Namespace, run_path: Path) -> int:
    from dermlab.errors import ConfigError
    from dermlab.explain.run_explain import explain_run

    if args.per_class < 1:
        raise ConfigError(f"--per-class must be >= 1, got {args.per_class}")
    result = explain_run(
        run_path, data=args.data, split=args.split, method=args.method, per_class=args.per_class,
        out_dir=args.out, batch_size=args.batch_size,
    )
    print(f"{result.shown} images from {result.predictions} ({args.method}, target = predicted class):")
    for written in result.paths:
        print(f"  {written}")
    if result.report is not None:
        print(f"report: {result.report}")
    return 0


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _mask_agreement(args: argparse.Namespace, run_path: Path) -> int:
    from rich.console import Console
    from rich.table import Table

    from dermlab.explain.run_masks import measure_mask_agreement
    from dermlab.models.checkpoint import run_dir_of

    summary = measure_mask_agreement(
        run_path, args.masks, method=args.method, limit=args.limit, batch_size=args.batch_size,
        seed=args.seed, out_path=args.out,
    )
    counts = summary["cam_target"]
    table = Table(title=f"{args.method} vs lesion masks: {summary['n']} images of {args.masks}")
    for column in ("CAM", "energy in mask", "energy / chance", "pointing game", "n"):
        table.add_column(column, justify="left" if column == "CAM" else "right")
    for key, label in (("trained", "trained"), ("untrained", f"untrained (seed {args.seed})"),
                       ("centre_prior", "fixed centre blob")):
        row = summary[key]
        table.add_row(label, _fmt(row["mean_energy_in_mask"]), _fmt(row["energy_over_chance"]),
                      _fmt(row["pointing_game_hit_rate"]), str(row["n"]))
    chance = summary["trained"]["mean_mask_area_share"]
    table.add_row("chance (mask area)", _fmt(chance), "1.000", _fmt(chance), str(summary["n"]))
    Console().print(table)
    print(f"CAM target: the true class for {counts['true_class']} images, the predicted class for "
          f"{counts['predicted_class']} (label unknown to the model)")
    splits = summary.get("images_by_run_split")
    if splits:
        print("these images in the run's splits: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    out = Path(args.out) if args.out else run_dir_of(run_path) / "explain" / "mask_agreement.json"
    print(f"wrote {out}")
    return 0
