"""Side-by-side comparison of several runs from their ``metrics.json`` files, with intervals and paired tests.

:func:`compare_runs` gives the point estimates. :func:`compare_with_intervals` adds each run's bootstrap 95%
intervals (from its ``metrics.json``) and, for every run after the first (the baseline), the paired-bootstrap
interval of its difference from the baseline, computed from both runs' ``eval/<split>/predictions.csv`` with the
same lesion resamples. Differences are only tested when the runs were scored on the same images with the same
labels; otherwise the comparison carries a one-line warning.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlab.errors import DataError
from dermlab.evaluation.bootstrap import paired_bootstrap, sensitivity_key
from dermlab.io import atomic_write_text, read_json_object

__all__ = [
    "COMPARISON_METRICS",
    "RunComparison",
    "compare_runs",
    "compare_with_intervals",
    "comparison_caption",
    "comparison_markdown",
    "data_fingerprint",
    "write_comparison",
]

COMPARISON_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "balanced_accuracy",
    "auc_macro",
)


@dataclass
class RunComparison:
    """Point estimates, intervals and paired differences of several runs on one split.

    ``values``: :func:`compare_runs` output. ``low`` / ``high``: interval bounds, same shape (NaN where a run
    has none). ``difference`` / ``difference_low`` / ``difference_high``: ``run - baseline`` and its paired
    95% interval (NaN for the baseline and where untested); ``significant``: the interval excludes zero.
    ``warnings``: one line each, e.g. runs scored on different data.
    """

    values: pd.DataFrame
    low: pd.DataFrame
    high: pd.DataFrame
    difference: pd.DataFrame
    difference_low: pd.DataFrame
    difference_high: pd.DataFrame
    significant: pd.DataFrame
    baseline: str
    split: str
    bootstrap: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One wide frame: each metric, then ``<metric>_low``, ``_high``, ``_diff``, ``_diff_low``, ``_diff_high``,
        ``_significant`` (the CSV that :func:`write_comparison` writes)."""
        columns = {}
        for name in self.values.columns:
            columns[name] = self.values[name]
            columns[f"{name}_low"] = self.low[name]
            columns[f"{name}_high"] = self.high[name]
            columns[f"{name}_diff"] = self.difference[name]
            columns[f"{name}_diff_low"] = self.difference_low[name]
            columns[f"{name}_diff_high"] = self.difference_high[name]
            columns[f"{name}_significant"] = self.significant[name]
        return pd.DataFrame(columns, index=self.values.index)


def data_fingerprint(predictions: pd.DataFrame) -> str:
    """A short hash of the scored rows' ``(image_id, true)`` pairs, independent of row order.

    Two evaluations share a fingerprint exactly when they scored the same images with the same labels.
    """
    pairs = sorted(
        f"{image_id}\t{true}" for image_id, true in zip(predictions["image_id"], predictions["true"])
    )
    return hashlib.sha256("\n".join(pairs).encode("utf-8")).hexdigest()[:16]


#: the balanced decision rule's figures compared beside the argmax rule's (columns ``balanced_rule_<key>``)
BALANCED_RULE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro")


def _balanced_rule(metrics: dict[str, Any]) -> dict[str, Any]:
    """A split's balanced-rule figures (``metrics["rules"]["balanced"]``), {} for a run without that rule."""
    rules = metrics.get("rules")
    rule = rules.get("balanced") if isinstance(rules, dict) else None
    return rule if isinstance(rule, dict) else {}


def compare_runs(
    run_dirs: Sequence[str | Path], split: str = "test", classes: Sequence[str] | None = None
) -> pd.DataFrame:
    """One row per run (index ``run``), columns :data:`COMPARISON_METRICS`, the target class's sensitivity at
    the fixed specificity (``sensitivity_at_specificity_<class>``, when every run has that target) and
    ``recall_<class>`` per class of ``classes``. The columns are the argmax rule's; when a run has a fitted
    balanced rule (logit adjustment), ``balanced_rule_accuracy``, ``balanced_rule_balanced_accuracy`` and
    ``balanced_rule_f1_macro`` follow (NaN for runs without one; their differences are not tested).

    A run is named by the string ``label`` in its ``metrics.json`` when there is one, else by its folder name;
    names that collide fall back to the path as given. Undefined values (and classes a run lacks) are NaN.
    """
    loaded = _load_runs(run_dirs, split)
    target = _shared_target(loaded)
    rows = []
    for _, metrics in loaded:
        row: dict[str, Any] = {name: _number(metrics.get(name)) for name in COMPARISON_METRICS}
        if target is not None:
            point = (metrics.get("target") or {}).get("sensitivity_at_specificity") or {}
            row[sensitivity_key(target[0])] = _number(point.get("sensitivity"))
        per_class = metrics.get("per_class") or {}
        for class_name in classes or ():
            row[f"recall_{class_name}"] = _number((per_class.get(class_name) or {}).get("recall"))
        if any(_balanced_rule(m) for _, m in loaded):  # the other decision rule, where a run has one
            for key in BALANCED_RULE_METRICS:
                row[f"balanced_rule_{key}"] = _number(_balanced_rule(metrics).get(key))
        rows.append(row)
    names = [name for name, _ in loaded]
    frame = pd.DataFrame(rows, index=pd.Index(names, name="run"))
    return frame.astype(float)


def compare_with_intervals(
    run_dirs: Sequence[str | Path],
    split: str = "test",
    classes: Sequence[str] | None = None,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> RunComparison:
    """:func:`compare_runs` plus intervals and paired differences from the first run (see the module docstring).

    ``resamples=0`` still checks that the runs were scored on the same data, but tests no difference.
    """
    values = compare_runs(run_dirs, split, classes)
    loaded = _load_runs(run_dirs, split)
    low, high = (pd.DataFrame(math.nan, index=values.index, columns=values.columns) for _ in range(2))
    for name, metrics in loaded:
        intervals = {**(metrics.get("intervals") or {}), **{f"balanced_rule_{k}": v for k, v in (_balanced_rule(metrics).get("intervals") or {}).items()}}
        for column, interval in intervals.items():
            if column in values.columns and interval is not None:
                low.loc[name, column], high.loc[name, column] = (float(bound) for bound in interval)
    comparison = RunComparison(
        values=values,
        low=low,
        high=high,
        difference=low * math.nan,
        difference_low=low * math.nan,
        difference_high=low * math.nan,
        significant=pd.DataFrame(False, index=values.index, columns=values.columns),
        baseline=str(values.index[0]),
        split=split,
    )
    if len(run_dirs) > 1:
        _add_paired_differences(comparison, [Path(run_dir) for run_dir in run_dirs], loaded, resamples, seed)
    return comparison


def comparison_markdown(comparison: RunComparison | pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; NaN shows as ``-``.

    With a :class:`RunComparison`: warnings first, each value with its ``[low, high]`` interval and ``*`` where
    its paired difference from the baseline is significant, then a table of those differences.
    """
    if isinstance(comparison, pd.DataFrame):
        return _markdown_table(comparison, lambda name, column, value: _format(value, digits))
    lines = [f"> warning: {warning}" for warning in comparison.warnings]
    if lines:
        lines.append("")

    def value_cell(name: str, column: str, value: float) -> str:
        cell = _format(value, digits)
        low, high = comparison.low.loc[name, column], comparison.high.loc[name, column]
        if not (math.isnan(low) or math.isnan(high)):
            cell += f" [{low:.{digits}f}, {high:.{digits}f}]"
        return cell + (" *" if comparison.significant.loc[name, column] else "")

    lines.append(_markdown_table(comparison.values, value_cell).rstrip("\n"))
    lines += ["", comparison_caption(comparison)]
    tested = comparison.difference.drop(index=comparison.baseline).dropna(how="all")
    if len(tested):

        def difference_cell(name: str, column: str, value: float) -> str:
            if math.isnan(value):
                return "-"
            low = comparison.difference_low.loc[name, column]
            high = comparison.difference_high.loc[name, column]
            mark = " *" if comparison.significant.loc[name, column] else ""
            return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{mark}"

        lines += ["", f"Paired differences from {comparison.baseline} (run - baseline):", ""]
        lines.append(_markdown_table(tested, difference_cell).rstrip("\n"))
    return "\n".join(lines) + "\n"


def comparison_caption(comparison: RunComparison, interval_form: str = "[low, high]") -> str:
    """One line saying what the intervals (written as ``interval_form``) and the ``*`` mean."""
    text = f"{interval_form}: bootstrap 95% interval of each run ({comparison.split} split)."
    if comparison.bootstrap:
        unit = "lesions" if comparison.bootstrap.get("unit") == "lesion" else "images"
        text += (
            f" *: the paired-bootstrap 95% interval of the difference from {comparison.baseline} excludes 0 "
            f"({comparison.bootstrap['resamples']} resamples of {unit}, seed {comparison.bootstrap['seed']})."
        )
    return text


def write_comparison(comparison: RunComparison | pd.DataFrame, out_prefix: str | Path) -> tuple[Path, Path]:
    """Write ``<out_prefix>.md`` and ``<out_prefix>.csv`` atomically and return both paths."""
    prefix = Path(out_prefix)
    markdown_path = prefix.with_name(prefix.name + ".md")
    csv_path = prefix.with_name(prefix.name + ".csv")
    table = comparison if isinstance(comparison, pd.DataFrame) else comparison.table()
    atomic_write_text(markdown_path, comparison_markdown(comparison))
    atomic_write_text(csv_path, table.to_csv())
    return markdown_path, csv_path


def _add_paired_differences(
    comparison: RunComparison,
    run_dirs: Sequence[Path],
    loaded: Sequence[tuple[str, dict[str, Any]]],
    resamples: int,
    seed: int,
) -> None:
    """Fill the differences from the baseline, or add the warning that says why they cannot be tested."""
    split = comparison.split
    predictions = [_read_predictions(run_dir, split) for run_dir in run_dirs]
    names = [name for name, _ in loaded]
    identities = [
        data_fingerprint(frame) if frame is not None else metrics.get("data_fingerprint")
        for frame, (_, metrics) in zip(predictions, loaded)
    ]
    if len({identity for identity in identities if identity}) > 1:
        comparison.warnings.append(_different_data_warning(names, predictions, loaded, split))
        return
    if resamples == 0:
        return
    lacking = [name for name, frame in zip(names, predictions) if frame is None]
    if lacking:
        comparison.warnings.append(
            f"no eval/{split}/predictions.csv for {', '.join(lacking)}: "
            + ("cannot check that the runs were scored on the same data; " if not all(identities) else "")
            + "differences are not tested"
        )
        return
    baseline = predictions[0]
    classes, y_true, probabilities = _scored_arrays(run_dirs[0] / "eval" / split / "predictions.csv", baseline)
    target = _shared_target(loaded)
    groups = _groups(run_dirs[0], baseline)
    for name, frame in zip(names[1:], predictions[1:]):
        other_classes = _probability_classes(frame)
        if other_classes != classes:
            comparison.warnings.append(f"{name} has classes {other_classes}, the baseline {classes}: not tested")
            continue
        aligned = frame.set_index("image_id").loc[baseline["image_id"]]
        result = paired_bootstrap(
            y_true,
            probabilities,
            aligned[[f"prob_{c}" for c in classes]].to_numpy(dtype=float),
            classes,
            groups,
            resamples=resamples,
            seed=seed,
            target_class=target[0] if target else None,
            fixed_specificity=target[1] if target else 0.8,
        )
        _fill_differences(comparison, name, result)
    unit = "lesion" if len(set(groups)) < len(groups) else "image"
    comparison.bootstrap = {"resamples": resamples, "seed": seed, "unit": unit}


def _probability_classes(frame: pd.DataFrame) -> list[str]:
    """The classes of a predictions frame, in the order of its ``prob_`` columns."""
    return [column.removeprefix("prob_") for column in frame.columns if column.startswith("prob_")]


def _scored_arrays(path: Path, frame: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes, true label indices and probabilities of a predictions frame read from ``path``."""
    classes = _probability_classes(frame)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(frame["true"]) - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown} have no prob_ column")
    y_true = frame["true"].map(index).to_numpy(dtype=int)
    return classes, y_true, frame[[f"prob_{name}" for name in classes]].to_numpy(dtype=float)


def _fill_differences(comparison: RunComparison, name: str, result: dict[str, dict[str, Any]]) -> None:
    """One run's paired differences from the baseline into the comparison's tables (tested columns only)."""
    for column, entry in result.items():
        if column not in comparison.values.columns or entry["interval"] is None:
            continue
        comparison.difference.loc[name, column] = _number(entry["difference"])
        comparison.difference_low.loc[name, column], comparison.difference_high.loc[name, column] = entry["interval"]
        comparison.significant.loc[name, column] = entry["significant"]


def _different_data_warning(
    names: Sequence[str],
    predictions: Sequence[pd.DataFrame | None],
    loaded: Sequence[tuple[str, dict[str, Any]]],
    split: str,
) -> str:
    sizes = ", ".join(
        f"{name} {frame['image_id'].nunique() if frame is not None else metrics.get('n', '?')} images"
        for name, frame, (_, metrics) in zip(names, predictions, loaded)
    )
    known = [set(frame["image_id"].astype(str)) for frame in predictions if frame is not None]
    shared = f", {len(set.intersection(*known))} in common" if len(known) == len(predictions) else ""
    return (
        f"the runs were scored on different data or splits ({split}: {sizes}{shared}); "
        "their figures are not comparable and differences are not tested"
    )


def _groups(run_dir: Path, predictions: pd.DataFrame) -> list[str]:
    """Each predicted image's lesion: the ``group`` column of the run's ``splits.csv``, else its image id."""
    image_ids = predictions["image_id"].astype(str)
    path = run_dir / "splits.csv"
    if not path.is_file():
        return image_ids.tolist()
    try:
        splits = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: cannot read as CSV ({error})") from error
    if not {"image_id", "group"} <= set(splits.columns):
        return image_ids.tolist()
    lesion = dict(zip(splits["image_id"], splits["group"]))
    return [lesion.get(image_id) or image_id for image_id in image_ids]


def _read_predictions(run_dir: Path, split: str) -> pd.DataFrame | None:
    path = run_dir / "eval" / split / "predictions.csv"
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "true": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read as CSV ({error})") from error
    missing = {"image_id", "true"} - set(frame.columns)
    if missing or not any(column.startswith("prob_") for column in frame.columns):
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing)) or 'prob_<class>'}")
    if frame["image_id"].duplicated().any():
        raise DataError(
            f"{path}: image_id {frame['image_id'][frame['image_id'].duplicated()].iloc[0]!r} repeats"
        )
    return frame


def _load_runs(run_dirs: Sequence[str | Path], split: str) -> list[tuple[str, dict[str, Any]]]:
    """``(name, split metrics)`` per run; names that collide fall back to the path as given."""
    if not run_dirs:
        raise DataError("compare needs at least one run folder")
    loaded = [_load_split(Path(run_dir), split) for run_dir in run_dirs]
    names = [label for _, label in loaded]
    duplicated = {name for name in names if names.count(name) > 1}
    names = [str(run_dir) if name in duplicated else name for name, run_dir in zip(names, run_dirs)]
    return [(name, metrics) for name, (metrics, _) in zip(names, loaded)]


def _shared_target(loaded: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, float] | None:
    """The target class and fixed specificity every run was scored with, or None."""
    targets = set()
    for _, metrics in loaded:
        target = metrics.get("target")
        if not isinstance(target, dict) or not isinstance(target.get("sensitivity_at_specificity"), dict):
            return None
        targets.add((target.get("class"), target["sensitivity_at_specificity"].get("requested")))
    if len(targets) != 1:
        return None
    name, requested = targets.pop()
    return (name, float(requested)) if isinstance(name, str) and requested is not None else None


def _load_split(run_dir: Path, split: str) -> tuple[dict[str, Any], str]:
    path = run_dir / "metrics.json"
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    if not path.is_file():
        raise DataError(f"{run_dir}: no metrics.json (evaluate the run first)")
    data = read_json_object(path)
    metrics = data.get(split)
    if not isinstance(metrics, dict):
        available = sorted(k for k, v in data.items() if isinstance(v, dict))
        raise DataError(f"{path}: no '{split}' metrics; splits present: {', '.join(available) or 'none'}")
    label = data.get("label")
    return metrics, label if isinstance(label, str) and label else run_dir.resolve().name


def _markdown_table(frame: pd.DataFrame, cell: Any) -> str:
    header = [frame.index.name or "run", *map(str, frame.columns)]
    lines = [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(["---"] + ["---:"] * len(frame.columns)) + " |",
    ]
    for name, values in zip(frame.index, frame.to_numpy()):
        cells = [
            str(name).replace("|", "\\|"),
            *(cell(name, column, value) for column, value in zip(frame.columns, values)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _format(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
