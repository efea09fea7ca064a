"""Flagging what a model has not seen: telling another clinic's images from its own, per image and per set.

    nice .venv/bin/python benchmarks/familiarity.py --runs /work/runs/accuracy/default \
        --external ../shared/data/ISIC_external_dev

For every ``--runs`` run (its own TTA views, temperature and decision rule throughout):

- the training images' feature statistics (:mod:`dermlab.evaluation.familiarity`), fitted here exactly as
  training now fits them (train and val split, identity view) without writing to the run, so runs trained before
  them, or before they were scored on the identity view, are measured as a run trained today;
- **shift detection**: the AUROC, with a 95% bootstrap interval, of telling the ``--external`` images from the
  run's own test images by each per-image score: the level score (:mod:`dermlab.evaluation.level_statistics`:
  channel statistics of each feature level of the backbone, fitted here on the train split, scaled on val), the
  Mahalanobis distance of the pooled features, and the logit scores the abstention rule had before (max
  probability, energy);
- **per set**: the unusual share, shift score and warning of :meth:`FeatureStatistics.shift` on the test split
  and on the external folder, and the unusual share by the level score;
- **abstention**: rules fitted on val at the run's false-rejection target (as training fits them:
  :func:`~dermlab.evaluation.abstention.fit_abstention`) with the logit scores (max probability and energy, the
  old default), ``mahalanobis`` alone, the logit scores with ``mahalanobis``, ``level`` alone, and the logit
  scores with ``level`` (the HAM10000 recipe's rule); for each, the share of test and external images marked uncertain,
  test accuracy on the accepted images, and how many of the external folder's images of ``--target`` that the
  as-trained rule answers confidently and wrongly the rule turns into "uncertain".

Labels of the external folder only score. ``--quick``: a random tiny model on synthetic images (smoke test).
Writes ``benchmarks/results/familiarity.json`` (``--quick``: ``familiarity-quick.json``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_common_arguments, print_table, write_results  # noqa: E402
from external import _quick_setup  # noqa: E402

LOGIT_RULE = "logit scores"
RULES = {LOGIT_RULE: ("max_probability", "energy"), "mahalanobis": ("mahalanobis",),
         "logit scores + mahalanobis": ("max_probability", "energy", "mahalanobis"), "level": ("level",),
         "logit scores + level": ("max_probability", "energy", "level")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--runs", nargs="+", type=Path, default=[], help="run folders to measure")
    parser.add_argument("--external", type=Path, help="the external folder (class sub-folders, a subset of the runs' classes)")
    parser.add_argument("--target", default="mel", help="the class whose confident errors are counted (default mel)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the AUROC intervals (default 1000)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.external = _quick_setup(args.work)
        args.resamples = 50
    if not args.runs or args.external is None:
        parser.error("--runs and --external are needed (or --quick)")
    results = {run.name: _measure(run, args) for run in args.runs}
    _print(results, args)
    args.runs, args.external = [str(run) for run in args.runs], str(args.external)  # plain data for the JSON
    write_results("familiarity", args, {"runs": results})
    return 0


def _outputs(loaded: Any, frame: Any, views: tuple[str, ...], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    from dermlab.evaluation.evaluate import predict_view_outputs

    return predict_view_outputs(loaded, frame, views, batch_size=batch_size)


def _measure(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dermlab.data.datasets import load_dataset
    from dermlab.data.run_data import prepare_run_data
    from dermlab.evaluation.familiarity import fit_feature_statistics
    from dermlab.evaluation.inference import resolve_behaviour
    from dermlab.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(run)
    behaviour = resolve_behaviour(loaded.config.evaluation.tta, loaded.extras, str(loaded.path))
    data = prepare_run_data(loaded.config, run)
    batch = loaded.config.data.eval_batch_size
    external = load_dataset(args.external, replace(loaded.config.data, path=str(args.external), classes=loaded.classes)).frame
    outputs = {name: _outputs(loaded, frame, behaviour.views, batch) for name, frame in
               (("val", data.rows("val")), ("test", data.rows("test")), ("external", external))}
    train_features = _outputs(loaded, data.rows("train"), ("identity",), batch)[1]
    statistics = fit_feature_statistics(train_features, outputs["val"][1], loaded.config.evaluation.feature_components)
    distances = {name: statistics.distance(features) for name, (_, features) in outputs.items()}
    levels, descriptors = _level_statistics(loaded, {"train": data.rows("train"), "val": data.rows("val"),
                                                     "test": data.rows("test"), "external": external}, batch)
    level_scores = {name: levels.score(descriptors[name]) for name in ("val", "test", "external")} if levels else {}
    level_unusual = {name: float((level_scores[name] > levels.unusual_score).mean()) for name in ("test", "external")} if levels else {}
    detection = _detection(outputs, distances, behaviour.temperature, args.resamples, level_scores)
    sets = {name: {**statistics.shift(outputs[name][1]).to_dict(), "threshold": statistics.shift_threshold(len(outputs[name][1])),
                   "level_unusual_share": level_unusual.get(name)}
            for name in ("test", "external")}
    truth = {"test": data.rows("test")["label"].to_numpy(), "external": external["label"].to_numpy()}
    rules = _rules(loaded, behaviour, outputs, statistics, truth, args.target, levels, descriptors)
    return {"views": list(behaviour.views), "train_images": statistics.images,
            "images": {name: int(len(d)) for name, d in distances.items()}, "detection": detection, "sets": sets, "rules": rules}


def _level_statistics(loaded: Any, frames: dict[str, Any], batch: int) -> tuple[Any, dict[str, dict[str, np.ndarray]]]:
    """Level statistics (:mod:`dermlab.evaluation.level_statistics`) fitted on train and val here, as training
    fits them, and each frame's level descriptors; ``(None, {})`` for a model without feature levels."""
    from dermlab.errors import ConfigError
    from dermlab.evaluation.evaluate import level_descriptors
    from dermlab.evaluation.level_statistics import feature_levels, fit_level_statistics

    try:
        feature_levels(loaded.model)
    except ConfigError as error:
        print(f"no level statistics: {error}")
        return None, {}
    descriptors = {name: level_descriptors(loaded, frame, batch_size=batch) for name, frame in frames.items()}
    return fit_level_statistics(descriptors["train"], descriptors["val"], loaded.config.evaluation.feature_components), descriptors


def _detection(outputs: dict, distances: dict, temperature: float, resamples: int, level_scores: dict) -> dict[str, Any]:
    """AUROC of external (positive) against test by each per-image score, higher = more external."""
    from dermlab.evaluation.abstention import compute_scores

    logit_scores = {name: compute_scores(outputs[name][0], ["max_probability", "energy"], temperature) for name in ("test", "external")}
    unfamiliarity = {
        **({"level statistics (mean z over feature levels)": (level_scores["test"], level_scores["external"])} if level_scores else {}),
        "mahalanobis distance": (distances["test"], distances["external"]),
        "1 - max probability": (-logit_scores["test"]["max_probability"], -logit_scores["external"]["max_probability"]),
        "minus energy": (-logit_scores["test"]["energy"], -logit_scores["external"]["energy"]),
    }
    return {name: _auroc_with_interval(inside, outside, resamples) for name, (inside, outside) in unfamiliarity.items()}


def _auroc_with_interval(inside: np.ndarray, outside: np.ndarray, resamples: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    scores = np.r_[inside, outside]
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        a, b = rng.integers(0, len(inside), len(inside)), rng.integers(0, len(outside), len(outside))
        draws.append(roc_auc_score(labels, np.r_[inside[a], outside[b]]))
    low, high = np.percentile(draws, [2.5, 97.5]) if draws else (np.nan, np.nan)
    return {"auroc": float(roc_auc_score(labels, scores)), "interval": [float(low), float(high)]}


def _rules(loaded: Any, behaviour: Any, outputs: dict, statistics: Any, truth: dict, target: str, levels: Any,
           descriptors: dict) -> dict[str, Any]:
    """Each rule of ``RULES`` fitted on val (the ``level`` ones only with level statistics); what it marks
    uncertain on test and external, and the confident errors of the logit-score rule it catches."""
    from dermlab.evaluation.abstention import fit_abstention, needs_levels

    evaluation = loaded.config.evaluation
    target_index = loaded.classes.index(target)
    fitted = {name: fit_abstention(outputs["val"][0], evaluation.abstain_false_rejection, scores, behaviour.temperature,
                                   behaviour.views, outputs["val"][1], statistics, descriptors.get("val"), levels)
              for name, scores in RULES.items() if levels is not None or not needs_levels(scores)}
    decisions = {name: {split: replace(behaviour, abstention=rule).decide(*outputs[split], descriptors.get(split))
                        for split in ("test", "external")} for name, rule in fitted.items()}
    reference = decisions[LOGIT_RULE]["external"]
    is_target = truth["external"] == target
    confident_wrong = is_target & (reference.predicted != target_index) & ~reference.uncertain
    index = {name: i for i, name in enumerate(loaded.classes)}
    test_truth = np.array([index[label] for label in truth["test"]])
    table = {}
    for name, by_split in decisions.items():
        test, external = by_split["test"].uncertain, by_split["external"].uncertain
        accepted = ~test
        table[name] = {
            "scores": list(RULES[name]),
            "val_rejection": fitted[name].val_rejection,
            "test_uncertain": float(test.mean()),
            "test_accuracy_accepted": float((by_split["test"].predicted[accepted] == test_truth[accepted]).mean()),
            "external_uncertain": float(external.mean()),
            f"external_{target}_confident_wrong_as_trained": int(confident_wrong.sum()),
            f"external_{target}_of_those_now_uncertain": int((confident_wrong & external).sum()),
            f"external_{target}_images": int(is_target.sum()),
        }
    return table


def _print(results: dict[str, Any], args: argparse.Namespace) -> None:
    for run, result in results.items():
        note = " (statistics fitted here, as training fits them)"
        print_table(
            f"{run}: telling {args.external} ({result['images']['external']}) from its test split ({result['images']['test']}){note}",
            [[score, f"{d['auroc']:.3f} [{d['interval'][0]:.3f}, {d['interval'][1]:.3f}]"] for score, d in result["detection"].items()],
            ["per-image score", "AUROC (95% interval)"],
        )
        print_table(
            f"{run}: per set",
            [[name, f"{s['unusual_share']:.3f}",
              f"{s['level_unusual_share']:.3f}" if s.get("level_unusual_share") is not None else "-",
              f"{s['shift_score']:.3f} (val {s['reference_shift_score']:.3f})",
              f"{s['threshold']:.3f}" if s["threshold"] is not None else "-", "yes" if s["warning"] else "no"]
             for name, s in result["sets"].items()],
            ["images", "unusual share (expected 0.05)", "by level statistics (expected 0.05)", "shift score",
             "1-in-100 threshold at this size", "warning"],
        )
        target = args.target
        print_table(
            f"{run}: abstention rules fitted on val",
            [[name, f"{r['val_rejection']:.3f}", f"{r['test_uncertain']:.3f}", f"{r['test_accuracy_accepted']:.3f}",
              f"{r['external_uncertain']:.3f}",
              f"{r[f'external_{target}_of_those_now_uncertain']} of {r[f'external_{target}_confident_wrong_as_trained']}"]
             for name, r in result["rules"].items()],
            ["rule", "val uncertain", "test uncertain", "test accuracy accepted", "external uncertain",
             f"confident wrong external {target} -> uncertain"],
        )


if __name__ == "__main__":
    raise SystemExit(main())
