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


# ------------------------------------------------------------------------------------------- parity on files
# Real image files (JPEGs of several sizes and aspect ratios in the HAM10000 layout, with its metadata CSV)
# through the real preprocessing (decoding, letterbox resize, colour constancy, normalisation) on both engines,
# for a model whose outputs are far from uniform, so a preprocessing or graph mismatch shows in the probabilities.
PHOTO_SIZES = [(40, 36), (64, 48), (32, 32), (50, 80), (97, 61), (36, 40)]  # (width, height)
PHOTO_METADATA = [("70", "male", "scalp"), ("15", "female", "back"), ("", "unknown", "face"), ("45", "", ""),
                  ("60", "male", "")]  # the last photo has no row: all unknown
PARITY_MODEL = dict(name="test_efficientnet", input_size=[32, 32], weights="none", resize_mode="letterbox",
                    color_constancy="shades_of_gray")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, images) -> tuple[list, dict]:
    """The photo paths and the ``image_id -> PatientMetadata`` read from their HAM10000 metadata CSV."""
    from dermlab.data.metadata import read_metadata_csv

    root = tmp_path_factory.mktemp("HAM10000")
    (root / "HAM10000_images_part_1").mkdir()
    paths, lines = [], ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for index, size in enumerate(PHOTO_SIZES):
        image_id = f"ISIC_{24306 + index:07d}"
        path = root / "HAM10000_images_part_1" / f"{image_id}.jpg"
        images.sample(size, seed=index).save(path, format="JPEG", quality=90)
        paths.append(path)
        if index < len(PHOTO_METADATA):
            lines.append(f"HAM_{index:07d},{image_id},nv,histo,{','.join(PHOTO_METADATA[index])}")
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths, read_metadata_csv(root / "HAM10000_metadata.csv")


def _both_engines(run, tmp_path):
    from dermlab.serving.onnx_export import export_onnx

    torch_predictor = Predictor.from_path(run)
    onnx_predictor = Predictor.from_path(export_onnx(torch_predictor.loaded, tmp_path / "model.onnx"), engine="onnx")
    assert onnx_predictor.preprocessing == torch_predictor.preprocessing
    assert onnx_predictor.preprocessing.resize_mode == "letterbox"
    return torch_predictor, onnx_predictor


def _probabilities(predictor, paths, **options) -> np.ndarray:
    results = list(predictor.predict_paths(paths, batch_size=4, **options))  # 4: two batches, one partial
    assert [result.path for result in results] == paths
    return np.stack([result.probabilities for result in results])


def test_onnx_matches_torch_on_image_files_through_the_real_preprocessing(photos, tmp_path) -> None:
    import torch

    from dermlab.config import Config, ModelConfig
    from dermlab.models.checkpoint import save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing

    torch.manual_seed(0)
    config = Config(model=ModelConfig(**PARITY_MODEL))
    model = create_model(config.model, 3, load_weights=False)
    with torch.no_grad():  # the untrained pooled features are ~1e-3: a wide head makes the outputs confident
        model.head.weight.normal_(0.0, 100.0)
    preprocessing = resolve_preprocessing(model, config.model)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", model, config, ["nv", "mel", "bkl"], preprocessing,
                    temperature=1.5)
    torch_predictor, onnx_predictor = _both_engines(tmp_path / "run", tmp_path)
    assert onnx_predictor.temperature == torch_predictor.temperature == 1.5
    paths, _ = photos
    expected = _probabilities(torch_predictor, paths)
    assert expected.max(axis=1).max() > 0.8 and np.ptp(expected, axis=0).max() > 0.3  # far from uniform, varied
    np.testing.assert_allclose(_probabilities(onnx_predictor, paths), expected, atol=1e-4, rtol=0)


def test_onnx_matches_torch_for_a_fusion_model_fed_the_metadata_csv(photos, make_fusion_run, tmp_path) -> None:
    from dermlab.config import Config, ModelConfig

    config = Config(model=ModelConfig(**PARITY_MODEL, metadata_fusion=True))
    run = make_fusion_run(tmp_path / "run", config, temperature=1.5)
    torch_predictor, onnx_predictor = _both_engines(run, tmp_path)
    assert onnx_predictor.takes_metadata
    paths, metadata = photos
    expected = _probabilities(torch_predictor, paths, metadata=metadata)
    without = _probabilities(torch_predictor, paths)
    assert np.abs(expected - without)[: len(PHOTO_METADATA)].max(axis=1).min() > 1e-3  # every row's metadata counts
    np.testing.assert_allclose(_probabilities(onnx_predictor, paths, metadata=metadata), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_probabilities(onnx_predictor, paths), without, atol=1e-4, rtol=0)


def test_feature_statistics_and_a_mahalanobis_rule_travel_into_the_onnx_export(run_dir, predictor, images, tmp_path):
    """The export gains a features output and the statistics: same distances, same verdicts as torch."""
    import torch

    from dermlab.evaluation.abstention import fit_abstention
    from dermlab.evaluation.familiarity import fit_feature_statistics
    from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
    from dermlab.serving.onnx_export import export_onnx

    photos = [images.sample((40 + i % 7, 36), seed=i) for i in range(30)]
    features = predictor.predict_with_abstention(photos).features
    assert features is None  # no statistics in this checkpoint: no features computed
    with torch.inference_mode():
        pooled = predictor.loaded.model.forward_features(predictor.preprocess(photos)).numpy()
    statistics = fit_feature_statistics(pooled[:20], pooled[20:], components=8)
    logits = predictor.tta_logits(predictor.preprocess(photos[20:])).numpy()
    rule = fit_abstention(logits, 0.2, ["energy", "mahalanobis"], features=pooled[20:], statistics=statistics)
    loaded = predictor.loaded
    root = tmp_path / "run"
    save_checkpoint(root / "checkpoints" / "best.ckpt", loaded.model, loaded.config, loaded.classes, loaded.preprocessing,
                    feature_statistics=statistics.to_dict(), abstention=rule.to_dict())
    torch_predictor = Predictor(load_checkpoint(root))
    onnx_predictor = Predictor.from_path(export_onnx(torch_predictor.loaded, root / "export" / "model.onnx"), engine="onnx")
    assert onnx_predictor.statistics is not None and onnx_predictor.behaviour.needs_features
    odd = [images.sample((60, 50), seed=100 + i).point(lambda v: 255 - v) for i in range(4)]
    batch = photos[:20] + odd  # not the val images: their scores sit exactly on the thresholds ("lower" quantiles)
    a, b = torch_predictor.predict_with_abstention(batch), onnx_predictor.predict_with_abstention(batch)
    assert a.uncertain.any() and not a.uncertain.all()  # a comparison of both verdicts, not of all-accepted
    np.testing.assert_allclose(a.feature_distance, b.feature_distance, rtol=1e-3, atol=1e-4)
    assert a.uncertain.tolist() == b.uncertain.tolist() and a.reasons == b.reasons
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4


def test_level_statistics_and_a_level_rule_travel_into_the_onnx_export(predictor, images, tmp_path):
    """The export gains one output per feature level and the level statistics: the same level scores, verdicts
    and reasons as torch, and the scores are those of the statistics on the identity view's descriptors."""
    import torch

    from dermlab.evaluation.abstention import fit_abstention
    from dermlab.evaluation.familiarity import fit_feature_statistics
    from dermlab.evaluation.level_statistics import capture_levels, fit_level_statistics, stack_levels
    from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
    from dermlab.serving.onnx_export import export_onnx

    photos = [images.sample((40 + i % 7, 36), seed=i) for i in range(30)]
    model = predictor.loaded.model
    with torch.inference_mode(), capture_levels(model) as captured:
        pooled = model.forward_features(predictor.preprocess(photos)).numpy()
    descriptors = stack_levels(captured)
    train, val = ({level: d[part] for level, d in descriptors.items()} for part in (slice(0, 20), slice(20, None)))
    levels = fit_level_statistics(train, val, components=8)
    features = fit_feature_statistics(pooled[:20], pooled[20:], components=8)
    logits = predictor.tta_logits(predictor.preprocess(photos[20:])).numpy()
    rule = fit_abstention(logits, 0.2, ["energy", "level"], levels=val, level_statistics=levels)
    loaded = predictor.loaded
    root = tmp_path / "run"
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, loaded.config, loaded.classes, loaded.preprocessing,
                    feature_statistics=features.to_dict(), level_statistics=levels.to_dict(), abstention=rule.to_dict())
    torch_predictor = Predictor(load_checkpoint(root))
    onnx_path = export_onnx(torch_predictor.loaded, root / "export" / "model.onnx")
    assert json.loads((onnx_path.parent / "model.onnx.json").read_text())["level_outputs"]["outputs"] == {
        level: f"level_{index}" for index, level in enumerate(levels.levels)
    }
    onnx_predictor = Predictor.from_path(onnx_path, engine="onnx")
    assert onnx_predictor.level_statistics is not None and onnx_predictor.behaviour.needs_levels
    odd = [images.sample((60, 50), seed=100 + i).point(lambda v: 255 - v) for i in range(4)]
    batch = photos[:20] + odd
    a, b = torch_predictor.predict_with_abstention(batch), onnx_predictor.predict_with_abstention(batch)
    with torch.inference_mode(), capture_levels(model) as captured:
        model.forward_features(predictor.preprocess(batch))
    np.testing.assert_allclose(a.level_score, levels.score(stack_levels(captured)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.level_score, b.level_score, rtol=1e-3, atol=1e-4)
    flipped_only = Predictor(load_checkpoint(root), tta=["hflip"]).predict_with_abstention(batch)  # views without identity
    np.testing.assert_allclose(flipped_only.level_score, a.level_score, rtol=1e-5, atol=1e-6)  # still the identity view's
    assert a.uncertain.any() and not a.uncertain.all()
    assert any("level" in reasons for reasons in a.reasons)
    assert a.uncertain.tolist() == b.uncertain.tolist() and a.reasons == b.reasons
    assert not model.backbone.get_submodule(levels.levels[0])._forward_hooks  # the export's recorders are gone
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermlab.serving.app import create_app

    client = TestClient(create_app(onnx_predictor))
    answer = client.post("/predict", files={"file": ("x.png", images.encode(odd[0]), "image/png")}).json()
    assert answer["level_score"] == pytest.approx(float(b.level_score[20]), rel=1e-3, abs=1e-4)
    assert answer["uncertain"] == bool(b.uncertain[20]) and answer["uncertain_reasons"] == b.reasons[20]


def test_a_fusion_model_with_feature_and_level_statistics_exports_with_its_metadata_input(photos, make_fusion_run, tmp_path):
    """The HAM10000 recipe's model: metadata fusion, feature and level statistics. The export keeps the metadata
    input beside the extra outputs (it once lost it when the outputs were added), and answers as torch does."""
    import torch

    from dermlab.config import Config, ModelConfig
    from dermlab.data.images import read_image
    from dermlab.evaluation.familiarity import fit_feature_statistics
    from dermlab.evaluation.level_statistics import capture_levels, fit_level_statistics, stack_levels

    config = Config(model=ModelConfig(**PARITY_MODEL, metadata_fusion=True))
    paths, metadata = photos
    plain = Predictor.from_path(make_fusion_run(tmp_path / "plain", config))
    batch = plain.preprocess([read_image(path) for path in paths] * 3)
    with torch.inference_mode(), capture_levels(plain.loaded.model) as captured:
        pooled = plain.loaded.model.forward_features(batch).numpy()
    looks = stack_levels(captured)
    train, val = ({level: d[part] for level, d in looks.items()} for part in (slice(0, 12), slice(12, None)))
    run = make_fusion_run(tmp_path / "run", config, feature_statistics=fit_feature_statistics(pooled[:12], pooled[12:], 4).to_dict(),
                          level_statistics=fit_level_statistics(train, val, 4).to_dict())
    torch_predictor, onnx_predictor = _both_engines(run, tmp_path)
    assert onnx_predictor.takes_metadata and onnx_predictor.level_statistics is not None
    np.testing.assert_allclose(_probabilities(onnx_predictor, paths, metadata=metadata),
                               _probabilities(torch_predictor, paths, metadata=metadata), atol=1e-4, rtol=0)
    scores = [[result.level_score for result in predictor.predict_paths(paths, metadata=metadata)]
              for predictor in (torch_predictor, onnx_predictor)]
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-3, atol=1e-4)


def test_a_4_to_3_export_answers_the_run_s_quarter_turn_views_as_torch_does(images, tmp_path):
    """The HAM10000 recipe's input is 144x192 and its chosen views may turn it by 90 degrees (192x144): the
    exported graph takes any height and width, as the torch network does."""
    import torch

    from dermlab.config import Config, EvaluationConfig, ModelConfig
    from dermlab.models.checkpoint import save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing

    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[24, 32]),
                    evaluation=EvaluationConfig(tta=["identity", "rot90", "hflip"]))
    model = create_model(config.model, 3, load_weights=False)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", model, config, ["nv", "mel", "bkl"],
                    resolve_preprocessing(model, config.model))
    torch_predictor = Predictor.from_path(tmp_path / "run")
    onnx_predictor = Predictor.from_path(_exported(torch_predictor, tmp_path), engine="onnx")
    assert onnx_predictor.tta_views == ("identity", "rot90", "hflip")
    photos = [images.sample((40 + i, 30), seed=i) for i in range(5)]
    np.testing.assert_allclose(onnx_predictor.predict_images(photos), torch_predictor.predict_images(photos), atol=1e-5, rtol=0)


def _exported(predictor, tmp_path):
    from dermlab.serving.onnx_export import export_onnx

    return export_onnx(predictor.loaded, tmp_path / "export" / "model.onnx")
