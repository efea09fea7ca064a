"""A self-contained HTML report of one run folder: every image is embedded, so the file opens anywhere.

The report leads with the answer: a summary block (task, data, split sizes, the decision rule and the key
metrics of the test split with their bootstrap 95% intervals), then the confusion matrix and the per-class
table, ROC and reliability plots, the Grad-CAM gallery when ``dermlab explain`` has run, the training curves,
the model card (folded), and, folded at the end, every metric of every split, the class counts and the
configuration.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dermlab.data.splits import split_rows
from dermlab.errors import DataError
from dermlab.evaluation.bootstrap import sensitivity_key
from dermlab.evaluation.html_pieces import Raw, details, embedded_images, missing, number_cell, section, table
from dermlab.evaluation.metrics import SUMMARY_METRICS
from dermlab.io import atomic_write_text, read_json_object

__all__ = ["render_report", "write_report"]

_DISCLAIMER = (
    "dermlab is a research tool, not a medical device. Its outputs must not be used to diagnose, treat or "
    "triage any person."
)

# The headline numbers: (label, key in the split's metrics, key in its "intervals").
_HEADLINE_METRICS = (
    ("balanced accuracy", "balanced_accuracy", "balanced_accuracy"),
    ("macro AUC", "auc_macro", "auc_macro"),
    ("macro F1", "f1_macro", "f1_macro"),
    ("accuracy", "accuracy", "accuracy"),
)

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1b1b1b; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; font-size: 1.6rem; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; } td.num { text-align: right;
font-variant-numeric: tabular-nums; } th { background: #f2f2f2; text-align: left; }
.ci { color: #666; font-size: 0.85em; white-space: nowrap; }
pre { background: #f6f6f6; padding: 0.8rem; overflow-x: auto; white-space: pre-wrap; font-size: 0.85rem; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; width: 480px; border: 1px solid #ddd; }
figure.wide img { width: 1000px; }
figcaption { font-size: 0.85rem; color: #555; }
.notice { background: #fff4e5; border-left: 4px solid #f0a000; padding: 0.4rem 1rem; font-size: 0.9rem; }
.missing { color: #777; font-style: italic; }
.headline { background: #f4f8fc; border: 1px solid #c9d9ea; border-radius: 6px; padding: 0.4rem 1.2rem 0.8rem; }
.headline dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1.2rem; margin: 0.6rem 0; }
.headline dt { font-weight: 600; } .headline dd { margin: 0; }
.key-metrics td.num { font-size: 1.05rem; } .key-metrics td.num strong { font-size: 1.2rem; }
.note { color: #555; font-size: 0.85rem; margin-top: 0; }
details { margin: 0.4rem 0; } summary { cursor: pointer; font-weight: 600; padding: 0.2rem 0; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) from whatever the run folder holds, and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    path = run_dir / "report.html"
    atomic_write_text(path, render_report(run_dir))
    return path


def render_report(run_dir: str | Path) -> str:
    """The report of :func:`write_report` as an HTML string; optional parts that are missing are noted."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    config = _read_config(run_dir / "config.yaml")
    splits = _read_splits(run_dir / "splits.csv")
    split_metrics = _split_metrics(metrics)
    main = "test" if "test" in split_metrics else next(iter(split_metrics), None)
    eval_dir = run_dir / "eval" / main if main else None
    sections = [
        section("Summary", _headline_html(metrics, config, splits, main), css_class="headline"),
        section(
            "Confusion matrix and per-class results",
            _per_class_section(run_dir, eval_dir, split_metrics.get(main) if main else None, main),
        ),
        section("ROC and reliability", _eval_images(run_dir, eval_dir, ("roc.png", "reliability.png"))),
    ]
    gallery = sorted((run_dir / "gallery").glob("*.png"))
    if gallery:
        sections.append(section("Grad-CAM gallery", embedded_images(run_dir, gallery)))
    sections.append(
        section(
            "Training curves", embedded_images(run_dir, sorted((run_dir / "plots").glob("*.png")), wide=True)
        )
    )
    card = run_dir / "model_card.md"
    if card.is_file():
        text = f"<pre>{html.escape(card.read_text(encoding='utf-8'))}</pre>"
        sections.append(section("Model card", details("Intended use, data, performance and limits", text)))
    sections.append(section("Details", _details_html(run_dir, metrics, splits, main)))
    title = f"dermlab run report: {html.escape(run_dir.resolve().name)}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body>",
            f"<h1>{title}</h1>",
            f'<p class="notice"><strong>{html.escape(_DISCLAIMER)}</strong></p>',
            *sections,
            f'<p class="notice">{html.escape(_DISCLAIMER)}</p>',
            "</body>",
            "</html>",
            "",
        ]
    )


# ----------------------------------------------------------------------------------------------- headline
def _headline_html(
    metrics: dict[str, Any] | None,
    config: dict[str, Any] | None,
    splits: pd.DataFrame | None,
    main: str | None,
) -> str:
    data = (config or {}).get("data") or {}
    model = (config or {}).get("model") or {}
    part = _split_metrics(metrics).get(main) if main else None
    classes = list((part or {}).get("classes") or (part or {}).get("per_class") or [])
    facts = [
        ("Task", _task_text(classes, part)),
        ("Data", html.escape(str(data.get("path") or "unknown (config.yaml not found)"))),
        ("Splits", _split_sizes_text(splits)),
        ("Model", html.escape(str(model.get("name") or "unknown"))),
        ("Decision rule", _decision_rule_text(metrics or {}, part)),
    ]
    items = "\n".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in facts)
    body = [f"<dl>\n{items}\n</dl>"]
    if part is None:
        body.append(missing("metrics.json not found or holds no split: the run has not been evaluated."))
    else:
        body.append(_key_metrics_html(_split_metrics(metrics), main or ""))
        body.append(f'<p class="note">{html.escape(_interval_note(part, main or ""))}</p>')
    return "\n".join(body)


def _task_text(classes: Sequence[str], part: dict[str, Any] | None) -> str:
    if not classes:
        return "image classification"
    text = f"classify an image into one of {len(classes)} classes: {', '.join(classes)}"
    target = (part or {}).get("target")
    if isinstance(target, dict) and target.get("class"):
        text += f"; target class {target['class']}"
    return html.escape(text)


def _split_sizes_text(splits: pd.DataFrame | None) -> str:
    if splits is None:
        return missing("splits.csv not found.")
    grouped = "group" in splits and splits["group"].nunique() < len(splits)
    parts = []
    for split in _split_order(splits):
        rows = split_rows(splits, split)
        parts.append(
            f"{split} {len(rows)} images" + (f" ({rows['group'].nunique()} lesions)" if grouped else "")
        )
    note = "; grouped by lesion: no lesion has images in two splits" if grouped else ""
    return html.escape(", ".join(parts) + note)


def _decision_rule_text(metrics: dict[str, Any], part: dict[str, Any] | None) -> str:
    """How a prediction is made: views, temperature, abstention, the target's operating point (escaped HTML)."""
    part = part or {}
    views = part.get("tta") or ["identity"]
    temperature = (part.get("calibration") or {}).get("temperature", metrics.get("temperature"))
    scaled = isinstance(temperature, (int, float)) and temperature != 1.0
    sentences = [
        "The predicted class is the most probable one, from "
        + (f"softmax(logits / {temperature:.3g})" if scaled else "softmax(logits)")
        + (
            f" averaged over the test-time views {', '.join(views)}."
            if len(views) > 1
            else " of the image as it is (no test-time augmentation)."
        )
    ]
    rule = part.get("abstention") if isinstance(part.get("abstention"), dict) else None
    if rule and rule.get("thresholds"):
        thresholds = " or ".join(f"{name} < {value:.3g}" for name, value in rule["thresholds"].items())
        sentences.append(
            f'An image with {thresholds} is answered "uncertain" instead ({100 * rule.get("rejected", 0.0):.1f}% of '
            "this split; thresholds set on val)."
        )
    else:
        sentences.append("Every image gets a class (no abstention rule).")
    target = part.get("target") if isinstance(part.get("target"), dict) else None
    point = (target or {}).get("sensitivity_at_specificity") or {}
    if target and point.get("threshold") is not None:
        sentences.append(
            f"{target['class']} operating point: positive when p({target['class']}) >= {point['threshold']:.3g}, the "
            f"highest sensitivity with specificity >= {point['requested']:g} on this split."
        )
    balanced = ((part.get("rules") or {}).get("balanced")) if isinstance(part.get("rules"), dict) else None
    if isinstance(balanced, dict):
        chosen = part.get("decision_rule", "argmax")
        sentences.append(
            f"Two decision rules come from this one model: argmax (accuracy first) and balanced (logit adjustment: "
            f"argmax of log p - {balanced.get('tau', 0):g} x log(training class share), tau fitted on val for balanced "
            f"accuracy). Predictions use the {chosen} rule; the figures below give both."
        )
    return html.escape(" ".join(sentences))


def _key_metrics_html(split_metrics: dict[str, dict[str, Any]], main: str) -> str:
    """The headline numbers, one column per split, the main split first and in bold."""
    names = [main, *(name for name in split_metrics if name != main)]
    rows = []
    for label, key, interval_key in _HEADLINE_METRICS:
        rows.append(
            [
                label,
                *(
                    _metric_cell(
                        split_metrics[s].get(key), _interval(split_metrics[s], interval_key), s == main
                    )
                    for s in names
                ),
            ]
        )
    target = split_metrics[main].get("target")
    if isinstance(target, dict) and isinstance(target.get("sensitivity_at_specificity"), dict):
        name = target["class"]
        label = f"{name} sensitivity at specificity {target['sensitivity_at_specificity']['requested']:g}"
        rows.append(
            [
                label,
                *(
                    _metric_cell(
                        (
                            ((split_metrics[s].get("target") or {}).get("sensitivity_at_specificity")) or {}
                        ).get("sensitivity"),
                        _interval(split_metrics[s], sensitivity_key(name)),
                        s == main,
                    )
                    for s in names
                ),
            ]
        )
    if any(isinstance((split_metrics[s].get("rules") or {}).get("balanced"), dict) for s in names):
        for label, key in (("accuracy, balanced rule", "accuracy"), ("balanced accuracy, balanced rule", "balanced_accuracy"), ("macro F1, balanced rule", "f1_macro")):
            cells = []
            for s in names:
                rule = (split_metrics[s].get("rules") or {}).get("balanced") or {}
                cells.append(_metric_cell(rule.get(key), (rule.get("intervals") or {}).get(key), s == main))
            rows.append([label, *cells])
    rows.append(["images", *(number_cell(split_metrics[s].get("n")) for s in names)])
    return table(["metric", *(f"{s} [95% interval]" for s in names)], rows, css_class="key-metrics")


def _interval_note(part: dict[str, Any], split: str) -> str:
    bootstrap = part.get("bootstrap") if isinstance(part.get("bootstrap"), dict) else None
    if not bootstrap:
        return "No intervals: the run was scored with evaluation.bootstrap_resamples = 0 (or before dermlab had them)."
    unit = "lesions" if bootstrap.get("unit") == "lesion" else "images"
    return (
        f"[low, high]: {100 * bootstrap.get('confidence', 0.95):g}% bootstrap interval, resampling the "
        f"{bootstrap.get('groups')} {unit} of the {split} split ({bootstrap.get('resamples')} resamples, seed "
        f"{bootstrap.get('seed')}). Differences between runs smaller than these intervals may be noise; "
        "dermlab compare tests them pairwise. The val split chose the checkpoint, the temperature and the "
        "abstention thresholds, so its figures are optimistic; the test split was only scored."
    )


# --------------------------------------------------------------------------------------------- per class
def _per_class_section(
    run_dir: Path, eval_dir: Path | None, part: dict[str, Any] | None, split: str | None
) -> str:
    if part is None or eval_dir is None:
        return missing("no evaluated split.")
    images = _eval_images(run_dir, eval_dir, ("confusion_matrix.png", "confusion_matrix_normalized.png"))
    note = f'<p class="note">{html.escape(str(split))} split; recall with its bootstrap 95% interval.</p>'
    return "\n".join([images, note, _per_class_html(part)])


def _per_class_html(metrics: dict[str, Any]) -> str:
    rows = []
    for name, values in metrics["per_class"].items():
        recall = _metric_cell(values.get("recall"), _interval(metrics, f"recall_{name}"), False)
        rows.append(
            [
                name,
                values.get("precision"),
                recall,
                values.get("f1"),
                values.get("support"),
                values.get("auc"),
            ]
        )
    return table(["class", "precision", "recall [95% interval]", "f1", "support", "auc"], rows)


def _confusion_table(metrics: dict[str, Any]) -> str:
    matrix = metrics.get("confusion_matrix")
    classes = list(metrics["per_class"])
    if not matrix or len(matrix) != len(classes):
        return ""
    confusion = table(["true \\ predicted", *classes], [[name, *row] for name, row in zip(classes, matrix)])
    return f"<p>Confusion matrix (rows = truth):</p>\n{confusion}"


def _eval_images(run_dir: Path, eval_dir: Path | None, names: Sequence[str]) -> str:
    if eval_dir is None:
        return missing("no evaluated split.")
    return embedded_images(run_dir, [eval_dir / name for name in names if (eval_dir / name).is_file()])


# ----------------------------------------------------------------------------------------------- details
def _details_html(
    run_dir: Path, metrics: dict[str, Any] | None, splits: pd.DataFrame | None, main: str | None
) -> str:
    parts = [details("All metrics, every split", _metrics_html(metrics))]
    parts.append(details("Images per class and split", _splits_html(splits)))
    shown = {
        run_dir / "eval" / str(main) / name
        for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "roc.png", "reliability.png")
    }
    other = [path for path in sorted((run_dir / "eval").glob("*/*.png")) if path not in shown]
    if other:
        parts.append(details("Other evaluation plots", embedded_images(run_dir, other)))
    config = run_dir / "config.yaml"
    body = (
        f"<pre>{html.escape(config.read_text(encoding='utf-8'))}</pre>"
        if config.is_file()
        else missing("config.yaml not found.")
    )
    parts.append(details("Configuration (config.yaml)", body))
    return "\n".join(parts)


def _splits_html(splits: pd.DataFrame | None) -> str:
    if splits is None:
        return missing("splits.csv not found.")
    order = _split_order(splits)
    counts = pd.crosstab(splits["label"], splits["split"]).reindex(columns=order, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    rows = [[label, *(int(v) for v in values)] for label, values in zip(counts.index, counts.to_numpy())]
    if "group" in splits:
        lesions = splits.groupby("split")["group"].nunique()
        rows.append(["lesions", *(int(lesions.get(s, 0)) for s in order), int(splits["group"].nunique())])
    return table(["class", *counts.columns], rows)


def _metrics_html(metrics: dict[str, Any] | None) -> str:
    if metrics is None:
        return missing("metrics.json not found: the run has not been evaluated.")
    splits = _split_metrics(metrics)
    extras = {k: v for k, v in metrics.items() if k not in splits and not isinstance(v, (dict, list))}
    parts = []
    if splits:
        names = list(splits)
        rows = [
            [name, *(_metric_cell(splits[s].get(name), _interval(splits[s], name), False) for s in names)]
            for name in SUMMARY_METRICS
        ]
        for key, label in (
            ("auc", "auc"),
            ("sensitivity_at_specificity", "sensitivity @ specificity"),
            ("specificity_at_sensitivity", "specificity @ sensitivity"),
        ):
            row = _target_row(splits, names, key, label)
            if row is not None:
                rows.append(row)
        parts.append(table(["metric", *names], rows))
        for name in names:
            parts.append(f"<h3>Per class ({html.escape(name)})</h3>")
            parts.append(_per_class_html(splits[name]))
            parts.append(_confusion_table(splits[name]))
    else:
        parts.append(missing("metrics.json holds no per-split metrics."))
    if extras:
        parts.append("<h3>Run facts</h3>")
        parts.append(table(["key", "value"], [[k, v] for k, v in extras.items()]))
    return "\n".join(parts)


def _target_row(splits: dict[str, Any], names: Sequence[str], key: str, label: str) -> list[Any] | None:
    targets = [splits[s].get("target") for s in names]
    first = next((t for t in targets if t), None)
    if first is None:
        return None
    if key == "auc":
        return [f"{first['class']} auc", *((t or {}).get("auc") for t in targets)]
    point = first[key]
    achieved = "sensitivity" if key == "sensitivity_at_specificity" else "specificity"
    heading = f"{first['class']} {label} {point['requested']:g}"
    values = [((t or {}).get(key) or {}).get(achieved) for t in targets]
    if key == "sensitivity_at_specificity":
        return [
            heading,
            *(
                _metric_cell(v, _interval(splits[s], sensitivity_key(first["class"])), False)
                for v, s in zip(values, names)
            ),
        ]
    return [heading, *values]


# ------------------------------------------------------------------------------------------------ pieces
def _metric_cell(value: Any, interval: list[float] | None, emphasise: bool) -> Any:
    """A number with its interval below it in grey; plain numbers go through :func:`cell` as before."""
    if not isinstance(value, float) or interval is None:
        return value
    number = f"<strong>{value:.3f}</strong>" if emphasise else f"{value:.3f}"
    return Raw(
        f'<td class="num">{number} <span class="ci">[{interval[0]:.3f}, {interval[1]:.3f}]</span></td>'
    )


def _interval(metrics: dict[str, Any], key: str) -> list[float] | None:
    value = (metrics.get("intervals") or {}).get(key)
    return (
        [float(value[0]), float(value[1])] if isinstance(value, (list, tuple)) and len(value) == 2 else None
    )


def _split_metrics(metrics: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, dict) and "per_class" in v}


def _split_order(splits: pd.DataFrame) -> list[str]:
    present = set(splits["split"])
    order = [s for s in ("train", "val", "test") if s in present]
    return order + sorted(present - set(order))


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid YAML ({error})") from error
    return data if isinstance(data, dict) else None


def _read_splits(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"{path}: cannot read as CSV ({error})") from error
    absent = {"label", "split"} - set(frame.columns)
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(absent))}")
    return frame
