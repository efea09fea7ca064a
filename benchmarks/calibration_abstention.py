"""Calibration, test-time augmentation, abstention (and optionally metadata fusion) of a trained run, on its split.

    nice -n 10 .venv/bin/python benchmarks/calibration_abstention.py /work/runs/ham-lite0-ce [--fusion]
    .venv/bin/python benchmarks/calibration_abstention.py --quick [--fusion --fusion-seeds 1]   # seconds

Reads the run folder and its dataset; never writes into the run. Everything fitted here (temperature, thresholds,
fusion heads) is fitted on the run's val split and reported on its test split:

1. temperature scaling: ECE and NLL before and after, without and with TTA (flips);
2. abstention: thresholds for a 5% false rejection of val lesions, per score and combined; the share rejected of
   the test lesions (overall and per class) and of images that are not skin lesions: scikit-image's sample photos
   and textures (bundled with the package, no download), random noise textures, patterns and solid colours;
3. ``--fusion``: metadata fusion against image-only on the same split, CPU-sized: the stage-1 head trained on
   frozen ImageNet features (the run's cached ones where they are found), with and without age, sex and
   localization, three seeds each.

Writes ``benchmarks/results/calibration_abstention.json``, the test reliability diagram
``benchmarks/results/calibration_reliability_test.png``, and the results section of ``docs/calibration.md``
(``--fusion-only``: ``benchmarks/results/calibration_abstention_fusion.json``, read by a later run without
``--fusion``). ``--quick`` without a run folder first trains a tiny run on synthetic images under ``--work``
(reused when it is there), scores 64 images per split and writes ``calibration_abstention-quick.json`` and
``calibration_reliability_test-quick.png``, never the doc.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QUICK_RECIPE, RESULTS_DIR, print_table, quiet_libraries, synthetic_dataset, write_results  # noqa: E402

from dermlab.evaluation.abstention import compute_scores, fit_abstention, synthetic_non_lesion_images  # noqa: E402
from dermlab.evaluation.calibration import reliability_bins  # noqa: E402
from dermlab.evaluation.evaluate import predict_image_logits, predict_view_logits  # noqa: E402
from dermlab.evaluation.metrics import compute_metrics  # noqa: E402
from dermlab.evaluation.plots import plot_reliability_diagram  # noqa: E402
from dermlab.evaluation.tta import average_probabilities, fit_tta_temperature, resolve_tta_views  # noqa: E402
from dermlab.models.checkpoint import load_checkpoint, resolve_checkpoint_path  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "calibration.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
RULES = {
    "max probability": ("max_probability",),
    "energy": ("energy",),
    "max logit": ("max_logit",),
    "max probability + energy (default)": ("max_probability", "energy"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run", type=Path, nargs="?",
        help="a trained run folder (checkpoints/best.ckpt, splits.csv, config.yaml); with --quick, default a tiny one",
    )
    parser.add_argument("--tta", default="flips", help="TTA views to compare with no TTA (default flips)")
    parser.add_argument("--false-rejection", type=float, default=0.05, help="target share of val lesions rejected")
    parser.add_argument("--fusion", action="store_true", help="also compare metadata fusion with image-only")
    parser.add_argument("--fusion-seeds", type=int, default=3)
    parser.add_argument("--fusion-only", action="store_true", help="only the fusion comparison (no checkpoint needed)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dermlab-calibration-cache"), help="logit cache")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64 images per split, for a smoke test")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dermlab-benchmarks",
                        help="where --quick keeps its synthetic images, tiny run and logit cache")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", help="suffix for the JSON's name")
    parser.add_argument("--doc", type=Path, default=DOC, help="markdown file whose results section is replaced")
    args = parser.parse_args()
    quiet_libraries()
    if args.quick and args.run is None:
        args.run = _quick_run(args.work)
        args.cache = args.work / "calibration-cache"
    elif args.run is None:
        parser.error("the run folder is required (or --quick)")
    torch.manual_seed(0)

    from dermlab.data.run_data import prepare_run_data

    if args.fusion_only:
        from types import SimpleNamespace

        from dermlab.config import load_config

        config = load_config(args.run / "config.yaml")
        data = prepare_run_data(config, args.run)  # reads the run's splits.csv, writes nothing
        splits = {s: data.frame[data.frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
        labels = {s: part["label"].map({c: i for i, c in enumerate(data.classes)}).to_numpy() for s, part in splits.items()}
        fusion = _fusion(args, SimpleNamespace(config=config, classes=data.classes), splits, labels, data.classes)
        write_results("calibration_abstention_fusion", args, {"run": str(args.run), "fusion": fusion})
        return 0
    loaded = load_checkpoint(args.run)
    frame = prepare_run_data(loaded.config, args.run).frame  # reads the run's splits.csv, writes nothing
    splits = {s: frame[frame["split"] == s].reset_index(drop=True) for s in ("train", "val", "test")}
    if args.quick:
        splits = {s: part.head(64) for s, part in splits.items()}
    classes = loaded.classes
    labels = {s: part["label"].map({c: i for i, c in enumerate(classes)}).to_numpy() for s, part in splits.items()}
    views = resolve_tta_views(["identity", *resolve_tta_views(args.tta)])
    logits = {s: _cached_logits(args, loaded, splits[s], views, s) for s in ("val", "test")}
    payload: dict[str, Any] = {"run": str(args.run), "views": list(views), "n": {s: int(len(splits[s])) for s in splits}}

    payload["calibration"] = _calibration(logits, labels, classes, views)
    plain_t = payload["calibration"]["no TTA"]["temperature"]
    before = reliability_bins(labels["test"], average_probabilities(logits["test"][:1]))
    after = reliability_bins(labels["test"], average_probabilities(logits["test"][:1], plain_t))
    figure = Path(args.results) / f"calibration_reliability_test{'-quick' if args.quick else ''}.png"
    plot_reliability_diagram(before, figure, calibrated=after, title=f"{args.run.name}: test, temperature {plain_t:.2f} fitted on val")
    payload["reliability_figure"] = str(figure)

    payload["abstention"] = _abstention(args, loaded, logits, labels, classes, plain_t)
    if args.fusion:
        payload["fusion"] = _fusion(args, loaded, splits, labels, classes)
    elif (Path(args.results) / "calibration_abstention_fusion.json").is_file():  # from an earlier --fusion-only
        payload["fusion"] = json.loads((Path(args.results) / "calibration_abstention_fusion.json").read_text())["fusion"]
    results_file = write_results("calibration_abstention", args, payload)
    if not args.quick:
        _write_doc(args.doc, payload, args, results_file)
    return 0


def _quick_run(work: Path) -> Path:
    """A tiny trained run on synthetic images (``QUICK_RECIPE``) under ``work``; reused when it is finished."""
    from dermlab.config import Config, apply_overrides
    from dermlab.training.run import train_run

    run = work / "quick-calibration-run"
    if not (run / "checkpoints" / "best.ckpt").is_file():
        data = synthetic_dataset(work, images=140, size=48)
        overrides = [f"data.path={data}", *(f"{key}={json.dumps(value)}" for key, value in QUICK_RECIPE.items())]
        print(f"training a tiny run into {run} ...", flush=True)
        train_run(apply_overrides(Config(), overrides), run, resume=(run / "config.yaml").is_file())
    return run


# ----------------------------------------------------------------------------------------------------- logits


def _cached_logits(args: argparse.Namespace, loaded, frame: pd.DataFrame, views: tuple[str, ...], split: str) -> np.ndarray:
    checkpoint = resolve_checkpoint_path(args.run)
    key = hashlib.sha256(
        "|".join([str(checkpoint.resolve()), str(checkpoint.stat().st_mtime_ns), ",".join(views), *frame["image_id"]]).encode()
    ).hexdigest()[:16]
    path = args.cache / f"logits-{split}-{key}.npy"
    if path.is_file():
        return np.load(path)
    print(f"computing {split} logits: {len(frame)} images x {len(views)} views ...", flush=True)
    logits = predict_view_logits(loaded, frame, views, batch_size=args.batch_size, num_workers=args.workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, logits)
    return logits


# ----------------------------------------------------------------------------------------------- calibration


def _calibration(logits: dict, labels: dict, classes: list[str], views: tuple[str, ...]) -> dict[str, Any]:
    results = {}
    rows = []
    for name, chosen in (("no TTA", slice(0, 1)), (f"TTA ({', '.join(views)})", slice(None))):
        temperature = fit_tta_temperature(logits["val"][chosen], labels["val"])
        entry: dict[str, Any] = {"temperature": temperature}
        for split in ("val", "test"):
            raw = average_probabilities(logits[split][chosen])
            scaled = average_probabilities(logits[split][chosen], temperature)
            metrics = compute_metrics(labels[split], scaled, classes, target_class="mel" if "mel" in classes else None)
            entry[split] = {
                "ece_before": reliability_bins(labels[split], raw)["ece"],
                "ece_after": reliability_bins(labels[split], scaled)["ece"],
                "nll_before": _nll(labels[split], raw),
                "nll_after": _nll(labels[split], scaled),
                "accuracy": metrics["accuracy"],
                "balanced_accuracy": metrics["balanced_accuracy"],
                "auc_macro": metrics["auc_macro"],
            }
            rows.append([name, split, temperature, *(entry[split][k] for k in ("ece_before", "ece_after", "nll_before", "nll_after", "balanced_accuracy"))])
        results[name] = entry
    print_table("temperature scaling (fitted on val)", rows, ["setting", "split", "T", "ECE before", "ECE after", "NLL before", "NLL after", "bal. acc"])
    return results


def _nll(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(y_true.size), y_true], 1e-12, None))))


# ------------------------------------------------------------------------------------------------ abstention


def _non_lesion_images(size: tuple[int, int], quick: bool) -> dict[str, list]:
    """scikit-image's bundled sample photos and textures, plus synthetic noise, patterns and solid colours."""
    import skimage.data
    from PIL import Image

    photos, textures = [], []
    names = [
        "astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "coins",
        "moon", "page", "text", "horse", "clock", "colorwheel", "logo", "retina", "cell", "microaneurysms",
        "shepp_logan_phantom", "stereo_motorcycle", "checkerboard", "binary_blobs",
    ]
    for name in names + ["grass", "gravel", "brick"]:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a few samples need a download: skip them
            continue
        array = np.asarray(array[0] if isinstance(array, tuple) else array)
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        elif array.dtype != np.uint8:
            array = (255 * (array - array.min()) / max(float(np.ptp(array)), 1e-9)).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB")
        (textures if name in ("grass", "gravel", "brick") else photos).append(image)
    synthetic = synthetic_non_lesion_images(size, per_kind=8 if quick else 48, seed=0)
    return {"scikit-image photos": photos, "scikit-image textures": textures, **synthetic}


def _abstention(args: argparse.Namespace, loaded, logits: dict, labels: dict, classes: list[str], temperature: float) -> dict[str, Any]:
    height, width = loaded.preprocessing.input_size
    others = _non_lesion_images((width, height), args.quick)
    other_logits = {kind: predict_image_logits(loaded, images, ("identity",)) for kind, images in others.items()}
    results: dict[str, Any] = {"non_lesion_counts": {kind: len(images) for kind, images in others.items()}, "rules": {}}
    rows = []
    for label, scores in RULES.items():
        rule = fit_abstention(logits["val"][:1], args.false_rejection, scores, temperature=temperature)
        test_rejected = rule.reject(logits["test"][:1])
        probabilities = average_probabilities(logits["test"][:1], temperature)
        correct = probabilities.argmax(axis=1) == labels["test"]
        accepted = ~test_rejected
        recalls = [correct[accepted & (labels["test"] == k)].mean() for k in range(len(classes)) if (accepted & (labels["test"] == k)).any()]
        entry = {
            "thresholds": rule.thresholds,
            "val_rejected": rule.val_rejection,
            "test_rejected": float(test_rejected.mean()),
            "test_rejected_per_class": {c: float(test_rejected[labels["test"] == k].mean()) for k, c in enumerate(classes) if (labels["test"] == k).any()},
            "test_accuracy_all": float(correct.mean()),
            "test_accuracy_accepted": float(correct[accepted].mean()),
            "test_balanced_accuracy_accepted": float(np.mean(recalls)),
            "non_lesion_rejected": {kind: float(rule.reject(value).mean()) for kind, value in other_logits.items()},
        }
        results["rules"][label] = entry
        rows.append([label, entry["val_rejected"], entry["test_rejected"], *entry["non_lesion_rejected"].values()])
    print_table(
        f"abstention at {args.false_rejection:.0%} false rejection on val: share rejected",
        rows,
        ["rule", "val lesions", "test lesions", *others],
    )
    # the raw scores, to show how far apart lesions and the rest lie
    results["score_medians"] = {
        "test lesions": {k: float(np.median(v)) for k, v in compute_scores(logits["test"][:1], ["max_probability", "energy"], temperature).items()},
        **{kind: {k: float(np.median(v)) for k, v in compute_scores(value, ["max_probability", "energy"], temperature).items()} for kind, value in other_logits.items()},
    }
    return results


# --------------------------------------------------------------------------------------------------- fusion


def _fusion(args: argparse.Namespace, loaded, splits: dict, labels: dict, classes: list[str]) -> dict[str, Any]:
    from torch import nn

    from dermlab.data.metadata import encode_metadata
    from dermlab.models.classifier import MetadataFusionClassifier
    from dermlab.models.factory import DermClassifier

    features = _stage1_features(args, loaded, splits)
    width = features["train"].shape[-1]
    torch.set_num_threads(1)  # small linear heads: more threads only contend on a shared machine

    class _Pooled(nn.Identity):  # the heads train on pooled features: the backbone is not needed
        num_features = width

    config = loaded.config
    metadata = {s: encode_metadata(splits[s]) for s in splits}
    results: dict[str, Any] = {"feature_views": int(features["train"].shape[0]), "missing": _missing_shares(splits["train"])}
    rows = []
    for arm in ("image only", "image + metadata"):
        runs = []
        for seed in range(args.fusion_seeds):
            torch.manual_seed(seed)
            cls = MetadataFusionClassifier if arm != "image only" else DermClassifier
            model = cls(_Pooled(), len(classes), drop_rate=config.model.drop_rate)
            runs.append(_train_head(model, features, metadata if arm != "image only" else None, labels, classes, config, seed))
        summary = {key: [run[key] for run in runs] for key in runs[0]}
        results[arm] = {key: {"mean": float(np.mean(v)), "std": float(np.std(v)), "runs": v} for key, v in summary.items()}
        rows.append([arm, *(f"{np.mean(summary[k]):.4f} ± {np.std(summary[k]):.4f}" for k in ("val_balanced_accuracy", "test_balanced_accuracy", "test_auc_macro", "test_mel_sensitivity"))])
    print_table("metadata fusion (stage-1 heads on frozen ImageNet features)", rows, ["arm", "val bal. acc", "test bal. acc", "test macro AUC", "test mel sens @ spec 0.8"])
    return results


def _missing_shares(frame: pd.DataFrame) -> dict[str, float]:
    age = pd.to_numeric(frame.get("age"), errors="coerce")
    return {
        "age": float(age.isna().mean()) if age is not None else 1.0,
        "sex": float((~frame["sex"].str.lower().isin(["male", "female"])).mean()) if "sex" in frame else 1.0,
        "localization": float(frame["localization"].str.lower().isin(["", "unknown"]).mean()) if "localization" in frame else 1.0,
    }


def _stage1_features(args: argparse.Namespace, loaded, splits: dict) -> dict[str, torch.Tensor]:
    """Pooled ImageNet-backbone features: the run's own stage-1 cache for train and val when found, else computed."""
    from dermlab.data.transforms import create_transform
    from dermlab.models.factory import create_model, resolve_preprocessing
    from dermlab.training.features import compute_features, feature_cache_key, load_or_compute_features
    from dermlab.training.run import _feature_cache_dir

    config = loaded.config
    model = create_model(config.model, len(loaded.classes))  # the backbone as stage 1 saw it (packaged weights)
    preprocessing = resolve_preprocessing(model, config.model)
    eval_transform = create_transform("none", preprocessing, train=False)
    run_cache = _feature_cache_dir(config, args.run)
    features = {}
    for split in ("train", "val", "test"):
        frame = splits[split]
        views = config.train.feature_views if split == "train" and config.data.augmentation != "none" else 1
        transform = create_transform(config.data.augmentation, preprocessing, train=True) if split == "train" else eval_transform
        key = feature_cache_key(config, preprocessing, transform, views, frame, model)
        try:  # the run's cache, read only
            features[split] = load_or_compute_features(run_cache, key, _not_cached)
            print(f"{split}: the run's cached stage-1 features, {tuple(features[split].shape)}")
            continue
        except LookupError:
            pass
        own = feature_cache_key(config, preprocessing, eval_transform, 1, frame, model)
        print(f"{split}: computing stage-1 features of {len(frame)} images ...", flush=True)
        features[split] = load_or_compute_features(
            args.cache / "features", own,
            lambda frame=frame: compute_features(model, frame, loaded.classes, eval_transform, views=1, seed=config.train.seed,
                                                 batch_size=args.batch_size, num_workers=args.workers),
        )
    return features


def _not_cached() -> torch.Tensor:
    raise LookupError("not in the run's cache")


def _train_head(model, features: dict, metadata: dict | None, labels: dict, classes: list[str], config, seed: int) -> dict[str, float]:
    """The stage-1 recipe: AdamW, cosine, the run's epochs, lr and batch size; views cycled per epoch; best val epoch."""
    from dermlab.training.module import cosine_with_warmup

    train = features["train"]
    y = torch.from_numpy(np.array(labels["train"], dtype=np.int64))
    epochs, batch = config.train.stage1_epochs or 15, config.data.batch_size
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.train.stage1_lr, weight_decay=config.train.weight_decay)
    steps = epochs * ((len(y) + batch - 1) // batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: cosine_with_warmup(step, steps, 0))
    generator = torch.Generator().manual_seed(seed)
    best: tuple[float, dict] = (-1.0, {})
    for epoch in range(epochs):
        model.train()
        view = train[epoch % train.shape[0]]
        for index in torch.randperm(len(y), generator=generator).split(batch):
            inputs = (view[index], metadata["train"][index]) if metadata else (view[index],)
            loss = torch.nn.functional.cross_entropy(model.forward_head(*inputs), y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            scheduler.step()
        scores = {s: _score(model, features[s][0], metadata[s] if metadata else None, labels[s], classes) for s in ("val", "test")}
        if scores["val"]["balanced_accuracy"] > best[0]:
            best = (scores["val"]["balanced_accuracy"], scores)
    val, test = best[1]["val"], best[1]["test"]
    return {
        "val_balanced_accuracy": val["balanced_accuracy"],
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_accuracy": test["accuracy"],
        "test_auc_macro": test["auc_macro"],
        "test_mel_sensitivity": ((test.get("target") or {}).get("sensitivity_at_specificity") or {}).get("sensitivity") or float("nan"),
    }


@torch.no_grad()
def _score(model, pooled: torch.Tensor, metadata: torch.Tensor | None, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    model.eval()
    logits = model.forward_head(pooled, metadata) if metadata is not None else model.forward_head(pooled)
    return compute_metrics(y, logits.softmax(dim=1).numpy(), classes, target_class="mel" if "mel" in classes else None)


# ------------------------------------------------------------------------------------------------------ doc


def _write_doc(path: Path, payload: dict[str, Any], args: argparse.Namespace, results_file: Path) -> None:
    root = Path(__file__).resolve().parents[1]

    def shown(file: Path) -> Path:
        file = Path(file).resolve()
        return file.relative_to(root) if file.is_relative_to(root) else file

    lines = [START, "", f"Measured with `nice -n 10 .venv/bin/python benchmarks/calibration_abstention.py {args.run}"
             f"{' --fusion' if args.fusion else ''}` (fusion: `--fusion` or an earlier `--fusion-only`) on run `{Path(args.run).name}` "
             f"({payload['n']['val']} val and {payload['n']['test']} test images; everything fitted on val); "
             f"results file `{shown(results_file)}`.", ""]
    lines += ["### Temperature scaling", "", "| setting | T | split | ECE before | ECE after | NLL before | NLL after | balanced accuracy |",
              "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, entry in payload["calibration"].items():
        for split in ("val", "test"):
            e = entry[split]
            lines.append(f"| {name} | {entry['temperature']:.3f} | {split} | {e['ece_before']:.4f} | {e['ece_after']:.4f} | "
                         f"{e['nll_before']:.4f} | {e['nll_after']:.4f} | {e['balanced_accuracy']:.4f} |")
    lines += ["", f"Reliability diagram (test, before and after): `{shown(payload['reliability_figure'])}`.", ""]
    abstention = payload["abstention"]
    kinds = list(abstention["non_lesion_counts"])
    lines += [f"### Abstention at {args.false_rejection:.0%} false rejection (thresholds set on val)", "",
              "Share rejected (answered \"uncertain\"):", "",
              "| rule | val lesions | test lesions | " + " | ".join(f"{k} ({abstention['non_lesion_counts'][k]})" for k in kinds) + " |",
              "| --- | ---: | ---: | " + " | ".join("---:" for _ in kinds) + " |"]
    for label, entry in abstention["rules"].items():
        lines.append(f"| {label} | {entry['val_rejected']:.1%} | {entry['test_rejected']:.1%} | "
                     + " | ".join(f"{entry['non_lesion_rejected'][k]:.0%}" for k in kinds) + " |")
    default = abstention["rules"]["max probability + energy (default)"]
    lines += ["", "Default rule on the test lesions, per class (share rejected):", "",
              "| " + " | ".join(default["test_rejected_per_class"]) + " |", "|" + " ---: |" * len(default["test_rejected_per_class"]),
              "| " + " | ".join(f"{v:.1%}" for v in default["test_rejected_per_class"].values()) + " |", "",
              f"Accuracy on test: {default['test_accuracy_all']:.4f} on all images, {default['test_accuracy_accepted']:.4f} on the accepted "
              f"(balanced accuracy of the accepted: {default['test_balanced_accuracy_accepted']:.4f}).", ""]
    if "fusion" in payload:
        fusion = payload["fusion"]
        lines += ["### Metadata fusion against image-only (same split)", "",
                  f"Stage-1 heads on frozen ImageNet features ({fusion['feature_views']} cached augmented view(s) per training image), "
                  f"the run's stage-1 recipe, best epoch by val balanced accuracy; mean ± std over {args.fusion_seeds} seeds. "
                  f"Missing in train: age {fusion['missing']['age']:.1%}, sex {fusion['missing']['sex']:.1%}, "
                  f"localization {fusion['missing']['localization']:.1%}.", "",
                  "| arm | val balanced accuracy | test balanced accuracy | test accuracy | test macro AUC | test mel sensitivity @ specificity 0.8 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for arm in ("image only", "image + metadata"):
            f = fusion[arm]
            lines.append(f"| {arm} | " + " | ".join(f"{f[k]['mean']:.4f} ± {f[k]['std']:.4f}" for k in
                                                    ("val_balanced_accuracy", "test_balanced_accuracy", "test_accuracy", "test_auc_macro", "test_mel_sensitivity")) + " |")
        lines.append("")
    lines.append(END)
    text = path.read_text(encoding="utf-8") if path.is_file() else f"# Calibration\n\n## Measured results\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n## Measured results\n\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + "\n".join(lines) + tail, encoding="utf-8")
    print(f"wrote the results section of {path}")


if __name__ == "__main__":
    raise SystemExit(main())
