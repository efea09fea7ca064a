"""compare_runs, write_comparison and the `dermlab compare` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from dermlab.cli import main
from dermlab.errors import DataError
from dermlab.evaluation.compare import COMPARISON_METRICS, compare_runs, write_comparison


def _run(root: Path, name: str, accuracy: float, label: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    split = {key: accuracy for key in COMPARISON_METRICS}
    split["auc_macro"] = None
    split["per_class"] = {
        "mel": {"precision": 0.5, "recall": accuracy / 2, "f1": 0.5, "support": 4, "auc": 0.9},
        "df": {"precision": None, "recall": None, "f1": None, "support": 0, "auc": None},
    }
    data: dict = {"val": split, "test": split, "wall_time_s": 3.0}
    if label:
        data["label"] = label
    (run / "metrics.json").write_text(json.dumps(data))
    return run


def test_compare_runs_table(tmp_path: Path) -> None:
    first = _run(tmp_path, "baseline", 0.8)
    second = _run(tmp_path, "cutmix", 0.9, label="cutmix + weights")
    frame = compare_runs([first, second], classes=["mel", "df", "vasc"])
    assert list(frame.index) == ["baseline", "cutmix + weights"]
    assert list(frame.columns) == [*COMPARISON_METRICS, "recall_mel", "recall_df", "recall_vasc"]
    assert frame.loc["baseline", "accuracy"] == pytest.approx(0.8)
    assert frame.loc["cutmix + weights", "recall_mel"] == pytest.approx(0.45)
    assert math.isnan(frame.loc["baseline", "auc_macro"])
    assert math.isnan(frame.loc["baseline", "recall_df"]) and math.isnan(frame.loc["baseline", "recall_vasc"])


def test_duplicate_folder_names_fall_back_to_paths(tmp_path: Path) -> None:
    runs = [_run(tmp_path / "a", "run", 0.5), _run(tmp_path / "b", "run", 0.6)]
    assert list(compare_runs(runs).index) == [str(runs[0]), str(runs[1])]


def test_write_comparison(tmp_path: Path) -> None:
    frame = compare_runs([_run(tmp_path, "baseline", 0.8)], split="val", classes=["mel"])
    markdown, csv = write_comparison(frame, tmp_path / "out" / "table")
    assert markdown == tmp_path / "out" / "table.md" and csv == tmp_path / "out" / "table.csv"
    lines = markdown.read_text().splitlines()
    assert lines[0].startswith("| run | accuracy |")
    assert lines[2] == "| baseline | 0.8000 | 0.8000 | 0.8000 | 0.8000 | 0.8000 | - | 0.4000 |"
    back = pd.read_csv(csv, index_col="run")
    assert back.loc["baseline", "recall_mel"] == pytest.approx(0.4)


def test_missing_metrics_or_split(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no metrics.json"):
        compare_runs([_run(tmp_path, "ok", 0.5), tmp_path / "empty"])
    with pytest.raises(DataError, match="no 'train' metrics; splits present: test, val"):
        compare_runs([tmp_path / "ok"], split="train")


def test_cli_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = _run(tmp_path, "baseline", 0.8)
    second = _run(tmp_path, "cutmix", 0.9)
    prefix = tmp_path / "cmp"
    classes = ["mel", "df", "vasc", "akiec", "bcc", "bkl"]  # wider than 80 columns: nothing may be dropped
    code = main(["compare", str(first), str(second), "--out", str(prefix), "--classes", *classes])
    assert code == 0
    output = capsys.readouterr().out
    assert "baseline" in output and "cutmix" in output
    assert all(f"rec {name}" in output for name in classes)
    assert (tmp_path / "cmp.md").is_file() and (tmp_path / "cmp.csv").is_file()


def test_cli_compare_names_the_bad_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "unevaluated").mkdir()
    assert main(["compare", str(tmp_path / "unevaluated"), "--out", str(tmp_path / "x")]) == 2
    assert "unevaluated: no metrics.json" in capsys.readouterr().err
