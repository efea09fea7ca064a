"""Inference: single-image latency (p50 / p99) and batched throughput, PyTorch eager against ONNX Runtime.

Both go through :class:`dermlab.serving.predictor.Predictor` (``engine="torch"`` on the checkpoint,
``engine="onnx"`` on its ``dermlab export``), so preprocessing, softmax and locking are the same and only the
network's runtime differs:

- ``model, 1 image``: ``predict_tensor`` on one preprocessed image (the network call, softmax, lock);
- ``end to end, 1 image``: ``predict_images`` on a 600x450 PIL image (resize, normalise, network, softmax);
- ``batched``: ``predict_tensor`` on batches of ``--batch-size`` preprocessed images, images/s.

Threads: by default torch uses every usable core and onnxruntime its own default (the physical cores);
``--threads N`` gives both engines N threads. The two engines are measured in alternating rounds, so a
change in the machine's load hits both alike.
Goal: ONNX Runtime >= 1.5x faster than PyTorch eager on CPU. The network is random-init (speed does not
depend on the weights).

    python benchmarks/inference.py              # about 3 minutes on 2 busy CPU cores
    python benchmarks/inference.py --threads 1  # both engines on one thread
    python benchmarks/inference.py --quick      # seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_arguments, goal, print_table, set_threads, summarise_latencies, write_results  # noqa: E402

CLASSES = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]


def make_run(root: Path, model_name: str, size: int) -> Path:
    """A run folder with a random-init checkpoint and its ONNX export (``export/model.onnx``)."""
    import torch

    from dermlab.config import Config, ModelConfig
    from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing
    from dermlab.serving.onnx_export import export_onnx

    torch.manual_seed(0)
    config = Config(model=ModelConfig(name=model_name, weights="none", input_size=[size, size]))
    model = create_model(config.model, len(CLASSES))
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, CLASSES, resolve_preprocessing(model, config.model))
    export_onnx(load_checkpoint(root), root / "export" / "model.onnx")
    return root


def sample_image(width: int = 600, height: int = 450):
    """A textured RGB image the size of a HAM10000 photo (gradients, waves, noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([180 + 40 * np.sin(x / 23), 120 + 50 * np.cos(y / 17), 100 + 30 * np.sin((x + y) / 31)], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def measure(predictors: dict, image, args) -> dict[str, dict]:
    """Latency samples and batch throughput per engine, in alternating rounds."""
    one = predictors["torch"].preprocess([image])
    batch = one.repeat(args.batch_size, 1, 1, 1)
    samples = {name: {"model": [], "end_to_end": [], "batched_s": 0.0, "batched_images": 0} for name in predictors}
    for predictor in predictors.values():  # warm-up: lazy initialisation, kernel selection, allocator
        for _ in range(args.warmup):
            predictor.predict_tensor(one)
            predictor.predict_images([image])
        predictor.predict_tensor(batch)
    per_round = max(1, args.runs // args.rounds)
    batches_per_round = max(1, args.batches // args.rounds)
    for _ in range(args.rounds):
        for name, predictor in predictors.items():
            for _ in range(per_round):
                started = time.perf_counter()
                predictor.predict_tensor(one)
                samples[name]["model"].append(time.perf_counter() - started)
            for _ in range(per_round):
                started = time.perf_counter()
                predictor.predict_images([image])
                samples[name]["end_to_end"].append(time.perf_counter() - started)
            started = time.perf_counter()
            for _ in range(batches_per_round):
                predictor.predict_tensor(batch)
            samples[name]["batched_s"] += time.perf_counter() - started
            samples[name]["batched_images"] += batches_per_round * args.batch_size
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--runs", type=int, default=100, help="single-image calls per engine and kind (default 100)")
    parser.add_argument("--batches", type=int, default=6, help="batches per engine (default 6)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds the calls are spread over (default 4)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per engine first (default 5)")
    parser.add_argument("--run", type=Path, help="a run folder with export/model.onnx, instead of a random-init model")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runs, args.batches, args.batch_size, args.rounds, args.warmup = 32, 10, 2, 8, 2, 2
        args.model = "test_efficientnet" if args.model == "efficientnet_lite0" else args.model

    import onnxruntime
    import torch

    from dermlab.serving.predictor import Predictor

    explicit_threads = args.threads is not None
    args.threads = set_threads(args.threads)  # default: every usable core, as onnxruntime's own default

    with tempfile.TemporaryDirectory(prefix="dermlab-bench-") as tmp:
        run = args.run or make_run(Path(tmp) / "run", args.model, args.size)
        predictors = {"torch": Predictor.from_path(run, engine="torch"), "onnx": Predictor.from_path(run, engine="onnx")}
        if explicit_threads:  # the ONNX session again, with as many threads as torch (default: physical cores)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.log_severity_level = 3
            onnx = predictors["onnx"]
            onnx._session = onnxruntime.InferenceSession(str(onnx.path), sess_options=options, providers=["CPUExecutionProvider"])
        size = predictors["torch"].preprocessing.input_size
        print(
            f"{predictors['torch'].model_id} at {size[0]}x{size[1]}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
            f"({args.threads if explicit_threads else 'default'} threads)",
            flush=True,
        )
        samples = measure(predictors, sample_image(), args)

    results = {}
    for name, s in samples.items():
        results[name] = {
            "model_1_image": summarise_latencies(s["model"]),
            "end_to_end_1_image": summarise_latencies(s["end_to_end"]),
            "batched_images_per_s": round(s["batched_images"] / s["batched_s"], 1),
        }
    t, o = results["torch"], results["onnx"]
    ratios = {
        "onnx_vs_torch_model_p50": goal(t["model_1_image"]["p50_ms"] / o["model_1_image"]["p50_ms"], 1.5),
        "onnx_vs_torch_model_p99": round(t["model_1_image"]["p99_ms"] / o["model_1_image"]["p99_ms"], 2),
        "onnx_vs_torch_end_to_end_p50": goal(t["end_to_end_1_image"]["p50_ms"] / o["end_to_end_1_image"]["p50_ms"], 1.5),
        "onnx_vs_torch_batched": goal(o["batched_images_per_s"] / t["batched_images_per_s"], 1.5),
    }
    rows = []
    for name, label in (("torch", "PyTorch eager"), ("onnx", "ONNX Runtime")):
        r = results[name]
        rows.append((
            label, r["model_1_image"]["p50_ms"], r["model_1_image"]["p99_ms"], r["end_to_end_1_image"]["p50_ms"],
            r["end_to_end_1_image"]["p99_ms"], r["batched_images_per_s"],
        ))
    print_table(
        "inference on CPU",
        rows,
        ["engine", "model p50 ms", "model p99 ms", "end-to-end p50 ms", "end-to-end p99 ms", f"batch {args.batch_size} images/s"],
    )
    print_table("ratios (ONNX Runtime speed / PyTorch speed)", list(ratios.items()), ["ratio", "value"])
    write_results("inference", args, {"results": results, "ratios": ratios, "input_size": list(size)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
