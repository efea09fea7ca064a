"""``dermlab serve``: the web page and JSON API for a run, with uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from dermlab.cli._common import add_behaviour_arguments, behaviour_options

__all__ = ["register", "run"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a run's model: web page at /, POST /predict and /explain, API docs at /docs",
        description="Starts a local web server (127.0.0.1 unless --host says otherwise). The model behaves as "
        "`dermlab evaluate` scores it and `dermlab predict` predicts: the run's own TTA views, temperature and "
        "abstention rule unless the flags below override them. A metadata-fusion model's /predict takes the form "
        "fields age, sex and localization, and the page offers them. A research tool, not a medical device.",
    )
    parser.add_argument("run", help="run folder or checkpoint file (with --engine onnx: a .onnx file or a run folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' on /predict and /explain (default: $DERMLAB_API_TOKEN, if set)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload in MiB (default 10)")
    parser.add_argument("--engine", choices=["torch", "onnx"], default="torch", help="inference engine (default torch)")
    add_behaviour_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dermlab.errors import ConfigError
    from dermlab.serving.app import create_app
    from dermlab.serving.predictor import Predictor

    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    token = args.token or os.environ.get("DERMLAB_API_TOKEN") or None
    predictor = Predictor.from_path(args.run, engine=args.engine, **behaviour_options(args))
    app = create_app(predictor, api_token=token, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024))
    if args.host not in _LOOPBACK and token is None:
        print(
            f"warning: serving on {args.host} without an API token; anyone who can reach it can use the model "
            "(set --token or DERMLAB_API_TOKEN)",
            file=sys.stderr,
        )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"serving {predictor.model_id} ({predictor.engine}) at http://{shown}:{args.port}/ "
        "(research tool, not a medical device)"
    )
    fields = "; takes age, sex and localization with each image" if predictor.takes_metadata else ""
    print(f"{predictor.behaviour.describe()}{fields}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
