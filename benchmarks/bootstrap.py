"""Bootstrap intervals: seconds for 1,000 lesion resamples of a HAM10000-sized test split, side by side with
the obvious loop (``compute_metrics``, i.e. scikit-learn, once per resample) on a subset of resamples.

Every scored split gets these intervals (``evaluation.bootstrap_resamples``), so their cost is paid by every
``dermlab evaluate`` and ``dermlab train``. Goal: 1,000 resamples of 1,600 images x 7 classes in under 10 s, and
>= 10x faster than the loop.

    python benchmarks/bootstrap.py           # about a minute
    python benchmarks/bootstrap.py --quick   # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import goal, print_table, write_results  # noqa: E402

CLASSES = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
PRIOR = [0.67, 0.11, 0.11, 0.05, 0.03, 0.015, 0.015]


def _synthetic_split(images: int, lesions: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    label = rng.choice(len(CLASSES), size=images, p=PRIOR)
    logits = rng.normal(size=(images, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[label]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    groups = rng.integers(0, lesions, size=images).astype(str)
    return label, prob, groups


def _loop_seconds_per_resample(label, prob, groups, resamples: int) -> float:
    """The loop a script would write: draw lesions, gather their images, score with compute_metrics."""
    import numpy as np

    from dermlab.evaluation.metrics import compute_metrics

    rng = np.random.default_rng(0)
    unique = np.unique(groups)
    members = {group: np.flatnonzero(groups == group) for group in unique}
    started = time.perf_counter()
    for _ in range(resamples):
        chosen = rng.choice(unique, size=unique.size, replace=True)
        index = np.concatenate([members[group] for group in chosen])
        compute_metrics(label[index], prob[index], CLASSES, target_class="mel")
    return (time.perf_counter() - started) / resamples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds) for CI smoke tests")
    parser.add_argument("--images", type=int, default=1600, help="images in the split (default 1600)")
    parser.add_argument("--lesions", type=int, default=1100, help="lesions in the split (default 1100)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--loop-resamples", type=int, default=30, help="resamples timed for the loop (default 30)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.quick:
        args.images, args.lesions, args.resamples, args.loop_resamples = 200, 120, 50, 3

    from dermlab.evaluation.bootstrap import bootstrap_intervals

    label, prob, groups = _synthetic_split(args.images, args.lesions)
    started = time.perf_counter()
    bootstrap_intervals(label, prob, CLASSES, groups, resamples=args.resamples, seed=0, target_class="mel")
    vectorised = time.perf_counter() - started
    loop = _loop_seconds_per_resample(label, prob, groups, args.loop_resamples) * args.resamples
    speedup = loop / vectorised
    rows = [
        ["dermlab bootstrap_intervals", args.resamples, round(vectorised, 2)],
        [f"compute_metrics loop (timed on {args.loop_resamples}, scaled)", args.resamples, round(loop, 1)],
    ]
    print_table(f"{args.images} images, {args.lesions} lesions, 7 classes", rows, ["method", "resamples", "seconds"])
    figures = {
        "vectorised_s": round(vectorised, 3),
        "loop_s_estimated": round(loop, 2),
        "speedup": goal(speedup, 10.0),
        "under_10_s": bool(vectorised < 10.0),
    }
    print(f"\nspeed-up {speedup:.1f}x (goal >= 10x); {vectorised:.2f} s for {args.resamples} resamples (goal < 10 s)")
    write_results("bootstrap", args, {"figures": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
