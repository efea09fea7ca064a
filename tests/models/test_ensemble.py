"""dermlab ensemble: the mean of members' calibrated probabilities, as a run folder like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dermlab.config import Config, ModelConfig
from dermlab.errors import ConfigError, DataError
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing
from dermlab.serving.predictor import Predictor
from dermlab.training.ensemble import create_ensemble_run

CLASSES = ["nv", "mel", "bkl"]


def _run(root: Path, seed: int, size: int = 32, fusion: bool = False, temperature: float = 1.0, classes=CLASSES,
         splits: str = "image_id,split\na,train\n", **model_options) -> Path:
    torch.manual_seed(seed)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[size, size], metadata_fusion=fusion, **model_options))
    model = create_model(config.model, len(classes), load_weights=False)
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, classes, resolve_preprocessing(model, config.model), temperature=temperature)
    (root / "splits.csv").write_text(splits)
    return root


def _images(count: int = 4) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


def test_an_ensemble_of_one_run_equals_that_run(tmp_path: Path) -> None:
    member = _run(tmp_path / "a", seed=0, temperature=1.7)
    create_ensemble_run([str(member)], tmp_path / "ens")
    # the ensemble's own temperature (fitted after scoring) is not there yet: it averages the member's calibrated probabilities
    alone = Predictor.from_path(member, tta="identity").predict_images(_images())
    ensemble = Predictor.from_path(tmp_path / "ens", tta="identity").predict_images(_images())
    assert np.allclose(alone, ensemble, atol=1e-5)
    for name in ("config.yaml", "classes.json", "splits.csv", "lineage.json"):
        assert (tmp_path / "ens" / name).is_file()
    assert load_checkpoint(tmp_path / "ens").config.model.name == "ensemble"


def test_members_of_other_input_sizes_and_metadata_average(tmp_path: Path) -> None:
    small, large = _run(tmp_path / "a", 0, size=32, temperature=2.0), _run(tmp_path / "b", 1, size=40, fusion=True)
    create_ensemble_run([str(small), str(large)], tmp_path / "ens")
    ensemble = Predictor.from_path(tmp_path / "ens", tta="identity")
    assert ensemble.takes_metadata  # one member fuses metadata: the ensemble takes it
    by_hand = (Predictor.from_path(small, tta="identity").predict_images(_images()) + Predictor.from_path(large, tta="identity").predict_images(_images())) / 2
    # the ensemble resizes member 0's 32x32 input to 40x40 for member 1, so it is close to, not equal to, a 40x40 decode
    assert np.abs(ensemble.predict_images(_images()) - by_hand).max() < 0.05
    assert np.allclose(ensemble.predict_images(_images()).sum(axis=1), 1.0, atol=1e-5)


def test_members_must_share_classes_and_split(tmp_path: Path) -> None:
    a = _run(tmp_path / "a", 0)
    with pytest.raises(DataError, match="classes"):
        create_ensemble_run([str(a), str(_run(tmp_path / "b", 1, classes=["nv", "mel", "df"]))], tmp_path / "e1")
    with pytest.raises(DataError, match="splits.csv differs"):
        create_ensemble_run([str(a), str(_run(tmp_path / "c", 1, splits="image_id,split\na,test\n"))], tmp_path / "e2")
    create_ensemble_run([str(a)], tmp_path / "e3")
    with pytest.raises(ConfigError, match="already holds a run"):
        create_ensemble_run([str(a)], tmp_path / "e3")


@pytest.mark.parametrize("options", [
    {"color_constancy": "shades_of_gray"},
    {"resize_mode": "crop"},
])
def test_members_whose_pixels_differ_are_refused(tmp_path: Path, options) -> None:
    """The ensemble passes member 0's pixels on: a member with other colour constancy or framing is refused by name."""
    plain = _run(tmp_path / "plain", 0)
    other = _run(tmp_path / "other", 1, **options)
    for first, second in ((plain, other), (other, plain)):
        with pytest.raises(ConfigError, match=f"{second}: colour constancy .*must share colour constancy and resize mode"):
            create_ensemble_run([str(first), str(second)], tmp_path / f"ens-{first.name}")
        assert not (tmp_path / f"ens-{first.name}").exists()  # refused before anything is written
    create_ensemble_run([str(other), str(_run(tmp_path / "same", 2, size=40, **options))], tmp_path / "ens")  # same pixels, other size: works


@pytest.mark.slow  # a real ONNX export (about a second)
def test_an_ensemble_exports_to_onnx_and_predicts_the_same(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from dermlab.serving.onnx_export import export_onnx

    members = [_run(tmp_path / "a", 0, temperature=1.5), _run(tmp_path / "b", 1)]
    create_ensemble_run([str(m) for m in members], tmp_path / "ens")
    torch_predictor = Predictor.from_path(tmp_path / "ens", tta="identity")
    export_onnx(torch_predictor.loaded, tmp_path / "ens" / "export" / "model.onnx")
    onnx_predictor = Predictor.from_path(tmp_path / "ens", engine="onnx", tta="identity")
    assert np.abs(torch_predictor.predict_images(_images()) - onnx_predictor.predict_images(_images())).max() < 1e-4


@pytest.mark.parametrize(("scores", "kept", "rejection"), [
    (["max_probability", "energy", "level"], ["max_probability", "energy"], 0.05),
    (["mahalanobis"], [], 0.0),
])
def test_an_ensemble_keeps_only_the_abstention_scores_it_can_read(tmp_path: Path, scores, kept, rejection) -> None:
    """No single backbone: no feature or level statistics, so those scores are dropped, and said."""
    from dataclasses import replace

    from dermlab.config import EvaluationConfig, load_config

    member = _run(tmp_path / "a", 0)
    loaded = load_checkpoint(member)
    config = replace(loaded.config, evaluation=EvaluationConfig(abstain_scores=scores))
    save_checkpoint(member / "checkpoints" / "best.ckpt", loaded.model, config, CLASSES, loaded.preprocessing)
    made = create_ensemble_run([str(member)], tmp_path / "ens")
    assert set(made.dropped_scores) == set(scores) - set(kept)
    saved = load_config(tmp_path / "ens" / "config.yaml").evaluation
    assert (saved.abstain_scores, saved.abstain_false_rejection) == (kept, rejection)
