"""Inference from a checkpoint alone (or its ONNX export): preprocessing, batching, TTA, temperature,
abstention, metadata, Grad-CAM.

By default a predictor behaves as ``dermlab evaluate`` scores the run: the run's own TTA views, the
checkpoint's temperature and its abstention rule (:mod:`dermlab.evaluation.inference`); ``tta``, ``calibrated``
and ``abstain`` override them. A metadata-fusion model takes each image's age, sex and localization
(:class:`dermlab.data.metadata.PatientMetadata`); an image without them is predicted with all three unknown,
and every result says which it was.

A :class:`Predictor` is shared by every request of the web app, so each call into the network holds a lock:
concurrent callers are served one batch at a time and never race on the model (or on Grad-CAM's hooks).
Image decoding and preprocessing happen outside the lock.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dermlab.data.images import read_image
from dermlab.data.metadata import PatientMetadata, encode_patient_metadata
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.transforms import create_transform
from dermlab.errors import CheckpointError, ConfigError, DataError
from dermlab.evaluation.abstention import AbstentionRule
from dermlab.evaluation.familiarity import FeatureStatistics
from dermlab.evaluation.inference import (
    InferenceBehaviour,
    checkpoint_feature_statistics,
    checkpoint_level_statistics,
    resolve_behaviour,
)
from dermlab.evaluation.level_statistics import LevelStatistics, capture_levels
from dermlab.evaluation.tta import DEFAULT_TTA_VIEWS, TTA_VIEWS, view_logits
from dermlab.models.checkpoint import LoadedModel, run_folder_of
from dermlab.models.classifier import uses_metadata

__all__ = [
    "ENGINES",
    "TTA_VIEWS",
    "DEFAULT_TTA_VIEWS",
    "PathPrediction",
    "AbstainingPrediction",
    "Predictor",
    "OnnxPredictor",
    "resolve_onnx_path",
]

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnx")

# TTA_VIEWS and DEFAULT_TTA_VIEWS live in dermlab.evaluation.tta (evaluation averages the same views) and are
# re-exported here.

_OVERLAY_MAX_SIDE = 512  # Grad-CAM overlays are returned at most this large (keeps responses small)


TtaSetting = bool | str | Sequence[str] | None
MetadataRows = Sequence[PatientMetadata | None] | None


@dataclass(frozen=True)
class PathPrediction:
    """One image file's class probabilities, in the predictor's class order, and the abstention verdict.

    ``metadata``: what a metadata-fusion model was given for this image (``None``: nothing, all unknown).
    """

    path: Path
    probabilities: np.ndarray
    uncertain: bool = False
    reasons: tuple[str, ...] = ()
    metadata: PatientMetadata | None = None
    features: np.ndarray | None = None  # pooled features (F,), when the predictor has feature statistics
    feature_distance: float | None = None  # their Mahalanobis distance to the training images (typical: about 1)
    level_score: float | None = None  # how unlike the training images it looks (about 0 at home), with level statistics


@dataclass(frozen=True)
class AbstainingPrediction:
    """Probabilities ``(N, C)`` and, per image, whether the abstention rule answers "uncertain" and why.

    Without a rule in the checkpoint, ``uncertain`` is all False and ``reasons`` are empty.
    """

    probabilities: np.ndarray
    uncertain: np.ndarray
    reasons: list[list[str]]
    scores: dict[str, np.ndarray]
    features: np.ndarray | None = None  # (N, F) pooled features of the identity view, when computed
    feature_distance: np.ndarray | None = None  # (N,), with the predictor's feature statistics
    level_score: np.ndarray | None = None  # (N,), with the predictor's level statistics (identity view)


class Predictor:
    """Class probabilities (and Grad-CAM overlays) for PIL images, with the checkpoint's own preprocessing.

    >>> predictor = Predictor.from_path("runs/exp1")          # run folder or .ckpt (or engine="onnx")
    >>> predictor.predict_images([image])                       # (1, num_classes) probabilities

    ``tta``: ``None`` = the run's own views (``evaluation.tta``), else a setting for
    :func:`~dermlab.evaluation.tta.resolve_tta_views`. ``calibrated=False`` ignores the checkpoint's temperature,
    ``abstain=False`` its abstention rule.
    """

    engine = "torch"

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        tta: TtaSetting = None,
        calibrated: bool = True,
        abstain: bool = True,
        rule: str | None = None,
        batch_size: int = 32,
    ) -> None:
        self.loaded = loaded
        self._model = loaded.model.eval()
        self._device = next(iter(loaded.model.parameters()), torch.empty(0)).device
        behaviour = resolve_behaviour(
            loaded.config.evaluation.tta, loaded.extras, str(loaded.path), tta=tta, calibrated=calibrated, abstain=abstain, rule=rule
        )
        self._setup(
            classes=loaded.classes,
            preprocessing=loaded.preprocessing,
            model_id=loaded.model_id,
            behaviour=behaviour,
            batch_size=batch_size,
            takes_metadata=uses_metadata(loaded.model),
            statistics=checkpoint_feature_statistics(loaded.extras, str(loaded.path)),
            level_statistics=checkpoint_level_statistics(loaded.extras, str(loaded.path)),
        )

    def _setup(
        self,
        *,
        classes: Sequence[str],
        preprocessing: Preprocessing,
        model_id: str,
        behaviour: InferenceBehaviour,
        batch_size: int,
        takes_metadata: bool = False,
        statistics: FeatureStatistics | None = None,
        level_statistics: LevelStatistics | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.classes: list[str] = list(classes)
        self.preprocessing = preprocessing
        self.model_id = model_id
        self.behaviour = behaviour
        self.batch_size = batch_size
        self.takes_metadata = takes_metadata
        self.statistics = statistics  # the training images' feature statistics (familiarity), or None
        self.level_statistics = level_statistics  # and their level statistics, or None
        self._transform = create_transform("none", preprocessing, train=False)
        self._lock = threading.Lock()

    @property
    def temperature(self) -> float:
        return self.behaviour.temperature

    @property
    def tta_views(self) -> tuple[str, ...]:
        return self.behaviour.views

    @property
    def abstention(self) -> AbstentionRule | None:
        return self.behaviour.abstention

    @property
    def decision_rule(self) -> str:
        """The decision rule that picks the answer: ``argmax``, or ``balanced`` (the run's logit adjustment)."""
        return self.behaviour.rule

    def classes_by_rule(self, probabilities: np.ndarray) -> dict[str, list[str]]:
        """The class each of the run's decision rules picks for probabilities ``(N, C)``: ``argmax``, and
        ``balanced`` when the run has a fitted logit adjustment."""
        picks = self.behaviour.choices(np.atleast_2d(np.asarray(probabilities, dtype=np.float64)))
        return {rule: [self.classes[i] for i in chosen] for rule, chosen in picks.items()}

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        engine: str = "torch",
        *,
        tta: TtaSetting = None,
        calibrated: bool = True,
        abstain: bool = True,
        rule: str | None = None,
        batch_size: int = 32,
    ) -> Predictor:
        """A predictor for a run folder or checkpoint (``engine="torch"``), or an ONNX export (``"onnx"``).

        With ``engine="onnx"``, ``path`` is a ``.onnx`` file or a run folder holding ``export/model.onnx``.
        """
        options: dict[str, Any] = {"tta": tta, "calibrated": calibrated, "abstain": abstain, "rule": rule, "batch_size": batch_size}
        if engine == "torch":
            from dermlab.models.checkpoint import load_checkpoint

            if Path(path).suffix == ".onnx":
                raise ConfigError(f"{path}: an ONNX file needs --engine onnx")
            return cls(load_checkpoint(path), **options)
        if engine == "onnx":
            return OnnxPredictor(resolve_onnx_path(path), **options)
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")

    # ------------------------------------------------------------------------------------------- inference

    @property
    def can_explain(self) -> bool:
        """Whether :meth:`explain` works (Grad-CAM needs the torch network)."""
        return True

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised float batch ``(N, 3, H, W)`` of RGB PIL images."""
        return torch.stack([self._transform(image.convert("RGB")) for image in images])

    def _logits(self, batch: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        """Raw network outputs for a preprocessed batch (and encoded metadata). Called with the lock held."""
        with torch.inference_mode():
            inputs = (batch.to(self._device),) if metadata is None else (batch.to(self._device), metadata.to(self._device))
            return self._model(*inputs).float().cpu()

    def _outputs(
        self, batch: torch.Tensor, metadata: torch.Tensor | None, levels: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray] | None]:
        """Logits, pooled backbone features ``(N, F)`` and, with ``levels``, the level descriptors of a
        preprocessed batch. Called with the lock held."""
        with torch.inference_mode(), (capture_levels(self._model) if levels else contextlib.nullcontext({})) as captured:
            pooled = self._model.forward_features(batch.to(self._device))
            head = (pooled,) if metadata is None else (pooled, metadata.to(self._device))
            logits = self._model.forward_head(*head).float().cpu()
        return logits, pooled.float().cpu(), {level: found[0].numpy() for level, found in captured.items()} if levels else None

    @property
    def computes_features(self) -> bool:
        """Whether predictions carry pooled features: for the feature or level statistics, or a feature or level
        abstention score."""
        return self.statistics is not None or self.behaviour.needs_features or self.computes_levels

    @property
    def computes_levels(self) -> bool:
        """Whether predictions carry level scores: the predictor has level statistics (or the rule needs them)."""
        return self.level_statistics is not None or self.behaviour.needs_levels

    def _encode_metadata(self, metadata: MetadataRows, count: int) -> torch.Tensor | None:
        """The metadata tensor for a fusion model (all unknown without ``metadata``); None for an image-only one."""
        if not self.takes_metadata:
            self.refuse_metadata_unless_fused(metadata is not None and any(row is not None for row in metadata))
            return None
        rows = list(metadata) if metadata is not None else [None] * count
        if len(rows) != count:
            raise ConfigError(f"{len(rows)} metadata rows for {count} images")
        return encode_patient_metadata(rows)

    def refuse_metadata_unless_fused(self, given: bool) -> None:
        """Raise when metadata is ``given`` to a model that does not take it (it would silently be dropped)."""
        if given and not self.takes_metadata:
            raise ConfigError(
                f"model {self.model_id} does not take metadata (trained without model.metadata_fusion); "
                "predict without age, sex and localization"
            )

    def tta_logits(self, batch: torch.Tensor, metadata: MetadataRows = None) -> torch.Tensor:
        """Raw logits ``(V, N, C)`` of a preprocessed batch, one slice per TTA view."""
        encoded = self._encode_metadata(metadata, batch.shape[0])

        def forward(view: torch.Tensor) -> torch.Tensor:
            with self._lock:
                return self._logits(view, encoded)

        return view_logits(forward, batch, self.tta_views)

    def tta_outputs(
        self, batch: torch.Tensor, metadata: MetadataRows = None, levels: bool = False
    ) -> tuple[torch.Tensor, np.ndarray, dict[str, np.ndarray] | None]:
        """Raw logits ``(V, N, C)``, the pooled features ``(N, F)`` and, with ``levels``, the level descriptors:
        both of the identity view, as their statistics were fitted (one more pass when the views lack it)."""
        encoded = self._encode_metadata(metadata, batch.shape[0])
        found: list[tuple[torch.Tensor, dict[str, np.ndarray] | None]] = []
        identity = self.tta_views.index("identity") if "identity" in self.tta_views else None
        calls = 0

        def forward(view: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            is_identity, calls = calls == identity, calls + 1
            with self._lock:
                logits, features, looks = self._outputs(view, encoded, levels=levels and is_identity)
            if is_identity:
                found.append((features, looks))
            return logits

        logits = view_logits(forward, batch, self.tta_views)
        if identity is None:
            with self._lock:
                found.append(self._outputs(batch, encoded, levels=levels)[1:])
        features, looks = found[0]
        return logits, features.numpy(), looks

    def predict_tensor(self, batch: torch.Tensor, metadata: MetadataRows = None) -> np.ndarray:
        """Probabilities ``(N, C)`` of a preprocessed batch: TTA views averaged, temperature applied."""
        return self.behaviour.probabilities(self.tta_logits(batch, metadata)).astype(np.float32)

    def predict_with_abstention(self, images: Sequence[Image.Image], metadata: MetadataRows = None) -> AbstainingPrediction:
        """Probabilities of PIL images plus the checkpoint's abstention verdict (see :class:`AbstainingPrediction`).

        ``metadata``: one :class:`PatientMetadata` (or ``None``) per image, for a metadata-fusion model.
        """
        probabilities, uncertain, reasons, scores, pooled, looks = [], [], [], [], [], []
        rows = list(metadata) if metadata is not None else None
        if rows is not None and len(rows) != len(images):
            raise ConfigError(f"{len(rows)} metadata rows for {len(images)} images")
        for start in range(0, len(images), self.batch_size):
            chunk = rows[start : start + self.batch_size] if rows is not None else None
            batch = self.preprocess(images[start : start + self.batch_size])
            features = levels = None
            if self.computes_features:
                logits, features, levels = self.tta_outputs(batch, chunk, levels=self.computes_levels)
                pooled.append(features)
                looks.append(levels)
            else:
                logits = self.tta_logits(batch, chunk)
            decisions = self.behaviour.decide(logits, features, levels)
            probabilities.append(decisions.probabilities.astype(np.float32))
            reasons.extend(decisions.reasons)
            uncertain.extend(decisions.uncertain.tolist())
            if decisions.scores:
                scores.append(decisions.scores)
        names = list(self.abstention.thresholds) if self.abstention is not None else []
        features = np.concatenate(pooled) if pooled else None
        level_score = None
        if self.level_statistics is not None and looks:
            level_score = self.level_statistics.score({level: np.concatenate([chunk[level] for chunk in looks]) for level in looks[0]})
        return AbstainingPrediction(
            probabilities=np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.classes)), np.float32),
            uncertain=np.asarray(uncertain, dtype=bool),
            reasons=reasons,
            scores={name: np.concatenate([chunk[name] for chunk in scores]) for name in names} if scores else {},
            features=features,
            feature_distance=self.statistics.distance(features) if features is not None and self.statistics is not None else None,
            level_score=level_score,
        )

    def predict_images(self, images: Sequence[Image.Image], metadata: MetadataRows = None) -> np.ndarray:
        """Class probabilities ``(N, C)`` (rows sum to 1) for PIL images, in batches of ``batch_size``."""
        return self.predict_with_abstention(images, metadata).probabilities

    def predict_paths(
        self,
        paths: Iterable[str | Path],
        batch_size: int | None = None,
        on_error: Callable[[Path, DataError], None] | None = None,
        metadata: Mapping[str, PatientMetadata] | None = None,
    ) -> Iterator[PathPrediction]:
        """Yield one :class:`PathPrediction` per readable file, in order; unreadable files are skipped.

        Each unreadable file is passed to ``on_error(path, error)`` (default: a logged warning), so one bad
        file never stops the batch. ``metadata`` maps image ids (file names without suffix) to what a fusion
        model is given; an image without an entry is predicted with age, sex and localization unknown.
        """
        self.refuse_metadata_unless_fused(bool(metadata))
        size = batch_size or self.batch_size
        pending: list[tuple[Path, Image.Image]] = []
        for raw in paths:
            path = Path(raw)
            try:
                pending.append((path, read_image(path)))
            except DataError as error:
                (on_error or _log_error)(path, error)
                continue
            if len(pending) >= size:
                yield from self._flush(pending, metadata)
                pending = []
        if pending:
            yield from self._flush(pending, metadata)

    def _flush(
        self, pending: list[tuple[Path, Image.Image]], metadata: Mapping[str, PatientMetadata] | None
    ) -> Iterator[PathPrediction]:
        rows = [metadata.get(path.stem) if metadata is not None else None for path, _ in pending]
        result = self.predict_with_abstention([image for _, image in pending], rows if metadata is not None else None)
        for index, ((path, _), given, row, uncertain, reasons) in enumerate(
            zip(pending, rows, result.probabilities, result.uncertain, result.reasons)
        ):
            features = result.features[index] if result.features is not None else None
            distance = float(result.feature_distance[index]) if result.feature_distance is not None else None
            look = float(result.level_score[index]) if result.level_score is not None else None
            yield PathPrediction(path, row, bool(uncertain), tuple(reasons), given, features, distance, look)

    # ------------------------------------------------------------------------------------------- explanation

    def class_index(self, target: str | int | None) -> int | None:
        """Index of a class given by name or index; ``None`` stays ``None``. Unknown classes raise."""
        if target is None:
            return None
        if isinstance(target, int) and not isinstance(target, bool):
            if 0 <= target < len(self.classes):
                return target
        elif isinstance(target, str) and target in self.classes:
            return self.classes.index(target)
        raise ConfigError(f"unknown class {target!r}; valid classes: {', '.join(self.classes)}")

    def explain(self, image: Image.Image, target: str | int | None = None, method: str = "gradcam") -> bytes:
        """PNG bytes of the CAM of ``target`` (default: the predicted class) blended over ``image``.

        The overlay keeps the image's aspect ratio, at most 512 px on its longer side.
        """
        from dermlab.explain.gradcam import CamExplainer, overlay_cam

        index = self.class_index(target)
        batch = self.preprocess([image])
        with self._lock:  # hooks are registered and released within one call, never shared
            with CamExplainer(self._model, method=method) as cam:
                maps = cam(batch.to(self._device), targets=None if index is None else [index])
        shown = image.convert("RGB")
        shown.thumbnail((_OVERLAY_MAX_SIDE, _OVERLAY_MAX_SIDE))
        overlay = overlay_cam(shown, maps[0])
        buffer = io.BytesIO()
        Image.fromarray(overlay).save(buffer, format="PNG")
        return buffer.getvalue()


def _log_error(path: Path, error: DataError) -> None:
    log.warning("skipped %s", error)


# ----------------------------------------------------------------------------------------------- ONNX engine


def resolve_onnx_path(path: str | Path) -> Path:
    """A ``.onnx`` file as it is; a run folder (or a checkpoint inside one) resolves to ``export/model.onnx``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir():
        run_dir = path
    elif path.is_file():
        run_dir = run_folder_of(path)
    else:
        raise CheckpointError(f"{path}: no such ONNX file or run folder")
    candidate = run_dir / "export" / "model.onnx"
    if not candidate.is_file():
        raise CheckpointError(
            f"{path}: no {candidate.relative_to(run_dir)} here; create it with `dermlab export {run_dir} --format onnx`"
        )
    return candidate


class OnnxPredictor(Predictor):
    """The same predictor on an ONNX export, run with onnxruntime on the CPU.

    Preprocessing, classes, model id, the run's TTA views, temperature and abstention rule come from the model's
    ``metadata_props["dermlab"]``; a metadata-fusion export has a second input, ``metadata``, fed here.
    Grad-CAM is not available (it needs the torch network's gradients).
    """

    engine = "onnx"

    def __init__(
        self,
        path: str | Path,
        *,
        tta: TtaSetting = None,
        calibrated: bool = True,
        abstain: bool = True,
        rule: str | None = None,
        batch_size: int = 32,
    ) -> None:
        import onnxruntime

        self.path = Path(path)
        try:
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            self._session = onnxruntime.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"{self.path}: not a loadable ONNX model ({reason})") from None
        metadata = self._read_metadata()
        outputs = [item.name for item in self._session.get_outputs()]
        entry = metadata.get("features_output")
        self._features_output = entry.get("name") if isinstance(entry, dict) else None
        entry = metadata.get("level_outputs")
        self._level_outputs = {str(level): str(name) for level, name in (entry.get("outputs") or {}).items()} if isinstance(entry, dict) else {}
        for name in [self._features_output, *self._level_outputs.values()]:
            if name is not None and name not in outputs:
                raise CheckpointError(f"{self.path}: the metadata names output {name!r}, the graph has {outputs}")
        inputs = [item.name for item in self._session.get_inputs()]
        self._input_name = inputs[0]
        entry = metadata.get("metadata_input")
        self._metadata_input = entry.get("name") if isinstance(entry, dict) else None
        if self._metadata_input is not None and self._metadata_input not in inputs:
            raise CheckpointError(f"{self.path}: the metadata names input {self._metadata_input!r}, the graph has {inputs}")
        try:
            preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
            classes = [str(name) for name in metadata["classes"]]
            model_id = str(metadata.get("model_id") or self.path.stem)
        except (KeyError, TypeError, ValueError, ConfigError) as error:
            raise CheckpointError(f"{self.path}: damaged dermlab metadata ({error})") from None
        behaviour = resolve_behaviour(
            metadata.get("tta_views") or [], metadata, str(self.path), tta=tta, calibrated=calibrated, abstain=abstain, rule=rule
        )
        self._setup(
            classes=classes,
            preprocessing=preprocessing,
            model_id=model_id,
            behaviour=behaviour,
            batch_size=batch_size,
            takes_metadata=self._metadata_input is not None,
            statistics=checkpoint_feature_statistics(metadata, str(self.path)),
            level_statistics=checkpoint_level_statistics(metadata, str(self.path)),
        )

    def _read_metadata(self) -> dict[str, Any]:
        props = self._session.get_modelmeta().custom_metadata_map
        if "dermlab" not in props:
            raise CheckpointError(f"{self.path}: no dermlab metadata; export it with `dermlab export RUN --format onnx`")
        try:
            metadata = json.loads(props["dermlab"])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{self.path}: damaged dermlab metadata ({error})") from None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{self.path}: damaged dermlab metadata (not a JSON object)")
        from dermlab.serving.onnx_export import (
            FEATURE_STATISTICS_KEY,
            LEVEL_STATISTICS_KEY,
            decode_feature_statistics,
            decode_level_statistics,
        )

        if FEATURE_STATISTICS_KEY in props:  # the training images' feature statistics, beside the JSON
            metadata["feature_statistics"] = decode_feature_statistics(props[FEATURE_STATISTICS_KEY], str(self.path))
        if LEVEL_STATISTICS_KEY in props:  # and their level statistics
            metadata["level_statistics"] = decode_level_statistics(props[LEVEL_STATISTICS_KEY], str(self.path))
        return metadata

    @property
    def can_explain(self) -> bool:
        return False

    def _feeds(self, batch: torch.Tensor, metadata: torch.Tensor | None) -> dict[str, np.ndarray]:
        feeds = {self._input_name: np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)}
        if self._metadata_input is not None and metadata is not None:
            feeds[self._metadata_input] = np.ascontiguousarray(metadata.detach().cpu().numpy(), dtype=np.float32)
        return feeds

    def _logits(self, batch: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
        logits = self._session.run(None, self._feeds(batch, metadata))[0]
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def _outputs(
        self, batch: torch.Tensor, metadata: torch.Tensor | None, levels: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray] | None]:
        if self._features_output is None:
            raise CheckpointError(f"{self.path}: this ONNX export has no features output (exported without feature statistics)")
        if levels and not self._level_outputs:
            raise CheckpointError(f"{self.path}: this ONNX export has no level outputs (exported without level statistics)")
        names = ["logits", self._features_output, *(self._level_outputs.values() if levels else ())]
        logits, features, *found = self._session.run(names, self._feeds(batch, metadata))
        looks = {level: np.asarray(value, dtype=np.float32) for level, value in zip(self._level_outputs, found)} if levels else None
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)), torch.from_numpy(np.asarray(features, dtype=np.float32)), looks

    def explain(self, image: Image.Image, target: str | int | None = None, method: str = "gradcam") -> bytes:
        raise ConfigError("Grad-CAM needs the torch engine; serve or explain the checkpoint, not the ONNX export")
