"""Every benchmark runs with ``--quick`` in its own process, prints its figures and writes its JSON.

They run two at a time, each with one torch thread (more torch processes than cores, each with a thread per
core, slow each other many times over), into a temporary results folder, so the real figures in
``benchmarks/results/`` are never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {
    "train_throughput": ["images_per_s", "ratios"],
    "stage1_cache": ["runs", "ratios"],
    "stage2_trunk": ["runs", "ratios", "trunk_share"],
    "data_loading": ["images_per_s", "ratios", "augmentation_profile", "cache_margin_error"],
    "inference": ["results", "ratios"],
    "service": ["results", "ratios"],
    "accuracy": ["runs", "class_counts"],
    "clinical": ["runs", "targets", "paired"],
    "external": ["rows", "in_distribution", "paired", "metadata_withheld", "label_shift"],
    "familiarity": ["runs"],
    "robustness": ["runs", "reports", "tables"],
    "distillation": ["results", "experts", "timings_s"],
    "calibration_abstention": ["calibration", "abstention", "fusion"],
    "bootstrap": ["figures"],
    "duplicates": ["speed", "lesions", "copies"],
}
# the real-data grids train several runs each: two per grid cover their code paths in less time
EXTRA_ARGS = {
    "accuracy": ["--only", "peer-seed0", "default", "default-seed2", "ensemble-default-x2"],
    "clinical": ["--only", "peer-seed0", "default", "ref_b_baseline", "ref_b_cutmix", "ref_b_distill"],
    "robustness": ["--only", "default", "no_color_constancy"],
    "calibration_abstention": ["--fusion", "--fusion-seeds", "1"],
    "external": ["--withhold-metadata", "--label-shift"],
    # a server may need minutes to import and load beside another benchmark on a small machine
    "service": ["--start-timeout", "400"],
}


def _run_quick(name: str, tmp_path: Path) -> tuple[int, str]:
    command = [
        sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick",
        "--results", str(tmp_path / "results"), *EXTRA_ARGS.get(name, []),
    ]
    if name != "bootstrap":  # the only one without synthetic datasets to keep
        command += ["--work", str(tmp_path / "work" / name)]
    env = {**os.environ, "DERMLAB_PROGRESS": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return result.returncode, result.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a dozen benchmarks, two at a time: several minutes on a 2-core machine
def test_every_benchmark_runs_quick_and_writes_its_json(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        finished = dict(zip(BENCHMARKS, pool.map(lambda name: _run_quick(name, tmp_path), BENCHMARKS)))
    for name, keys in BENCHMARKS.items():
        returncode, output = finished[name]
        assert returncode == 0, f"{name} failed:\n{output[-3000:]}"
        assert "-----" in output and "wrote" in output, f"{name} printed no table of figures:\n{output[-2000:]}"
        result = json.loads((tmp_path / "results" / f"{name}-quick.json").read_text())
        assert result["benchmark"] == name and result["settings"]["quick"] is True
        assert result["machine"]["cores"] >= 1 and result["machine"]["versions"]["torch"]
        for key in keys:
            assert result[key], f"{name}: empty {key}"
    # the figures are measurements, not placeholders
    throughput = json.loads((tmp_path / "results" / "train_throughput-quick.json").read_text())["images_per_s"]
    assert all(value > 0 for value in throughput.values())
    service = json.loads((tmp_path / "results" / "service-quick.json").read_text())["results"]
    assert all(r["requests_ok"] > 0 and r["errors"] == 0 for r in service.values())
    inference = json.loads((tmp_path / "results" / "inference-quick.json").read_text())["results"]
    assert all(r["model_1_image"]["p50_ms"] > 0 for r in inference.values())
    accuracy = json.loads((tmp_path / "results" / "accuracy-quick.json").read_text())
    assert [r["run"] for r in accuracy["runs"]] == [
        "peer-seed0", "default", "default-seed2", "default, no logit adjustment (argmax rule)", "default, no TTA",
        "default, no EMA (raw weights)", "ensemble-default-x2",
    ]
    assert set(accuracy["targets"]) == {"accuracy", "balanced_accuracy", "auc_macro", "mel_sensitivity_at_80_spec"}
    assert all(row["accuracy"]["ci"] and 0 <= row["accuracy"]["value"] <= 1 for row in accuracy["runs"])
    trained = {row["run"]: row for row in accuracy["runs"] if row["wall_min"] != "(same run)"}
    assert list(trained) == ["peer-seed0", "default", "default-seed2", "ensemble-default-x2"]
    assert all(row["wall_min"] >= row["train_min"] >= 0 for row in trained.values())
    ensemble = trained["ensemble-default-x2"]  # its times are its members' plus its own scoring
    assert ensemble["train_min"] == pytest.approx(trained["default"]["train_min"] + trained["default-seed2"]["train_min"], abs=0.11)
    assert ensemble["wall_min"] >= trained["default"]["wall_min"] + trained["default-seed2"]["wall_min"]
    assert set(accuracy["ensemble_gain"]["ensemble-default-x2"]) >= {"over", "extra_wall_min", "accuracy", "auc_macro"}
    assert set(accuracy["paired"]) == {"default - peer-seed0", "ensemble-default-x2 - peer-seed0", "default-seed2 - default", "ensemble-default-x2 - default"}
    assert set(accuracy["paired"]["default - peer-seed0"]) >= {"accuracy", "balanced_accuracy", "auc_macro"}
    assert sum(accuracy["class_counts"]["nv"].values()) > 0
    external = json.loads((tmp_path / "results" / "external-quick.json").read_text())
    assert [(row["run"], row["method"]) for row in external["rows"]] == [
        (run, method) for run in ("run", "run-copy") for method in ("as trained", "adabn", "tent", "prior")
    ]
    same = external["paired"]["run-copy - run"]  # a copy of the run: its predictions, image by image, are the run's
    assert set(same) == {"accuracy", "balanced_accuracy", "auc_macro"}
    assert all(d["difference"] == 0 and d["interval"] == [0, 0] for d in same.values())
    assert all(0 <= row["auc"] <= 1 and row["images"] > 0 for row in external["rows"])
    points = external["rows"][0]["val_operating_points"]  # the quick run's thresholds: 0 flags every image, 1.5 none
    assert (points["val specificity 0.8"]["recall"], points["val specificity 0.8"]["others_flagged"]) == (1.0, 1.0)
    assert (points["val sensitivity 0.8"]["recall"], points["val sensitivity 0.8"]["others_flagged"]) == (0.0, 0.0)
    mixes = {row["method"]: row["class_mix"] for row in external["rows"] if row["run"] == "run"}
    assert mixes["as trained"] is None and mixes["adabn"] is None  # only prior estimates a class mix
    assert sum(mixes["prior"]["estimated"].values()) == pytest.approx(1.0)
    assert mixes["prior"]["estimated_present"] == pytest.approx(sum(mixes["prior"]["estimated"][name] for name in mixes["prior"]["true"]))
    assert sum(mixes["prior"]["true"].values()) == pytest.approx(1.0)  # the true mix of the classes present
    assert set(external["in_distribution"]["run"]) == {"adabn", "tent", "prior"}
    assert set(external["in_distribution"]["run"]["adabn"]["after"]) == {"accuracy", "balanced_accuracy", "auc_macro"}
    withheld = external["metadata_withheld"]["run"]  # the quick run fuses metadata: withholding it moves its answers
    assert withheld["images"] > 0 and withheld["with"]["auc_macro"] != withheld["withheld"]["auc_macro"]
    # label shift alone: the run's own test images drawn to the external folder's class mix, each method scored on them
    assert [(row["run"], row["method"]) for row in external["label_shift"]] == [(row["run"], row["method"]) for row in external["rows"]]
    true_mix = mixes["prior"]["true"]
    for row in (r for r in external["label_shift"] if "refused" not in r):
        total = sum(row["drawn"].values())
        assert row["images"] == total > 0 and set(row["drawn"]) == set(true_mix)
        assert all(abs(row["drawn"][name] / total - share) <= 1.5 / total for name, share in true_mix.items())
    shifted = next(r for r in external["label_shift"] if r["run"] == "run" and r["method"] == "prior")
    drawn = sum(shifted["drawn"].values())  # EM's estimate is recorded beside the drawn images' own mix
    assert shifted["class_mix"]["true"] == pytest.approx({name: shifted["drawn"][name] / drawn for name in true_mix})
    familiarity = json.loads((tmp_path / "results" / "familiarity-quick.json").read_text())["runs"]["run"]
    assert set(familiarity["detection"]) == {
        "level statistics (mean z over feature levels)", "mahalanobis distance", "1 - max probability", "minus energy"
    }
    assert all(0 <= familiarity["sets"][name]["level_unusual_share"] <= 1 for name in ("test", "external"))
    assert all(0 <= d["auroc"] <= 1 for d in familiarity["detection"].values())
    assert set(familiarity["rules"]) == {"logit scores", "mahalanobis", "logit scores + mahalanobis", "level", "logit scores + level"}
    assert all(rule["val_rejection"] <= 0.05 + 1e-9 for rule in familiarity["rules"].values())  # each fitted at the target
    trunk = json.loads((tmp_path / "results" / "stage2_trunk-quick.json").read_text())
    assert trunk["runs"]["cached_trunk"]["maps_mib"] > 0 and trunk["runs"]["cached_trunk"]["caching_passes_per_s"] > 0
    assert all(run["train_images_per_s"] > 0 for run in trunk["runs"].values())
    loading = json.loads((tmp_path / "results" / "data_loading-quick.json").read_text())
    assert loading["cache_margin_error"]["margin_0"]["max_abs"] == 0.0  # the margin-0 cache is exact
    assert loading["cache_margin_error"]["margin_0.25"]["max_abs"] > 0.0
    assert abs(sum(step["share"] for step in loading["augmentation_profile"].values()) - 1.0) < 0.01
    distillation = json.loads((tmp_path / "results" / "distillation-quick.json").read_text())
    assert set(distillation["results"]) == {
        "alone", "alone + balanced subset", "LFME", "LFME + instance curriculum", "LFME + balanced subset", "LFME, KL on own images"
    }
    assert all("delta_ci95" in r["best"] for name, r in distillation["results"].items() if name != "alone")
    calibration = json.loads((tmp_path / "results" / "calibration_abstention-quick.json").read_text())
    assert calibration["calibration"]["no TTA"]["temperature"] > 0
    assert (tmp_path / "results" / "calibration_reliability_test-quick.png").is_file()
    robustness = json.loads((tmp_path / "results" / "robustness-quick.json").read_text())
    conditions = [row[0] for row in robustness["tables"]["accuracy"]]
    assert conditions[0] == "clean" and len(conditions) == 9 and conditions[-1] == "mean of corruptions"
    assert all(report["seed"] == 0 and report["images"] > 0 for report in robustness["reports"].values())
