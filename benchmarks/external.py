"""Off its home data: each run on an external folder as trained, after AdaBN and after TENT on its images.

    nice .venv/bin/python benchmarks/external.py --runs /work/runs/accuracy/default \
        --external ../shared/data/ISIC_external_dev

For every ``--runs`` run, on the ``--external`` folder (its labels read only to score, never to adapt):

- ``as trained``: the run's own behaviour (TTA views, temperature, decision rules, abstention);
- ``adabn`` / ``tent`` / ``prior``: the run adapted on the folder's unlabelled images (``dermlab adapt``'s code),
  scored the same; a method ``dermlab adapt`` refuses for the run (adabn and tent on BatchNorm statistics that
  never trained) gets its one-line reason instead of figures; after ``prior``, the class mix EM estimated for
  the folder beside its true mix.

Each row: the softmax restricted to the classes present (accuracy, balanced accuracy, AUC of the target class
against the others present, with 95% bootstrap intervals over images), the target class's recall at the run's
own decision rule over all its classes, and the share the abstention rule marks "uncertain"; and whether the run's
val operating points travel: the thresholds on the target's probability that gave specificity 0.8 and sensitivity
0.8 on its own val split (``metrics.json``), applied to the external images (the target's recall there, and the
share of the other classes present it flags). Then the
in-distribution check: each method adapted on the run's own test images (with their metadata, as they are scored;
before 2026-12-07 adapting read no metadata), and the change it makes to the test split's accuracy, balanced
accuracy and macro AUC (it should be within noise). With several runs, each later run's
as-trained figures minus each earlier run's on the same external images, with paired bootstrap intervals.
``--withhold-metadata``: for each run whose head fuses age, sex and localization, its own test split scored with
them and again with them withheld (every image "all unknown", as every external image is scored): how much of the
external loss is the missing metadata rather than the change of source.
``--label-shift``: every method again on the run's own test images drawn (seeded, without replacement) to the
external folder's class mix, metadata withheld: the external folder's class mix and missing metadata without its
change of source, so the gap between the two rows is the change of source itself (the folder's labels set only the
shares to draw).
A progress line goes to stderr before each measurement (the figures come at the end).
``--methods``: only these methods. ``--quick``: a random tiny model on synthetic images (smoke test).

Writes ``benchmarks/results/external.json`` (``--quick``: ``external-quick.json``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, print_table, synthetic_dataset, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("as trained", "adabn", "tent", "prior")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--runs", nargs="+", type=Path, default=[], help="run folders to score")
    parser.add_argument("--external", type=Path, help="the external folder (class sub-folders, a subset of the runs' classes)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per adaptation batch (default 32)")
    parser.add_argument("--tent-epochs", type=int, default=1, help="TENT passes over the external images (default 1)")
    parser.add_argument("--tent-lr", type=float, default=1e-3, help="TENT Adam learning rate (default 1e-3)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the methods to measure (default all; 'as trained' alone for a quick side-by-side of runs)")
    parser.add_argument("--withhold-metadata", action="store_true",
                        help="also score each metadata-fusion run's test split with its metadata withheld")
    parser.add_argument("--label-shift", action="store_true",
                        help="also score each method on the run's own test images drawn to the external folder's class mix "
                             "(metadata withheld): the label shift alone, without the change of source")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.external = _quick_setup(args.work)
    if not args.runs or args.external is None:
        parser.error("--runs and --external are needed (or --quick)")
    rows, checks = [], {}
    for run in args.runs:
        for method in args.methods:
            _progress(f"[{run.name}] {method}: scoring on {args.external}")
            rows.append({"run": run.name, "method": method, **_refused_or(_score_external, run, method, args)})
        checks[run.name] = {}
        for method in (m for m in args.methods if m != "as trained"):
            _progress(f"[{run.name}] {method}: adapting on its own test images (the in-distribution check)")
            checks[run.name][method] = _refused_or(_in_distribution_check, run, method, args)
    withheld = {}
    for run in args.runs if args.withhold_metadata else ():
        _progress(f"[{run.name}] its test split with and without its metadata")
        withheld[run.name] = _refused_or(_metadata_withheld, run)
    label_shift = []
    for run in args.runs if args.label_shift else ():
        for method in args.methods:
            _progress(f"[{run.name}] {method}: its own test images drawn to the external class mix")
            label_shift.append({"run": run.name, "method": method, **_refused_or(_label_shift_row, run, method, args)})
    scored = [r for r in rows if "refused" not in r]
    target = scored[0]["target"] if scored else "target"
    paired = _paired_differences(rows)
    for row in rows:
        row.pop("_restricted", None)
    args.runs, args.external = [str(run) for run in args.runs], str(args.external)  # plain data for the JSON
    write_results("external", args, {"rows": rows, "in_distribution": checks, "paired": paired, "metadata_withheld": withheld,
                                     "label_shift": label_shift})  # before printing: never lose the figures
    header = ["run", "method", "accuracy", "balanced acc", f"AUC {target} vs rest", f"{target} recall (run's rule)", "by rule", "uncertain"]
    print_table(f"external: {args.external} (softmax restricted to the classes present; 95% intervals over images)",
                [_row_cells(r) for r in rows], header)
    if label_shift:
        drawn = next((r["drawn"] for r in label_shift if "drawn" in r), {})
        print_table("label shift alone: the run's own test images drawn to the external class mix ("
                    + ", ".join(f"{n} {name}" for name, n in drawn.items()) + "), metadata withheld",
                    [_row_cells(r) for r in label_shift], header)
    points = [(r, name, p) for r in rows for name, p in (r.get("val_operating_points") or {}).items()]
    if points:
        print_table(
            f"the run's val operating points on the external images (threshold on p({target}) fitted on its val split)",
            [[r["run"], r["method"], name, f"{p['threshold']:.4f}", f"{p['val_sensitivity']:.3f} / {p['val_specificity']:.3f}",
              _share(p["recall"]), _share(p["others_flagged"])] for r, name, p in points],
            ["run", "method", "operating point", "threshold", "val sensitivity / specificity", f"external {target} recall", "others flagged"],
        )
    mixes = [r for r in rows if r.get("class_mix")]
    if mixes:
        print_table(
            "prior: the class mix EM estimated for the external images (all the run's classes), beside the true mix",
            [[r["run"], *(f"{r['class_mix']['estimated'][name]:.3f} ({r['class_mix']['true'][name]:.3f})" for name in r["class_mix"]["true"]),
              f"{r['class_mix']['estimated_present']:.3f}"] for r in mixes],
            ["run", *(f"{name} estimated (true)" for name in mixes[0]["class_mix"]["true"]), "classes present, estimated"],
        )
    if any(checks.values()):
        print_table(
            "in distribution: each method adapted on the run's own test images, test split before -> after",
            [[name, method, "refused", "", ""] if "refused" in c else
             [name, method, *(f"{c['before'][k]:.3f} -> {c['after'][k]:.3f} ({c['after'][k] - c['before'][k]:+.3f})" for k in ("accuracy", "balanced_accuracy", "auc_macro"))]
             for name, by_method in checks.items() for method, c in by_method.items()],
            ["run", "method", "accuracy", "balanced accuracy", "macro AUC"],
        )
    if withheld:
        print_table(
            "in distribution: the test split with its metadata -> with it withheld (every image all unknown)",
            [[name, "refused: " + w["refused"][:60], "", "", ""] if "refused" in w else
             [name, *(f"{w['with'][k]:.3f} -> {w['withheld'][k]:.3f} ({w['withheld'][k] - w['with'][k]:+.3f})"
                      for k in ("accuracy", "balanced_accuracy", "auc_macro", "target_recall"))]
             for name, w in withheld.items()],
            ["run", "accuracy", "balanced accuracy", "macro AUC", f"{target} recall (run's rule)"],
        )
    if paired:
        print_table(
            "as trained, paired on the same external images (95% bootstrap intervals over images)",
            [[name, "refused: " + d["refused"], "", ""] if "refused" in d else
             [name, *(f"{d[k]['difference']:+.3f} [{d[k]['interval'][0]:+.3f}, {d[k]['interval'][1]:+.3f}]" for k in ("accuracy", "balanced_accuracy", "auc_macro"))]
             for name, d in paired.items()],
            ["difference", "accuracy", "balanced accuracy", f"AUC {target} vs rest"],
        )
    return 0


def _row_cells(r: dict[str, Any]) -> list[str]:
    if "refused" in r:
        return [r["run"], r["method"], "refused: " + r["refused"][:60], "", "", "", "", ""]
    return [r["run"], r["method"], _cell(r, "accuracy"), _cell(r, "balanced_accuracy"), _cell(r, "auc"),
            f"{r['target_recall']:.3f} ({r['rule']})", "  ".join(f"{k} {v:.3f}" for k, v in r["target_recall_by_rule"].items()),
            f"{r['uncertain']:.3f}"]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # flushed: a log file shows where a long run is


def _refused_or(measure: Any, *arguments: Any) -> dict[str, Any]:
    """``measure(*arguments)``, or ``{"refused": reason}`` when dermlab refuses the combination (a ConfigError)."""
    from dermlab.errors import ConfigError

    try:
        return measure(*arguments)
    except ConfigError as error:
        return {"refused": str(error).split(": ", 1)[-1]}


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell(row: dict[str, Any], key: str) -> str:
    interval = row["intervals"].get(key)
    return f"{row[key]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _adapted(run: Path, method: str, images: list[Path], args: argparse.Namespace,
             frame: pd.DataFrame | None = None) -> tuple[Any, dict[str, Any]]:
    """The run loaded, adapted by ``method`` on ``images`` (none for ``as trained``), and what adapting reported.
    ``frame`` (the images' rows, in their order): a fusion model adapts with their metadata, as it is scored."""
    from dermlab.data.metadata import encode_metadata
    from dermlab.models.checkpoint import load_checkpoint
    from dermlab.models.classifier import uses_metadata
    from dermlab.training.adapt import adapt_model

    loaded, details = load_checkpoint(run), {}
    if method != "as trained":
        options = {"epochs": args.tent_epochs, "lr": args.tent_lr} if method == "tent" else {}
        if frame is not None and uses_metadata(loaded.model):
            options["metadata"] = encode_metadata(frame.reset_index(drop=True))
        details = adapt_model(loaded, images, method, batch_size=args.batch_size, **options)
    return loaded, details


def _estimated_mix(details: dict[str, Any], classes: list[str], present: list[str], true: pd.Series) -> dict[str, Any] | None:
    """After ``prior``: the class mix EM estimated for the images, beside their true mix (labels only score)."""
    if "target_prior" not in details:
        return None
    estimated = dict(zip(classes, details["target_prior"]))
    return {"estimated": estimated, "estimated_present": sum(estimated[name] for name in present),
            "true": {name: float((true == name).mean()) for name in present}}


def _external_table(loaded: Any, external: Path) -> pd.DataFrame:
    """The external folder as a table of the run's classes (path, label; no metadata)."""
    from dermlab.data.datasets import load_dataset

    return load_dataset(external, replace(loaded.config.data, path=str(external), classes=loaded.classes)).frame


def _score_external(run: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    from dermlab.training.adapt import list_images

    loaded, details = _adapted(run, method, list_images([args.external]), args)
    return _score_frame(run, loaded, details, _external_table(loaded, args.external))


def _drawn_to_mix(frame: pd.DataFrame, shares: dict[str, float], seed: int = 0) -> pd.DataFrame:
    """Images of ``frame`` drawn without replacement (seeded) so that their class mix is ``shares``: as many images
    as the scarcest class allows, every class at its share of them."""
    from dermlab.errors import ConfigError

    counts = frame["label"].value_counts()
    missing = [name for name in shares if counts.get(name, 0) == 0]
    if missing:  # refused for this run (a row saying why), not a crash that loses the other rows
        raise ConfigError(f"no test images of {', '.join(missing)} to draw the external class mix from")
    total = min(counts[name] / share for name, share in shares.items() if share > 0)
    parts = [frame[frame["label"] == name].sample(n=int(total * share + 1e-9), random_state=seed) for name, share in shares.items()]
    return pd.concat(parts).reset_index(drop=True)


def _label_shift_row(run: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    """Label shift alone: the run's own test images drawn to the external folder's class mix (its labels only
    set the shares), their metadata withheld as every external image's is, adapted (``method``) and scored as the
    external folder is. What is left between this row and the external one is the change of source."""
    from dermlab.data.metadata import METADATA_COLUMNS
    from dermlab.data.run_data import prepare_run_data
    from dermlab.models.checkpoint import load_checkpoint

    source = load_checkpoint(run)
    true = _external_table(source, args.external)["label"]
    shares = {name: float(share) for name, share in true.value_counts(normalize=True).sort_index().items()}
    test = prepare_run_data(source.config, run).rows("test")
    drawn = _drawn_to_mix(test, shares).drop(columns=[c for c in METADATA_COLUMNS if c in test])
    loaded, details = _adapted(run, method, [Path(p) for p in drawn["path"]], args, frame=drawn)
    row = _score_frame(run, loaded, details, drawn)
    row.pop("_restricted")
    return {**row, "drawn": {name: int(n) for name, n in drawn["label"].value_counts().sort_index().items()}}


def _score_frame(run: Path, loaded: Any, details: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any]:
    """The row of figures for ``loaded`` (the run as trained or adapted) on ``frame``'s images (labels only score)."""
    from dermlab.evaluation.evaluate import evaluate_frame

    evaluation = replace(loaded.config.evaluation, bootstrap_resamples=1000)
    with tempfile.TemporaryDirectory() as out:
        metrics = evaluate_frame(loaded, frame, Path(out), evaluation)
        predictions = pd.read_csv(Path(out) / "predictions.csv")
    present = metrics["present_classes"]
    restricted = present["restricted_softmax"]
    target = restricted.get("target", {}).get("class") or present["classes"][0]
    rule = metrics.get("decision_rule") or "argmax"
    full_recall = present["full_softmax"]["recall"][target]  # argmax over all the run's classes
    recall_by_rule = {name: entry["recall"][target] for name, entry in (metrics.get("rules") or {}).items()} or {"argmax": full_recall}
    auc = restricted["auc"][target] if len(present["classes"]) > 2 else restricted["auc_macro"]
    intervals = restricted.get("intervals") or {}
    return {
        "target": target,
        "accuracy": restricted["accuracy"],
        "balanced_accuracy": restricted["balanced_accuracy"],
        "auc": auc,
        "intervals": {"accuracy": intervals.get("accuracy"), "balanced_accuracy": intervals.get("balanced_accuracy"),
                      "auc": intervals.get("auc_macro") if len(present["classes"]) == 2 else None},
        "target_recall": float(recall_by_rule.get(rule, full_recall)),
        "target_recall_by_rule": recall_by_rule,
        "rule": rule,
        "uncertain": float((metrics.get("abstention") or {}).get("rejected", 0.0)),
        "images": int(metrics["n"]),
        "val_operating_points": _val_operating_points(run, predictions, target),
        "class_mix": _estimated_mix(details, list(loaded.classes), present["classes"], predictions["true"]),
        "_restricted": _restricted(predictions, present["classes"]),  # for the paired differences; not written
    }


def _val_operating_points(run: Path, predictions: pd.DataFrame, target: str) -> dict[str, Any]:
    """The run's val operating points for ``target`` (``metrics.json``: its threshold on the target's probability for
    the fixed specificity and for the fixed sensitivity) applied to these images: the target's recall at each, and the
    share of the other images it flags. Empty without a fitted operating point (a run without ``metrics.json``).
    Read from metrics.json, not the checkpoint, so runs trained before checkpoints stored them are scored too."""
    import json

    from dermlab.evaluation.operating_point import OperatingPoints

    path = run / "metrics.json"
    fitted = (json.loads(path.read_text()).get("val") or {}).get("target") if path.is_file() else None
    points = OperatingPoints.from_target_metrics(fitted, "val")
    if points is None or points.target != target:
        return {}
    classes = [column.removeprefix("prob_") for column in predictions.columns if column.startswith("prob_")]
    truth = [classes.index(label) for label in predictions["true"]]
    scored = points.score(truth, predictions[[f"prob_{name}" for name in classes]].to_numpy(dtype=np.float64), classes)
    return {
        f"val {name}": {
            "threshold": at["threshold"], "val_sensitivity": at["val_sensitivity"], "val_specificity": at["val_specificity"],
            "recall": at["sensitivity"], "others_flagged": None if at["specificity"] is None else 1.0 - at["specificity"],
        }
        for name, at in scored["points"].items()
    }


def _restricted(predictions: pd.DataFrame, present: list[str]) -> dict[str, Any]:
    """Image ids, true labels and the softmax restricted to the classes present (rows by image id)."""
    ordered = predictions.sort_values("image_id")
    probabilities = ordered[[f"prob_{name}" for name in present]].to_numpy(dtype=np.float64)
    return {"ids": ordered["image_id"].tolist(), "true": ordered["true"].tolist(), "classes": list(present),
            "probabilities": probabilities / probabilities.sum(axis=1, keepdims=True)}


def _paired_differences(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """For every pair of runs, the later run's as-trained restricted accuracy, balanced accuracy and AUC minus the
    earlier run's (``--runs`` order), on the same external images, with 95% paired bootstrap intervals over images."""
    from dermlab.evaluation.bootstrap import paired_bootstrap

    trained = [row for row in rows if row["method"] == "as trained" and "_restricted" in row]
    paired = {}
    for i, earlier in enumerate(trained):
        base = earlier["_restricted"]
        index = {name: k for k, name in enumerate(base["classes"])}
        for later in trained[i + 1:]:
            name, other = f"{later['run']} - {earlier['run']}", later["_restricted"]
            if other["ids"] != base["ids"] or other["classes"] != base["classes"]:
                paired[name] = {"refused": "not scored on the same images and classes as " + earlier["run"]}
                continue
            result = paired_bootstrap([index[label] for label in base["true"]], base["probabilities"], other["probabilities"],
                                      base["classes"], resamples=1000, seed=0)
            paired[name] = {key: result[key] for key in ("accuracy", "balanced_accuracy", "auc_macro")}
    return paired


def _in_distribution_check(run: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    import json

    from dermlab.data.run_data import prepare_run_data
    from dermlab.evaluation.evaluate import evaluate_frame

    loaded, _ = _adapted(run, "as trained", [], args)
    test = prepare_run_data(loaded.config, run).rows("test")
    adapted, _ = _adapted(run, method, [Path(p) for p in test["path"]], args, frame=test)
    before_path = run / "eval" / "test" / "metrics.json"
    with tempfile.TemporaryDirectory() as out:
        before = json.loads(before_path.read_text()) if before_path.is_file() else evaluate_frame(loaded, test, Path(out) / "b")
        after = evaluate_frame(adapted, test, Path(out) / "a")
    keys = ("accuracy", "balanced_accuracy", "auc_macro")
    return {"images": len(test), "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}


def _metadata_withheld(run: Path) -> dict[str, Any]:
    """The run's test split scored with its metadata and with the metadata columns removed (all unknown): accuracy,
    balanced accuracy, macro AUC and the target class's recall at the run's decision rule."""
    from dermlab.data.metadata import METADATA_COLUMNS
    from dermlab.data.run_data import prepare_run_data
    from dermlab.errors import ConfigError
    from dermlab.evaluation.evaluate import evaluate_frame
    from dermlab.models.checkpoint import load_checkpoint
    from dermlab.models.classifier import uses_metadata

    loaded = load_checkpoint(run)
    if not uses_metadata(loaded.model):
        raise ConfigError(f"{run}: its model reads no metadata")
    test = prepare_run_data(loaded.config, run).rows("test")
    if not any(column in test for column in METADATA_COLUMNS):
        raise ConfigError(f"{run}: its test split has no metadata to withhold")
    scored = {}
    with tempfile.TemporaryDirectory() as out:
        for name, frame in (("with", test), ("withheld", test.drop(columns=[c for c in METADATA_COLUMNS if c in test]))):
            metrics = evaluate_frame(loaded, frame, Path(out) / name)
            target = (metrics.get("target") or {}).get("class") or metrics["classes"][0]
            rule = metrics.get("decision_rule") or "argmax"
            recall = ((metrics.get("rules") or {}).get(rule) or {}).get("recall") or {k: v["recall"] for k, v in metrics["per_class"].items()}
            scored[name] = {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
                            "auc_macro": metrics["auc_macro"], "target_recall": float(recall[target]), "target": target, "rule": rule}
    return {"images": len(test), **scored}


def _quick_setup(work: Path) -> tuple[list[Path], Path]:
    """A random tiny model over a synthetic HAM10000-layout set (twice: ``run`` and its copy ``run-copy``, whose
    paired difference must be exactly 0), and a two-class external folder of its test images. The model fuses the
    set's metadata, so ``--withhold-metadata`` has some to withhold."""
    import json

    import torch

    from dermlab.config import Config, apply_overrides
    from dermlab.data.run_data import prepare_run_data
    from dermlab.models.checkpoint import save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing

    data = synthetic_dataset(work, 80, 32)
    root = Path(work) / "quick-external"
    shutil.rmtree(root, ignore_errors=True)
    run = root / "run"
    config = apply_overrides(Config(), [f"data.path={data}", "model.name=test_efficientnet", "model.weights=none",
                                        "model.input_size=[32,32]", "data.duplicates=none", "evaluation.bootstrap_resamples=50",
                                        "model.metadata_fusion=true"])
    split = prepare_run_data(config, run)
    model = create_model(config.model, len(split.classes), load_weights=False)
    for layer in model.modules():  # as if trained with its BatchNorm statistics following the batches
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.num_batches_tracked.fill_(1)
    prior = split.frame[split.frame["split"] == "train"]["label"].value_counts().reindex(split.classes, fill_value=1)
    save_checkpoint(run / "checkpoints" / "best.ckpt", model, config, split.classes, resolve_preprocessing(model, config.model),
                    decision={"tau": 1.0, "class_prior": (prior / prior.sum()).tolist(), "default": "argmax"})
    external = root / "external"
    for _, row in split.frame[split.frame["label"].isin(["mel", "nv"])].iterrows():
        (external / row["label"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(row["path"], external / row["label"] / Path(row["path"]).name)
    # val operating points as a trained run's metrics.json holds them: one flags every image, one none
    points = {"sensitivity_at_specificity": {"requested": 0.8, "specificity": 0.8, "sensitivity": 0.9, "threshold": 0.0},
              "specificity_at_sensitivity": {"requested": 0.8, "specificity": 0.7, "sensitivity": 0.8, "threshold": 1.5}}
    (run / "metrics.json").write_text(json.dumps({"val": {"target": {"class": "mel", **points}}}))
    shutil.copytree(run, root / "run-copy")
    return [run, root / "run-copy"], external


if __name__ == "__main__":
    raise SystemExit(main())
