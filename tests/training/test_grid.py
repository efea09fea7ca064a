"""A grid's finished runs are reused, and one whose saved config the grid row no longer gives is said so."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermlab.config import Config, apply_overrides, save_config
from dermlab.training.grid import config_differences, run_config, run_grid


def test_config_differences_names_each_changed_setting_and_ignores_paths_and_workers() -> None:
    saved = apply_overrides(Config(), ["data.path=/a", "data.num_workers=0", "model.input_size=[144,192]"])
    same = apply_overrides(Config(), ["data.path=/elsewhere", "data.num_workers=4", "model.input_size=[144,192]"])
    assert config_differences(saved, same) == []
    changed = apply_overrides(same, ["model.input_size=[168,168]", "model.color_constancy=shades_of_gray"])
    assert sorted(config_differences(saved, changed)) == [
        "model.color_constancy: None -> 'shades_of_gray'",
        "model.input_size: [144, 192] -> [168, 168]",
    ]


def test_a_finished_run_whose_row_changed_is_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = {"_dir": tmp_path, "runs": [{"name": "a", "set": {"model.input_size": [32, 32]}}, {"name": "b"}]}
    for entry in grid["runs"]:  # both finished, "a" with another input size than its row now gives
        run_dir = tmp_path / "out" / entry["name"]
        run_dir.mkdir(parents=True)
        saved = run_config(grid, entry, tmp_path / "data")
        save_config(apply_overrides(saved, ["model.input_size=[40,40]"]) if entry["name"] == "a" else saved, run_dir / "config.yaml")
        (run_dir / "metrics.json").write_text("{}")
    assert run_grid(grid, tmp_path / "data", tmp_path / "out") == [tmp_path / "out" / "a", tmp_path / "out" / "b"]
    captured = capsys.readouterr()
    assert captured.out.count("already finished, skipped") == 2
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("[a] warning:") and "model.input_size: [40, 40] -> [32, 32]" in warnings[0]
