"""Accuracy on real dermoscopy, from scratch: the default recipe against reference A rebuilt and ablations.

    nice .venv/bin/python benchmarks/accuracy.py --data ../shared/data/HAM10000 --out runs/ham10000

Trains every run of ``configs/grids/accuracy.yaml`` (``--grid``) through ``dermlab experiment`` on one shared
lesion-disjoint split (made by the first run, seed 42), so runs that share a backbone, preprocessing and
augmentation share their cached features. Finished runs are skipped: the command continues where it stopped.
Then prints and writes one table (test split): accuracy, balanced accuracy, macro AUC, melanoma sensitivity at
80% specificity, macro F1, the recall of every class and each run's wall time, the issue-12 targets against the
default recipe, and the split's class counts. ``--quick`` does the same on synthetic images with a tiny model.

Writes ``benchmarks/results/accuracy.json`` (or ``--grid``'s name) and ``OUT/<grid name>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_grid_arguments, print_table, resolve_grid, run_grid, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"accuracy": 0.85, "balanced_accuracy": 0.75, "auc_macro": 0.95, "mel_sensitivity_at_80_spec": 0.80}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, ROOT / "configs" / "grids" / "accuracy.yaml")
    args = parser.parse_args()
    grid_path = resolve_grid(parser, args)
    names = run_grid(grid_path, args.data, args.out, args.only)
    rows = [_row(args.out / name) for name in names]
    counts = _class_counts(args.out, args.data)
    header = ["run", "accuracy", "balanced acc", "macro AUC", "mel sens @80% spec", "macro F1", "wall min"]
    print_table(
        f"test split ({args.out})",
        [[r["run"], r["accuracy"], r["balanced_accuracy"], r["auc_macro"], r["mel_sensitivity_at_80_spec"], r["f1_macro"], r["wall_min"]] for r in rows],
        header,
    )
    classes = list(counts.columns)
    print_table("test recall per class", [[r["run"], *[r["recall"].get(c, float("nan")) for c in classes]] for r in rows], ["run", *classes])
    targets = {}
    default = next((r for r in rows if r["run"] == "default"), None)
    if default is not None:
        targets = {key: {"value": default[key], "target": goal, "met": bool(default[key] >= goal)} for key, goal in TARGETS.items()}
        print_table("targets (default recipe)", [[k, v["value"], f">= {v['target']}", "met" if v["met"] else "MISSED"] for k, v in targets.items()], ["metric", "value", "target", ""])
    print_table("images per split and class", [[split, *row.tolist()] for split, row in counts.iterrows()], ["split", *classes])
    markdown = _markdown(rows, classes, counts, targets)
    (args.out / f"{grid_path.stem}.md").write_text(markdown)
    print(f"\nwrote {args.out / (grid_path.stem + '.md')}")
    write_results(args.grid.stem, args, {"runs": rows, "targets": targets, "class_counts": counts.to_dict()})
    return 0


def _row(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    target = test.get("target") or {}
    sensitivity = (target.get("sensitivity_at_specificity") or {}).get("sensitivity", float("nan"))
    return {
        "run": run_dir.name,
        "accuracy": round(test["accuracy"], 4),
        "balanced_accuracy": round(test["balanced_accuracy"], 4),
        "auc_macro": round(test["auc_macro"], 4),
        "mel_sensitivity_at_80_spec": round(sensitivity, 4),
        "f1_macro": round(test["f1_macro"], 4),
        "recall": {name: round(values["recall"], 3) for name, values in test["per_class"].items()},
        "tta": test.get("tta"),
        "wall_min": round(metrics.get("wall_time_s", float("nan")) / 60, 1),
    }


def _class_counts(out: Path, data: str) -> pd.DataFrame:
    from dermlab.data.datasets import load_dataset

    table = load_dataset(data)
    splits = pd.read_csv(out / "splits.csv")
    frame = table.frame.merge(splits[["image_id", "split"]], on="image_id")
    counts = pd.crosstab(frame["split"], frame["label"]).reindex(columns=table.classes, fill_value=0)
    return counts.reindex(["train", "val", "test"]).fillna(0).astype(int)


def _markdown(rows: list[dict[str, Any]], classes: list[str], counts: pd.DataFrame, targets: dict[str, Any]) -> str:
    lines = ["| run | accuracy | balanced accuracy | macro AUC | mel sensitivity @ 80% spec | macro F1 | " + " | ".join(f"recall {c}" for c in classes) + " | wall (min) |"]
    lines.append("|---" * (7 + len(classes)) + "|")
    for r in rows:
        cells = [r["run"], *(f"{r[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "auc_macro", "mel_sensitivity_at_80_spec", "f1_macro"))]
        cells += [f"{r['recall'].get(c, float('nan')):.3f}" for c in classes] + [f"{r['wall_min']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if targets:
        lines += ["", "| target (default recipe) | value | goal | |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['value']:.3f} | >= {v['target']} | {'met' if v['met'] else 'missed'} |" for k, v in targets.items()]
    lines += ["", "| split | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    for split, row in counts.iterrows():
        lines.append(f"| {split} | " + " | ".join(str(int(v)) for v in row) + f" | {int(row.sum())} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
