"""write_report builds a self-contained HTML file from a run folder, complete or not."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermlab.errors import DataError
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


def _metrics(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, size=40)
    y_prob = rng.dirichlet(np.ones(3), size=40)
    return compute_metrics(y_true, y_prob, CLASSES)


def _full_run(run: Path) -> None:
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: resnet18 <tiny>\n")
    (run / "splits.csv").write_text(
        "image_id,path,label,group,split\n"
        "i1,/d/i1.jpg,nv,l1,train\ni2,/d/i2.jpg,nv,l2,train\ni3,/d/i3.jpg,mel,l3,val\n"
        "i4,/d/i4.jpg,df,l4,test\ni5,/d/i5.jpg,mel,l5,test\n"
    )
    metrics = {"val": _metrics(0), "test": _metrics(1), "wall_time_s": 12.5, "best_epoch": 3}
    (run / "metrics.json").write_text(json.dumps(metrics))
    for name in ("confusion_matrix", "roc", "reliability"):
        _png(run / "eval" / "test" / f"{name}.png")
    _png(run / "eval" / "val" / "roc.png", "green")
    _png(run / "plots" / "training_curves.png", "blue")
    _png(run / "gallery" / "mel.png", "white")
    (run / "model_card.md").write_text("# Model card\n\nIntended use: research <only>.\n")


def test_full_report_embeds_every_image(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _full_run(run)
    path = write_report(run)
    assert path == run / "report.html"
    collector, text = _parse(path)
    assert len(collector.images) == 6
    for src in collector.images:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
    # metric table, run facts, per-class and confusion tables for 2 splits, class counts
    assert collector.tables == 1 + 1 + 2 * 2 + 1
    assert collector.headings == [
        "Configuration",
        "Data splits",
        "Metrics",
        "Evaluation plots",
        "Training curves",
        "Grad-CAM gallery",
        "Model card",
    ]
    assert "research tool, not a medical device" in text
    assert "resnet18 &lt;tiny&gt;" in text and "research &lt;only&gt;" in text
    assert "balanced_accuracy" in text and "wall_time_s" in text
    assert "mel sensitivity @ specificity 0.8" in text
    assert "<th>total</th>" in text
    assert not list(run.glob(".*.tmp"))


def test_report_of_a_bare_run_folder(tmp_path: Path) -> None:
    collector, text = _parse(write_report(tmp_path))
    assert collector.images == []
    assert "metrics.json not found" in text and "config.yaml not found" in text
    assert "Grad-CAM gallery" not in collector.headings
    assert "research tool, not a medical device" in text


def test_report_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run folder not found"):
        write_report(tmp_path / "absent")
    (tmp_path / "metrics.json").write_text("{broken")
    with pytest.raises(DataError, match="metrics.json"):
        write_report(tmp_path)
