"""Abstention: scores, thresholds set for a false-rejection rate on val, storage, and the service's answer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermlab.config import Config, ModelConfig
from dermlab.errors import CheckpointError, ConfigError
from dermlab.evaluation.abstention import (
    UNCERTAIN_MESSAGE,
    AbstentionRule,
    abstention_summary,
    compute_scores,
    fit_abstention,
    synthetic_non_lesion_images,
)
from dermlab.models.checkpoint import save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing

CLASSES = ["nv", "mel", "bkl"]


def _lesion_logits(n: int, seed: int = 0) -> np.ndarray:
    """Logits of 'in-distribution' images: one class clearly ahead, large logits (high energy)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, size=(n, 3))
    logits[np.arange(n), rng.integers(0, 3, n)] += rng.normal(5.0, 1.0, n)
    return logits


def test_scores_by_hand() -> None:
    logits = np.array([[[2.0, 0.0, 0.0]], [[0.0, 0.0, 4.0]]])  # two views of one image
    scores = compute_scores(logits, ["max_probability", "energy", "max_logit"], temperature=2.0)
    first, second = np.exp([1.0, 0, 0]), np.exp([0, 0, 2.0])
    averaged = (first / first.sum() + second / second.sum()) / 2
    assert scores["max_probability"] == pytest.approx([averaged.max()])
    assert scores["energy"] == pytest.approx([(np.log(np.exp(2) + 2) + np.log(np.exp(4) + 2)) / 2])
    assert scores["max_logit"] == pytest.approx([3.0])
    with pytest.raises(ConfigError, match="valid names"):
        compute_scores(logits, ["entropy"])


def test_one_score_rejects_the_target_share_of_validation_lesions() -> None:
    val = _lesion_logits(2000)
    rule = fit_abstention(val, false_rejection=0.05, scores=["energy"])
    rejected = rule.reject(val)
    assert 0.05 - 1 / 2000 <= rejected.mean() <= 0.05
    assert rule.val_rejection == pytest.approx(rejected.mean())
    # fresh lesions from the same distribution: close to the target
    assert rule.reject(_lesion_logits(4000, seed=1)).mean() == pytest.approx(0.05, abs=0.015)
    # flat, small logits (what a solid colour tends to give) are rejected
    assert rule.reject(np.random.default_rng(2).normal(0, 0.3, size=(50, 3))).all()


def test_several_scores_share_the_budget() -> None:
    val = _lesion_logits(3000)
    rule = fit_abstention(val, false_rejection=0.05, scores=["max_probability", "energy"], temperature=1.5)
    assert rule.val_rejection <= 0.05
    assert rule.val_rejection > 0.04  # the budget is used, not wasted
    assert rule.quantile < 0.05  # each score alone rejects less than the target
    scores = rule.scores(val)
    for name, threshold in rule.thresholds.items():
        alone = (scores[name] < threshold).mean()
        assert alone == pytest.approx(rule.quantile, abs=2 / 3000)
    reasons = rule.reasons(scores)
    assert [bool(r) for r in reasons] == rule.reject(val).tolist()
    with pytest.raises(ConfigError, match="false_rejection"):
        fit_abstention(val, false_rejection=0.0)


def test_rule_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    rule = fit_abstention(_lesion_logits(500), 0.1, ["max_logit", "energy"], temperature=1.3, views=("identity", "hflip"))
    torch.save({"abstention": rule.to_dict()}, tmp_path / "x.pt")
    back = AbstentionRule.from_dict(torch.load(tmp_path / "x.pt", weights_only=True)["abstention"])
    assert back == rule
    with pytest.raises(CheckpointError, match="damaged abstention"):
        AbstentionRule.from_dict({"thresholds": {"energy": "high"}, "false_rejection": 0.1}, "run.ckpt")
    with pytest.raises(CheckpointError, match="run.ckpt: unknown abstention score 'entropy'"):
        AbstentionRule.from_dict({"thresholds": {"entropy": 1.0}, "false_rejection": 0.1}, "run.ckpt")


def test_summary_of_a_labelled_split() -> None:
    y_true = np.array([0, 0, 1, 1, 2])
    y_prob = np.eye(3)[[0, 1, 1, 1, 0]]  # correct, wrong, correct, correct, wrong
    rejected = np.array([False, True, False, False, True])
    summary = abstention_summary(y_true, y_prob, rejected)
    assert summary["rejected"] == pytest.approx(0.4) and summary["n_rejected"] == 2
    assert summary["accuracy_accepted"] == pytest.approx(1.0)
    assert summary["accuracy_rejected"] == pytest.approx(0.0)
    assert summary["balanced_accuracy_accepted"] == pytest.approx(1.0)  # classes 0 and 1 remain, both right


def test_synthetic_non_lesion_images() -> None:
    kinds = synthetic_non_lesion_images((40, 30), per_kind=3, seed=1)
    assert set(kinds) == {"solid colours", "noise textures", "patterns"}
    for images in kinds.values():
        assert len(images) == 3 and all(image.size == (40, 30) and image.mode == "RGB" for image in images)
    assert len(np.unique(np.asarray(kinds["solid colours"][0]).reshape(-1, 3), axis=0)) == 1
    assert np.asarray(kinds["noise textures"][0]).std() > 50
    assert len(np.unique(np.asarray(kinds["patterns"][0]).reshape(-1, 3), axis=0)) == 2
    # seeded: the same images again
    again = synthetic_non_lesion_images((40, 30), per_kind=3, seed=1)
    assert np.array_equal(np.asarray(again["noise textures"][1]), np.asarray(kinds["noise textures"][1]))


# ------------------------------------------------------------------------------ service and predict CLI


def _checkpoint(path: Path, thresholds: dict[str, float]) -> Path:
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32]))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    rule = AbstentionRule(thresholds=thresholds, false_rejection=0.05, val_rejection=0.05)
    return save_checkpoint(path, model, config, CLASSES, resolve_preprocessing(model, config.model), abstention=rule.to_dict())


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (180, 120, 100)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_service_answers_uncertain_with_a_message(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dermlab.serving.app import create_app
    from dermlab.serving.predictor import Predictor

    rejecting = Predictor.from_path(_checkpoint(tmp_path / "strict.ckpt", {"energy": 1e9}))
    accepting = Predictor.from_path(_checkpoint(tmp_path / "lenient.ckpt", {"energy": -1e9}))
    files = {"file": ("x.png", _png(), "image/png")}
    body = TestClient(create_app(rejecting)).post("/predict", files=files).json()
    assert body["uncertain"] is True and body["uncertain_reasons"] == ["energy"]
    assert "this image may not be a skin lesion" in body["message"] == UNCERTAIN_MESSAGE
    assert body["top_class"] in CLASSES  # the probabilities still come back, flagged
    client = TestClient(create_app(accepting))
    body = client.post("/predict", files=files).json()
    assert body["uncertain"] is False and body["message"] is None
    assert client.get("/health").json()["abstention"] is True
    page = client.get("/").text
    assert 'id="uncertain"' in page and "result.uncertain" in page


@pytest.mark.slow
def test_predict_cli_writes_an_uncertain_column(tmp_path: Path) -> None:
    from dermlab.cli import main

    image = tmp_path / "x.png"
    image.write_bytes(_png())
    checkpoint = _checkpoint(tmp_path / "strict.ckpt", {"max_probability": 2.0})  # rejects everything
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(checkpoint), str(image), "--out", str(out), "--tta-views", "flips"]) == 0
    table = pd.read_csv(out)
    assert list(table.columns)[-1] == "uncertain" and table["uncertain"].tolist() == [True]
