"""compare_runs, compare_with_intervals, write_comparison and the `dermlab compare` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermlab.cli import main
from dermlab.errors import DataError
from dermlab.evaluation.bootstrap import bootstrap_intervals
from dermlab.evaluation.compare import (
    COMPARISON_METRICS,
    compare_runs,
    compare_with_intervals,
    comparison_markdown,
    data_fingerprint,
    write_comparison,
)
from dermlab.evaluation.metrics import compute_metrics


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


def _scored_run(
    root: Path, name: str, signal: float, images: int = 120, seed: int = 0, offset: int = 0
) -> Path:
    """A run folder scored like `dermlab train` leaves it: metrics.json with intervals, predictions.csv, splits.csv."""
    rng = np.random.default_rng(seed)
    classes = ["nv", "mel", "df"]
    label = rng.integers(0, 3, size=images // 2).repeat(2)  # two images per lesion
    noise = np.random.default_rng(100 + int(10 * signal)).normal(size=(images, 3))
    logits = noise + signal * np.eye(3)[label]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ids = [f"img{offset + i}" for i in range(images)]
    groups = [f"lesion{(offset + i) // 2}" for i in range(images)]
    run = root / name
    (run / "eval" / "test").mkdir(parents=True)
    predictions = pd.DataFrame(
        {"image_id": ids, "path": [f"/d/{i}.jpg" for i in ids], "true": [classes[k] for k in label]}
    )
    predictions["predicted"] = [classes[k] for k in prob.argmax(axis=1)]
    for k, class_name in enumerate(classes):
        predictions[f"prob_{class_name}"] = prob[:, k]
    predictions.to_csv(run / "eval" / "test" / "predictions.csv", index=False)
    splits = predictions[["image_id", "path"]].assign(label=predictions["true"], group=groups, split="test")
    splits.to_csv(run / "splits.csv", index=False)
    metrics = compute_metrics(label, prob, classes, target_class="mel")
    metrics.update(
        bootstrap_intervals(label, prob, classes, groups, resamples=200, seed=0, target_class="mel")
    )
    metrics["data_fingerprint"] = data_fingerprint(predictions)
    (run / "metrics.json").write_text(json.dumps({"test": metrics}))
    return run


def test_intervals_and_paired_differences(tmp_path: Path) -> None:
    weak = _scored_run(tmp_path, "weak", 1.0)
    strong = _scored_run(tmp_path, "strong", 3.0)
    same = _scored_run(tmp_path, "same", 1.0)  # the baseline's predictions again: no difference
    comparison = compare_with_intervals([weak, strong, same], classes=["df"], resamples=200, seed=0)
    assert comparison.warnings == [] and comparison.baseline == "weak"
    assert list(comparison.values.columns) == [
        *COMPARISON_METRICS,
        "sensitivity_at_specificity_mel",
        "recall_df",
    ]
    written = json.loads((strong / "metrics.json").read_text())["test"]
    assert comparison.low.loc["strong", "balanced_accuracy"] == written["intervals"]["balanced_accuracy"][0]
    assert comparison.high.loc["strong", "recall_df"] == written["intervals"]["recall_df"][1]
    assert comparison.low.loc["strong", "precision_macro"] == written["intervals"]["precision_macro"][0]
    assert math.isnan(comparison.low.loc["strong", "recall_macro"])  # no interval for it (balanced accuracy has)
    assert (
        comparison.significant.loc["strong", "balanced_accuracy"]
        and comparison.significant.loc["strong", "auc_macro"]
    )
    gain = comparison.difference.loc["strong", "balanced_accuracy"]
    assert gain == pytest.approx(
        written["balanced_accuracy"] - comparison.values.loc["weak", "balanced_accuracy"]
    )
    assert comparison.difference_low.loc["strong", "balanced_accuracy"] > 0
    assert (
        not comparison.significant.loc["same"].any()
        and (comparison.difference.loc["same"].dropna() == 0).all()
    )
    assert comparison.difference.loc["weak"].isna().all()
    markdown = comparison_markdown(comparison)
    assert "Paired differences from weak (run - baseline):" in markdown
    assert f"{comparison.values.loc['strong', 'balanced_accuracy']:.4f} [" in markdown and " *" in markdown
    assert "200 resamples of lesions, seed 0" in markdown


def test_runs_scored_on_different_data_get_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = _scored_run(tmp_path, "demo", 1.0, images=60)
    ham = _scored_run(tmp_path, "ham", 3.0, images=80, offset=1000)
    comparison = compare_with_intervals([demo, ham], resamples=50)
    assert len(comparison.warnings) == 1
    assert (
        "different data or splits (test: demo 60 images, ham 80 images, 0 in common)"
        in comparison.warnings[0]
    )
    assert comparison.difference.isna().all(axis=None) and not comparison.significant.any(axis=None)
    (demo / "eval" / "test" / "predictions.csv").unlink()  # the fingerprint in metrics.json still tells
    assert "different data or splits" in compare_with_intervals([demo, ham], resamples=50).warnings[0]
    assert main(["compare", str(demo), str(ham), "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the runs were scored on different data or splits")
    assert "> warning: the runs were scored on different data" in (tmp_path / "cmp.md").read_text()


def test_runs_without_predictions_are_not_tested(tmp_path: Path) -> None:
    first = _run(tmp_path, "baseline", 0.8)
    second = _run(tmp_path, "cutmix", 0.9)
    comparison = compare_with_intervals([first, second])
    assert comparison.warnings == [
        (
            "no eval/test/predictions.csv for baseline, cutmix: cannot check that the runs were scored on the "
            "same data; differences are not tested"
        )
    ]


def test_cli_compare_prints_intervals_and_marks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weak = _scored_run(tmp_path, "weak", 1.0)
    strong = _scored_run(tmp_path, "strong", 3.0)
    assert (
        main(["compare", str(weak), str(strong), "--out", str(tmp_path / "cmp"), "--resamples", "100"]) == 0
    )
    captured = capsys.readouterr()
    assert captured.err == ""
    low, high = json.loads((strong / "metrics.json").read_text())["test"]["intervals"]["accuracy"]
    assert f"{low:.3f}-{high:.3f}" in captured.out
    assert "difference from weak (paired bootstrap)" in captured.out and " *" in captured.out
    table = pd.read_csv(tmp_path / "cmp.csv", index_col="run")
    assert table.loc["strong", "accuracy_low"] == pytest.approx(low)
    assert bool(table.loc["strong", "accuracy_significant"]) and not bool(
        table.loc["weak", "accuracy_significant"]
    )


def test_the_balanced_rule_is_compared_beside_the_argmax_rule(tmp_path: Path) -> None:
    plain = _run(tmp_path, "plain", 0.8)
    adjusted = _run(tmp_path, "adjusted", 0.85)
    data = json.loads((adjusted / "metrics.json").read_text())
    data["test"]["decision_rule"] = "argmax"
    data["test"]["rules"] = {
        "argmax": {"tau": 0.0, "accuracy": 0.85, "balanced_accuracy": 0.6, "f1_macro": 0.6},
        "balanced": {"tau": 0.9, "accuracy": 0.8, "balanced_accuracy": 0.72, "f1_macro": 0.65,
                     "intervals": {"balanced_accuracy": [0.66, 0.78]}},
    }
    (adjusted / "metrics.json").write_text(json.dumps(data))
    comparison = compare_with_intervals([plain, adjusted], resamples=0)
    values = comparison.values
    assert values.loc["adjusted", "balanced_rule_balanced_accuracy"] == pytest.approx(0.72)
    assert values.loc["adjusted", "balanced_rule_accuracy"] == pytest.approx(0.8)
    assert math.isnan(values.loc["plain", "balanced_rule_balanced_accuracy"])  # that run has no such rule
    assert comparison.low.loc["adjusted", "balanced_rule_balanced_accuracy"] == pytest.approx(0.66)
    assert list(compare_runs([plain]).columns) == list(COMPARISON_METRICS)  # no rule anywhere: no extra columns
