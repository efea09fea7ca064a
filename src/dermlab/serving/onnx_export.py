"""Export a checkpoint to ONNX, with its preprocessing stored in the model's metadata and a JSON sidecar.

The graph maps a normalised batch ``(N, 3, H, W)`` (dynamic ``N``) to logits ``(N, C)``; a metadata-fusion
model takes a second input ``metadata`` ``(N, METADATA_WIDTH)``, the encoded age, sex and localization (its
layout is in the metadata, ``metadata_input``). Resizing, normalisation and the metadata encoding stay outside
the graph, done by :class:`dermlab.serving.predictor.OnnxPredictor` exactly as for torch. The run's TTA views,
temperature and abstention rule are stored in the metadata, not folded into the graph, so the ONNX engine
behaves as the checkpoint does. A checkpoint with feature statistics (:mod:`dermlab.evaluation.familiarity`)
exports a second output, ``features`` (the pooled backbone features ``(N, F)``), and the statistics as a
second metadata entry, ``dermlab_feature_statistics`` (a base64 ``.npz``): the ONNX engine then gives the same
familiarity warning and the same ``mahalanobis`` abstention score as torch. With level statistics
(:mod:`dermlab.evaluation.level_statistics`) it also outputs each feature level's descriptor (``level_0``,
``level_1``, ...: channel means and deviations ``(N, 2C)``, computed in the graph) and stores the statistics as
``dermlab_level_statistics``: the same ``level_score`` per image, warning and ``level`` abstention score.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermlab.data.metadata import (
    METADATA_COLUMNS,
    METADATA_WIDTH,
    PatientMetadata,
    encode_patient_metadata,
    metadata_layout,
)
from dermlab.errors import CheckpointError
from dermlab.evaluation.level_statistics import channel_moments
from dermlab.io import atomic_save, atomic_write_json
from dermlab.models.checkpoint import LoadedModel
from dermlab.models.classifier import uses_metadata

__all__ = ["DEFAULT_OPSET", "FEATURE_STATISTICS_KEY", "LEVEL_STATISTICS_KEY", "decode_feature_statistics",
           "decode_level_statistics", "encode_feature_statistics", "encode_level_statistics", "export_onnx", "onnx_metadata"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
FEATURE_STATISTICS_KEY = "dermlab_feature_statistics"
LEVEL_STATISTICS_KEY = "dermlab_level_statistics"
_PARITY_TOLERANCE = 1e-3  # max |logit (and feature) difference| accepted between torch and onnxruntime after export


def onnx_metadata(loaded: LoadedModel) -> dict[str, Any]:
    """What an ONNX consumer needs to feed the graph and read its output: classes, preprocessing, model id,
    the metadata input (fusion models), the run's TTA views, temperature and abstention rule."""
    preprocessing = loaded.preprocessing.to_dict()
    fused = uses_metadata(loaded.model)
    levels = _level_output_names(loaded)
    return {
        "format_version": 1,
        "model_id": loaded.model_id,
        "architecture": loaded.config.model.name,
        "classes": list(loaded.classes),
        "preprocessing": preprocessing,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "normalised": True},
        "metadata_input": _metadata_input() if fused else None,
        "output": {"name": "logits", "apply": "mean over tta_views of softmax(logits / temperature)"},
        "tta_views": list(loaded.extras.get("tta_views") or loaded.config.evaluation.tta),
        "decision": loaded.extras.get("decision"),
        "temperature": loaded.extras.get("temperature"),
        "abstention": loaded.extras.get("abstention"),
        "features_output": (
            {"name": "features", "statistics": f"metadata_props[{FEATURE_STATISTICS_KEY!r}], base64 npz"}
            if _has_feature_statistics(loaded) else None
        ),
        "level_outputs": (
            {"outputs": levels, "statistics": f"metadata_props[{LEVEL_STATISTICS_KEY!r}], base64 npz", "view": "identity"}
            if levels else None
        ),
        "source_checkpoint": str(loaded.path),
        "disclaimer": "research tool, not a medical device",
    }


def export_onnx(
    loaded: LoadedModel,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Write ``out`` (ONNX) and ``out + ".json"`` (the same metadata), atomically; returns ``out``.

    Uses the legacy TorchScript exporter (fast and dependable on CPU), falling back to the dynamo exporter.
    ``check`` runs the export in onnxruntime on a random batch and compares its logits with torch's.
    """
    import onnx

    out = Path(out)
    model: torch.nn.Module = loaded.model.eval().cpu()
    fused = uses_metadata(model)  # asked of the classifier itself: the wrapper below takes metadata through it
    with_features = _has_feature_statistics(loaded)
    levels = _level_output_names(loaded)
    if with_features:  # a new module starts in training mode, which export restores
        model = _LogitsAndFeatures(model, list(levels)).eval()
    height, width = loaded.preprocessing.input_size
    dummy: tuple[torch.Tensor, ...] = (torch.randn(2, 3, height, width),)
    if fused:  # one image with its metadata known, one with all of it unknown
        dummy = (dummy[0], encode_patient_metadata([PatientMetadata(45.0, "male", "back"), None]))
    metadata = onnx_metadata(loaded)

    def write(tmp: Path) -> None:
        _torch_export(model, dummy, tmp, opset, ["logits", "features", *levels.values()] if with_features else ["logits"])
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = "dermlab", json.dumps(metadata)
        if with_features:
            entry = proto.metadata_props.add()
            entry.key, entry.value = FEATURE_STATISTICS_KEY, encode_feature_statistics(loaded.extras["feature_statistics"])
        if levels:
            entry = proto.metadata_props.add()
            entry.key, entry.value = LEVEL_STATISTICS_KEY, encode_level_statistics(loaded.extras["level_statistics"])
        proto.doc_string = f"dermlab {metadata['model_id']}: research tool, not a medical device"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        if check:
            _check_parity(model, tmp, dummy)

    try:
        atomic_save(out, write)
    finally:
        if isinstance(model, _LogitsAndFeatures):
            model.remove_hooks()
    atomic_write_json(out.with_name(out.name + ".json"), metadata)
    return out


def _metadata_input() -> dict[str, Any]:
    return {
        "name": "metadata",
        "dtype": "float32",
        "width": METADATA_WIDTH,
        "fields": list(METADATA_COLUMNS),
        "layout": metadata_layout(),
        "encoding": "dermlab.data.metadata.encode_metadata; all missing flags set = unknown",
    }


class _LogitsAndFeatures(torch.nn.Module):
    """The classifier with its pooled features as a second output (for the familiarity statistics) and, for
    each of ``levels`` (module names inside ``model.backbone``), that level's channel moments."""

    def __init__(self, model: torch.nn.Module, levels: list[str] | None = None) -> None:
        super().__init__()
        self.model = model
        self.levels = list(levels or [])
        self._found: dict[str, torch.Tensor] = {}
        self._hooks = [model.backbone.get_submodule(level).register_forward_hook(self._recorder(level)) for level in self.levels]

    def remove_hooks(self) -> None:
        """Detach the level recorders from the wrapped model (after the export)."""
        for handle in self._hooks:
            handle.remove()

    def _recorder(self, level: str) -> Any:
        def record(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            self._found[level] = channel_moments(output)

        return record

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        self._found = {}
        pooled = self.model.forward_features(x)
        logits = self.model.forward_head(pooled) if metadata is None else self.model.forward_head(pooled, metadata)
        return (logits, pooled, *(self._found[level] for level in self.levels))


def _has_feature_statistics(loaded: LoadedModel) -> bool:
    return loaded.extras.get("feature_statistics") is not None


def _level_output_names(loaded: LoadedModel) -> dict[str, str]:
    """The graph output of each feature level (``{module name: "level_0", ...}``), when the checkpoint has level
    statistics (which are only fitted with the feature statistics)."""
    stored = loaded.extras.get("level_statistics")
    if not stored or not _has_feature_statistics(loaded):
        return {}
    return {str(level): f"level_{index}" for index, level in enumerate(stored["levels"])}


def encode_feature_statistics(statistics: dict[str, Any]) -> str:
    """A checkpoint's ``feature_statistics`` entry as base64 text of an ``.npz`` (no pickles)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{key: np.asarray(value.numpy() if hasattr(value, "numpy") else value) for key, value in statistics.items()})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_feature_statistics(text: str, source: str) -> dict[str, Any]:
    """The inverse of :func:`encode_feature_statistics`; damaged text raises a CheckpointError naming ``source``."""
    try:
        with np.load(io.BytesIO(base64.b64decode(text.encode("ascii"), validate=True)), allow_pickle=False) as arrays:
            return {key: _decoded(arrays[key]) for key in arrays.files}
    except (ValueError, OSError, binascii.Error) as error:
        raise CheckpointError(f"{source}: damaged feature statistics in the ONNX metadata ({error})") from None


def encode_level_statistics(statistics: dict[str, Any]) -> str:
    """A checkpoint's ``level_statistics`` entry (levels, per-level feature statistics, scales) as base64 text
    of one flat ``.npz``: each level's statistics under ``statistics/<index>/<key>``."""
    flat: dict[str, Any] = {key: np.asarray(statistics[key]) for key in ("levels", "log_mean", "log_std", "unusual_score")}
    for index, entry in enumerate(statistics["statistics"]):
        flat.update({f"statistics/{index}/{key}": value for key, value in entry.items()})
    return encode_feature_statistics(flat)


def decode_level_statistics(text: str, source: str) -> dict[str, Any]:
    """The inverse of :func:`encode_level_statistics`; damaged text raises a CheckpointError naming ``source``."""
    flat = decode_feature_statistics(text, source)
    try:
        levels = [str(level) for level in np.atleast_1d(np.asarray(flat["levels"]))]
        entries: list[dict[str, Any]] = [{} for _ in levels]
        for key, value in flat.items():
            if key.startswith("statistics/"):
                _, index, name = key.split("/", 2)
                entries[int(index)][name] = value
        scales = {key: [float(v) for v in np.atleast_1d(np.asarray(flat[key]))] for key in ("log_mean", "log_std")}
        return {"levels": levels, "statistics": entries, **scales, "unusual_score": float(flat["unusual_score"])}
    except (KeyError, ValueError, IndexError) as error:
        raise CheckpointError(f"{source}: damaged level statistics in the ONNX metadata ({error!r})") from None


def _decoded(array: np.ndarray) -> Any:
    """An array read back: text as a list of strings, a scalar as a number, else a tensor."""
    if array.dtype.kind in "US":
        return [str(item) for item in np.atleast_1d(array)]
    return torch.from_numpy(array.copy()) if array.ndim else array.item()


def _torch_export(
    model: torch.nn.Module, dummy: tuple[torch.Tensor, ...], path: Path, opset: int, outputs: list[str] | None = None
) -> None:
    names = ["input", "metadata"][: len(dummy)]
    outputs = outputs or ["logits"]
    options: dict[str, Any] = {
        "input_names": names,
        "output_names": outputs,
        "opset_version": opset,
        # height and width stay free too: the run's TTA views may turn a 4:3 input by 90 degrees, as torch allows
        "dynamic_axes": {"input": {0: "batch", 2: "height", 3: "width"}, **{name: {0: "batch"} for name in [*names[1:], *outputs]}},
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(model, dummy, str(path), dynamo=False, **options)
        return
    except Exception as error:  # noqa: BLE001 - fall back to the other exporter, then report both
        legacy_error = error
        log.info("legacy ONNX exporter failed (%s); trying the dynamo exporter", error)
    try:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            model,
            dummy,
            str(path),
            dynamo=True,
            input_names=names,
            output_names=outputs,
            opset_version=opset,
            dynamic_shapes={"x": {0: batch}, "metadata": {0: batch}} if len(dummy) > 1 else {"x": {0: batch}},
            external_data=False,
        )
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            "ONNX export failed with both exporters "
            f"(legacy: {_first_line(legacy_error)}; dynamo: {_first_line(error)})"
        ) from None


def _check_parity(model: torch.nn.Module, path: Path, dummy: tuple[torch.Tensor, ...]) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [item.name for item in session.get_inputs()]
    if len(inputs) != len(dummy):
        raise CheckpointError(f"ONNX export has inputs {inputs}, expected {len(dummy)} (images and metadata)")
    onnx_outputs = session.run(None, {name: tensor.numpy() for name, tensor in zip(inputs, dummy)})
    with torch.inference_mode():
        torch_outputs = model(*dummy)
    torch_outputs = torch_outputs if isinstance(torch_outputs, tuple) else (torch_outputs,)
    if len(onnx_outputs) != len(torch_outputs):
        raise CheckpointError(f"ONNX export has {len(onnx_outputs)} outputs, expected {len(torch_outputs)}")
    difference = max(float(np.max(np.abs(o - t.float().numpy()))) for o, t in zip(onnx_outputs, torch_outputs))
    if not difference <= _PARITY_TOLERANCE:
        raise CheckpointError(
            f"ONNX export differs from the torch model (max |output difference| {difference:.2e} > {_PARITY_TOLERANCE})"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
