"""``dermlab ensemble``: average the probabilities of several runs into one run folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dermlab.cli._common import print_metrics_table

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ensemble",
        help="average several runs' probabilities into a run folder that evaluate, predict, serve and export use",
        description="Average the calibrated probabilities of trained runs (other seeds, backbones, input sizes) "
        "into one model. The runs must share their classes and their splits.csv (so no member has trained on "
        "the test images of another), and their colour constancy and resize mode (every member is fed the first "
        "member's pixels, resized and re-normalised). The ensemble folder is scored like a trained run: on val it gets its own "
        "TTA views, temperature, abstention rule and balanced decision rule, then val and test are scored.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or checkpoints) to average")
    parser.add_argument("--out", required=True, metavar="ENS", help="the ensemble's run folder (must not hold a run)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dermlab.data.run_data import prepare_run_data
    from dermlab.evaluation.run_summary import summarise_run
    from dermlab.training.ensemble import create_ensemble_run

    started = time.perf_counter()
    out = Path(args.out)
    made = create_ensemble_run(args.runs, out)
    print(f"ensemble of {len(made.members)} runs: {', '.join(made.members)}", file=sys.stderr)
    if made.dropped_scores:
        rule = ", ".join(made.config.evaluation.abstain_scores) if made.config.evaluation.abstain_false_rejection > 0 else "off"
        print(f"note: an ensemble has no single backbone, so its abstention rule cannot read {', '.join(made.dropped_scores)} "
              f"(the members' rule); its rule: {rule}", file=sys.stderr)
    frame = prepare_run_data(made.config, out).frame
    member_minutes = sum(made.member_wall_times) / 60
    summary = summarise_run(
        out,
        frame,
        extras={
            "ensemble": {"members": made.members, "member_wall_time_s": made.member_wall_times},
            "wall_time_s": round(sum(made.member_wall_times) + time.perf_counter() - started, 1),
        },
        num_workers=made.config.data.num_workers,
    )
    print_metrics_table(summary, title=f"ensemble of {len(made.members)} runs")
    print(f"run folder: {out.resolve()}  (report: {out.resolve() / 'report.html'}; the members trained {member_minutes:.1f} min in all)")
    return 0
