"""``dermlab distill``: LFME experts and students, and plain single-teacher distillation.

::

    dermlab distill experts DATA --student-split RUN_OR_SPLITS --out EXPERTS [--groups 3 | --thresholds 500 200]
    dermlab distill student DATA --experts EXPERTS --out RUN [--curriculum instance] [--config FILE] [--set ...]
    dermlab distill kd DATA --teacher RUN --out RUN2 [--model efficientnet_lite0.packaged]

Experts are ordinary runs (``data.class_subset``), reusable by any number of students. ``dermlab train`` with a
``distill`` section in the config does the same as ``student`` / ``kd``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dermlab.cli._common import add_config_arguments, print_metrics_table, resolve_config
from dermlab.config import DistillConfig, literal_choices

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="learn from multiple experts (LFME) or distil one teacher into a student",
        description="LFME: train one expert per class group (many / medium / few training images), then a "
        "student on all classes that also matches each expert's softened outputs on its classes, with "
        "self-paced expert weights and optional curricula. kd: distil any run into any backbone.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    experts = actions.add_parser("experts", help="train one expert run per class group on the student's split")
    experts.add_argument("data", help="dataset folder or CSV file")
    experts.add_argument("--student-split", required=True, metavar="RUN_OR_SPLITS", help="the student's run folder or splits.csv")
    experts.add_argument("--out", required=True, help="folder for the expert runs (one subfolder per group) and experts.json")
    grouping = experts.add_mutually_exclusive_group()
    grouping.add_argument("--groups", type=int, default=3, help="number of groups, cut automatically (default 3)")
    grouping.add_argument("--thresholds", type=int, nargs="+", metavar="N", help="training-image counts that cut the groups, e.g. 500 200")
    experts.add_argument("--model", help="the experts' backbone (default: the config's)")
    add_config_arguments(experts)
    experts.set_defaults(handler=run)

    student = actions.add_parser("student", help="train an LFME student from an experts folder")
    student.add_argument("data", help="dataset folder or CSV file")
    student.add_argument("--experts", required=True, help="folder made by `dermlab distill experts`")
    student.add_argument("--out", required=True, help="the student's run folder")
    _student_flags(student)
    student.set_defaults(handler=run)

    kd = actions.add_parser("kd", help="distil one teacher run into a student (any backbone)")
    kd.add_argument("data", help="dataset folder or CSV file")
    kd.add_argument("--teacher", required=True, help="the teacher's run folder or checkpoint")
    kd.add_argument("--out", required=True, help="the student's run folder")
    _student_flags(kd)
    kd.set_defaults(handler=run)


def _student_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="the student's backbone, e.g. efficientnet_lite0.packaged")
    parser.add_argument("--temperature", type=float, help="softmax temperature T (distill.temperature, default 2)")
    parser.add_argument("--curriculum", choices=literal_choices(DistillConfig, "curriculum"), help="distill.curriculum")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_arguments(parser)


def _common_overrides(args: argparse.Namespace) -> list[str]:
    overrides = [f"data.path={json.dumps(str(args.data))}"]
    if getattr(args, "model", None):
        overrides.append(f"model.name={args.model}")
    if getattr(args, "temperature", None) is not None:
        overrides.append(f"distill.temperature={args.temperature}")
    if getattr(args, "curriculum", None):
        overrides.append(f"distill.curriculum={args.curriculum}")
    return overrides


def run(args: argparse.Namespace) -> int:
    if args.action == "experts":
        return _run_experts(args)
    return _run_student(args)


def _run_experts(args: argparse.Namespace) -> int:
    from dermlab.training.experts import train_experts

    config = resolve_config(args, _common_overrides(args))
    runs = train_experts(
        config, args.student_split, args.out, groups=args.groups, thresholds=args.thresholds, on_trained=_print_expert_summary
    )
    manifest = json.loads((Path(args.out) / "experts.json").read_text(encoding="utf-8"))
    for group, run_dir in zip(manifest["groups"], runs):
        counts = ", ".join(f"{c} {n}" for c, n in zip(group["classes"], group["train_counts"]))
        print(f"expert {group['name']}: {counts} -> {run_dir}")
    print(f"experts folder: {Path(args.out).resolve()}  (train a student with: dermlab distill student DATA --experts {args.out} --out RUN)")
    return 0


def _run_student(args: argparse.Namespace) -> int:
    from dermlab.config import apply_overrides
    from dermlab.errors import ConfigError
    from dermlab.training.experts import read_experts
    from dermlab.training.run import train_and_summarise

    out = Path(args.out)
    if args.resume and (out / "config.yaml").is_file() and not args.config:
        args.config = str(out / "config.yaml")  # a resumed run keeps its own config
    config = resolve_config(args, _common_overrides(args))
    if args.action == "student":
        runs, splits_file = read_experts(args.experts)
        extra = ["distill.method=lfme", f"distill.teachers={json.dumps([str(r) for r in runs])}"]
        if splits_file is not None and config.data.splits_file is None:
            extra.append(f"data.splits_file={json.dumps(str(splits_file))}")  # the split the experts never saw val/test of
    else:
        extra = ["distill.method=kd", f"distill.teachers={json.dumps([str(args.teacher)])}"]
    config = apply_overrides(config, extra)
    if config.data.class_subset is not None:
        raise ConfigError("a distillation student trains on every class: unset data.class_subset")
    finished = train_and_summarise(config, out, resume=args.resume)
    if finished.summary is None:
        return 0
    print_metrics_table(finished.summary, title=f"{config.model.name}: {out}")
    state = finished.summary.get("distill") or {}
    names = state.get("expert_names", [])
    accuracies = state.get("expert_val_accuracy") or [None] * len(names)
    for name, accuracy, weight in zip(names, accuracies, state.get("expert_weights", [])):
        shown = "n/a" if accuracy is None else f"{accuracy:.3f}"
        print(f"teacher {name}: val accuracy on its classes {shown}, weight at the best checkpoint {weight:.3f}")
    seconds = finished.training.wall_time_s
    print(f"run folder: {out.resolve()}  (report: {out.resolve() / 'report.html'}, train time {seconds:.0f} s)")
    sys.stdout.flush()
    return 0


def _print_expert_summary(result: Any, config: Any) -> None:
    """Score a newly trained expert (metrics.json, report) and print its table."""
    from dermlab.training.run import summarise_trained_run

    print_metrics_table(summarise_trained_run(result, config), title=f"{config.model.name}: {result.run_dir}")
