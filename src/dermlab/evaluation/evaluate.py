"""Scoring a trained model on a split: inference, metrics, predictions.csv and the plots."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from dermlab.config import EvaluationConfig
from dermlab.data.datamodule import ImageDataset
from dermlab.data.images import read_image
from dermlab.data.metadata import encode_metadata
from dermlab.data.transforms import create_transform
from dermlab.errors import DataError
from dermlab.evaluation.abstention import AbstentionRule, abstention_summary
from dermlab.evaluation.bootstrap import bootstrap_intervals
from dermlab.evaluation.calibration import reliability_bins
from dermlab.evaluation.compare import data_fingerprint
from dermlab.evaluation.decision import RULES, DecisionRule
from dermlab.evaluation.familiarity import FeatureStatistics
from dermlab.evaluation.inference import (
    InferenceBehaviour,
    checkpoint_abstention,
    checkpoint_feature_statistics,
    checkpoint_level_statistics,
    checkpoint_temperature,
    resolve_behaviour,
)
from dermlab.evaluation.level_statistics import LevelStatistics, capture_levels, stack_levels
from dermlab.evaluation.metrics import compute_metrics
from dermlab.evaluation.operating_point import OperatingPoints, checkpoint_operating_points
from dermlab.evaluation.plots import plot_confusion_matrix, plot_reliability_diagram, plot_roc_curves
from dermlab.evaluation.present_classes import present_class_metrics
from dermlab.evaluation.tta import average_probabilities, resolve_tta_views, view_logits
from dermlab.io import atomic_save, atomic_write_json
from dermlab.models.checkpoint import LoadedModel
from dermlab.models.classifier import uses_metadata

__all__ = [
    "predict_logits",
    "predict_view_logits",
    "predict_view_outputs",
    "level_descriptors",
    "LevelView",
    "predict_image_logits",
    "predictions_frame",
    "evaluate_frame",
    "score_logits",
    "score_predictions",
    "resolve_temperature",
    "resolve_abstention",
]

log = logging.getLogger(__name__)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_logits(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    image_loader: Callable[[str], Any] | None = None,
) -> np.ndarray:
    """Logits ``(N, C)`` of the rows of ``frame`` (``path`` column), preprocessed as the checkpoint says.

    ``image_loader(path) -> PIL image`` replaces :func:`read_image` (the shift report corrupts images there).
    """
    device = device or _device()
    transform = create_transform("none", loaded.preprocessing, train=False)
    labels_known = frame.assign(label=loaded.classes[0])  # labels are not needed for inference
    dataset = ImageDataset(labels_known, loaded.classes, transform, image_loader or read_image, metadata=_metadata(loaded, frame))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model = loaded.model.to(device).eval()
    outputs = [_forward(model, inputs, device)(_images(inputs, device)).float().cpu() for inputs, _ in loader]
    if not outputs:
        return np.zeros((0, len(loaded.classes)), dtype=np.float32)
    return torch.cat(outputs).numpy()


@torch.inference_mode()
def predict_view_logits(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    views: Sequence[str] = ("identity",),
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    image_loader: Callable[[str], Any] | None = None,
) -> np.ndarray:
    """Logits ``(V, N, C)`` of each test-time augmentation view (:mod:`dermlab.evaluation.tta`) of each row.

    Every image is decoded once; the views are taken of its preprocessed tensor, as serving does.
    """
    return _view_logits_of_rows(loaded, frame, views, batch_size, num_workers, device, image_loader)


@torch.inference_mode()
def predict_view_outputs(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    views: Sequence[str] = ("identity",),
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    image_loader: Callable[[str], Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(V, N, C)`` as :func:`predict_view_logits`, and the pooled backbone features ``(N, F)`` of the
    identity view, what :mod:`dermlab.evaluation.familiarity` compares with the training images (fitted on the
    identity view, so the distances do not depend on the TTA views; the identity view is run too when ``views``
    lack it)."""
    from dermlab.evaluation.familiarity import capture_pooled

    views = resolve_tta_views(list(views))
    run = views if "identity" in views else ("identity", *views)
    with capture_pooled(loaded.model) as pooled:
        logits = _view_logits_of_rows(loaded, frame, run, batch_size, num_workers, device, image_loader)
    features = view_features(pooled, len(run), int(getattr(loaded.model, "num_features", 0)))[run.index("identity")]
    return logits[[run.index(view) for view in views]], features


@torch.inference_mode()
def level_descriptors(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    image_loader: Callable[[str], Any] | None = None,
) -> dict[str, np.ndarray]:
    """Per feature level of the backbone, each image's channel means and deviations ``(N, 2C)`` (the identity
    view, as evaluation preprocesses it): what :mod:`dermlab.evaluation.level_statistics` compares."""
    with capture_levels(loaded.model) as captured:
        _view_logits_of_rows(loaded, frame, ("identity",), batch_size, num_workers, device, image_loader)
    return stack_levels(captured)


def view_features(pooled: Sequence[torch.Tensor], views: int, width: int) -> np.ndarray:
    """Captured pooled batches, in the order view 1..V of batch 1, then of batch 2, ...: ``(V, N, F)``."""
    if not pooled:
        return np.zeros((views, 0, width), dtype=np.float32)
    batches = [torch.stack(list(pooled[start : start + views])) for start in range(0, len(pooled), views)]
    return torch.cat(batches, dim=1).numpy()


def _view_logits_of_rows(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    views: Sequence[str],
    batch_size: int,
    num_workers: int,
    device: torch.device | None,
    image_loader: Callable[[str], Any] | None,
) -> np.ndarray:
    device = device or _device()
    views = resolve_tta_views(list(views))
    transform = create_transform("none", loaded.preprocessing, train=False)
    labels_known = frame.assign(label=loaded.classes[0])  # labels are not needed for inference
    dataset = ImageDataset(labels_known, loaded.classes, transform, image_loader or read_image, metadata=_metadata(loaded, frame))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model = loaded.model.to(device).eval()
    outputs = [view_logits(_forward(model, inputs, device), _images(inputs, device), views).cpu() for inputs, _ in loader]
    if not outputs:
        return np.zeros((len(views), 0, len(loaded.classes)), dtype=np.float32)
    return torch.cat(outputs, dim=1).numpy()


@torch.inference_mode()
def predict_image_logits(
    loaded: LoadedModel,
    images: Sequence[Any],
    views: Sequence[str] = ("identity",),
    batch_size: int = 64,
    device: torch.device | None = None,
) -> np.ndarray:
    """Logits ``(V, N, C)`` of PIL images (converted to RGB), preprocessed as the checkpoint says."""
    device = device or _device()
    views = resolve_tta_views(list(views))
    transform = create_transform("none", loaded.preprocessing, train=False)
    model = loaded.model.to(device).eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image.convert("RGB")) for image in images[start : start + batch_size]])
        outputs.append(view_logits(model, batch.to(device), views).cpu())
    if not outputs:
        return np.zeros((len(views), 0, len(loaded.classes)), dtype=np.float32)
    return torch.cat(outputs, dim=1).numpy()


def _metadata(loaded: LoadedModel, frame: pd.DataFrame) -> torch.Tensor | None:
    """Encoded age / sex / localization for a metadata-fusion model, else None (images only)."""
    return encode_metadata(frame.reset_index(drop=True)) if uses_metadata(loaded.model) else None


def _images(inputs: Any, device: torch.device) -> torch.Tensor:
    return (inputs[0] if isinstance(inputs, (tuple, list)) else inputs).to(device)


def _forward(model: torch.nn.Module, inputs: Any, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images -> logits``; a batch from a dataset with metadata binds its metadata rows."""
    if isinstance(inputs, (tuple, list)):
        metadata = inputs[1].to(device)
        return lambda images: model(images, metadata)
    return model


def resolve_temperature(loaded: LoadedModel) -> float:
    """The checkpoint's fitted temperature (``checkpoint["dermlab"]["temperature"]``), 1.0 when it has none."""
    return checkpoint_temperature(loaded.extras, str(loaded.path))


def resolve_abstention(loaded: LoadedModel) -> AbstentionRule | None:
    """The checkpoint's abstention rule (``checkpoint["dermlab"]["abstention"]``), or None."""
    return checkpoint_abstention(loaded.extras, str(loaded.path))


def predictions_frame(frame: pd.DataFrame, classes: Sequence[str], probabilities: np.ndarray) -> pd.DataFrame:
    """``image_id, path, true, predicted, prob_<class>...`` (``true`` empty where the label is unknown)."""
    out = pd.DataFrame(
        {
            "image_id": frame["image_id"].astype(str).to_numpy() if "image_id" in frame else frame["path"].map(lambda p: Path(p).stem),
            "path": frame["path"].astype(str).to_numpy(),
            "true": frame["label"].astype(str).to_numpy() if "label" in frame else "",
            "predicted": [classes[i] for i in probabilities.argmax(axis=1)] if len(probabilities) else [],
        }
    )
    for index, name in enumerate(classes):
        out[f"prob_{name}"] = probabilities[:, index] if len(probabilities) else []
    return out


def score_predictions(
    predictions: pd.DataFrame,
    classes: Sequence[str],
    out_dir: Path,
    evaluation: EvaluationConfig,
    title: str = "",
    *,
    uncalibrated: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics and plots from a predictions frame; writes ``metrics.json``, ``predictions.csv`` and PNGs.

    ``uncalibrated``: the probabilities before temperature scaling, drawn beside the frame's own in the
    reliability diagram. ``extra`` entries are added to the metrics. ``groups`` (lesion ids, one per row) are
    what the bootstrap intervals resample (``evaluation.bootstrap_resamples``; images when None); the metrics
    get ``intervals`` and ``bootstrap`` (:func:`dermlab.evaluation.bootstrap.bootstrap_intervals`) and
    ``data_fingerprint`` (:func:`dermlab.evaluation.compare.data_fingerprint`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(predictions["true"]) - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's classes {list(classes)}")
    y_true = predictions["true"].map(index).to_numpy(dtype=np.int64)
    y_prob = predictions[[f"prob_{name}" for name in classes]].to_numpy(dtype=np.float64)
    target = evaluation.target_class if evaluation.target_class in classes else None
    metrics = compute_metrics(
        y_true,
        y_prob,
        list(classes),
        target_class=target,
        fixed_specificity=evaluation.fixed_specificity,
        fixed_sensitivity=evaluation.fixed_sensitivity,
        ece_bins=evaluation.ece_bins,
    )
    metrics["data_fingerprint"] = data_fingerprint(predictions)
    present = present_class_metrics(y_true, y_prob, list(classes), evaluation, groups=groups)
    if present is not None:  # e.g. an external folder of melanomas and nevi only
        metrics["present_classes"] = present
    if evaluation.bootstrap_resamples > 0:
        metrics.update(
            bootstrap_intervals(
                y_true,
                y_prob,
                list(classes),
                groups=groups,
                resamples=evaluation.bootstrap_resamples,
                seed=evaluation.bootstrap_seed,
                target_class=target,
                fixed_specificity=evaluation.fixed_specificity,
            )
        )
    metrics.update(extra or {})
    atomic_save(out_dir / "predictions.csv", lambda tmp: predictions.to_csv(tmp, index=False))
    atomic_write_json(out_dir / "metrics.json", metrics)
    _write_plots(out_dir, y_true, y_prob, list(classes), np.asarray(metrics["confusion_matrix"]), evaluation.ece_bins, uncalibrated)
    return metrics


def _write_plots(out_dir: Path, y_true: np.ndarray, y_prob: np.ndarray, classes: list[str], cm: np.ndarray, ece_bins: int,
                 uncalibrated: np.ndarray | None) -> None:
    """The confusion matrices, ROC curves and reliability diagram (before and after calibration when given)."""
    plot_confusion_matrix(cm, classes, out_dir / "confusion_matrix.png", normalize=False)
    plot_confusion_matrix(cm, classes, out_dir / "confusion_matrix_normalized.png", normalize=True)
    plot_roc_curves(y_true, y_prob, classes, out_dir / "roc.png")
    bins = reliability_bins(y_true, y_prob, n_bins=ece_bins)
    if uncalibrated is None:
        plot_reliability_diagram(bins, out_dir / "reliability.png")
    else:
        before = reliability_bins(y_true, uncalibrated, n_bins=ece_bins)
        plot_reliability_diagram(before, out_dir / "reliability.png", calibrated=bins)


def evaluate_frame(
    loaded: LoadedModel,
    frame: pd.DataFrame,
    out_dir: Path,
    evaluation: EvaluationConfig | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    *,
    tta: bool | str | Sequence[str] | None = None,
    calibrated: bool = True,
    abstain: bool = True,
    rule: str | None = None,
) -> dict[str, Any]:
    """Run the model over labelled rows and score them (see :func:`score_logits`).

    ``tta``: views to average (default ``evaluation.tta``). ``calibrated``: apply the checkpoint's temperature.
    ``abstain``: apply the checkpoint's abstention rule (an ``uncertain`` column and an ``abstention`` entry).
    The behaviour is resolved as ``predict`` and ``serve`` resolve it (:func:`dermlab.evaluation.inference.resolve_behaviour`).
    """
    if len(frame) == 0:
        raise DataError("nothing to evaluate: the chosen split is empty")
    evaluation = evaluation or loaded.config.evaluation
    behaviour = resolve_behaviour(
        evaluation.tta, loaded.extras, str(loaded.path), tta=tta, calibrated=calibrated, abstain=abstain, rule=rule
    )
    statistics = checkpoint_feature_statistics(loaded.extras, str(loaded.path))
    features = None
    if statistics is not None or behaviour.needs_features:
        logits, features = predict_view_outputs(loaded, frame, behaviour.views, batch_size=batch_size, num_workers=num_workers)
    else:
        logits = predict_view_logits(loaded, frame, behaviour.views, batch_size=batch_size, num_workers=num_workers)
    return score_logits(
        logits,
        frame,
        loaded.classes,
        out_dir,
        evaluation,
        temperature=behaviour.temperature,
        abstention=behaviour.abstention,
        views=behaviour.views,
        decision=behaviour.decision,
        rule=behaviour.rule,
        features=features,
        statistics=statistics,
        levels=_level_view(loaded, frame, batch_size, num_workers),
        operating_points=checkpoint_operating_points(loaded.extras, str(loaded.path)),
    )


def _level_view(loaded: LoadedModel, frame: pd.DataFrame, batch_size: int, num_workers: int) -> LevelView | None:
    """The checkpoint's level statistics and ``frame``'s level descriptors, or None when it has none."""
    statistics = checkpoint_level_statistics(loaded.extras, str(loaded.path))
    if statistics is None:
        return None
    return LevelView(statistics, level_descriptors(loaded, frame, batch_size=batch_size, num_workers=num_workers))


@dataclass(frozen=True)
class LevelView:
    """Level statistics of the training images and the level descriptors of the images being scored."""

    statistics: LevelStatistics
    descriptors: dict[str, np.ndarray]


def score_logits(
    logits: np.ndarray,
    frame: pd.DataFrame,
    classes: Sequence[str],
    out_dir: Path,
    evaluation: EvaluationConfig,
    *,
    temperature: float = 1.0,
    abstention: AbstentionRule | None = None,
    views: Sequence[str] = ("identity",),
    decision: DecisionRule | None = None,
    rule: str = "argmax",
    features: np.ndarray | None = None,
    statistics: FeatureStatistics | None = None,
    levels: LevelView | None = None,
    operating_points: OperatingPoints | None = None,
) -> dict[str, Any]:
    """Score view logits ``(V, N, C)`` (or ``(N, C)``) of labelled rows (see :func:`score_predictions`).

    ``features``: their pooled features ``(N, F)``, for an abstention rule with a feature score; with the
    training images' ``statistics`` too, predictions.csv gets each image's ``feature_distance`` and the
    metrics ``familiarity`` (:meth:`FeatureStatistics.shift`: how unlike the training images they are). With
    ``levels``, predictions.csv gets each image's ``level_score`` and the metrics ``level_familiarity``
    (:meth:`LevelStatistics.verdict`: how many look unlike the training images at the backbone's feature levels).
    With ``operating_points`` (the target class's thresholds fitted on val), the metrics hold
    ``at_fitted_thresholds``: the sensitivity and specificity these images get at those thresholds
    (:mod:`dermlab.evaluation.operating_point`), beside ``target``'s thresholds re-fitted on them.

    The headline metrics are those of the argmax rule; with a fitted ``decision`` the metrics also hold
    ``rules`` (accuracy, balanced accuracy, macro F1 and per-class recall of each rule, with intervals) and
    ``decision_rule``, the rule (``rule``) whose choice fills predictions.csv's ``predicted`` column.

    Probabilities are the views' mean of ``softmax(logits / temperature)``, as ``dermlab predict`` and the
    service compute them. The metrics also hold ``tta`` (the views) and ``calibration`` (the temperature, ECE
    and NLL before and after it); with ``abstention`` also ``abstention`` (share rejected, accuracy of the
    accepted), and predictions.csv gets an ``uncertain`` column.
    """
    logits = np.asarray(logits)
    behaviour = InferenceBehaviour(tuple(views), temperature, abstention, decision, rule)
    decisions = behaviour.decide(logits, features, levels.descriptors if levels is not None else None)  # as predict and serve
    probabilities = decisions.probabilities
    raw = average_probabilities(logits, 1.0) if temperature != 1.0 else probabilities
    predictions = predictions_frame(frame, classes, probabilities)
    if decision is not None:
        predictions["predicted"] = [classes[i] for i in decisions.predicted]
        for name, chosen in (decisions.by_rule or {}).items():
            predictions[f"predicted_{name}"] = [classes[i] for i in chosen]
    y_true = _true_indices(predictions, classes)
    extra: dict[str, Any] = {"tta": list(views), "calibration": _calibration_facts(y_true, raw, probabilities, temperature, evaluation)}
    groups = frame["group"].astype(str).tolist() if "group" in frame else None
    if decision is not None:
        extra["decision_rule"] = rule
        extra["rules"] = rule_metrics(y_true, probabilities, classes, decision, evaluation, groups)
    extra.update(_familiarity_columns(predictions, features, statistics, levels))
    if operating_points is not None:
        extra["at_fitted_thresholds"] = operating_points.score(y_true, probabilities, classes)
    if abstention is not None:
        rejected = decisions.uncertain
        predictions["uncertain"] = rejected
        extra["abstention"] = {
            **abstention_summary(y_true, probabilities, rejected),
            "thresholds": dict(abstention.thresholds),
            "val_false_rejection_target": abstention.false_rejection,
        }
    return score_predictions(
        predictions,
        classes,
        out_dir,
        evaluation,
        uncalibrated=raw if temperature != 1.0 else None,
        extra=extra,
        groups=groups,
    )


def _familiarity_columns(
    predictions: pd.DataFrame, features: np.ndarray | None, statistics: FeatureStatistics | None, levels: LevelView | None
) -> dict[str, Any]:
    """Add ``feature_distance`` and ``level_score`` to ``predictions`` where their statistics exist; return the
    set-level verdicts (``familiarity``, ``level_familiarity``)."""
    facts: dict[str, Any] = {}
    if statistics is not None and features is not None:
        predictions["feature_distance"] = statistics.distance(features)
        if len(features) >= 2:
            facts["familiarity"] = statistics.shift(features).to_dict()
    if levels is not None:
        predictions["level_score"] = levels.statistics.score(levels.descriptors)
        facts["level_familiarity"] = levels.statistics.verdict(levels.descriptors).to_dict()
    return facts


def _true_indices(predictions: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """The ``true`` column as class indices; a label the model does not know is refused."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(predictions["true"]) - set(index))
    if unknown:
        raise DataError(f"labels {unknown} are not among the model's classes {list(classes)}")
    return predictions["true"].map(index).to_numpy(dtype=np.int64)


def _calibration_facts(
    y_true: np.ndarray, raw: np.ndarray, probabilities: np.ndarray, temperature: float, evaluation: EvaluationConfig
) -> dict[str, float]:
    """The temperature, and ECE and NLL before (``raw``) and after it (``probabilities``)."""
    return {
        "temperature": float(temperature),
        "ece_before": reliability_bins(y_true, raw, n_bins=evaluation.ece_bins)["ece"],
        "ece_after": reliability_bins(y_true, probabilities, n_bins=evaluation.ece_bins)["ece"],
        "nll_before": _nll(y_true, raw),
        "nll_after": _nll(y_true, probabilities),
    }


def rule_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    decision: DecisionRule,
    evaluation: EvaluationConfig,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Each decision rule's accuracy, balanced accuracy, macro F1 and recall per class, with intervals."""
    out: dict[str, Any] = {}
    for name in RULES:
        adjusted = decision.probabilities(probabilities, name)
        metrics = compute_metrics(y_true, adjusted, list(classes), target_class=None)
        entry: dict[str, Any] = {
            "tau": 0.0 if name == "argmax" else float(decision.tau),
            "accuracy": metrics["accuracy"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "f1_macro": metrics["f1_macro"],
            "recall": {c: v["recall"] for c, v in metrics["per_class"].items()},
        }
        if evaluation.bootstrap_resamples > 0:
            intervals = bootstrap_intervals(
                y_true, adjusted, list(classes), groups=groups, resamples=evaluation.bootstrap_resamples, seed=evaluation.bootstrap_seed
            )["intervals"]
            keys = ["accuracy", "balanced_accuracy", "f1_macro", *(f"recall_{c}" for c in classes)]
            entry["intervals"] = {key: intervals.get(key) for key in keys}
        out[name] = entry
    return out


def _nll(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    picked = probabilities[np.arange(y_true.size), y_true]
    return float(-np.mean(np.log(np.clip(picked, 1e-12, None))))
