"""Finishing a run folder: score val and test with the best checkpoint, write metrics.json, curves, report.

Before scoring, the best checkpoint is completed with what is fitted on the val split alone: a temperature
(``evaluation.calibrate``) and abstention thresholds (``evaluation.abstain_false_rejection``), stored in
``checkpoint["dermlab"]`` so that evaluate, predict and serve apply them. ``model_card.md`` is written last.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermlab.data.splits import split_rows
from dermlab.errors import ConfigError
from dermlab.evaluation.abstention import AbstentionRule, fit_abstention, needs_features, needs_levels, synthetic_non_lesion_images
from dermlab.evaluation.bootstrap import sensitivity_key
from dermlab.evaluation.decision import DecisionRule, checkpoint_decision, fit_tau
from dermlab.evaluation.evaluate import (
    LevelView,
    level_descriptors,
    _nll,
    predict_image_logits,
    predict_view_logits,
    predict_view_outputs,
    resolve_abstention,
    resolve_temperature,
    score_logits,
    view_features,
)
from dermlab.evaluation.familiarity import capture_pooled, fit_feature_statistics, has_one_backbone
from dermlab.evaluation.inference import checkpoint_feature_statistics, checkpoint_level_statistics
from dermlab.evaluation.level_statistics import capture_levels, feature_levels, fit_level_statistics, stack_levels
from dermlab.evaluation.model_card import write_model_card
from dermlab.evaluation.operating_point import OperatingPoints, checkpoint_operating_points
from dermlab.evaluation.plots import plot_training_curves
from dermlab.evaluation.report import write_report
from dermlab.evaluation.tta import average_probabilities, fit_tta_temperature, resolve_tta_views
from dermlab.io import atomic_write_json
from dermlab.models.checkpoint import LoadedModel, load_checkpoint, update_checkpoint_metadata

__all__ = ["summarise_run", "metrics_table", "interval_note"]

log = logging.getLogger(__name__)


def summarise_run(
    run_dir: Path,
    frame: pd.DataFrame,
    splits: tuple[str, ...] = ("val", "test"),
    extras: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Evaluate the run's best checkpoint on each split present in ``frame['split']`` and write the summary.

    With a val split, the temperature and the abstention thresholds are fitted on it first and stored in the
    best checkpoint (see the module docstring); every split is then scored with them.
    """
    run_dir = Path(run_dir)
    loaded = load_checkpoint(run_dir)
    batch_size = loaded.config.data.eval_batch_size
    evaluation = loaded.config.evaluation
    rows = {split: split_rows(frame, split) for split in splits}
    rows = {split: part for split, part in rows.items() if len(part) > 0}
    train = split_rows(frame, "train")
    with_features = bool(evaluation.feature_statistics) and "val" in rows and len(train) >= 3 and has_one_backbone(loaded.model)
    views, logits, features, tta_facts = _split_outputs(loaded, rows, batch_size, num_workers, with_features)
    familiarity, fitted_levels = (_fit_feature_statistics(loaded, train, rows.get("val"), features, batch_size, num_workers)
                                  if with_features else ({}, {}))
    level_statistics = checkpoint_level_statistics(loaded.extras, str(loaded.path))
    prior = _train_prior(frame, loaded.classes)
    facts = _fit_on_val(loaded, rows.get("val"), logits.get("val"), views, prior, tta_facts, features.get("val"), fitted_levels.get("val"))
    rule = resolve_abstention(loaded)
    decision = checkpoint_decision(loaded.extras, str(loaded.path))
    summary: dict[str, Any] = {}
    points = checkpoint_operating_points(loaded.extras, str(loaded.path))  # until val fits them again
    for split, part in sorted(rows.items(), key=lambda item: item[0] != "val"):  # val first: its thresholds travel
        summary[split] = score_logits(
            logits[split],
            part,
            loaded.classes,
            run_dir / "eval" / split,
            evaluation,
            temperature=resolve_temperature(loaded),
            abstention=rule,
            views=views,
            decision=decision,
            rule=decision.default if decision is not None else "argmax",
            features=features.get(split),
            statistics=checkpoint_feature_statistics(loaded.extras, str(loaded.path)),
            levels=LevelView(level_statistics, fitted_levels.get(split)
                             or level_descriptors(loaded, part, batch_size=batch_size, num_workers=num_workers))
            if level_statistics is not None else None,
            operating_points=points if split != "val" else None,
        )
        if split == "val":
            points = _store_operating_points(loaded, summary["val"].get("target"))
    summary = {split: summary[split] for split in rows}  # the splits in the order asked
    summary.update(facts)
    if familiarity:
        summary["familiarity"] = familiarity
    if rule is not None:
        summary["ood_rejection"] = _non_lesion_rejection(loaded, rule, views, batch_size)
    summary.update(extras or {})
    atomic_write_json(run_dir / "metrics.json", summary)
    _write_pictures_and_pages(run_dir)
    return summary


def _split_outputs(
    loaded: LoadedModel, rows: dict[str, pd.DataFrame], batch_size: int, num_workers: int, with_features: bool
) -> tuple[tuple[str, ...], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """The run's views (chosen on val when ``evaluation.tta_candidates``), each split's view logits and, with
    ``with_features``, its pooled features (identity view); and the facts of the TTA choice."""
    evaluation = loaded.config.evaluation
    logits: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    views, tta_facts = resolve_tta_views(evaluation.tta), {}
    if "val" in rows and evaluation.tta_candidates:
        views, logits["val"], tta_facts, val_features = _choose_tta_on_val(
            loaded, rows["val"], batch_size, num_workers, with_features=with_features
        )
        if val_features is not None:
            features["val"] = val_features
    for split, part in rows.items():
        if split in logits:
            continue
        if with_features:
            logits[split], features[split] = predict_view_outputs(loaded, part, views, batch_size=batch_size, num_workers=num_workers)
        else:
            logits[split] = predict_view_logits(loaded, part, views, batch_size=batch_size, num_workers=num_workers)
    return views, logits, features, tta_facts


def _write_pictures_and_pages(run_dir: Path) -> None:
    """Training curves, model card and report of a run whose metrics.json is written (curves and card are
    niceties: a failure there is logged, never lost work)."""
    metrics_csv = run_dir / "logs" / "metrics.csv"
    if metrics_csv.is_file():
        try:
            plot_training_curves(metrics_csv, run_dir / "plots" / "training_curves.png")
        except Exception as error:  # curves are a nicety; never lose the run's metrics over them
            log.warning("could not plot training curves: %s", error)
    try:
        write_model_card(run_dir)
    except Exception as error:  # the card is generated from the files above; never lose the run over it
        log.warning("could not write the model card: %s", error)
    write_report(run_dir)


# The console table's rows: (label, key in the split's metrics, key in its "intervals" or None).
_TABLE_ROWS = (
    ("accuracy (argmax rule)", "accuracy", "accuracy"),
    ("balanced accuracy (argmax rule)", "balanced_accuracy", "balanced_accuracy"),
    ("macro precision", "precision_macro", None),
    ("macro recall", "recall_macro", None),
    ("macro F1", "f1_macro", "f1_macro"),
    ("macro AUC", "auc_macro", "auc_macro"),
    ("ECE", "ece", None),
    ("images", "n", None),
)


def metrics_table(summary: dict[str, Any], splits: tuple[str, ...] = ("val", "test")) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the console table: one row per headline metric, one column per split.

    Values with a bootstrap interval in the split's ``intervals`` read ``value [low, high]``; then come the
    target class's sensitivity at the fixed specificity and each class's recall.
    """
    present = [split for split in splits if isinstance(summary.get(split), dict)]
    parts = [summary[split] for split in present]
    rows = [[label, *(_cell(part, key, interval) for part in parts)] for label, key, interval in _TABLE_ROWS]
    target = next((part["target"] for part in parts if isinstance(part.get("target"), dict)), None)
    if target is not None and isinstance(target.get("sensitivity_at_specificity"), dict):
        requested = target["sensitivity_at_specificity"].get("requested")
        rows.append(
            [
                f"{target['class']} sensitivity @ spec {requested:g}",
                *(_sensitivity_cell(part, target["class"]) for part in parts),
            ]
        )
    classes = next((list(part["per_class"]) for part in parts if isinstance(part.get("per_class"), dict)), [])
    for name in classes:
        rows.append([f"recall {name}", *(_recall_cell(part, name) for part in parts)])
    rows.extend(_rule_rows(parts))
    return ["metric", *present], rows


def _rule_rows(parts: list[dict[str, Any]]) -> list[list[str]]:
    """With a fitted balanced rule: its tau, accuracy, balanced accuracy, macro F1 and per-class recall.

    The rows above are the argmax rule's; ``decision rule`` names the one predictions.csv's column uses.
    """
    if not any(isinstance(part.get("rules"), dict) and "balanced" in part["rules"] for part in parts):
        return []

    def balanced(part: dict[str, Any], key: str) -> str:
        rule = (part.get("rules") or {}).get("balanced") or {}
        value = rule.get("recall", {}).get(key[7:]) if key.startswith("recall_") else rule.get(key)
        return _with_interval(value, (rule.get("intervals") or {}).get(key))

    tau = next(part["rules"]["balanced"]["tau"] for part in parts if isinstance(part.get("rules"), dict) and "balanced" in part["rules"])
    rows = [["decision rule (predicted)", *(str(part.get("decision_rule", "argmax")) for part in parts)]]
    rows.append([f"balanced rule (tau {tau:g}): accuracy", *(balanced(part, "accuracy") for part in parts)])
    rows.append(["balanced rule: balanced accuracy", *(balanced(part, "balanced_accuracy") for part in parts)])
    rows.append(["balanced rule: macro F1", *(balanced(part, "f1_macro") for part in parts)])
    classes = next((list(part["rules"]["balanced"].get("recall", {})) for part in parts if isinstance(part.get("rules"), dict)), [])
    for name in classes:
        rows.append([f"balanced rule: recall {name}", *(balanced(part, f"recall_{name}") for part in parts)])
    return rows


def interval_note(summary: dict[str, Any], splits: tuple[str, ...] = ("val", "test")) -> str:
    """What the brackets of :func:`metrics_table` mean, e.g. "[low, high]: 95% bootstrap interval, ...", or ""."""
    for split in splits:
        bootstrap = (summary.get(split) or {}).get("bootstrap") if isinstance(summary.get(split), dict) else None
        if isinstance(bootstrap, dict):
            unit = "lesions" if bootstrap.get("unit") == "lesion" else "images"
            return (
                f"[low, high]: {100 * bootstrap.get('confidence', 0.95):g}% bootstrap interval "
                f"({bootstrap.get('resamples')} resamples of {unit}, seed {bootstrap.get('seed')})"
            )
    return ""


def _cell(metrics: dict[str, Any], key: str, interval_key: str | None) -> str:
    value = metrics.get(key)
    interval = (metrics.get("intervals") or {}).get(interval_key) if interval_key else None
    return _with_interval(value, interval)


def _sensitivity_cell(metrics: dict[str, Any], target_class: str) -> str:
    point = ((metrics.get("target") or {}).get("sensitivity_at_specificity")) or {}
    interval = (metrics.get("intervals") or {}).get(sensitivity_key(target_class))
    return _with_interval(point.get("sensitivity"), interval)


def _recall_cell(metrics: dict[str, Any], name: str) -> str:
    value = ((metrics.get("per_class") or {}).get(name) or {}).get("recall")
    return _with_interval(value, (metrics.get("intervals") or {}).get(f"recall_{name}"))


def _with_interval(value: Any, interval: Any) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return str(value)
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.4f}"


def _choose_tta_on_val(
    loaded: LoadedModel, val: pd.DataFrame, batch_size: int, num_workers: int, *, with_features: bool = False
) -> tuple[tuple[str, ...], np.ndarray, dict[str, Any], np.ndarray | None]:
    """The candidate view set of ``evaluation.tta_candidates`` with the lowest val log-loss (each with its own
    fitted temperature), its val logits, the facts (every candidate's log-loss) and, ``with_features``, the val
    images' pooled features (identity view; else None).

    The union of the candidates' views is run once; a log-loss, not accuracy, decides, as it is smooth and
    proper (a count of a few hundred images changes by one image at a time). Ties go to the fewer views.
    """
    index = {name: i for i, name in enumerate(loaded.classes)}
    y_val = val["label"].map(index).to_numpy(dtype=np.int64)
    candidates = [resolve_tta_views(candidate) for candidate in loaded.config.evaluation.tta_candidates]
    union = tuple(dict.fromkeys(view for candidate in candidates for view in candidate))
    if with_features:
        all_logits, all_features = predict_view_outputs(loaded, val, union, batch_size=batch_size, num_workers=num_workers)
    else:
        all_logits, all_features = predict_view_logits(loaded, val, union, batch_size=batch_size, num_workers=num_workers), None
    scores = {}
    for candidate in candidates:
        picked = all_logits[[union.index(view) for view in candidate]]
        probabilities = average_probabilities(picked, fit_tta_temperature(picked, y_val))
        scores[",".join(candidate)] = _nll(y_val, probabilities)
    best = min(scores, key=lambda key: (round(scores[key], 6), len(key.split(","))))
    views = tuple(best.split(","))
    log.info("TTA views chosen on val: %s (val log-loss %s)", best, {k: round(v, 4) for k, v in scores.items()})
    chosen = [union.index(view) for view in views]
    return views, all_logits[chosen], {"views": list(views), "val_log_loss": scores}, all_features


def _fit_feature_statistics(
    loaded: LoadedModel,
    train: pd.DataFrame,
    val: pd.DataFrame,
    features: dict[str, np.ndarray],
    batch_size: int,
    num_workers: int,
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """Fit the pooled-feature statistics on the train split (identity view), references on val (the run's
    views), and the level statistics (train and val, identity view) when the backbone declares feature levels;
    store them in the checkpoint (``feature_statistics``, ``level_statistics``). Returns the familiarity facts,
    and the level descriptors computed here by split (val's), so that scoring val does not compute them again."""
    components = loaded.config.evaluation.feature_components
    with_levels = _has_feature_levels(loaded)
    with capture_levels(loaded.model) if with_levels else contextlib.nullcontext({}) as captured:
        _, train_features = predict_view_outputs(loaded, train, ("identity",), batch_size=batch_size, num_workers=num_workers)
    statistics = fit_feature_statistics(train_features, features["val"], components)
    stored = {"feature_statistics": statistics.to_dict()}
    if with_levels:  # the look of each feature level: train's identity view (captured above), val's
        val_levels = level_descriptors(loaded, val, batch_size=batch_size, num_workers=num_workers)
        stored["level_statistics"] = fit_level_statistics(stack_levels(captured), val_levels, components).to_dict()
    update_checkpoint_metadata(loaded.path, **stored)
    loaded.extras.update(stored)
    log.info("feature statistics fitted on %d training images (%d axes)", statistics.images, statistics.eigenvalues.numel())
    facts = {"train_images": statistics.images, "axes": int(statistics.eigenvalues.numel()),
             "unusual_distance": statistics.unusual_distance, "reference_shift_score": statistics.reference_shift_score,
             "level_statistics": sorted(stored.get("level_statistics", {}).get("levels", [])) or None}
    return facts, ({"val": val_levels} if with_levels else {})


def _has_feature_levels(loaded: LoadedModel) -> bool:
    """Whether the backbone declares feature levels for level statistics (a timm backbone does); else logged."""
    try:
        feature_levels(loaded.model)
    except ConfigError as error:
        log.info("no level statistics: %s", error)
        return False
    return True


def _train_prior(frame: pd.DataFrame, classes: list[str]) -> list[float] | None:
    """The training split's class shares (each class counted at least once), or None without train rows."""
    train = split_rows(frame, "train")
    if len(train) == 0:
        return None
    counts = train["label"].value_counts().reindex(classes, fill_value=0).clip(lower=1).to_numpy(dtype=np.float64)
    return (counts / counts.sum()).tolist()


def _fit_on_val(
    loaded: LoadedModel,
    val: pd.DataFrame | None,
    logits: np.ndarray | None,
    views: tuple[str, ...],
    prior: list[float] | None = None,
    tta_facts: dict[str, Any] | None = None,
    features: np.ndarray | None = None,
    levels: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Fit the temperature, the abstention rule and the balanced rule's tau (``evaluation.logit_adjustment``,
    with the training ``prior``) on val, store them in the checkpoint with the chosen TTA views, return the facts.
    ``features`` and ``levels`` (val's pooled features and level descriptors) serve a feature or level score.

    Without a val split nothing is fitted and the checkpoint keeps what it holds.
    """
    evaluation = loaded.config.evaluation
    temperature = resolve_temperature(loaded)
    if val is None or logits is None:
        return {"temperature": temperature, "calibration": {"temperature": temperature, "fitted": False}}
    index = {name: i for i, name in enumerate(loaded.classes)}
    y_val = val["label"].map(index).to_numpy(dtype=np.int64)
    fitted = bool(evaluation.calibrate)
    if fitted:
        temperature = fit_tta_temperature(logits, y_val)
    calibration = {"temperature": temperature, "fitted": fitted, "fitted_on": "val", "views": list(views), "n": int(y_val.size)}
    rule: AbstentionRule | None = None
    if evaluation.abstain_false_rejection > 0:
        statistics = checkpoint_feature_statistics(loaded.extras, str(loaded.path)) if needs_features(evaluation.abstain_scores) else None
        if needs_features(evaluation.abstain_scores) and (statistics is None or features is None):
            raise ConfigError("evaluation.abstain_scores has mahalanobis, but no feature statistics could be fitted "
                              "(they need one backbone, not an ensemble, a train split of at least 3 images and a val split)")
        level_statistics = checkpoint_level_statistics(loaded.extras, str(loaded.path)) if needs_levels(evaluation.abstain_scores) else None
        if needs_levels(evaluation.abstain_scores) and (level_statistics is None or levels is None):
            raise ConfigError("evaluation.abstain_scores has level, but no level statistics could be fitted (they need "
                              "one timm backbone that declares feature levels, a train split of at least 3 images and a val split)")
        rule = fit_abstention(
            logits, evaluation.abstain_false_rejection, evaluation.abstain_scores, temperature=temperature, views=views,
            features=features, statistics=statistics, levels=levels, level_statistics=level_statistics,
        )
    entries: dict[str, Any] = {"abstention": rule.to_dict() if rule is not None else None}
    if fitted:
        entries.update(temperature=temperature, calibration=calibration)
    if tta_facts:
        entries.update(tta_views=list(views), tta_choice=tta_facts)
    decision = None
    if evaluation.logit_adjustment and prior is not None:
        probabilities = average_probabilities(logits, temperature)
        tau, curve = fit_tau(probabilities, y_val, prior)
        decision = {
            **DecisionRule(tau, tuple(prior), evaluation.decision_rule).to_dict(),
            "fitted_on": "val",
            "val_balanced_accuracy": {"argmax": curve[0.0], "balanced": curve[tau]},
        }
        entries["decision"] = decision
    update_checkpoint_metadata(loaded.path, **entries)
    loaded.extras.update(entries)
    log.info("fitted on val: temperature %.4f, abstention %s, tau %s", temperature, rule.thresholds if rule else "off", decision and decision["tau"])
    facts = {"temperature": temperature, "calibration": calibration, "abstention": entries["abstention"]}
    if decision is not None:
        facts["decision"] = decision
    if tta_facts:
        facts["tta_choice"] = tta_facts
    return facts


def _store_operating_points(loaded: LoadedModel, target: dict[str, Any] | None) -> OperatingPoints | None:
    """The val split's target thresholds, stored in the best checkpoint (``operating_points``) so that every later
    evaluation reports what it gets at them; the stored entry is removed where val gives none."""
    points = OperatingPoints.from_target_metrics(target, "val")
    entry = points.to_dict() if points is not None else None
    if entry is not None or loaded.extras.get("operating_points") is not None:
        update_checkpoint_metadata(loaded.path, operating_points=entry)
        loaded.extras["operating_points"] = entry
    return points


def _non_lesion_rejection(
    loaded: LoadedModel, rule: AbstentionRule, views: tuple[str, ...], batch_size: int
) -> dict[str, float]:
    """Share of synthetic non-lesion images (solid colours, noise, patterns) the rule rejects, by kind."""
    height, width = loaded.preprocessing.input_size
    shares = {}
    for kind, images in synthetic_non_lesion_images((width, height), per_kind=8, seed=0).items():
        logits = predict_image_logits(loaded, images, views, batch_size=batch_size)
        features = levels = None
        if rule.needs_features or rule.needs_levels:  # the identity view, as their statistics were fitted
            looks = capture_levels(loaded.model) if rule.needs_levels else contextlib.nullcontext({})
            with capture_pooled(loaded.model) as pooled, looks as captured:
                predict_image_logits(loaded, images, ("identity",), batch_size=batch_size)
            features, levels = view_features(pooled, 1, loaded.model.num_features)[0], stack_levels(captured) or None
        shares[kind] = float(rule.reject(logits, features, levels).mean())
    return shares
