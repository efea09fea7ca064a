"""Accuracy on real dermoscopy, side by side: dermlab's default recipe against the plain timm peer and ablations.

    nice .venv/bin/python benchmarks/accuracy.py --data ../shared/data/HAM10000 --out runs/ham10000

One command, one lesion-disjoint split (``OUT/splits.csv``, made first with ``dermlab split``, seed 42, 6:2:2):

1. the peer, ``../shared/baselines/plain_timm_finetune.py`` (never edited), run as a child process on that
   ``splits.csv`` (``--peer-seeds`` seeds, ``OUT/peer-seed<S>``);
2. every run of ``configs/grids/accuracy.yaml`` (``--grid``), trained as ``dermlab experiment`` does (the default recipe,
   its second seed, the old default, reference A rebuilt, ablations that need their own training);
3. the ablations that need no training, scored from the default run's own checkpoint with ``dermlab
   evaluate``: no TTA (identity view), no logit adjustment (argmax rule), no EMA (the raw weights of the same
   run, ``checkpoints/raw.ckpt``);
4. the ensemble of the default and its second seed (``dermlab ensemble``, ``OUT/ensemble-default-x2``), once
   both have trained, with what it adds over the default per extra minute of the two trainings.

Every row is scored by the same code on the test split: accuracy (argmax rule), balanced accuracy (the run's
balanced rule where it has one, else argmax), macro AUC, melanoma sensitivity at 80% specificity, macro F1,
each with a 95% bootstrap interval over the test split's lesions (1,000 resamples, seed 0), the recall of every
class and each row's wall time (the whole run as a user waits for it: training and the final evaluation for
dermlab, training, loading and prediction for the peer; and the training alone); then the
paired lesion-bootstrap differences (same resamples for both) of each dermlab row from the peer, and of
each second seed from its first (the noise of one run), and of the default from its no-LP-init ablation. Finished
rows are skipped, so the command continues where it stopped; a row skipped as finished keeps its wall time.
``--quick`` does the same on synthetic images with a tiny model and a 1-epoch peer on 24 images (smoke test).

Writes ``benchmarks/results/accuracy.json`` (``--quick``: ``accuracy-quick.json``) and ``OUT/accuracy.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_grid_arguments, print_table, resolve_grid, run_grid, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared" / "baselines" / "plain_timm_finetune.py"
HEADLINE = ["accuracy", "balanced_accuracy", "auc_macro", "mel_sensitivity_at_80_spec"]
TARGETS = {"accuracy": 0.85, "balanced_accuracy": 0.75, "auc_macro": 0.965, "mel_sensitivity_at_80_spec": 0.85}
#: the ablations scored from the default run's own checkpoint: row name -> ``dermlab evaluate`` options
EVALUATED_ABLATIONS = {
    "default, no TTA": ["--tta-views", "identity"],
    "default, no EMA (raw weights)": ["--weights", "raw"],
}
#: ensembles made from trained rows with ``dermlab ensemble``: row name -> member rows
ENSEMBLES = {"ensemble-default-x2": ("default", "default-seed2")}
#: paired differences reported: (row, baseline row); a pair is skipped unless both rows were scored
PAIRS = [
    ("default", "peer-seed0"), ("default-seed2", "peer-seed1"), ("ensemble-default-x2", "peer-seed0"),
    ("default-seed2", "default"), ("peer-seed1", "peer-seed0"), ("ensemble-default-x2", "default"),
    ("default", "no_lp_init"), ("default_bn_trained", "default"), ("other_clinics", "previous_default"),
    ("default", "previous_default"), ("colour_constancy", "previous_default"), ("default", "colour_constancy"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, ROOT / "configs" / "grids" / "accuracy.yaml")
    parser.add_argument("--peer", type=Path, default=PEER, help=f"the peer script (default {PEER})")
    parser.add_argument(
        "--peer-seeds", type=int, nargs="*", default=None,
        help="seeds of the peer (default: 0 1 with the accuracy grid, none with another --grid; no values: no peer)",
    )
    parser.add_argument("--peer-epochs", type=int, default=6, help="the peer's epochs (default 6, its own default)")
    args = parser.parse_args()
    grid_path = resolve_grid(parser, args)
    if args.peer_seeds is None:
        args.peer_seeds = [0, 1] if args.grid.stem == "accuracy" else []
    args.out.mkdir(parents=True, exist_ok=True)
    splits = _ensure_splits(args.data, args.out)
    wanted = set(args.only) if args.only else None

    peer_rows = []
    for seed in args.peer_seeds:
        name = f"peer-seed{seed}"
        if wanted is None or name in wanted:
            peer_rows.append(_peer_row(args, name, seed, splits))
    names = [entry for entry in _grid_names(grid_path) if wanted is None or entry in wanted]
    if names:
        run_grid(grid_path, args.data, args.out, names)
    rows = peer_rows + [_run_row(args.out / name, splits) for name in names]
    if "default" in names:
        default = next(r for r in rows if r["run"] == "default")
        rows.append({**default, "run": "default, no logit adjustment (argmax rule)", "balanced_accuracy": default["balanced_accuracy_argmax"],
                     "recall_balanced_rule": default["recall"], "wall_min": "(same run)", "train_min": ""})
        rows += [_evaluated_ablation(args.out / "default", label, options, splits) for label, options in EVALUATED_ABLATIONS.items()]
    for name, members in ENSEMBLES.items():
        if wanted is None or name in wanted:
            rows.append(_ensemble_row(args.out, name, members, splits, required=wanted is not None))
    rows = [row for row in rows if row is not None]

    counts = _class_counts(splits)
    classes = list(counts.columns)
    _print_rows(rows, classes)
    targets = _targets(rows)
    paired = _paired(PAIRS)
    gain = _ensemble_gain(rows)
    print_paired(paired, "95% lesion-bootstrap interval")
    print_table("images per split and class", [[split, *row.tolist()] for split, row in counts.iterrows()], ["split", *classes])
    markdown = _markdown(rows, classes, counts, targets, paired, gain)
    (args.out / f"{grid_path.stem}.md").write_text(markdown)
    print(f"\nwrote {args.out / (grid_path.stem + '.md')}")
    write_results(args.grid.stem, args, {"runs": rows, "targets": targets, "paired": paired, "ensemble_gain": gain, "class_counts": counts.to_dict()})
    return 0


# --------------------------------------------------------------------------------------------- the split
def _ensure_splits(data: str, out: Path) -> Path:
    """``OUT/splits.csv``, made with ``dermlab split`` when missing, so the peer and every run share it."""
    splits = out / "splits.csv"
    if not splits.is_file():
        command = [sys.executable, "-m", "dermlab", "split", str(data), "--out", str(out)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return splits


def _grid_names(grid_path: Path) -> list[str]:
    import yaml

    return [entry["name"] for entry in yaml.safe_load(grid_path.read_text())["runs"]]


# --------------------------------------------------------------------------------------------- the peer
def _peer_row(args: argparse.Namespace, name: str, seed: int, splits: Path) -> dict[str, Any]:
    """Run the peer (unless it finished on this very ``splits.csv``) and score its test predictions."""
    out = args.out / name
    digest = _file_digest(splits)
    done = out / "benchmark.json"
    if done.is_file() and json.loads(done.read_text()).get("splits_sha256") == digest:
        print(f"[{name}] already finished on this splits.csv, skipped", flush=True)
    else:
        command = [sys.executable, str(args.peer), "--splits", str(splits), "--out", str(out), "--seed", str(seed), "--epochs", str(args.peer_epochs)]
        if getattr(args, "peer_size", None):
            command += ["--size", *(str(side) for side in args.peer_size)]
        if args.quick:
            command += ["--limit", "24", "--epochs", "1", "--size", "32", "32"]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        wall = time.perf_counter() - started
        done.write_text(json.dumps({"splits_sha256": digest, "wall_time_s": round(wall, 1), "command": command}, indent=1))
    record = json.loads(done.read_text())
    predictions = pd.read_csv(out / "test_predictions.csv")
    classes = [c for c in predictions.columns if c not in ("image_id", "label")]
    groups = _groups_of(predictions["image_id"], splits)
    truth = predictions["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    prob = predictions[classes].to_numpy(dtype=float)
    peer_metrics = json.loads((out / "metrics.json").read_text())
    row = _score(name, truth, prob, classes, groups, balanced_prob=None, image_ids=predictions["image_id"])
    row.update(wall_min=round(record["wall_time_s"] / 60, 1), train_min=round(peer_metrics["train_seconds"] / 60, 1), rule="argmax", tta="hflip")
    return row


def _groups_of(image_ids: pd.Series, splits: Path) -> np.ndarray:
    frame = pd.read_csv(splits)
    group = dict(zip(frame["image_id"].astype(str), frame["group"].astype(str)))
    return image_ids.astype(str).map(group).fillna(image_ids.astype(str)).to_numpy()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- dermlab rows
def _run_row(run_dir: Path, splits: Path, eval_dir: Path | None = None, name: str | None = None) -> dict[str, Any]:
    """A dermlab run's row, scored from its test predictions (``eval_dir``: another evaluation of it)."""
    from dermlab.evaluation.decision import balanced_probabilities

    predictions = pd.read_csv((eval_dir or run_dir / "eval" / "test") / "predictions.csv")
    classes = json.loads((run_dir / "classes.json").read_text())
    truth = predictions["true"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    prob = predictions[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rule = metrics.get("decision") or {}
    balanced = balanced_probabilities(prob, rule.get("tau"), rule.get("class_prior")) if rule.get("tau") is not None else None
    row = _score(name or run_dir.name, truth, prob, classes, _groups_of(predictions["image_id"], splits), balanced_prob=balanced,
                 image_ids=predictions["image_id"] if eval_dir is None else None)
    wall_min, train_min = _run_minutes(run_dir)
    row.update(wall_min=wall_min, train_min=train_min, rule="argmax / balanced (tau {:.2f})".format(rule["tau"]) if balanced is not None else "argmax", tta=",".join((metrics["test"].get("tta") or {}).get("views", []) or ["identity"]) if isinstance(metrics["test"].get("tta"), dict) else metrics["test"].get("tta"))
    return row


def _run_minutes(run_dir: Path) -> tuple[float, float]:
    """A run's wall and training minutes.

    Wall is the whole command, training and the final evaluation on val and test: ``config.yaml`` is written when
    training starts, ``metrics.json`` when the evaluation ends (file times; copied runs keep theirs). Training is
    what ``dermlab experiment`` records in ``metrics.json`` (caches included).
    """
    wall = (run_dir / "metrics.json").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime
    train = json.loads((run_dir / "metrics.json").read_text()).get("wall_time_s", float("nan"))
    return round(wall / 60, 1), round(train / 60, 1)


def _evaluated_ablation(run_dir: Path, label: str, options: list[str], splits: Path) -> dict[str, Any]:
    """``dermlab evaluate RUN OPTIONS`` into ``RUN/eval/<slug>`` (once), scored as a row."""
    slug = "ablation-" + "".join(ch if ch.isalnum() else "-" for ch in label.split(",", 1)[1].strip()).strip("-")
    out = run_dir / "eval" / slug
    if not (out / "metrics.json").is_file():
        command = [sys.executable, "-m", "dermlab", "evaluate", str(run_dir), "--split", "test", "--out", str(out), *options]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    row = _run_row(run_dir, splits, eval_dir=out, name=label)
    row["wall_min"], row["train_min"] = "(same run)", ""
    return row


def _ensemble_row(out: Path, name: str, members: tuple[str, ...], splits: Path, required: bool) -> dict[str, Any] | None:
    """``dermlab ensemble MEMBERS --out OUT/NAME`` (once), scored as a row whose times are its members' plus its own.

    Members still untrained skip the row with a message, or stop the command when the row was asked for by name.
    """
    missing = [m for m in members if not (out / m / "metrics.json").is_file()]
    if missing:
        message = f"[{name}] needs the trained rows {', '.join(missing)} (train them first, e.g. --only {' '.join(missing)})"
        if required:
            raise SystemExit(message)
        print(message + "; skipped", flush=True)
        return None
    run_dir = out / name
    if not (run_dir / "metrics.json").is_file():
        command = [sys.executable, "-m", "dermlab", "ensemble", *(str(out / m) for m in members), "--out", str(run_dir)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    row = _run_row(run_dir, splits)
    minutes = [_run_minutes(out / m) for m in members]
    row["scoring_min"] = row["wall_min"]  # the ensemble command itself: loading the members, scoring val and test
    row["wall_min"] = round(row["wall_min"] + sum(wall for wall, _ in minutes), 1)
    row["train_min"] = round(sum(train for _, train in minutes), 1)
    return row


def _ensemble_gain(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What each ensemble adds over its first member, in all and per extra minute of wall time."""
    by_name = {r["run"]: r for r in rows}
    out = {}
    for name, members in ENSEMBLES.items():
        if name not in by_name or members[0] not in by_name:
            continue
        ensemble, first = by_name[name], by_name[members[0]]
        extra = ensemble["wall_min"] - first["wall_min"]
        out[name] = {"over": members[0], "extra_wall_min": round(extra, 1)} | {
            key: {"gain": round(ensemble[key]["value"] - first[key]["value"], 4),
                  "gain_per_extra_min": round((ensemble[key]["value"] - first[key]["value"]) / extra, 5) if extra > 0 else None}
            for key in [*HEADLINE, "f1_macro"]
        }
    return out


# --------------------------------------------------------------------------------------------- scoring
#: each scored row's test predictions, by row name: (image ids, classes, truth, probabilities, balanced-rule probabilities)
_PREDICTIONS: dict[str, tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]] = {}


def _paired(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Paired lesion-bootstrap differences ``row - baseline`` of the headline figures on the same test images.

    Balanced accuracy compares each row's balanced rule (argmax for the peer, which has one rule); the other
    figures compare argmax with argmax. Rows align by image id; the baseline's class columns are put in the row's
    order. A pair is skipped unless both rows were scored in this invocation.
    """
    from dermlab.evaluation.bootstrap import paired_bootstrap

    out = {}
    for name, baseline in pairs:
        if name not in _PREDICTIONS or baseline not in _PREDICTIONS:
            continue
        ids, classes, truth, prob, balanced = _PREDICTIONS[name]
        base_ids, base_classes, _, base_prob, base_balanced = _PREDICTIONS[baseline]
        shared = np.isin(ids, base_ids)  # the images both scored (all of them, unless the peer ran with --limit)
        if shared.sum() < 2:
            continue
        ids, truth, prob, balanced, groups = ids[shared], truth[shared], prob[shared], balanced[shared], _GROUPS[name][shared]
        order = pd.Series(range(len(base_ids)), index=base_ids).reindex(ids).to_numpy(dtype=int)
        columns = [base_classes.index(c) for c in classes]
        target = "mel" if "mel" in classes else None
        argmax = paired_bootstrap(truth, base_prob[order][:, columns], prob, classes, groups, resamples=1000, seed=0, target_class=target)
        rule = paired_bootstrap(truth, base_balanced[order][:, columns], balanced, classes, groups, resamples=1000, seed=0)
        keys = {"accuracy": argmax["accuracy"], "balanced_accuracy": rule["balanced_accuracy"], "auc_macro": argmax["auc_macro"],
                "f1_macro": argmax["f1_macro"]}
        if "sensitivity_at_specificity_mel" in argmax:
            keys["mel_sensitivity_at_80_spec"] = argmax["sensitivity_at_specificity_mel"]
        out[f"{name} - {baseline}"] = {"images": int(shared.sum())} | {k: {"difference": round(v["difference"], 4) if v["difference"] is not None else None,
                                       "interval": [round(x, 4) for x in v["interval"]] if v["interval"] else None,
                                       "significant": v["significant"]} for k, v in keys.items()}
    return out


_GROUPS: dict[str, np.ndarray] = {}


def _score(name: str, truth: np.ndarray, prob: np.ndarray, classes: list[str], groups: np.ndarray, balanced_prob: np.ndarray | None, image_ids: Any = None) -> dict[str, Any]:
    """The headline figures with 95% lesion-bootstrap intervals; balanced accuracy from ``balanced_prob``'s argmax."""
    from dermlab.evaluation.bootstrap import bootstrap_intervals
    from dermlab.evaluation.metrics import compute_metrics

    if image_ids is not None:
        _PREDICTIONS[name] = (np.asarray(image_ids).astype(str), list(classes), truth, prob, prob if balanced_prob is None else balanced_prob)
        _GROUPS[name] = groups

    def figures(p: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
        metrics = compute_metrics(truth, p, classes, target_class="mel" if "mel" in classes else None)
        intervals = bootstrap_intervals(truth, p, classes, groups, resamples=1000, seed=0, target_class="mel" if "mel" in classes else None)["intervals"]
        return metrics, intervals

    metrics, intervals = figures(prob)
    bal_metrics, bal_intervals = (metrics, intervals) if balanced_prob is None else figures(balanced_prob)
    sensitivity = ((metrics.get("target") or {}).get("sensitivity_at_specificity") or {}).get("sensitivity", float("nan"))

    def cell(value: float, interval: list[float] | None) -> dict[str, Any]:
        return {"value": round(float(value), 4), "ci": [round(float(x), 4) for x in interval] if interval else None}

    return {
        "run": name,
        "accuracy": cell(metrics["accuracy"], intervals.get("accuracy")),
        "balanced_accuracy": cell(bal_metrics["balanced_accuracy"], bal_intervals.get("balanced_accuracy")),
        "balanced_accuracy_argmax": cell(metrics["balanced_accuracy"], intervals.get("balanced_accuracy")),
        "auc_macro": cell(metrics["auc_macro"], intervals.get("auc_macro")),
        "mel_sensitivity_at_80_spec": cell(sensitivity, intervals.get("sensitivity_at_specificity_mel")),
        "f1_macro": cell(metrics["f1_macro"], intervals.get("f1_macro")),
        "precision_macro": cell(metrics["precision_macro"], intervals.get("precision_macro")),
        "f1": {c: _rounded(v["f1"]) for c, v in metrics["per_class"].items()},
        "recall": {c: _rounded(v["recall"]) for c, v in metrics["per_class"].items()},
        "recall_balanced_rule": {c: _rounded(v["recall"]) for c, v in bal_metrics["per_class"].items()},
    }


def _rounded(value: float | None) -> float:
    """A recall to 3 places; NaN for a class absent from the split (no recall)."""
    return float("nan") if value is None else round(float(value), 3)


def _class_counts(splits: Path) -> pd.DataFrame:
    frame = pd.read_csv(splits)
    counts = pd.crosstab(frame["split"], frame["label"])
    order = counts.loc[["train"]].iloc[0].sort_values(ascending=False).index.tolist() if "train" in counts.index else list(counts.columns)
    return counts.reindex(index=["train", "val", "test"], columns=order).fillna(0).astype(int)


def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    default = next((r for r in rows if r["run"] == "default"), None)
    peers = [r for r in rows if r["run"].startswith("peer")]
    if default is None:
        return {}
    out = {}
    for key, goal in TARGETS.items():
        value = default[key]["value"]
        out[key] = {"value": value, "target": goal, "met": bool(value >= goal)}
        if peers:
            out[key]["peer"] = peers[0][key]["value"]
            out[key]["ahead_of_peer"] = bool(value > peers[0][key]["value"])
    return out


def _fmt(cell: Any) -> str:
    if isinstance(cell, dict):
        text = f"{cell['value']:.3f}"
        return text + (f" [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}]" if cell.get("ci") else "")
    return str(cell)


def _print_rows(rows: list[dict[str, Any]], classes: list[str]) -> None:
    keys = [*HEADLINE, "f1_macro"]
    print_table("test split: figures with 95% lesion-bootstrap intervals", [[r["run"], *(_fmt(r[k]) for k in keys), r["wall_min"], r.get("train_min", "")] for r in rows], ["run", "accuracy", "balanced acc", "macro AUC", "mel sens @80% spec", "macro F1", "wall min", "train min"])
    print_table("test recall per class (argmax rule)", [[r["run"], *[r["recall"].get(c, float("nan")) for c in classes]] for r in rows], ["run", *classes])


def print_paired(paired: dict[str, Any], interval: str) -> None:
    """Each pair's differences as a console table (``interval`` names the intervals, e.g. their bootstrap)."""
    for pair, figures in paired.items():
        print_table(f"paired differences {pair} ({interval}; * excludes 0)",
                    [[k, f"{v['difference']:+.3f}" if v["difference"] is not None else "-",
                      f"[{v['interval'][0]:+.3f}, {v['interval'][1]:+.3f}]" if v["interval"] else "-", "*" if v["significant"] else ""]
                     for k, v in figures.items() if k != "images"],
                    ["metric", "difference", "interval", ""])


def _paired_markdown(paired: dict[str, Any]) -> list[str]:
    """One markdown table per paired difference of :func:`_paired`, each after a blank line."""
    lines: list[str] = []
    for pair, figures in paired.items():
        lines += ["", f"| paired difference, {pair} ({figures['images']} images) | difference | 95% interval | excludes 0 |", "|---|---|---|---|"]
        for key, value in figures.items():
            if key == "images":
                continue
            interval = f"[{value['interval'][0]:+.3f}, {value['interval'][1]:+.3f}]" if value["interval"] else "-"
            difference = f"{value['difference']:+.3f}" if value["difference"] is not None else "-"
            lines.append(f"| {key} | {difference} | {interval} | {'yes' if value['significant'] else 'no'} |")
    return lines


def _markdown(rows: list[dict[str, Any]], classes: list[str], counts: pd.DataFrame, targets: dict[str, Any], paired: dict[str, Any] | None = None,
              gain: dict[str, Any] | None = None) -> str:
    head = "| run | accuracy | balanced accuracy | macro AUC | mel sensitivity @ 80% spec | macro F1 | wall (min) | train (min) |"
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        lines.append("| " + " | ".join([r["run"], *(_fmt(r[k]) for k in [*HEADLINE, "f1_macro"]), str(r["wall_min"]), str(r.get("train_min", ""))]) + " |")
    lines += ["", "| recall (argmax rule) | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += ["| " + " | ".join([r["run"], *(f"{r['recall'].get(c, float('nan')):.3f}" for c in classes)]) + " |" for r in rows]
    if targets:
        lines += ["", "| target (default recipe) | value | goal | | peer | ahead of peer |", "|---|---|---|---|---|---|"]
        for key, value in targets.items():
            lines.append(f"| {key} | {value['value']:.3f} | >= {value['target']} | {'met' if value['met'] else 'missed'} | {value.get('peer', '')} | {value.get('ahead_of_peer', '')} |")
    lines += _paired_markdown(paired or {})
    for name, figures in (gain or {}).items():
        lines += ["", f"| {name} over {figures['over']} (+{figures['extra_wall_min']} min wall) | gain | gain per extra minute |", "|---|---|---|"]
        for key in [*HEADLINE, "f1_macro"]:
            per_minute = figures[key]["gain_per_extra_min"]
            lines.append(f"| {key} | {figures[key]['gain']:+.3f} | {'-' if per_minute is None else f'{per_minute:+.5f}'} |")
    lines += ["", "| split | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    for split, row in counts.iterrows():
        lines.append(f"| {split} | " + " | ".join(str(int(v)) for v in row) + f" | {int(row.sum())} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
