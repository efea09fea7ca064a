"""The ``dermlab`` command: one subcommand per verb, each in its own module of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from dermlab import __version__
from dermlab.errors import DermlabError

__all__ = ["main", "build_parser"]

# Order is the order shown by `dermlab --help`.
_COMMAND_MODULES = [
    "synth",
    "info",
    "split",
    "train",
    "evaluate",
    "compare",
    "experiment",
    "distill",
    "ensemble",
    "adapt",
    "explain",
    "predict",
    "serve",
    "export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dermlab",
        description="Train, evaluate, explain and serve skin-lesion image classifiers. "
        "A research tool, not a medical device.",
    )
    parser.add_argument("--version", action="version", version=f"dermlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logs and full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dermlab.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"dermlab.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


_TRAINING_COMMANDS = {"train", "experiment", "distill", "ensemble"}


def _quiet_libraries(import_lightning: bool) -> None:
    """Keep the terminal for dermlab's own output: Lightning's banners and known-harmless warnings go."""
    import warnings

    if import_lightning:
        import lightning.pytorch  # noqa: F401  (it sets its own log level on import: set ours after it)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (
        r".*module\(s\) in eval mode.*",  # at fit start; ClassifierModule starts every epoch in train mode
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*smaller than the logging interval.*",
        r".*does not have many workers.*",
        r".*exists and is not empty.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _message(error: DermlabError) -> str:
    """The error's one line (``DermlabError`` escapes newlines and unfolds a DataLoader worker's traceback)."""
    return str(error).strip() or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        _quiet_libraries(import_lightning=args.command in _TRAINING_COMMANDS)
    try:
        return int(args.handler(args) or 0)
    except DermlabError as error:
        if args.verbose or os.environ.get("DERMLAB_TRACEBACK"):
            raise
        print(f"error: {_message(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
