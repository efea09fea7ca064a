"""Reference B on real clinical photos, side by side: the plain timm peer, reference B's rows, the clinical default.

    nice .venv/bin/python benchmarks/clinical.py --data ../shared/data/skin_infections --out runs/clinical

One command, one split (``OUT/splits.csv``, made first with ``dermlab split``: the publisher's test folder stays
the test set, val is carved from train by class, and train images that copy a test image are left out):

1. the peer, ``../shared/baselines/plain_timm_finetune.py`` (never edited), on that ``splits.csv`` at 224x224
   (``--peer-size``; its own default is HAM10000's 144x192), ``OUT/peer-seed<S>``;
2. every run of ``configs/grids/clinical.yaml`` (``--grid``): the clinical default (``configs/clinical.yaml``) and
   reference B's rows in dermlab terms (baseline, + Mixup, + CutMix, + focal loss, + class weights, + CutMix +
   class weights, curriculum), trained as ``dermlab experiment`` does;
3. reference B's multi-teacher distillation (``ref_b_distill``): one teacher per class group by train count (many /
   medium / few, ``dermlab.training.experts``), each an ordinary run of reference B's baseline on its classes, then a
   student of the same recipe that learns from the labels and all teachers' softened outputs (LFME).

Every row is scored by the same code on the test split: accuracy, reference B's macro precision / recall / F1,
balanced accuracy (the run's balanced rule where it has one, else argmax) and macro AUC, each with a 95% bootstrap
interval (1,000 resamples of the test images, copies resampled together as one group, seed 0), the F1 of every class, and
each row's wall and training minutes; then the paired differences of the clinical default from the peer and of
each reference-B row from reference B's baseline. Finished rows are skipped, so the command continues where it
stopped. ``--quick`` does the same on synthetic images with a tiny model (smoke test).

Writes ``benchmarks/results/clinical.json`` (``--quick``: ``clinical-quick.json``) and ``OUT/clinical.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as side_by_side  # noqa: E402  (the scoring of benchmarks/accuracy.py, shared)
from _common import add_grid_arguments, print_table, resolve_grid, run_grid, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: the columns of the table, in reference B's order and then ours
FIGURES = ["accuracy", "precision_macro", "recall_macro", "f1_macro", "balanced_accuracy", "auc_macro"]
LABELS = {"accuracy": "accuracy", "precision_macro": "macro precision", "recall_macro": "macro recall",
          "f1_macro": "macro F1", "balanced_accuracy": "balanced acc", "auc_macro": "macro AUC"}
#: issue 24's targets for the clinical default (the test folder, one run)
TARGETS = {"f1_macro": 0.90, "min_class_f1": 0.75, "train_min": 20.0}
DISTILL_ROW = "ref_b_distill"
BASELINE_ROW = "ref_b_baseline"
SMALLEST_CLASSES = 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, ROOT / "configs" / "grids" / "clinical.yaml")
    parser.set_defaults(out=Path("runs/clinical"))
    parser.add_argument("--peer", type=Path, default=side_by_side.PEER, help=f"the peer script (default {side_by_side.PEER})")
    parser.add_argument("--peer-seeds", type=int, nargs="*", default=[0], help="seeds of the peer (default 0; no values: no peer)")
    parser.add_argument("--peer-epochs", type=int, default=6, help="the peer's epochs (default 6, its own default)")
    parser.add_argument("--peer-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"), help="the peer's input size (default 224 224)")
    args = parser.parse_args()
    grid_path = resolve_grid(parser, args)
    args.out.mkdir(parents=True, exist_ok=True)
    splits = side_by_side._ensure_splits(args.data, args.out)
    wanted = set(args.only) if args.only else None

    rows = [side_by_side._peer_row(args, f"peer-seed{seed}", seed, splits) for seed in args.peer_seeds
            if wanted is None or f"peer-seed{seed}" in wanted]
    names = [name for name in side_by_side._grid_names(grid_path) if wanted is None or name in wanted]
    if names:
        run_grid(grid_path, args.data, args.out, names)
    rows += [side_by_side._run_row(args.out / name, splits) for name in names]
    if wanted is None or DISTILL_ROW in wanted:
        rows.append(_distillation_row(grid_path, args, splits))
    for row in rows:
        row["recall_macro"] = row["balanced_accuracy_argmax"]  # macro recall is balanced accuracy under argmax
        row["min_class_f1"] = min(row["f1"].values())

    counts = side_by_side._class_counts(splits)
    smallest = list(counts.loc["train"].sort_values().index[:SMALLEST_CLASSES])
    pairs = [("default", f"peer-seed{seed}") for seed in args.peer_seeds]
    pairs += [(row["run"], BASELINE_ROW) for row in rows if row["run"].startswith("ref_b_") and row["run"] != BASELINE_ROW]
    pairs += [("default", BASELINE_ROW), ("default_bn_trained", "default")]
    paired = side_by_side._paired(pairs)
    targets = _targets(rows)
    _print(rows, list(counts.columns), smallest, paired, targets)
    print_table("images per split and class", [[split, *row.tolist()] for split, row in counts.iterrows()], ["split", *counts.columns])
    (args.out / "clinical.md").write_text(_markdown(rows, list(counts.columns), smallest, counts, paired, targets))
    print(f"\nwrote {args.out / 'clinical.md'}")
    write_results("clinical", args, {"runs": rows, "targets": targets, "paired": paired, "class_counts": counts.to_dict(),
                                     "smallest_classes": smallest})
    return 0


# --------------------------------------------------------------------------------------------- distillation
def _distillation_row(grid_path: Path, args: argparse.Namespace, splits: Path) -> dict[str, Any]:
    """Reference B's multi-teacher distillation: teachers per class group, then an LFME student, both of B's recipe."""
    from dermlab.training.experts import train_experts
    from dermlab.training.grid import load_grid, run_config
    from dermlab.training.grid import run_grid as train_grid

    grid = load_grid(grid_path)
    baseline = next(entry for entry in grid["runs"] if entry["name"] == BASELINE_ROW)
    teachers_dir = args.out / f"{DISTILL_ROW}-teachers"
    teachers = train_experts(run_config(grid, baseline, args.data, splits), splits, teachers_dir)
    student = {"name": DISTILL_ROW, "set": {**(baseline.get("set") or {}), "distill.method": "lfme",
                                            "distill.teachers": [str(t) for t in teachers]}}
    train_grid({**grid, "runs": [student]}, args.data, args.out, only=[DISTILL_ROW])
    row = side_by_side._run_row(args.out / DISTILL_ROW, splits)
    teacher_minutes = sum(_training_minutes(t) for t in teachers)
    row["student_wall_min"], row["teachers_min"] = row["wall_min"], round(teacher_minutes, 1)
    row["wall_min"] = round(row["wall_min"] + teacher_minutes, 1)
    row["train_min"] = round(row["train_min"] + teacher_minutes, 1)
    row["teachers"] = json.loads((teachers_dir / "experts.json").read_text())["groups"]
    return row


def _training_minutes(run_dir: Path) -> float:
    """A teacher's training time (it is trained, not scored): from ``config.yaml`` to its last checkpoint (file times)."""
    return ((run_dir / "checkpoints" / "last.ckpt").stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime) / 60


# --------------------------------------------------------------------------------------------- targets and tables
def _targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    default = next((r for r in rows if r["run"] == "default"), None)
    if default is None:
        return {}
    peer = next((r for r in rows if r["run"].startswith("peer")), None)
    out: dict[str, Any] = {
        "f1_macro": {"value": default["f1_macro"]["value"], "target": TARGETS["f1_macro"], "met": default["f1_macro"]["value"] >= TARGETS["f1_macro"]},
        "min_class_f1": {"value": default["min_class_f1"], "target": TARGETS["min_class_f1"], "met": default["min_class_f1"] >= TARGETS["min_class_f1"]},
        "train_min": {"value": default["train_min"], "target": TARGETS["train_min"], "met": default["train_min"] <= TARGETS["train_min"]},
    }
    if peer is not None:
        for key in ("accuracy", "f1_macro", "balanced_accuracy"):
            out[f"ahead_of_peer_{key}"] = {"value": default[key]["value"], "peer": peer[key]["value"],
                                           "met": default[key]["value"] > peer[key]["value"]}
    return out


def _print(rows: list[dict[str, Any]], classes: list[str], smallest: list[str], paired: dict[str, Any], targets: dict[str, Any]) -> None:
    fmt = side_by_side._fmt
    print_table("test folder: figures with 95% bootstrap intervals", [[r["run"], *(fmt(r[k]) for k in FIGURES), r["wall_min"], r.get("train_min", "")] for r in rows],
                ["run", *(LABELS[k] for k in FIGURES), "wall min", "train min"])
    print_table("test F1 per class (argmax rule; the smallest train classes first)", [[r["run"], *(r["f1"].get(c, float("nan")) for c in [*smallest, *(c for c in classes if c not in smallest)])] for r in rows],
                ["run", *smallest, *(c for c in classes if c not in smallest)])
    side_by_side.print_paired(paired, "95% bootstrap interval")
    if targets:
        print_table("targets (clinical default)", [[k, v["value"], v.get("target", v.get("peer")), "met" if v["met"] else "MISSED"] for k, v in targets.items()], ["target", "value", "goal / peer", ""])


def _markdown(rows: list[dict[str, Any]], classes: list[str], smallest: list[str], counts: Any, paired: dict[str, Any], targets: dict[str, Any]) -> str:
    fmt = side_by_side._fmt
    order = [*smallest, *(c for c in classes if c not in smallest)]
    lines = ["| run | " + " | ".join(LABELS[k] for k in FIGURES) + " | wall (min) | train (min) |", "|---" * (len(FIGURES) + 3) + "|"]
    lines += ["| " + " | ".join([r["run"], *(fmt(r[k]) for k in FIGURES), str(r["wall_min"]), str(r.get("train_min", ""))]) + " |" for r in rows]
    lines += ["", "| F1 (argmax rule) | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
    lines += ["| " + " | ".join([r["run"], *(f"{r['f1'].get(c, float('nan')):.3f}" for c in order)]) + " |" for r in rows]
    if targets:
        lines += ["", "| target (clinical default) | value | goal / peer | |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['value']} | {v.get('target', v.get('peer'))} | {'met' if v['met'] else 'missed'} |" for k, v in targets.items()]
    lines += side_by_side._paired_markdown(paired)
    lines += ["", "| split | " + " | ".join(classes) + " | total |", "|---" * (len(classes) + 2) + "|"]
    lines += [f"| {split} | " + " | ".join(str(int(v)) for v in row) + f" | {int(row.sum())} |" for split, row in counts.iterrows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
