"""Export a checkpoint to ONNX, with its preprocessing stored in the model's metadata and a JSON sidecar.

The graph maps a normalised batch ``(N, 3, H, W)`` (dynamic ``N``) to logits ``(N, C)``; resizing and
normalisation stay outside it, done by :class:`dermlab.serving.predictor.OnnxPredictor` exactly as for torch.
The temperature (if the checkpoint has one) is stored in the metadata, not folded into the graph.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermlab.errors import CheckpointError
from dermlab.io import atomic_save, atomic_write_json
from dermlab.models.checkpoint import LoadedModel

__all__ = ["DEFAULT_OPSET", "export_onnx", "onnx_metadata"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
_PARITY_TOLERANCE = 1e-3  # max |logit difference| accepted between torch and onnxruntime after export


def onnx_metadata(loaded: LoadedModel) -> dict[str, Any]:
    """What an ONNX consumer needs to feed the graph: classes, preprocessing, model id, temperature."""
    preprocessing = loaded.preprocessing.to_dict()
    return {
        "format_version": 1,
        "model_id": loaded.model_id,
        "architecture": loaded.config.model.name,
        "classes": list(loaded.classes),
        "preprocessing": preprocessing,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "normalised": True},
        "output": {"name": "logits", "apply": "softmax(logits / temperature)"},
        "temperature": loaded.extras.get("temperature"),
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
    dummy = torch.randn(2, 3, height, width)
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


def _torch_export(model: torch.nn.Module, dummy: torch.Tensor, path: Path, opset: int) -> None:
    options: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["logits"],
        "opset_version": opset,
        "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}},
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, **options)
        return
    except Exception as error:  # noqa: BLE001 - fall back to the other exporter, then report both
        legacy_error = error
        log.info("legacy ONNX exporter failed (%s); trying the dynamo exporter", error)
    try:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            opset_version=opset,
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
        )
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            "ONNX export failed with both exporters "
            f"(legacy: {_first_line(legacy_error)}; dynamo: {_first_line(error)})"
        ) from None


def _check_parity(model: torch.nn.Module, path: Path, dummy: torch.Tensor) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: dummy.numpy()})
    with torch.inference_mode():
        torch_logits = model(dummy).float().numpy()
    difference = float(np.max(np.abs(onnx_logits - torch_logits)))
    if not difference <= _PARITY_TOLERANCE:
        raise CheckpointError(
            f"ONNX export differs from the torch model (max |logit difference| {difference:.2e} > {_PARITY_TOLERANCE})"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
