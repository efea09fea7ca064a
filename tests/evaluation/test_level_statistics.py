"""Level statistics: the channel statistics of each feature level, per-image level scores, storage."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from fakes import write_noise_images

from dermlab.config import Config, ModelConfig
from dermlab.errors import CheckpointError, ConfigError, DataError
from dermlab.evaluation.level_statistics import (
    LevelStatistics,
    capture_levels,
    feature_levels,
    fit_level_statistics,
    stack_levels,
)
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing


def _tiny_model() -> torch.nn.Module:
    return create_model(ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]), 2, load_weights=False).eval()


def _levels(count: int, shift: dict[str, float] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Two levels of correlated Gaussian descriptors; ``shift`` moves a level's every axis."""
    rng = np.random.default_rng(seed)
    out = {}
    for width, level in ((6, "a"), (10, "b")):
        mixing = np.random.default_rng(width).normal(size=(width, width)) / np.sqrt(width)
        out[level] = rng.normal(size=(count, width)) @ mixing + (shift or {}).get(level, 0.0)
    return out


def test_the_levels_are_timms_feature_info_and_their_statistics_are_the_maps_channel_moments() -> None:
    model = _tiny_model()
    assert feature_levels(model) == [entry["module"] for entry in model.backbone.feature_info]
    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), capture_levels(model) as captured:
        model(batch)
    descriptors = stack_levels(captured)
    with torch.no_grad():
        maps = model.backbone.forward_intermediates(batch, intermediates_only=True)  # timm's own level outputs
    assert list(descriptors) == feature_levels(model)
    for level, expected in zip(descriptors, maps):
        flat = expected.flatten(2)
        np.testing.assert_allclose(descriptors[level], torch.cat([flat.mean(2), flat.std(2, correction=0)], 1).numpy(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model(batch)
    assert all(len(batches) == 1 for batches in captured.values())  # the hooks are gone once the block closes


def test_a_model_without_feature_levels_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="no feature levels"):
        feature_levels(torch.nn.Linear(2, 2))


def test_held_out_images_score_about_zero_and_a_shift_in_one_level_raises_the_score() -> None:
    statistics = fit_level_statistics(_levels(600, seed=1), _levels(400, seed=2), components=5)
    clean = statistics.score(_levels(500, seed=3))
    moved = statistics.score(_levels(500, shift={"a": 2.0}, seed=4))
    assert abs(float(np.median(clean))) < 0.3
    assert float(np.median(moved)) > float(np.quantile(clean, 0.95))
    home, away = statistics.verdict(_levels(500, seed=3)), statistics.verdict(_levels(500, shift={"a": 2.0}, seed=4))
    assert 0.01 < home.unusual_share < 0.12 and home.warning is None
    assert away.unusual_share > 0.8 and away.warning is not None and "look unlike" in away.warning
    assert "WARNING" in away.describe() and "WARNING" not in home.describe()
    with pytest.raises(DataError, match="lack b"):
        statistics.score({"a": _levels(5)["a"]})
    with pytest.raises(DataError, match="same levels"):
        fit_level_statistics(_levels(50), {"a": _levels(50)["a"]})


def test_level_statistics_survive_a_checkpoint_read_with_weights_only_and_damage_is_refused() -> None:
    statistics = fit_level_statistics(_levels(200, seed=1), _levels(100, seed=2), components=4)
    buffer = io.BytesIO()
    torch.save(statistics.to_dict(), buffer)
    buffer.seek(0)
    restored = LevelStatistics.from_dict(torch.load(buffer, weights_only=True))
    probe = _levels(20, shift={"b": 1.0}, seed=5)
    np.testing.assert_allclose(restored.score(probe), statistics.score(probe), rtol=1e-5)
    damaged = {**statistics.to_dict(), "log_std": [1.0]}
    with pytest.raises(CheckpointError, match="damaged level statistics"):
        LevelStatistics.from_dict(damaged)
    with pytest.raises(CheckpointError, match="damaged level statistics"):
        LevelStatistics.from_dict({"levels": ["a"]})


def test_colour_shifted_images_score_higher_than_held_out_clean_ones(tmp_path: Path) -> None:
    from dermlab.evaluation.evaluate import level_descriptors

    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]))
    model = create_model(config.model, 2, load_weights=False)
    save_checkpoint(tmp_path / "run" / "best.ckpt", model, config, ["nv", "mel"], resolve_preprocessing(model, config.model))
    loaded = load_checkpoint(tmp_path / "run" / "best.ckpt")

    def descriptors(paths: list[str]) -> dict[str, np.ndarray]:
        return level_descriptors(loaded, pd.DataFrame({"path": paths}), batch_size=16)

    skin = (190, 140, 120)
    statistics = fit_level_statistics(descriptors(write_noise_images(tmp_path / "train", 60, skin, 0)),
                                      descriptors(write_noise_images(tmp_path / "val", 30, skin, 1)), components=16)
    clean = statistics.score(descriptors(write_noise_images(tmp_path / "clean", 30, skin, 2)))
    shifted = statistics.score(descriptors(write_noise_images(tmp_path / "shifted", 30, (120, 150, 210), 3)))
    assert float(np.median(shifted)) > float(np.quantile(clean, 0.95))


def _run_with_level_statistics(tmp_path: Path) -> tuple[Path, LevelStatistics, Any]:
    """A tiny random run whose checkpoint holds level statistics fitted on skin-coloured noise images; its
    checkpoint, the statistics and a function giving the level descriptors of image paths."""
    from dermlab.evaluation.evaluate import level_descriptors

    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]))
    model = create_model(config.model, 2, load_weights=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "best.ckpt"
    save_checkpoint(checkpoint, model, config, ["nv", "mel"], resolve_preprocessing(model, config.model))
    loaded = load_checkpoint(checkpoint)

    def descriptors(paths: list[str]) -> dict[str, np.ndarray]:
        return level_descriptors(loaded, pd.DataFrame({"path": paths}), batch_size=16)

    skin = (190, 140, 120)
    statistics = fit_level_statistics(descriptors(write_noise_images(tmp_path / "train", 60, skin, 0)),
                                      descriptors(write_noise_images(tmp_path / "val", 30, skin, 1)), components=16)
    save_checkpoint(checkpoint, model, config, ["nv", "mel"], loaded.preprocessing, level_statistics=statistics.to_dict())
    return checkpoint, statistics, descriptors


def test_evaluate_on_another_folder_prints_the_level_verdict_and_scores_each_image(tmp_path: Path, capsys) -> None:
    from dermlab.cli import main

    checkpoint, statistics, descriptors = _run_with_level_statistics(tmp_path)
    other = tmp_path / "other clinic"
    paths = write_noise_images(other / "nv", 12, (120, 150, 210), 2) + write_noise_images(other / "mel", 12, (110, 140, 200), 3)
    assert main(["evaluate", str(checkpoint), "--data", str(other)]) == 0
    printed = capsys.readouterr().out
    assert "look (level statistics)" in printed and "WARNING" in printed
    (predictions_csv,) = (tmp_path / "run" / "eval").rglob("predictions.csv")
    predictions = pd.read_csv(predictions_csv).set_index("path")
    np.testing.assert_allclose(predictions.loc[paths, "level_score"], statistics.score(descriptors(paths)), rtol=1e-4, atol=1e-5)


def test_the_level_score_joins_the_abstention_rule_and_needs_its_statistics() -> None:
    from dermlab.evaluation.abstention import AbstentionRule, fit_abstention, needs_levels

    statistics = fit_level_statistics(_levels(400), _levels(200, seed=1), components=8)
    confident = np.tile(np.array([[[12.0, 0.0]]]), (1, 200, 1))  # the logits alone accept every image
    rule = fit_abstention(confident, 0.05, ["level"], levels=_levels(200, seed=2), level_statistics=statistics)
    assert rule.needs_levels and not rule.needs_features and needs_levels(["energy", "level"]) and not needs_levels(["energy"])
    home, away = _levels(100, seed=3), _levels(100, shift={"a": 3.0}, seed=4)
    looks = {level: np.concatenate([home[level], away[level]]) for level in home}
    rejected = rule.reject(confident, levels=looks)
    assert rejected[:100].mean() < 0.15 and rejected[100:].mean() > 0.9
    with pytest.raises(ConfigError, match="level descriptors"):
        rule.reject(confident)
    with pytest.raises(CheckpointError, match="no level statistics"):
        AbstentionRule.from_dict(rule.to_dict(), "x.ckpt")
    assert AbstentionRule.from_dict(rule.to_dict(), "x.ckpt", level_statistics=statistics).reject(confident, levels=looks).tolist() == rejected.tolist()


def test_a_level_rule_without_feature_statistics_is_refused_before_training() -> None:
    from dermlab.config import EvaluationConfig
    from dermlab.training.checks import check_names

    config = Config(evaluation=EvaluationConfig(abstain_scores=["energy", "level"], feature_statistics=False))
    with pytest.raises(ConfigError, match="has level, which needs evaluation.feature_statistics: true"):
        check_names(config)
    check_names(Config(evaluation=EvaluationConfig(abstain_scores=["energy", "level"])))


def test_predict_writes_each_level_score_and_prints_the_look_verdict(tmp_path: Path, capsys) -> None:
    from dermlab.cli import main

    checkpoint, statistics, descriptors = _run_with_level_statistics(tmp_path)
    paths = write_noise_images(tmp_path / "other clinic", 16, (120, 150, 210), 2)
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(checkpoint), *paths, "--out", str(out)]) == 0
    assert "look (level statistics)" in capsys.readouterr().err
    predictions = pd.read_csv(out).set_index("path")
    np.testing.assert_allclose(predictions.loc[paths, "level_score"], statistics.score(descriptors(paths)), rtol=1e-4, atol=1e-5)
