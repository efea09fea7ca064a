"""Metadata wherever a fusion model takes it: `predict --metadata`, the service's form fields, the ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermlab.cli import main
from dermlab.data.metadata import PatientMetadata
from dermlab.serving.predictor import Predictor

PROBS = ["prob_nv", "prob_mel", "prob_bkl"]


@pytest.fixture(scope="module")
def fusion_predictor(fusion_run_dir: Path) -> Predictor:
    return Predictor.from_path(fusion_run_dir)


@pytest.fixture
def photos(tmp_path: Path, images) -> list[Path]:
    paths = [tmp_path / "photos" / f"{name}.png" for name in ("a", "b", "c")]
    paths[0].parent.mkdir()
    for seed, path in enumerate(paths):
        images.sample(seed=seed).save(path)
    return paths


def _metadata_csv(tmp_path: Path) -> Path:
    """a: everything known, b: the sex missing, c: no row at all."""
    path = tmp_path / "meta.csv"
    path.write_text("image_id,age,sex,site\na,70,male,scalp\nb,15,unknown,foot\n", encoding="utf-8")
    return path


def test_predict_with_and_without_metadata_differs_and_says_which(fusion_run_dir, photos, tmp_path, capsys) -> None:
    plain, informed = tmp_path / "plain.csv", tmp_path / "informed.csv"
    assert main(["predict", str(fusion_run_dir), *map(str, photos), "--out", str(plain)]) == 0
    err = capsys.readouterr().err
    assert "without --metadata" in err and "all three unknown" in err
    assert "trained without model.metadata_dropout" in err  # this run's config leaves it at 0
    meta = _metadata_csv(tmp_path)
    assert main(["predict", str(fusion_run_dir), *map(str, photos), "--out", str(informed), "--metadata", str(meta)]) == 0
    out = capsys.readouterr().out
    assert "metadata used for 1, partial for 1, missing for 1" in out
    without, with_ = pd.read_csv(plain).set_index("image_id"), pd.read_csv(informed).set_index("image_id")
    assert list(without["metadata"]) == ["missing"] * 3
    assert list(with_["metadata"]) == ["used", "partial", "missing"]
    assert with_["metadata_missing"].fillna("").tolist() == ["", "sex", "age;sex;localization"]
    difference = (with_[PROBS] - without[PROBS]).abs().max(axis=1)
    assert difference["a"] > 1e-3 and difference["b"] > 1e-3  # the metadata reached the head
    assert difference["c"] < 1e-6  # no row: predicted exactly as without metadata


def test_predict_refuses_metadata_for_an_image_only_model(run_dir, photos, tmp_path, capsys) -> None:
    code = main(["predict", str(run_dir), str(photos[0]), "--out", str(tmp_path / "p.csv"), "--metadata", str(_metadata_csv(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "does not take metadata" in err and "\n" not in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_names_the_bad_row_and_column(fusion_run_dir, photos, tmp_path, capsys) -> None:
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age,sex\na,70,male\nb,15,m\n", encoding="utf-8")
    assert main(["predict", str(fusion_run_dir), str(photos[0]), "--out", str(tmp_path / "p.csv"), "--metadata", str(meta)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{meta} row 3 column sex: 'm'" in err and "\n" not in err


def test_service_takes_the_metadata_fields(fusion_predictor, images) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermlab.serving.app import create_app

    client = TestClient(create_app(fusion_predictor))
    image = images.sample(seed=4)
    files = {"file": ("x.png", images.encode(image), "image/png")}
    health = client.get("/health").json()
    assert health["metadata_fusion"] is True and "upper extremity" in health["metadata_fields"]["localization"]
    assert 'id="metadata"' in client.get("/").text and 'name="localization"' in client.get("/").text

    informed = client.post("/predict", files=files, data={"age": "70", "sex": "male", "localization": "scalp"}).json()
    expected = fusion_predictor.predict_images([image], [PatientMetadata(70.0, "male", "scalp")])[0]
    assert np.allclose(list(informed["probabilities"].values()), expected, atol=1e-6)
    assert informed["metadata"]["status"] == "used" and informed["metadata"]["note"] is None

    plain = client.post("/predict", files=files).json()
    assert plain["metadata"]["status"] == "missing" and plain["metadata"]["missing"] == ["age", "sex", "localization"]
    assert "predicted without age, sex, localization" in plain["metadata"]["note"]
    assert not np.allclose(list(plain["probabilities"].values()), expected, atol=1e-4)

    bad = client.post("/predict", files=files, data={"localization": "elbow"})
    assert bad.status_code == 422 and "form field localization: 'elbow'" in bad.json()["detail"]


def test_image_only_service_refuses_metadata_fields(predictor, images) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermlab.serving.app import create_app

    client = TestClient(create_app(predictor))
    files = {"file": ("x.png", images.encode(images.sample()), "image/png")}
    assert client.get("/health").json()["metadata_fusion"] is False
    assert client.post("/predict", files=files).json()["metadata"] is None
    refused = client.post("/predict", files=files, data={"age": "40"})
    assert refused.status_code == 422 and "does not take metadata" in refused.json()["detail"]
    assert client.post("/predict", files=files, data={"age": ""}).status_code == 200  # empty fields are no metadata


@pytest.mark.slow  # a real export and parity check (about a second)
def test_onnx_export_carries_and_is_fed_the_metadata(fusion_run_dir, fusion_predictor, images, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    import json

    from dermlab.serving.onnx_export import export_onnx
    from dermlab.serving.predictor import OnnxPredictor

    path = export_onnx(fusion_predictor.loaded, tmp_path / "model.onnx")
    sidecar = json.loads(path.with_name("model.onnx.json").read_text())
    assert sidecar["metadata_input"]["name"] == "metadata" and len(sidecar["metadata_input"]["layout"]) == sidecar["metadata_input"]["width"]
    onnx_predictor = Predictor.from_path(path, engine="onnx")
    assert isinstance(onnx_predictor, OnnxPredictor) and onnx_predictor.takes_metadata
    batch = [images.sample(seed=i) for i in range(3)]
    rows = [PatientMetadata(70.0, "male", "scalp"), PatientMetadata(age=15.0), None]
    torch_probabilities = fusion_predictor.predict_images(batch, rows)
    assert np.abs(onnx_predictor.predict_images(batch, rows) - torch_probabilities).max() < 1e-4
    assert np.abs(onnx_predictor.predict_images(batch) - fusion_predictor.predict_images(batch)).max() < 1e-4
    assert not np.allclose(onnx_predictor.predict_images(batch)[0], torch_probabilities[0], atol=1e-3)
