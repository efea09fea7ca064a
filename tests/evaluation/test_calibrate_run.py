"""Finishing a run: temperature and abstention fitted on val, stored in the checkpoint, used everywhere after."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from dermlab.config import Config, apply_overrides, save_config
from dermlab.data.datasets import load_dataset
from dermlab.data.splits import create_splits, save_splits
from dermlab.evaluation.run_summary import summarise_run
from dermlab.io import atomic_write_json
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint, update_checkpoint_metadata
from dermlab.models.factory import create_model, resolve_preprocessing

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_run(ham_dir: Path, run_dir: Path, *overrides: str) -> pd.DataFrame:
    """A finished-training run folder without training: an untrained tiny model made over-confident."""
    config = apply_overrides(
        Config(),
        [f"data.path={ham_dir}", "model.name=test_efficientnet", "model.input_size=[32,32]", "data.num_workers=0", *overrides],
    )
    table = load_dataset(ham_dir, config.data)
    splits = create_splits(table, seed=config.data.split_seed)
    run_dir.mkdir(parents=True)
    save_splits(table, splits, run_dir / "splits.csv")
    save_config(config, run_dir / "config.yaml")
    atomic_write_json(run_dir / "classes.json", table.classes)
    torch.manual_seed(0)
    model = create_model(config.model, len(table.classes), load_weights=False)
    with torch.no_grad():
        model.head.bias[0] = 12.0  # (nearly) always the first class, with near certainty: over-confident
    save_checkpoint(run_dir / "checkpoints" / "best.ckpt", model, config, table.classes, resolve_preprocessing(model, config.model))
    return table.frame.assign(split=splits.reindex(table.frame.index).to_numpy())


def test_summarise_run_fits_on_val_and_stores_it_in_the_checkpoint(ham_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    frame = _make_run(ham_dir, run)
    summary = summarise_run(run, frame)

    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    meta = checkpoint["dermlab"]
    assert meta["temperature"] == pytest.approx(summary["temperature"])
    assert summary["temperature"] > 2.0  # the over-confident model is cooled
    assert meta["calibration"]["fitted_on"] == "val" and meta["calibration"]["n"] == int((frame["split"] == "val").sum())
    assert set(meta["abstention"]["thresholds"]) == {"max_probability", "energy"}
    assert meta["abstention"]["val_rejection"] <= 0.05
    for split in ("val", "test"):
        calibration = summary[split]["calibration"]
        assert calibration["temperature"] == pytest.approx(meta["temperature"])
        assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(calibration)
        assert 0.0 <= summary[split]["abstention"]["rejected"] <= 1.0
    # the NLL that the temperature minimises on val fell there, and so did the ECE on both splits
    assert summary["val"]["calibration"]["nll_after"] < summary["val"]["calibration"]["nll_before"]
    for split in ("val", "test"):
        assert summary[split]["calibration"]["ece_after"] < summary[split]["calibration"]["ece_before"] / 2
    assert set(summary["ood_rejection"]) == {"solid colours", "noise textures", "patterns"}

    written = json.loads((run / "metrics.json").read_text())
    assert written["val"]["calibration"] == pytest.approx(summary["val"]["calibration"])
    predictions = pd.read_csv(run / "eval" / "test" / "predictions.csv")
    assert predictions["uncertain"].dtype == bool
    # the val split's mel threshold (for sensitivity 0.8 there: always a finite one) travels in the checkpoint, and
    # the test split is scored at it, not at a threshold re-fitted on its own labels
    fitted = summary["val"]["target"]["specificity_at_sensitivity"]
    stored = meta["operating_points"]
    assert (stored["class"], stored["fitted_on"]) == ("mel", "val")
    assert stored["points"]["sensitivity 0.8"]["threshold"] == pytest.approx(fitted["threshold"])
    assert "at_fitted_thresholds" not in summary["val"]
    at = summary["test"]["at_fitted_thresholds"]["points"]["sensitivity 0.8"]
    flagged, is_mel = predictions["prob_mel"] >= fitted["threshold"], predictions["true"] == "mel"
    assert at["sensitivity"] == pytest.approx(flagged[is_mel].mean()) and at["specificity"] == pytest.approx(1 - flagged[~is_mel].mean())
    card = (run / "model_card.md").read_text()
    assert "Not a medical device" in card and f"T = {summary['temperature']:.4f}" in card
    report = (run / "report.html").read_text()
    assert "Model card" in report and "Not a medical device" in report

    # predict and serve rebuild both from the checkpoint alone
    from dermlab.serving.predictor import Predictor

    predictor = Predictor.from_path(run)
    assert predictor.temperature == pytest.approx(summary["temperature"])
    assert predictor.abstention is not None and predictor.abstention.thresholds == pytest.approx(meta["abstention"]["thresholds"])

    # summarising again refits from the raw logits: the same temperature, not one stacked on the other
    again = summarise_run(run, frame)
    assert again["temperature"] == pytest.approx(summary["temperature"], rel=1e-6)


def test_calibration_and_abstention_can_be_switched_off(ham_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    frame = _make_run(ham_dir, run, "evaluation.calibrate=false", "evaluation.abstain_false_rejection=0")
    update_checkpoint_metadata(run, abstention={"thresholds": {"energy": 1.0}, "false_rejection": 0.1})
    summary = summarise_run(run, frame)
    loaded = load_checkpoint(run)
    assert "temperature" not in loaded.extras
    assert loaded.extras["abstention"] is None  # a stale rule is cleared
    assert summary["temperature"] == 1.0 and summary["calibration"]["fitted"] is False
    assert summary["test"]["calibration"]["ece_before"] == summary["test"]["calibration"]["ece_after"]
    assert "abstention" not in summary["test"] and "ood_rejection" not in summary
    assert "uncertain" not in pd.read_csv(run / "eval" / "test" / "predictions.csv").columns


def test_evaluate_cli_applies_tta_temperature_and_abstention(ham_dir: Path, tmp_path: Path, capsys) -> None:
    from dermlab.cli import main

    run = tmp_path / "run"
    summarise_run(run, _make_run(ham_dir, run))
    assert main(["evaluate", str(run), "--split", "test", "--tta-views", "flips+rot180", "--out", str(tmp_path / "tta")]) == 0
    metrics = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert metrics["tta"] == ["identity", "hflip", "vflip", "rot180"]
    assert metrics["calibration"]["temperature"] > 1.0 and "abstention" in metrics
    out = capsys.readouterr().out
    assert "ECE" in out and "mel at the operating points fitted on val" in out
    assert main(["evaluate", str(run), "--split", "test", "--uncalibrated", "--out", str(tmp_path / "raw")]) == 0
    raw = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    assert raw["calibration"]["temperature"] == 1.0 and "abstention" not in raw
