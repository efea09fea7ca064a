"""Every benchmark runs with ``--quick`` in its own process, prints its figures and writes its JSON.

They run side by side (most of their time is interpreter start-up and servers starting), into a
temporary results folder, so the real figures in ``benchmarks/results/`` are never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {
    "train_throughput": ["images_per_s", "ratios"],
    "stage1_cache": ["runs", "ratios"],
    "data_loading": ["images_per_s", "ratios"],
    "inference": ["results", "ratios"],
    "service": ["results", "ratios"],
    "accuracy": ["runs", "class_counts"],
    "robustness": ["runs", "reports", "tables"],
}
# the real-data grids train several runs each: two per grid cover their code paths in less time
EXTRA_ARGS = {"accuracy": ["--only", "default", "reference_a"], "robustness": ["--only", "default", "color_constancy"]}


@pytest.mark.slow
def test_every_benchmark_runs_quick_and_writes_its_json(tmp_path: Path) -> None:
    env = {**os.environ, "DERMLAB_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    processes = {}
    for name in BENCHMARKS:
        command = [
            sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick",
            "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"), *EXTRA_ARGS.get(name, []),
        ]
        processes[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {}
    try:
        for name, process in processes.items():
            outputs[name], _ = process.communicate(timeout=600)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    for name, keys in BENCHMARKS.items():
        output = outputs[name]
        assert processes[name].returncode == 0, f"{name} failed:\n{output[-3000:]}"
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
    assert [r["run"] for r in accuracy["runs"]] == ["default", "reference_a"] and set(accuracy["targets"]) == {
        "accuracy", "balanced_accuracy", "auc_macro", "mel_sensitivity_at_80_spec"
    }
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["wall_min"] >= 0 for r in accuracy["runs"])
    assert sum(accuracy["class_counts"]["nv"].values()) > 0
    robustness = json.loads((tmp_path / "results" / "robustness-quick.json").read_text())
    conditions = [row[0] for row in robustness["tables"]["accuracy"]]
    assert conditions[0] == "clean" and len(conditions) == 9 and conditions[-1] == "mean of corruptions"
    assert all(report["seed"] == 0 and report["images"] > 0 for report in robustness["reports"].values())
