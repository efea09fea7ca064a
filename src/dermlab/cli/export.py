"""``dermlab export``: the model of a run as ONNX, with its preprocessing in the metadata."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a run's model to ONNX (classes and preprocessing stored in its metadata)",
        description="Writes model.onnx (input: normalised float32 batch N x 3 x H x W, output: logits; a "
        "metadata-fusion model has a second input, metadata: N x width encoded age, sex and localization) and "
        "model.onnx.json with the classes, mean, std, input size, interpolation, model id, the run's TTA views, "
        "temperature and abstention rule, and the metadata layout. `dermlab predict/serve --engine onnx` run it "
        "with onnxruntime and behave as the checkpoint does.",
    )
    parser.add_argument("run", help="run folder or checkpoint file")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    parser.add_argument("--out", help="output file (default RUN/export/model.onnx)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dermlab.models.checkpoint import load_checkpoint, run_folder_of
    from dermlab.serving.onnx_export import export_onnx

    loaded = load_checkpoint(args.run)
    checkpoint = loaded.path
    run_dir = run_folder_of(checkpoint)
    out = Path(args.out) if args.out else run_dir / "export" / "model.onnx"
    export_onnx(loaded, out, opset=args.opset)
    print(f"wrote {out} and {out.name}.json (model {loaded.model_id}, opset {args.opset}, checked against torch)")
    return 0
