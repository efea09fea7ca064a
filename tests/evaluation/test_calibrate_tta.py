"""Test-time augmentation: the view registry, presets, averaged probabilities, and evaluation = serving."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermlab.config import Config, EvaluationConfig, ModelConfig
from dermlab.errors import ConfigError
from dermlab.evaluation.evaluate import evaluate_frame, predict_logits, predict_view_logits
from dermlab.evaluation.tta import (
    DEFAULT_TTA_VIEWS,
    TTA_PRESETS,
    TTA_VIEWS,
    average_probabilities,
    resolve_tta_views,
    view_logits,
)
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing

CLASSES = ["nv", "mel", "bkl"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def loaded(tmp_path: Path):
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32]))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    path = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt", model, config, CLASSES, resolve_preprocessing(model, config.model))
    return load_checkpoint(path)


@pytest.fixture
def frame(tmp_path: Path) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(6):
        path = tmp_path / "images" / f"img{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        pixels[:10, :12] = 255  # an asymmetric corner, so flips really differ
        Image.fromarray(pixels).save(path)
        rows.append({"image_id": f"img{index}", "path": str(path), "label": CLASSES[index % 3]})
    return pd.DataFrame(rows)


def test_views_are_the_symmetries_of_the_square() -> None:
    batch = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    images = {name: TTA_VIEWS.get(name)(batch) for name in TTA_PRESETS["dihedral"]}
    assert torch.equal(images["identity"], batch)
    assert torch.equal(images["hflip"][..., 0], batch[..., -1])
    assert torch.equal(images["vflip"][..., 0, :], batch[..., -1, :])
    assert torch.equal(images["rot180"], torch.flip(batch, dims=[-2, -1]))
    assert torch.equal(TTA_VIEWS.get("rot90")(images["rot270"]), batch)
    assert torch.equal(images["transpose"][..., 1, 2], batch[..., 2, 1])
    # eight distinct images: the dihedral group of the square, with no view repeated
    flat = {tuple(image.flatten().tolist()) for image in images.values()}
    assert len(flat) == 8


def test_rotations_by_90_degrees_swap_height_and_width() -> None:
    batch = torch.zeros(1, 3, 4, 6)
    assert TTA_VIEWS.get("rot90")(batch).shape == (1, 3, 6, 4)
    assert TTA_VIEWS.get("rot180")(batch).shape == (1, 3, 4, 6)


def test_resolve_views_presets_strings_and_errors() -> None:
    assert resolve_tta_views(True) == DEFAULT_TTA_VIEWS == ("identity", "hflip", "vflip")
    assert resolve_tta_views(False) == resolve_tta_views(None) == resolve_tta_views([]) == ("identity",)
    assert resolve_tta_views("identity, rot180") == ("identity", "rot180")
    assert resolve_tta_views(["flips", "rot180", "hflip"]) == ("identity", "hflip", "vflip", "rot180")
    assert len(resolve_tta_views("dihedral")) == 8
    with pytest.raises(ConfigError, match="rot45.*valid names.*hflip"):
        resolve_tta_views("identity,rot45")


def test_average_probabilities_scales_each_view_then_averages() -> None:
    logits = np.array([[[2.0, 0.0]], [[0.0, 2.0]], [[4.0, 0.0]]])
    expected = np.mean([np.exp(v / 2) / np.exp(v / 2).sum() for v in logits[:, 0]], axis=0)
    assert np.allclose(average_probabilities(logits, temperature=2.0)[0], expected)
    assert np.allclose(average_probabilities(logits[0]), torch.softmax(torch.tensor(logits[0]), 1).numpy())


def test_a_view_the_model_cannot_take_is_a_config_error() -> None:
    def fixed_size(batch: torch.Tensor) -> torch.Tensor:
        if batch.shape[-2:] != (4, 6):
            raise RuntimeError("Input height (6) doesn't match model (4)")
        return batch.mean(dim=(2, 3))

    batch = torch.ones(2, 3, 4, 6)
    assert view_logits(fixed_size, batch, ("identity", "hflip", "rot180")).shape == (3, 2, 3)
    with pytest.raises(ConfigError, match="rot90.*4x6 input into 6x4"):
        view_logits(fixed_size, batch, ("identity", "rot90"))


@pytest.mark.slow
def test_evaluation_averages_the_same_views_as_serving(loaded, frame, tmp_path: Path) -> None:
    from dermlab.serving.predictor import TTA_VIEWS as SERVING_VIEWS
    from dermlab.serving.predictor import Predictor

    assert SERVING_VIEWS is TTA_VIEWS  # one registry
    views = ("identity", "hflip", "rot90")
    logits = predict_view_logits(loaded, frame, views, batch_size=4)
    assert logits.shape == (3, len(frame), len(CLASSES))
    assert np.allclose(logits[0], predict_logits(loaded, frame), atol=1e-5)
    assert not np.allclose(logits[0], logits[1], atol=1e-4)
    hot = replace(loaded, extras={"temperature": 2.5})
    served = Predictor(hot, tta=views).predict_paths(frame["path"])
    served = np.stack([item.probabilities for item in served])
    assert np.allclose(served, average_probabilities(logits, 2.5), atol=1e-5)

    metrics = evaluate_frame(hot, frame, tmp_path / "eval", EvaluationConfig(tta=list(views)), batch_size=4)
    assert metrics["tta"] == list(views)
    written = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert np.allclose(written[[f"prob_{c}" for c in CLASSES]].to_numpy(), served, atol=1e-5)
    assert metrics["calibration"]["temperature"] == 2.5
    # the tta argument overrides the config; calibrated=False ignores the temperature
    plain = evaluate_frame(hot, frame, tmp_path / "plain", EvaluationConfig(tta=list(views)), tta=False, calibrated=False)
    assert plain["tta"] == ["identity"] and plain["calibration"]["temperature"] == 1.0
