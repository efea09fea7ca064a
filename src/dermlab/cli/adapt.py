"""``dermlab adapt RUN IMAGES --out RUN2``: adapt a run to unlabelled images of another clinic (AdaBN, TENT or
the class mix by EM)."""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="adapt a run to unlabelled images from another clinic (adabn, tent or prior) into a new run folder",
        description="Re-estimate the BatchNorm statistics on the given images (adabn), or minimise the "
        "entropy of the predictions over them by training only the BatchNorm affine parameters, then "
        "re-estimate the statistics (tent), or estimate the images' class mix by EM from the run's calibrated "
        "probabilities and shift the head's bias to it (prior: for a clinic that sees, say, more melanomas). "
        "No label is read: class sub-folders are only folders. RUN2 is an "
        "ordinary run folder (evaluate, predict, serve and export use it) whose lineage.json and checkpoint say "
        "what it was adapted on; the source's temperature, abstention and decision rules are kept (after prior the "
        "balanced rule takes out the estimated class mix instead of the training one).",
    )
    parser.add_argument("run", metavar="RUN", help="run folder or checkpoint to adapt")
    parser.add_argument("images", nargs="+", metavar="IMAGES", help="image files or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="RUN2", help="the adapted run's folder (must not hold a run)")
    parser.add_argument("--method", default="adabn", help="adabn (default), tent or prior")
    parser.add_argument("--epochs", type=int, default=1, help="tent: passes over the images (default 1)")
    parser.add_argument("--lr", type=float, default=1e-3, help="tent: Adam learning rate (default 1e-3)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument(
        "--metadata", metavar="FILE.csv",
        help="CSV with image_id and age, sex, localization (or site) for a metadata-fusion model, so it adapts on the "
        "answers it gives with them (as predict --metadata); without it every image is all unknown",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dermlab.errors import ConfigError
    from dermlab.training.adapt import ADAPTATION_METHODS, adapt_run, class_mix_line

    if args.method not in ADAPTATION_METHODS:
        raise ConfigError(f"--method {args.method!r}: valid methods are {', '.join(ADAPTATION_METHODS.list())}")
    if args.batch_size < 2:
        raise ConfigError("--batch-size must be at least 2 (BatchNorm statistics of one image are not statistics)")
    options = {"batch_size": args.batch_size}
    if args.method == "tent":
        options.update(epochs=args.epochs, lr=args.lr)
    if args.metadata:
        from dermlab.data.metadata import read_metadata_csv

        options["metadata"] = read_metadata_csv(args.metadata)
    adapted = adapt_run(args.run, args.images, args.out, method=args.method, **options)
    print(f"adapted {args.run} with {adapted.method} on {adapted.images} unlabelled images -> {adapted.out}")
    if mix := class_mix_line(adapted.classes, adapted.details):
        print(mix)
    print(f"score it with: dermlab evaluate {adapted.out} --data DATA")
    return 0
