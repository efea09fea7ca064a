"""write_report builds a self-contained HTML file from a run folder, complete or not."""

from __future__ import annotations

import base64
import io
import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermlab.errors import DataError
from dermlab.evaluation.bootstrap import bootstrap_intervals
from dermlab.evaluation.metrics import compute_metrics
from dermlab.evaluation.report import write_report

CLASSES = ["nv", "mel", "df"]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables = 0
        self.headings: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag == "table":
            self.tables += 1
        elif tag == "h2":
            self._in_heading = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_heading = False

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings.append(data.strip())


def _parse(path: Path) -> tuple[_Collector, str]:
    text = path.read_text(encoding="utf-8")
    collector = _Collector()
    collector.feed(text)
    return collector, text


def _png(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format="PNG")


def _metrics(seed: int, intervals: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, size=40)
    y_prob = rng.dirichlet(np.ones(3), size=40)
    groups = [f"L{i // 2}" for i in range(40)]
    metrics = compute_metrics(y_true, y_prob, CLASSES)
    metrics.update(tta=["identity", "hflip"], calibration={"temperature": 1.5})
    if intervals:
        metrics.update(
            bootstrap_intervals(y_true, y_prob, CLASSES, groups, resamples=50, seed=0, target_class="mel")
        )
    return metrics


def _full_run(run: Path, intervals: bool = True) -> None:
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  path: /data/HAM <x>\nmodel:\n  name: resnet18 <tiny>\n")
    (run / "splits.csv").write_text(
        "image_id,path,label,group,split\n"
        "i1,/d/i1.jpg,nv,l1,train\ni2,/d/i2.jpg,nv,l1,train\ni3,/d/i3.jpg,mel,l3,val\n"
        "i4,/d/i4.jpg,df,l4,test\ni5,/d/i5.jpg,mel,l5,test\n"
    )
    metrics = {
        "val": _metrics(0, intervals),
        "test": _metrics(1, intervals),
        "wall_time_s": 12.5,
        "best_epoch": 3,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    for name in ("confusion_matrix", "confusion_matrix_normalized", "roc", "reliability"):
        _png(run / "eval" / "test" / f"{name}.png")
    _png(run / "eval" / "val" / "roc.png", "green")
    _png(run / "plots" / "training_curves.png", "blue")
    _png(run / "gallery" / "mel.png", "white")
    (run / "model_card.md").write_text("# Model card\n\nIntended use: research <only>.\n")


def test_full_report_leads_with_the_answer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _full_run(run)
    path = write_report(run)
    assert path == run / "report.html"
    collector, text = _parse(path)
    assert len(collector.images) == 7  # 4 of test, 1 of val (folded), curves, gallery
    for src in collector.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
    assert collector.headings == [
        "Summary",
        "Confusion matrix and per-class results",
        "ROC and reliability",
        "Grad-CAM gallery",
        "Training curves",
        "Model card",
        "Details",
    ]
    summary = text[text.index('id="summary"') : text.index('id="confusion-matrix-and-per-class-results"')]
    assert "3 classes: nv, mel, df; target class mel" in summary
    assert "/data/HAM &lt;x&gt;" in summary and "resnet18 &lt;tiny&gt;" in summary
    assert "train 2 images (1 lesions), val 1 images (1 lesions), test 2 images (2 lesions)" in summary
    assert "softmax(logits / 1.5) averaged over the test-time views identity, hflip" in summary
    test = json.loads((run / "metrics.json").read_text())["test"]
    low, high = test["intervals"]["balanced_accuracy"]
    assert (
        f'<strong>{test["balanced_accuracy"]:.3f}</strong> <span class="ci">[{low:.3f}, {high:.3f}]</span>'
        in summary
    )
    assert "mel sensitivity at specificity 0.8" in summary
    assert "50 resamples, seed 0" in summary
    low, high = test["intervals"]["recall_df"]
    assert f"[{low:.3f}, {high:.3f}]" in text[text.index('id="confusion-matrix') : text.index('id="roc-and')]
    # the model card, every split's full tables and the configuration are folded at the end
    card = text[text.index('id="model-card"') : text.index('id="details"')]
    assert "<details>" in card and "research &lt;only&gt;" in card
    details = text[text.index('id="details"') :]
    assert details.count("<details>") == 4
    assert "resnet18 &lt;tiny&gt;" in details
    assert text.index("<summary>Configuration (config.yaml)</summary>") > text.index('id="training-curves"')
    assert "wall_time_s" in details and "mel sensitivity @ specificity 0.8" in details
    assert "<th>total</th>" in details and "<th>lesions</th>" in details
    assert "eval/val/roc.png" in details
    assert "research tool, not a medical device" in text
    assert not list(run.glob(".*.tmp"))


def test_report_without_intervals_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _full_run(run, intervals=False)
    text = write_report(run).read_text(encoding="utf-8")
    assert "No intervals: the run was scored with evaluation.bootstrap_resamples = 0" in text
    assert 'class="ci"' not in text


def test_report_of_a_bare_run_folder(tmp_path: Path) -> None:
    collector, text = _parse(write_report(tmp_path))
    assert collector.images == []
    assert (
        "metrics.json not found" in text
        and "config.yaml not found" in text
        and "splits.csv not found" in text
    )
    assert "Grad-CAM gallery" not in collector.headings
    assert "research tool, not a medical device" in text


def test_report_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run folder not found"):
        write_report(tmp_path / "absent")
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(DataError, match="metrics.json"):
        write_report(tmp_path)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="no /usr/bin/chromium (sh scripts/install-browser.sh installs it)"
)
def test_report_renders_in_a_headless_browser_with_the_summary_on_top(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _full_run(run)
    report = write_report(run)
    screenshot = tmp_path / "report.png"
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1200,1600",
        report.resolve().as_uri(),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    with Image.open(screenshot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"))
    summary_background = np.all(pixels == (244, 248, 252), axis=-1)  # the .headline block's #f4f8fc
    rows = np.flatnonzero(summary_background.any(axis=1))
    assert rows.size and rows[0] < 300, "the summary block is not at the top of the page"
    assert summary_background[rows[0] : rows[0] + 300].mean() > 0.3  # a block, not a stray pixel
