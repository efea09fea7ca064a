"""Serving: a :class:`Predictor` rebuilt from a checkpoint (or its ONNX export), the web app and ONNX export.

FastAPI, onnx and onnxruntime are imported only by the functions that need them.
"""

from dermlab.serving.app import DEFAULT_MAX_UPLOAD_BYTES, DISCLAIMER, create_app
from dermlab.serving.onnx_export import DEFAULT_OPSET, export_onnx, onnx_metadata
from dermlab.serving.predictor import (
    DEFAULT_TTA_VIEWS,
    ENGINES,
    TTA_VIEWS,
    OnnxPredictor,
    PathPrediction,
    Predictor,
    resolve_onnx_path,
)

__all__ = [
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_OPSET",
    "DEFAULT_TTA_VIEWS",
    "DISCLAIMER",
    "ENGINES",
    "TTA_VIEWS",
    "OnnxPredictor",
    "PathPrediction",
    "Predictor",
    "create_app",
    "export_onnx",
    "onnx_metadata",
    "resolve_onnx_path",
]
