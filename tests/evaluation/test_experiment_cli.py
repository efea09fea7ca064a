"""`dermlab experiment`: several configs on one shared split, a comparison table, resumable."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from dermlab.cli import main


@pytest.mark.slow
def test_experiment_trains_each_run_on_one_split_and_writes_the_table(
    ham_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    grid = {
        "data": str(ham_dir),
        "set": {
            "model": {"name": "test_efficientnet", "weights": "none", "input_size": [32, 32]},
            "data": {"num_workers": 0, "batch_size": 8},
            "train": {"stage1_epochs": 1, "stage2_epochs": 1},
        },
        "runs": [
            {"name": "ce"},
            {"name": "focal", "set": {"loss.name": "focal", "loss.options": {"gamma": 2.0}}},
        ],
    }
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    out = tmp_path / "grid"
    assert main(["experiment", str(grid_file), "--out", str(out), "--classes", "mel", "df"]) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["run"]) == ["ce", "focal"]
    assert {"accuracy", "balanced_accuracy", "f1_macro", "auc_macro"} <= set(table.columns)
    assert "focal" in (out / "comparison.md").read_text()
    splits = [pd.read_csv(out / name / "splits.csv").sort_values("image_id") for name in ("ce", "focal")]
    assert splits[0]["split"].tolist() == splits[1]["split"].tolist()
    assert yaml.safe_load((out / "focal" / "config.yaml").read_text())["loss"]["name"] == "focal"
    capsys.readouterr()
    assert main(["experiment", str(grid_file), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("already finished") == 2


def test_experiment_rejects_a_bad_grid_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump({"runs": [{"name": "a"}, {"name": "a"}], "data": "x", "out": "y"}))
    assert main(["experiment", str(grid_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "appears twice" in err[0]
