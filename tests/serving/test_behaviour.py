"""One model, one behaviour: predict, serve and evaluate apply the run's own TTA views, temperature and
abstention rule by default, through one code path (dermlab.evaluation.inference); flags override them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermlab.cli import main
from dermlab.config import Config, EvaluationConfig, ModelConfig
from dermlab.evaluation.abstention import AbstentionRule
from dermlab.models.checkpoint import update_checkpoint_metadata
from dermlab.serving.predictor import Predictor

TEMPERATURE = 2.5
VIEWS = ("hflip", "rot180")
FUSION = ModelConfig(name="test_efficientnet", input_size=[32, 32], metadata_fusion=True, weights="none")


def _add_median_rule(run: Path, images: list) -> None:
    """An abstention rule on max_probability whose threshold rejects about half of ``images``."""
    probabilities = Predictor.from_path(run, abstain=False).predict_images(images)
    threshold = float(np.median(probabilities.max(axis=1)))
    rule = AbstentionRule({"max_probability": threshold}, 0.5, 0.5, temperature=TEMPERATURE, views=VIEWS)
    update_checkpoint_metadata(run / "checkpoints" / "best.ckpt", abstention=rule.to_dict())


@pytest.fixture(scope="module")
def tta_run(make_fusion_run, tmp_path_factory, images) -> Path:
    """A fusion run whose config asks for hflip + rot180 and whose checkpoint holds a temperature and a rule."""
    config = Config(model=FUSION, evaluation=EvaluationConfig(tta=list(VIEWS)))
    run = make_fusion_run(tmp_path_factory.mktemp("tta-run"), config, temperature=TEMPERATURE)
    _add_median_rule(run, [images.sample(seed=i) for i in range(8)])
    return run


def test_the_runs_views_temperature_and_rule_are_the_default(tta_run, images) -> None:
    default = Predictor.from_path(tta_run)
    assert (default.tta_views, default.temperature) == (VIEWS, TEMPERATURE) and default.abstention is not None
    batch = [images.sample(seed=i) for i in range(8)]
    raw = Predictor.from_path(tta_run, tta="identity,hflip,rot180", calibrated=False, abstain=False)
    logits = raw.tta_logits(raw.preprocess(batch))[1:]  # the hflip and rot180 views
    by_hand = torch.softmax(logits.double() / TEMPERATURE, dim=-1).mean(dim=0).numpy()
    result = default.predict_with_abstention(batch)
    assert np.allclose(result.probabilities, by_hand, atol=1e-6)
    assert 0 < result.uncertain.sum() < len(batch)  # the stored rule decides
    plain = Predictor.from_path(tta_run, tta="identity", calibrated=False, abstain=False)
    assert (plain.tta_views, plain.temperature, plain.abstention) == (("identity",), 1.0, None)
    assert not np.allclose(plain.predict_images(batch), result.probabilities, atol=1e-3)


def test_predict_flags_override_the_run(tta_run, images, tmp_path, capsys) -> None:
    path = tmp_path / "x.png"
    images.sample(seed=3).save(path)
    out = tmp_path / "p.csv"
    assert main(["predict", str(tta_run), str(path), "--out", str(out), "--tta-views", "identity", "--uncalibrated"]) == 0
    assert "TTA views: identity; temperature 1; abstention rule off" in capsys.readouterr().err
    table = pd.read_csv(out)
    expected = Predictor.from_path(tta_run, tta="identity", calibrated=False).predict_images([images.sample(seed=3)])
    assert np.allclose(table[["prob_nv", "prob_mel", "prob_bkl"]].to_numpy(), expected, atol=1e-6)
    assert "uncertain" not in table  # --uncalibrated drops the rule with the temperature
    assert main(["predict", str(tta_run), str(path), "--out", str(out)]) == 0
    assert f"TTA views: hflip, rot180; temperature {TEMPERATURE:g}; abstention rule on" in capsys.readouterr().err


@pytest.mark.slow  # a real export and parity check (about a second)
def test_the_onnx_export_behaves_as_the_checkpoint(tta_run, images, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from dermlab.serving.onnx_export import export_onnx

    torch_predictor = Predictor.from_path(tta_run)
    onnx_predictor = Predictor.from_path(export_onnx(torch_predictor.loaded, tmp_path / "model.onnx"), engine="onnx")
    assert onnx_predictor.behaviour == torch_predictor.behaviour
    batch = [images.sample(seed=i) for i in range(8)]
    a, b = torch_predictor.predict_with_abstention(batch), onnx_predictor.predict_with_abstention(batch)
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-4
    assert np.array_equal(a.uncertain, b.uncertain)


@pytest.mark.slow
def test_predict_serve_and_evaluate_give_the_same_probabilities(make_fusion_run, ham_dir, tmp_path, capsys) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermlab.data.run_data import prepare_run_data
    from dermlab.serving.app import create_app

    config = Config(model=FUSION, evaluation=EvaluationConfig(tta=list(VIEWS)))
    config.data.path, config.data.num_workers = str(ham_dir), 0
    run = tmp_path / "run"
    test = prepare_run_data(config, run).frame.query("split == 'test'")  # writes run/splits.csv
    classes = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
    make_fusion_run(run, config, classes=classes, temperature=TEMPERATURE)
    _add_median_rule(run, [Image.open(p).convert("RGB") for p in test["path"]])
    columns = [f"prob_{name}" for name in classes]

    assert main(["evaluate", str(run), "--split", "test", "--out", str(tmp_path / "eval")]) == 0
    evaluated = pd.read_csv(tmp_path / "eval" / "predictions.csv").set_index("image_id")
    metadata = ham_dir / "HAM10000_metadata.csv"
    predicted_csv = tmp_path / "predicted.csv"
    assert main(["predict", str(run), *test["path"], "--metadata", str(metadata), "--out", str(predicted_csv)]) == 0
    predicted = pd.read_csv(predicted_csv).set_index("image_id")
    assert set(predicted["metadata"]) <= {"used", "partial"}  # every test image has a row in the metadata file

    client = TestClient(create_app(Predictor.from_path(run)))
    rows = {row["image_id"]: row for row in csv.DictReader(metadata.open(encoding="utf-8"))}
    served = {}
    for path in test["path"]:
        image_id = Path(path).stem
        fields = {name: rows[image_id][name] for name in ("age", "sex", "localization")}
        body = client.post("/predict", files={"file": (Path(path).name, Path(path).read_bytes(), "image/jpeg")}, data=fields).json()
        served[image_id] = [body["probabilities"][name] for name in classes] + [body["uncertain"]]
    served_frame = pd.DataFrame.from_dict(served, orient="index", columns=[*columns, "uncertain"])

    ids = sorted(evaluated.index)
    assert sorted(predicted.index) == ids == sorted(served_frame.index) and len(ids) >= 5
    reference = evaluated.loc[ids, columns].to_numpy()
    assert np.abs(predicted.loc[ids, columns].to_numpy() - reference).max() < 1e-5
    assert np.abs(served_frame.loc[ids, columns].to_numpy(dtype=float) - reference).max() < 1e-5
    assert list(evaluated.loc[ids, "predicted"]) == list(predicted.loc[ids, "predicted"])
    uncertain = evaluated.loc[ids, "uncertain"].astype(bool).tolist()
    assert uncertain == predicted.loc[ids, "uncertain"].astype(bool).tolist() == served_frame.loc[ids, "uncertain"].tolist()


def test_predict_and_serve_name_their_decision_rule_and_give_both(make_fusion_run, tmp_path, images, capsys) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from dermlab.evaluation.decision import DecisionRule, adjust_probabilities
    from dermlab.serving.app import create_app

    rule = DecisionRule(2.0, (0.02, 0.08, 0.90))  # the untrained model leans to bkl: call it the frequent class
    run = make_fusion_run(tmp_path / "run", Config(model=FUSION), decision=rule.to_dict())
    batch = [images.sample(seed=i) for i in range(12)]
    paths = []
    for i, image in enumerate(batch):
        paths.append(tmp_path / f"x{i}.png")
        image.save(paths[-1])
    probabilities = Predictor.from_path(run).predict_images(batch)
    balanced = [["nv", "mel", "bkl"][i] for i in adjust_probabilities(probabilities, 2.0, rule.prior).argmax(axis=1)]
    argmax = [["nv", "mel", "bkl"][i] for i in probabilities.argmax(axis=1)]
    assert balanced != argmax  # the case distinguishes the rules

    out = tmp_path / "p.csv"
    assert main(["predict", str(run), *map(str, paths), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "decision rule argmax (balanced rule: tau 2)" in captured.err and "column predicted: argmax rule" in captured.out
    table = pd.read_csv(out)
    assert list(table["predicted"]) == argmax == list(table["predicted_argmax"]) and list(table["predicted_balanced"]) == balanced
    assert main(["predict", str(run), *map(str, paths), "--out", str(out), "--rule", "balanced"]) == 0
    assert list(pd.read_csv(out)["predicted"]) == balanced

    client = TestClient(create_app(Predictor.from_path(run, rule="balanced")))
    for path, expected_argmax, expected_balanced in zip(paths, argmax, balanced):
        body = client.post("/predict", files={"file": (path.name, path.read_bytes(), "image/png")}).json()
        assert body["decision_rule"] == "balanced" and body["top_class"] == expected_balanced
        assert body["class_by_rule"] == {"argmax": expected_argmax, "balanced": expected_balanced}
