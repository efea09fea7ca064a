"""The model card: generated from a run folder's files, embedded in the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dermlab.config import Config, apply_overrides, config_to_dict
from dermlab.errors import DataError
from dermlab.evaluation.model_card import render_model_card, write_model_card
from dermlab.evaluation.report import render_report

CLASSES = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]


def _split_metrics(n: int, accuracy: float, ece_before: float, ece_after: float, vasc_recall: float) -> dict:
    per_class = {
        name: {"precision": 0.5, "recall": vasc_recall if name == "vasc" else 0.6, "f1": 0.55, "support": 10, "auc": 0.9}
        for name in CLASSES
    }
    return {
        "n": n,
        "accuracy": accuracy,
        "balanced_accuracy": 0.61,
        "f1_macro": 0.55,
        "auc_macro": 0.9,
        "ece": ece_after,
        "per_class": per_class,
        "target": {
            "class": "mel",
            "auc": 0.87,
            "sensitivity_at_specificity": {"requested": 0.8, "sensitivity": 0.71, "specificity": 0.8},
            "specificity_at_sensitivity": {"requested": 0.8, "sensitivity": 0.8, "specificity": 0.66},
        },
        "calibration": {"temperature": 1.8, "ece_before": ece_before, "ece_after": ece_after, "nll_before": 0.9, "nll_after": 0.7},
        "abstention": {"rejected": 0.052, "accuracy_accepted": 0.83, "balanced_accuracy_accepted": 0.64},
    }


def _run(tmp_path: Path, *overrides: str, metrics: dict | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    config = apply_overrides(Config(), [f"data.path={tmp_path / 'HAM10000'}", "model.input_size=[144,192]", *overrides])
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    (run / "classes.json").write_text(json.dumps(CLASSES))
    rows = ["image_id,path,label,group,split"]
    counts = {"train": 6, "val": 2, "test": 3}
    for name in CLASSES:
        for split, count in counts.items():
            number = 40 if (name == "nv" and split == "test") else count
            rows += [f"{name}{split}{i},/x/{name}{split}{i}.jpg,{name},L{name}{split}{i // 2},{split}" for i in range(number)]
    (run / "splits.csv").write_text("\n".join(rows) + "\n")
    if metrics is None:
        metrics = {
            "val": _split_metrics(14, 0.8, 0.121, 0.034, 0.5),
            "test": _split_metrics(58, 0.79, 0.133, 0.041, 0.25),
            "temperature": 1.8,
            "calibration": {"temperature": 1.8, "fitted": True, "fitted_on": "val"},
            "abstention": {"thresholds": {"energy": 3.25}, "false_rejection": 0.05, "val_rejection": 0.0497},
            "ood_rejection": {"solid colours": 1.0, "noise textures": 0.875},
        }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_card_states_use_data_performance_calibration_and_limits(tmp_path: Path) -> None:
    card = render_model_card(_run(tmp_path))
    assert card.startswith("# Model card: run")
    assert "**Not a medical device.**" in card
    for heading in ("## Intended use", "## Model", "## Data and splits", "## Performance", "## Calibration",
                    "## Abstention", "## Known limits"):
        assert heading in card
    assert "HAM10000 (Tschandl et al., 2018)" in card
    assert "| nv | 6 | 2 | 40 | 48 |" in card  # images per class and split, from splits.csv
    assert "| lesions |" in card
    assert "| vasc | 0.5000 | 0.2500 |" in card  # per-class on test (recall 0.25), not val (0.5)
    assert "| test | 0.1330 | 0.0410 | 0.9000 | 0.7000 |" in card  # ECE and NLL before / after
    assert "T = 1.8000" in card
    assert "energy < 3.2500" in card and "5.0%" in card and "4.97%" not in card
    assert "| noise textures | 87.5% |" in card
    assert "mel sensitivity at specificity 0.80 | 0.7100 | 0.7100 |" in card
    assert "144 x 192" in card
    # the small classes of the test split are named; nv (40 test images) is not
    limits = card.split("## Known limits")[1]
    assert "mel (3)" in limits and "nv (" not in limits
    assert "dx_type" in limits  # never an input, said so


def test_card_of_a_partial_run_says_what_is_missing(tmp_path: Path) -> None:
    run = _run(tmp_path, "data.layout=folders", metrics={"wall_time_s": 3.0})
    (run / "classes.json").write_text(json.dumps(["acne", "eczema"]))
    card = render_model_card(run)
    assert "No evaluation found" in card
    assert "No calibration figures" in card
    assert "No abstention rule" in card
    assert "Tschandl" not in card  # not HAM10000: no HAM10000-specific claims
    assert "2 classes" in card


def test_fusion_runs_list_their_metadata_inputs(tmp_path: Path) -> None:
    run = _run(tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["metadata_fusion"] = True  # as a fusion run's config.yaml holds it
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = render_model_card(run)
    assert "age, sex and localization" in card and "(`dx_type`) is never used" in card
    assert "Never withheld in training" in card
    config["model"]["metadata_dropout"] = 0.25
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = render_model_card(run)
    assert "Withheld from 25% of the training images" in card and "Never withheld" not in card


def test_written_card_is_embedded_in_the_report(tmp_path: Path) -> None:
    run = _run(tmp_path)
    path = write_model_card(run)
    assert path == run / "model_card.md"
    report = render_report(run)
    assert '<section id="model-card">' in report
    assert "Not a medical device" in report


def test_damaged_files_raise_one_clear_error(tmp_path: Path) -> None:
    run = _run(tmp_path)
    (run / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="metrics.json: not valid JSON"):
        render_model_card(run)
    with pytest.raises(DataError, match="run folder not found"):
        render_model_card(tmp_path / "nope")


def test_card_gives_the_test_split_at_the_val_threshold(tmp_path: Path) -> None:
    val, test = _split_metrics(14, 0.8, 0.121, 0.034, 0.5), _split_metrics(58, 0.79, 0.133, 0.041, 0.25)
    test["at_fitted_thresholds"] = {"class": "mel", "fitted_on": "val", "positives": 3, "negatives": 55, "points": {
        "specificity 0.8": {"threshold": 0.08, "val_sensitivity": 0.89, "val_specificity": 0.8, "sensitivity": 0.6667, "specificity": 0.7818},
    }}
    card = render_model_card(_run(tmp_path, metrics={"val": val, "test": test}))
    assert "| mel sensitivity / specificity at the val threshold for specificity 0.8 | 0.8900 / 0.8000 | 0.6667 / 0.7818 |" in card
    assert "sensitivity / specificity at the val threshold" not in render_model_card(_run(_mkdir(tmp_path / "plain")))


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
