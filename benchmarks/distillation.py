"""Real-data comparison: an LFME student vs the same student trained alone, on one lesion-disjoint split.

CPU-sized: every run trains only the head on the frozen, packaged EfficientNet-Lite0 (stage 1 from cached
features, shared by the experts and all students), so the test set is scored from one set of cached test
features as well (exact: the script checks each run's backbone is the frozen one). Prints a markdown table of
test F1 for df, vasc and akiec, macro F1 and balanced accuracy, with paired-bootstrap 95% intervals of each
variant's difference from the student alone, and writes ``OUT/results.json`` and
``benchmarks/results/distillation.json`` (``--results``). ``--quick``: the same on synthetic images with timm's
tiny test network, one stage-1 epoch per run and 20 bootstrap rounds (seconds to a minute).

    nice -n 10 .venv/bin/python benchmarks/distillation.py --data ../shared/data/HAM10000 \\
        --base /work/runs/ham_lite0.yaml --splits /work/runs/ham-lite0-ce/splits.csv --out /work/runs/distill
    .venv/bin/python benchmarks/distillation.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_RECIPE, RESULTS_DIR, print_table, quiet_libraries, synthetic_dataset, write_results  # noqa: E402

from dermlab.config import Config, apply_overrides, load_config
from dermlab.data.run_data import prepare_run_data
from dermlab.data.transforms import create_transform
from dermlab.evaluation.metrics import compute_metrics
from dermlab.io import atomic_write_json
from dermlab.models.checkpoint import load_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing
from dermlab.training.distillation import distillation_summary
from dermlab.training.experts import train_experts
from dermlab.training.features import compute_features, load_or_compute_features
from dermlab.training.run import train_run

RARE = ("df", "vasc", "akiec")
METRICS = ("f1_df", "f1_vasc", "f1_akiec", "f1_macro", "balanced_accuracy", "accuracy")


def _variants(experts: list[Path]) -> dict[str, list[str]]:
    teachers = f"distill.teachers={json.dumps([str(e) for e in experts])}"
    return {
        "alone": [],
        "alone + balanced subset": ["distill.curriculum=balanced_subset"],
        "LFME": ["distill.method=lfme", teachers],
        "LFME + instance curriculum": ["distill.method=lfme", teachers, "distill.curriculum=instance"],
        "LFME + balanced subset": ["distill.method=lfme", teachers, "distill.curriculum=balanced_subset"],
        "LFME, KL on own images": ["distill.method=lfme", teachers, "distill.expert_samples=group"],
    }


def _same_backbone(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.backbone.state_dict(), second.backbone.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _test_features(base: Config, data, out: Path) -> tuple[torch.nn.Module, object, torch.Tensor]:
    """The frozen backbone (as every stage-1-only run has it) and its cached features of the test split."""
    import hashlib

    import lightning as L

    L.seed_everything(base.train.seed, verbose=False)  # as train_run, for backbones without fixed weights
    model = create_model(base.model, len(data.classes)).eval()
    preprocessing = resolve_preprocessing(model, base.model)
    digest = hashlib.sha256()
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode() + tensor.detach().float().numpy().tobytes())
    test = data.frame[data.frame["split"] == "test"].reset_index(drop=True)
    key = {"split": "test", "images": test["image_id"].tolist(), "preprocessing": preprocessing.to_dict(),
           "model": base.model.name, "backbone": digest.hexdigest()}
    transform = create_transform("none", preprocessing, train=False)
    features = load_or_compute_features(
        out / "cache", key,
        lambda: compute_features(model, test, data.classes, transform, batch_size=base.data.eval_batch_size,
                                 num_workers=base.data.num_workers),
    )[0]
    return model, preprocessing, features


def _scores(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict[str, float]:
    metrics = compute_metrics(y_true, probabilities, classes, target_class=None)
    result = {f"f1_{c}": metrics["per_class"][c]["f1"] for c in RARE}
    result.update({k: metrics[k] for k in ("f1_macro", "balanced_accuracy", "accuracy")})
    return result


def _bootstrap(y_true: np.ndarray, base: np.ndarray, other: np.ndarray, classes: list[str], rounds: int, seed: int = 0) -> dict:
    """Paired bootstrap over test images of ``other - base`` for each metric: (low, high) of the 95% interval."""
    generator = np.random.default_rng(seed)
    deltas = {name: [] for name in METRICS}
    for _ in range(rounds):
        pick = generator.integers(0, len(y_true), len(y_true))
        a, b = _scores(y_true[pick], base[pick], classes), _scores(y_true[pick], other[pick], classes)
        for name in METRICS:
            if a[name] is not None and b[name] is not None:
                deltas[name].append(b[name] - a[name])
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in deltas.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset folder; required without --quick")
    parser.add_argument("--base", help="the student's recipe (YAML); stage 2 is switched off")
    parser.add_argument("--splits", help="a splits.csv (one lesion-disjoint split for every run); required without --quick")
    parser.add_argument("--out", type=Path, help="runs folder (experts, students, results.json); required without --quick")
    parser.add_argument("--only", nargs="+", help="train only these variants")
    parser.add_argument("--bootstrap", type=int, default=500, help="paired-bootstrap resamples (default 500)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--test-features-only", action="store_true", help="only cache the test split's features")
    parser.add_argument("--quick", action="store_true", help="synthetic images, tiny model, one epoch (CI smoke test)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dermlab-benchmarks")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"folder for the JSON (default {RESULTS_DIR})")
    parser.add_argument("--tag", help="suffix for the JSON's name")
    args = parser.parse_args()
    os.environ.setdefault("DERMLAB_PROGRESS", "0")
    quiet_libraries()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.quick:
        _quick_setup(args)
    elif not (args.data and args.splits and args.out):
        parser.error("--data, --splits and --out are required (or --quick)")
    out = Path(args.out)
    base = load_config(args.base) if args.base else Config()
    base = apply_overrides(base, [f"data.path={args.data}", f"data.splits_file={args.splits}", "train.stage2_epochs=0", *args.overrides])
    timings: dict[str, float] = {}
    if args.test_features_only:  # e.g. while another run fills the shared feature cache
        _test_features(base, prepare_run_data(base, out / "split"), out)
        return

    started = time.perf_counter()
    experts = train_experts(base, args.splits, out / "experts")
    timings["experts"] = time.perf_counter() - started
    runs: dict[str, Path] = {}
    for name, overrides in _variants(experts).items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name.replace(" + ", "+").replace(", ", "-").replace(" ", "_")
        runs[name] = run_dir
        if (run_dir / "checkpoints" / "best.ckpt").is_file():
            continue
        started = time.perf_counter()
        train_run(apply_overrides(base, overrides), run_dir, resume=(run_dir / "config.yaml").is_file())  # interrupted: continue
        timings[name] = time.perf_counter() - started
        print(f"trained {name} in {timings[name]:.0f} s", flush=True)

    # ---- score every run on the test split from one set of cached features
    data = prepare_run_data(base, next(iter(runs.values())))  # every run has the same split
    test = data.frame[data.frame["split"] == "test"].reset_index(drop=True)
    started = time.perf_counter()
    backbone_model, preprocessing, features = _test_features(base, data, out)
    timings["test features"] = time.perf_counter() - started
    y_true = np.array([data.classes.index(label) for label in test["label"]])
    results: dict[str, dict] = {}
    # "best": the checkpoint with the best val balanced accuracy (as dermlab picks it); "last": the final epoch,
    # which shows how much of a difference is the noise of picking one epoch on a noisy validation curve
    for which in ("best", "last"):
        probabilities = {}
        for name, run_dir in runs.items():
            loaded = load_checkpoint(run_dir / "checkpoints" / f"{which}.ckpt")
            if not _same_backbone(loaded.model, backbone_model) or loaded.classes != data.classes:
                raise SystemExit(f"{run_dir}: its backbone is not the frozen one; score it with dermlab evaluate instead")
            with torch.inference_mode():
                probabilities[name] = loaded.model.forward_head(features).softmax(dim=1).numpy()
            entry = results.setdefault(name, {})
            entry[which] = {"test": _scores(y_true, probabilities[name], data.classes)}
            state = distillation_summary(loaded.path)
            if state:
                entry[which]["distill"] = {k: state[k] for k in ("expert_names", "expert_val_accuracy", "expert_weights")}
        for name in runs:
            if name != "alone" and "alone" in probabilities:
                results[name][which]["delta_ci95"] = _bootstrap(
                    y_true, probabilities["alone"], probabilities[name], data.classes, args.bootstrap
                )
    expert_test = {}
    for run_dir in experts:
        loaded = load_checkpoint(run_dir)
        mask = test["label"].isin(loaded.classes).to_numpy()
        with torch.inference_mode():
            predicted = loaded.model.forward_head(features[torch.tensor(mask)]).argmax(dim=1).numpy()
        truth = np.array([loaded.classes.index(label) for label in test["label"][mask]])
        expert_test[run_dir.name] = {"classes": loaded.classes, "test_accuracy_within_group": float((predicted == truth).mean())}
    summary = {"results": results, "experts": expert_test, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "test_images": len(test), "test_support": {c: int((test["label"] == c).sum()) for c in data.classes}}
    atomic_write_json(out / "results.json", summary)
    print(f"wrote {out / 'results.json'}")

    for which in ("best", "last"):
        print(f"\ntest split, {which} checkpoint (bracket: 95% paired-bootstrap interval of the difference from alone)")
        print("| variant | F1 df | F1 vasc | F1 akiec | macro F1 | balanced acc. | accuracy |")
        print("|" + "---|" * 7)
        for name, result in results.items():
            test_scores = result[which]["test"]
            cells = []
            for metric in METRICS:
                cell = f"{test_scores[metric]:.3f}"
                interval = result[which].get("delta_ci95", {}).get(metric)
                if interval:
                    cell += f" [{interval[0]:+.3f}, {interval[1]:+.3f}]"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |")
    print_table(
        "experts (test accuracy within their group)",
        [(name, ", ".join(entry["classes"]), entry["test_accuracy_within_group"]) for name, entry in expert_test.items()],
        ["expert", "classes", "test accuracy"],
    )
    print_table("wall time (s)", list(summary["timings_s"].items()), ["step", "seconds"])
    write_results("distillation", args, {**summary, "out": str(out)})


def _quick_setup(args: argparse.Namespace) -> None:
    """``--quick``: a synthetic dataset, its split, a tiny stage-1-only recipe and few bootstrap rounds, under --work."""
    from dermlab.data.datasets import load_dataset
    from dermlab.data.splits import create_splits, save_splits

    args.data = str(synthetic_dataset(args.work, images=140, size=48))
    args.out = args.work / "quick-distillation"
    table = load_dataset(args.data)
    args.splits = str(save_splits(table, create_splits(table, (0.6, 0.2, 0.2), seed=42), args.out / "split" / "splits.csv"))
    recipe = {k: v for k, v in QUICK_RECIPE.items() if not k.startswith("train.stage2") and k != "train.unfreeze"}
    args.overrides = [f"{key}={json.dumps(value)}" for key, value in recipe.items()] + args.overrides
    args.bootstrap = min(args.bootstrap, 20)


if __name__ == "__main__":
    main()
