"""Feature statistics of the training images: Mahalanobis distance, shift score and warning, storage, abstention."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fakes import write_noise_images

from dermlab.config import Config, ModelConfig
from dermlab.errors import CheckpointError, ConfigError, DataError
from dermlab.evaluation.abstention import AbstentionRule, fit_abstention, needs_features
from dermlab.evaluation.familiarity import FeatureStatistics, capture_pooled, fit_feature_statistics
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing


def _gaussian(count: int, width: int = 12, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """Correlated Gaussian features (a fixed mixing matrix), optionally moved by ``shift`` on every axis."""
    mixing = np.random.default_rng(99).normal(size=(width, width)) / np.sqrt(width)
    return np.random.default_rng(seed).normal(size=(count, width)) @ mixing + 2.0 + shift


@pytest.fixture(scope="module")
def statistics() -> FeatureStatistics:
    return fit_feature_statistics(_gaussian(600, seed=1), _gaussian(300, seed=2), components=11)


def test_the_distance_is_the_mahalanobis_distance_of_the_training_covariance() -> None:
    train = _gaussian(500, width=6, seed=3)
    statistics = fit_feature_statistics(train, _gaussian(50, width=6, seed=4), components=5)  # all axes: exact
    points = _gaussian(7, width=6, shift=1.0, seed=5)
    centred = points - train.mean(axis=0)
    expected = np.sqrt(np.einsum("ni,ij,nj->n", centred, np.linalg.inv(np.cov(train.T)), centred) / 6)
    np.testing.assert_allclose(statistics.distance(points), expected, rtol=1e-4)


def test_images_of_the_training_distribution_are_typical_and_shifted_ones_are_not(statistics: FeatureStatistics) -> None:
    held_out = _gaussian(400, seed=7)
    shifted = _gaussian(400, shift=1.5, seed=8)
    assert 0.8 < float(np.median(statistics.distance(held_out))) < 1.2
    assert float(np.median(statistics.distance(shifted))) > 2 * float(np.median(statistics.distance(held_out)))
    clean, moved = statistics.shift(held_out), statistics.shift(shifted)
    assert clean.unusual_share < 0.09 and clean.warning is None
    assert moved.unusual_share > 0.9 and moved.warning is not None and "unlike" in moved.warning
    assert moved.shift_score > 10 * max(clean.shift_score, 0.05)
    assert "WARNING" in moved.describe() and "WARNING" not in clean.describe()


def test_a_few_unusual_images_in_a_small_batch_raise_no_warning(statistics: FeatureStatistics) -> None:
    """The warning needs the unusual share to be clearly above 5%: one odd image in five is not evidence."""
    batch = np.concatenate([_gaussian(4, seed=9), _gaussian(1, shift=3.0, seed=10)])
    assert statistics.shift(batch).warning is None


def test_statistics_survive_a_checkpoint_read_with_weights_only(statistics: FeatureStatistics) -> None:
    buffer = io.BytesIO()
    torch.save({"feature_statistics": statistics.to_dict()}, buffer)
    buffer.seek(0)
    back = FeatureStatistics.from_dict(torch.load(buffer, weights_only=True)["feature_statistics"])
    points = _gaussian(5, seed=11)
    np.testing.assert_allclose(back.distance(points), statistics.distance(points), rtol=1e-5)


def test_damaged_statistics_and_bad_features_are_refused(statistics: FeatureStatistics) -> None:
    damaged = statistics.to_dict() | {"components": torch.zeros(3, 2)}
    with pytest.raises(CheckpointError, match="damaged feature statistics"):
        FeatureStatistics.from_dict(damaged, "x.ckpt")
    with pytest.raises(CheckpointError, match="damaged feature statistics"):
        FeatureStatistics.from_dict({"mean": [1.0]}, "x.ckpt")
    with pytest.raises(DataError, match=r"shape \(N, 12\)"):
        statistics.distance(np.zeros((3, 5)))
    with pytest.raises(DataError, match="NaN"):
        statistics.distance(np.full((2, 12), np.nan))
    with pytest.raises(DataError, match="at least 3 training images"):
        fit_feature_statistics(np.zeros((2, 4)), np.zeros((2, 4)))


def test_capture_pooled_collects_the_backbone_output_and_refuses_a_model_without_one() -> None:
    model = create_model(ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]), 2, load_weights=False).eval()
    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), capture_pooled(model) as pooled:
        model(batch)
    assert len(pooled) == 1
    torch.testing.assert_close(pooled[0], model.forward_features(batch).detach())
    with pytest.raises(ConfigError, match="no single backbone"), capture_pooled(torch.nn.Linear(2, 2)):
        pass


def test_the_mahalanobis_score_rejects_unfamiliar_features_that_the_logits_find_confident(statistics: FeatureStatistics) -> None:
    rng = np.random.default_rng(12)
    val_logits = rng.normal(size=(1, 300, 3)) * 3
    rule = fit_abstention(val_logits, 0.05, ["mahalanobis"], features=_gaussian(300, seed=2), statistics=statistics)
    assert rule.needs_features and needs_features(["energy", "mahalanobis"]) and not needs_features(["energy"])
    confident = np.tile(np.array([[[12.0, 0.0, 0.0]]]), (1, 4, 1))  # four very confident images
    rejected = rule.reject(confident, np.concatenate([_gaussian(2, seed=13), _gaussian(2, shift=4.0, seed=14)]))
    assert rejected.tolist() == [False, False, True, True]
    with pytest.raises(ConfigError, match="needs pooled features"):
        rule.reject(confident)
    with pytest.raises(CheckpointError, match="no feature statistics"):
        AbstentionRule.from_dict(rule.to_dict(), "x.ckpt")
    assert AbstentionRule.from_dict(rule.to_dict(), "x.ckpt", statistics).thresholds == rule.thresholds


def test_the_shift_score_of_a_colour_shifted_image_set_exceeds_a_held_out_clean_one(tmp_path: Path) -> None:
    from dermlab.evaluation.evaluate import predict_view_outputs

    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]))
    model = create_model(config.model, 2, load_weights=False)
    save_checkpoint(tmp_path / "run" / "best.ckpt", model, config, ["nv", "mel"], resolve_preprocessing(model, config.model))
    loaded = load_checkpoint(tmp_path / "run" / "best.ckpt")

    def features(paths: list[str]) -> np.ndarray:
        return predict_view_outputs(loaded, pd.DataFrame({"path": paths}), batch_size=16)[1]

    skin = (190, 140, 120)
    statistics = fit_feature_statistics(
        features(write_noise_images(tmp_path / "train", 60, skin, 0)), features(write_noise_images(tmp_path / "val", 30, skin, 1)), components=16
    )
    clean = statistics.shift(features(write_noise_images(tmp_path / "clean", 30, skin, 2)))
    shifted = statistics.shift(features(write_noise_images(tmp_path / "shifted", 30, (120, 150, 210), 3)))
    assert shifted.shift_score > 3 * clean.shift_score
    assert shifted.unusual_share > clean.unusual_share
    assert shifted.warning is not None and clean.warning is None


def test_a_set_whose_features_moved_together_is_flagged_by_its_shift_score_though_few_images_are_unusual(
    statistics: FeatureStatistics,
) -> None:
    """Every image a little off along the main axis: per image hardly unusual, as a set clearly shifted."""
    sizes, thresholds = statistics.threshold_sizes, statistics.threshold_scores
    assert sizes == tuple(sorted(sizes)) and all(a >= b for a, b in zip(thresholds, thresholds[1:]))
    assert statistics.shift_threshold(sizes[0] - 1) is None
    train = _gaussian(600, seed=1)
    _, singular, axes = np.linalg.svd(train - train.mean(axis=0), full_matrices=False)
    along_main_axis = axes[0] * singular[0] / np.sqrt(len(train) - 1)  # one standard deviation
    clean, moved = statistics.shift(_gaussian(200, seed=220)), statistics.shift(_gaussian(200, seed=220) + along_main_axis)
    assert clean.warning is None
    assert moved.unusual_share < 0.06 and moved.shift_score > statistics.shift_threshold(200)
    assert moved.warning is not None and "distributed unlike" in moved.warning and "unusual where" not in moved.warning


def test_familiarity_reads_the_identity_view_whatever_the_tta_views(tmp_path: Path) -> None:
    """The statistics are fitted on the identity view, so every image is scored on it: evaluating or predicting
    with other views must not move the distances (a run's own test split once looked 'unusual' with fewer views)."""
    from dermlab.evaluation.evaluate import predict_view_outputs
    from dermlab.serving.predictor import Predictor

    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]))
    model = create_model(config.model, 2, load_weights=False)
    checkpoint = tmp_path / "run" / "best.ckpt"
    save_checkpoint(checkpoint, model, config, ["nv", "mel"], resolve_preprocessing(model, config.model))
    loaded = load_checkpoint(checkpoint)
    frame = pd.DataFrame({"path": write_noise_images(tmp_path / "images", 12, (190, 140, 120), 0)})
    identity_logits, identity = predict_view_outputs(loaded, frame, ("identity",), batch_size=5)
    flips_logits, flips = predict_view_outputs(loaded, frame, ("hflip", "vflip"), batch_size=5)
    assert flips_logits.shape == (2, 12, 2) and not np.allclose(flips_logits[0], identity_logits[0])
    np.testing.assert_allclose(flips, identity, rtol=1e-5, atol=1e-6)
    statistics = fit_feature_statistics(identity[:8], identity[8:], components=4)
    save_checkpoint(checkpoint, model, config, ["nv", "mel"], loaded.preprocessing, feature_statistics=statistics.to_dict())
    images = [Image.open(path).convert("RGB") for path in frame["path"]]
    distances = [Predictor(load_checkpoint(checkpoint), tta=views).predict_with_abstention(images).feature_distance
                 for views in (["identity"], ["hflip", "vflip"], ["identity", "hflip"])]
    np.testing.assert_allclose(distances[1], distances[0], rtol=1e-4)
    np.testing.assert_allclose(distances[2], distances[0], rtol=1e-4)
    np.testing.assert_allclose(distances[0], statistics.distance(identity), rtol=1e-4)
