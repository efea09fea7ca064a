"""train.ema: the exponential moving average is what is validated, checkpointed and exported."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermlab.config import Config, apply_overrides
from dermlab.data.run_data import prepare_run_data
from dermlab.errors import CheckpointError, ConfigError
from dermlab.models.checkpoint import RAW_WEIGHTS_KEY, load_checkpoint
from dermlab.training.ema import ema_decay
from dermlab.training.run import train_run

TINY = ["model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "data.num_workers=0", "data.batch_size=8"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "0")


def test_the_decay_has_the_asked_half_life() -> None:
    decay = ema_decay(1000, 0.1)
    assert math.isclose(decay**100, 0.5, rel_tol=1e-9)  # half-life: 10% of 1,000 steps
    assert ema_decay(3, 0.1) == 0.5  # never shorter than one step
    with pytest.raises(ValueError):
        ema_decay(0, 0.1)
    with pytest.raises(ValueError):
        ema_decay(10, 0.0)


def test_ema_with_cached_trunk_maps_is_refused() -> None:
    with pytest.raises(ConfigError, match="stage2_cached_views"):
        apply_overrides(Config(), ["train.ema=true", "train.unfreeze=2", "train.stage2_cached_views=2"])


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fakes import write_ham10000

    root = tmp_path_factory.mktemp("ema")
    data = write_ham10000(root / "data")
    config = apply_overrides(
        Config(),
        [f"data.path={data}", *TINY, "train.stage1_epochs=0", "train.stage2_epochs=2", "train.stage2_lr=0.02",
         "train.ema=true", "train.ema_half_life=0.5", "train.monitor=val/loss", "train.monitor_mode=min",
         "data.augmentation=none", "evaluation.bootstrap_resamples=0"],
    )
    train_run(config, root / "run")
    return root / "run"


def _val_loss(loaded, run: Path) -> float:
    """Cross-entropy of the loaded weights on the run's val split, as validation computes it."""
    from dermlab.evaluation.evaluate import predict_logits

    frame = prepare_run_data(loaded.config, run).frame
    val = frame[frame["split"] == "val"].reset_index(drop=True)
    logits = torch.from_numpy(predict_logits(loaded, val, batch_size=8))
    targets = torch.tensor([loaded.classes.index(label) for label in val["label"]])
    return float(torch.nn.functional.cross_entropy(logits, targets))


def test_the_averaged_weights_are_checkpointed_validated_and_the_raw_ones_kept(ema_run: Path) -> None:
    checkpoint = torch.load(ema_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint[RAW_WEIGHTS_KEY]
    assert averaged.keys() == raw.keys()
    moved = [k for k in averaged if averaged[k].is_floating_point() and not torch.equal(averaged[k], raw[k])]
    assert moved, "the average equals the raw weights: no averaging happened"
    loaded = load_checkpoint(ema_run)
    state = {f"model.{k}": v for k, v in loaded.model.state_dict().items()}
    assert all(torch.equal(state[k], averaged[k]) for k in averaged)  # load_checkpoint takes the average
    # what validation logged for the best epoch is the loss of the averaged weights, not of the raw ones
    logged = pd.read_csv(ema_run / "logs" / "metrics.csv")["val/loss"].dropna().min()
    assert _val_loss(loaded, ema_run) == pytest.approx(logged, abs=1e-4)
    assert _val_loss(load_checkpoint(ema_run, raw_weights=True), ema_run) != pytest.approx(logged, abs=1e-4)


@pytest.mark.slow  # a real ONNX export (about a second)
def test_the_onnx_export_carries_the_averaged_weights(ema_run: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from dermlab.serving.onnx_export import export_onnx

    loaded = load_checkpoint(ema_run)
    path = export_onnx(loaded, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    feeds = {session.get_inputs()[0].name: x.numpy()}
    exported = session.run(None, feeds)[0]
    with torch.inference_mode():
        averaged = loaded.model(x).numpy()
        raw = load_checkpoint(ema_run, raw_weights=True).model(x).numpy()
    assert np.abs(exported - averaged).max() < 1e-4
    assert np.abs(exported - raw).max() > 1e-3


def test_raw_weights_of_a_run_without_ema_are_refused(tmp_path: Path) -> None:
    from dermlab.models.checkpoint import save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing

    config = apply_overrides(Config(), TINY)
    model = create_model(config.model, 3, load_weights=False)
    path = save_checkpoint(tmp_path / "best.ckpt", model, config, ["a", "b", "c"], resolve_preprocessing(model, config.model))
    with pytest.raises(CheckpointError, match="not trained with train.ema"):
        load_checkpoint(path, raw_weights=True)
