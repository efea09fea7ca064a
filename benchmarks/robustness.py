"""Robustness to other cameras and clinics: the shift report of the default recipe with and without colour constancy.

    nice .venv/bin/python benchmarks/robustness.py --data ../shared/data/HAM10000 --out runs/ham10000

Trains every run of ``configs/grids/robustness.yaml`` (``--grid``) as ``dermlab experiment`` does, on one shared
lesion-disjoint split (finished runs are skipped), then runs ``dermlab evaluate RUN --shift`` on each run whose
``eval/shift/shift.json`` is missing: the test split clean and under the seven seeded corruptions. Prints and
writes one table per metric (runs as columns, conditions as rows, plus the mean over the corruptions) to
``OUT/<grid name>.md`` and ``benchmarks/results/<grid name>.json``. ``--quick``: synthetic images, a tiny model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_grid_arguments, print_table, resolve_grid, run_grid, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "balanced_accuracy", "auc_macro", "mel_vs_nv_auc")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, ROOT / "configs" / "grids" / "robustness.yaml")
    parser.add_argument("--shift-seed", type=int, default=0, help="seed of the corruptions (default 0)")
    args = parser.parse_args()
    grid_path = resolve_grid(parser, args)
    names = run_grid(grid_path, args.data, args.out, args.only)
    reports = {name: _shift_report(args.out / name, args.shift_seed) for name in names}
    conditions = [row["corruption"] for row in next(iter(reports.values()))["rows"]]
    tables = {}
    for metric in METRICS:
        rows = []
        for condition in conditions:
            rows.append([condition, *(_value(reports[name], condition, metric) for name in names)])
        rows.append(["mean of corruptions", *(_mean_corrupted(reports[name], metric) for name in names)])
        tables[metric] = rows
        print_table(f"{metric} on the test split ({args.out})", rows, ["condition", *names])
    markdown = _markdown(names, tables, reports)
    (args.out / f"{grid_path.stem}.md").write_text(markdown)
    print(f"\nwrote {args.out / (grid_path.stem + '.md')}")
    write_results(args.grid.stem, args, {"runs": names, "reports": reports, "tables": tables})
    return 0


def _shift_report(run_dir: Path, seed: int) -> dict[str, Any]:
    path = run_dir / "eval" / "shift" / "shift.json"
    if not path.is_file() or json.loads(path.read_text()).get("seed") != seed:
        command = [sys.executable, "-m", "dermlab", "evaluate", str(run_dir), "--shift", "--shift-seed", str(seed)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(path.read_text())


def _value(report: dict[str, Any], condition: str, metric: str) -> float | None:
    row = next((r for r in report["rows"] if r["corruption"] == condition), None)
    value = None if row is None else row.get(metric)
    return None if value is None else round(value, 4)


def _mean_corrupted(report: dict[str, Any], metric: str) -> float | None:
    values = [r[metric] for r in report["rows"] if r["corruption"] != "clean" and r.get(metric) is not None]
    return round(sum(values) / len(values), 4) if values else None


def _markdown(names: list[str], tables: dict[str, list[list[Any]]], reports: dict[str, Any]) -> str:
    images = next(iter(reports.values())).get("images")
    seed = next(iter(reports.values())).get("seed")
    lines = [f"Test split, {images} images, corruption seed {seed}; brackets: change from clean."]
    for metric, rows in tables.items():
        lines += ["", f"**{metric}**", "", "| condition | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        clean = rows[0][1:]
        for row in rows:
            cells = []
            for value, base in zip(row[1:], clean):
                if value is None:
                    cells.append("n/a")
                elif row[0] == "clean" or base is None:
                    cells.append(f"{value:.3f}")
                else:
                    cells.append(f"{value:.3f} ({value - base:+.3f})")
            lines.append(f"| {row[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
