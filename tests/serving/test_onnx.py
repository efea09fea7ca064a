"""ONNX export: metadata, sidecar and parity with the torch engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from dermlab.errors import ConfigError  # noqa: E402
from dermlab.serving.predictor import OnnxPredictor, Predictor  # noqa: E402


def test_export_stores_preprocessing_metadata(onnx_path, predictor):
    import onnx

    model = onnx.load(str(onnx_path))
    metadata = json.loads({p.key: p.value for p in model.metadata_props}["dermlab"])
    assert metadata["classes"] == predictor.classes
    assert metadata["preprocessing"] == predictor.preprocessing.to_dict()
    assert metadata["model_id"] == predictor.model_id
    assert metadata["temperature"] is None
    sidecar = json.loads(onnx_path.with_name("model.onnx.json").read_text())
    assert sidecar == metadata
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param  # dynamic batch axis


def test_onnx_engine_matches_torch(onnx_path, run_dir, predictor, images):
    batch = [images.sample((40 + i, 36), seed=i) for i in range(5)]  # 5: not the exported dummy batch size
    onnx_predictor = Predictor.from_path(run_dir, engine="onnx")  # run folder -> export/model.onnx
    assert isinstance(onnx_predictor, OnnxPredictor)
    assert onnx_predictor.classes == predictor.classes
    assert onnx_predictor.preprocessing == predictor.preprocessing
    assert onnx_predictor.model_id == predictor.model_id
    difference = np.abs(onnx_predictor.predict_images(batch) - predictor.predict_images(batch)).max()
    assert difference < 1e-4


def test_onnx_engine_cannot_explain(onnx_path, images):
    onnx_predictor = Predictor.from_path(onnx_path, engine="onnx")
    assert not onnx_predictor.can_explain
    with pytest.raises(ConfigError, match="torch engine"):
        onnx_predictor.explain(images.sample())


def test_onnx_predictor_in_the_app(onnx_path, images):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermlab.serving.app import create_app

    client = TestClient(create_app(Predictor.from_path(onnx_path, engine="onnx")))
    data = images.encode(images.sample())
    response = client.post("/predict", files={"file": ("x.png", data, "image/png")})
    assert response.status_code == 200
    assert sum(response.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert client.post("/explain", files={"file": ("x.png", data, "image/png")}).status_code == 501
    assert client.get("/health").json()["engine"] == "onnx"
