"""Export a checkpoint to ONNX, with its preprocessing stored in the model's metadata and a JSON sidecar.

The graph maps a normalised batch ``(N, 3, H, W)`` (dynamic ``N``) to logits ``(N, C)``; a metadata-fusion
model takes a second input ``metadata`` ``(N, METADATA_WIDTH)``, the encoded age, sex and localization (its
layout is in the metadata, ``metadata_input``). Resizing, normalisation and the metadata encoding stay outside
the graph, done by :class:`dermlab.serving.predictor.OnnxPredictor` exactly as for torch. The run's TTA views,
temperature and abstention rule are stored in the metadata, not folded into the graph, so the ONNX engine
behaves as the checkpoint does.
"""

from __future__ import annotations

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
from dermlab.io import atomic_save, atomic_write_json
from dermlab.models.checkpoint import LoadedModel
from dermlab.models.classifier import uses_metadata

__all__ = ["DEFAULT_OPSET", "export_onnx", "onnx_metadata"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
_PARITY_TOLERANCE = 1e-3  # max |logit difference| accepted between torch and onnxruntime after export


def onnx_metadata(loaded: LoadedModel) -> dict[str, Any]:
    """What an ONNX consumer needs to feed the graph and read its output: classes, preprocessing, model id,
    the metadata input (fusion models), the run's TTA views, temperature and abstention rule."""
    preprocessing = loaded.preprocessing.to_dict()
    fused = uses_metadata(loaded.model)
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
    model = loaded.model.eval().cpu()
    height, width = loaded.preprocessing.input_size
    dummy: tuple[torch.Tensor, ...] = (torch.randn(2, 3, height, width),)
    if uses_metadata(model):  # one image with its metadata known, one with all of it unknown
        dummy = (dummy[0], encode_patient_metadata([PatientMetadata(45.0, "male", "back"), None]))
    metadata = onnx_metadata(loaded)

    def write(tmp: Path) -> None:
        _torch_export(model, dummy, tmp, opset)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = "dermlab", json.dumps(metadata)
        proto.doc_string = f"dermlab {metadata['model_id']}: research tool, not a medical device"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        if check:
            _check_parity(model, tmp, dummy)

    atomic_save(out, write)
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


def _torch_export(model: torch.nn.Module, dummy: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    names = ["input", "metadata"][: len(dummy)]
    options: dict[str, Any] = {
        "input_names": names,
        "output_names": ["logits"],
        "opset_version": opset,
        "dynamic_axes": {**{name: {0: "batch"} for name in names}, "logits": {0: "batch"}},
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
            output_names=["logits"],
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
    (onnx_logits,) = session.run(None, {name: tensor.numpy() for name, tensor in zip(inputs, dummy)})
    with torch.inference_mode():
        torch_logits = model(*dummy).float().numpy()
    difference = float(np.max(np.abs(onnx_logits - torch_logits)))
    if not difference <= _PARITY_TOLERANCE:
        raise CheckpointError(
            f"ONNX export differs from the torch model (max |logit difference| {difference:.2e} > {_PARITY_TOLERANCE})"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
