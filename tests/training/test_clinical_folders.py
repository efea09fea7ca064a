"""Clinical photos as published: class folders with spaces, PNG / WebP / CMYK JPEG / EXIF-rotated files, train/test.

The tree trains, evaluates and predicts with `dermlab train` and `dermlab predict`; the EXIF orientation is applied
the same way when the run scores its test folder (the training data path) and when `predict` reads a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dermlab.cli import main
from dermlab.data.images import read_image
from tests.fakes import class_colour, write_jpeg

CLASSES = ["BA- cellulitis", "FU nail fungus", "VI-chickenpox"]
ORIENTATION = 0x0112
SUFFIXES = {"png": ".png", "webp": ".webp", "cmyk": " cmyk.jpg", "exif": " exif.jpg"}
TINY = {
    "model": {"name": "test_efficientnet", "weights": "none", "input_size": [32, 32], "resize_mode": "letterbox"},
    "data": {"augmentation": "clinical", "num_workers": 0, "batch_size": 8},
    "train": {"stage1_epochs": 1, "stage2_epochs": 1},
    "evaluation": {"tta": [], "tta_candidates": [], "abstain_false_rejection": 0.0},
}


def _save_as(source: Path, target: Path, kind: str) -> Path:
    """Re-save a fixture JPEG as ``kind``: png, webp, cmyk (a CMYK JPEG) or exif (stored on its side, EXIF tag 6)."""
    image = Image.open(source).convert("RGB")
    target.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png":
        image.save(target, format="PNG")
    elif kind == "webp":
        image.save(target, format="WEBP", quality=95)
    elif kind == "cmyk":
        image.convert("CMYK").save(target, format="JPEG", quality=95)
    elif kind == "exif":  # pixels rotated 90 degrees clockwise on disk; orientation 6 turns them back on reading
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        image.transpose(Image.Transpose.ROTATE_270).save(target, format="JPEG", quality=95, exif=exif)
    source.unlink()
    return target


@pytest.fixture
def clinical_tree(tmp_path: Path) -> Path:
    """``train/`` 6 and ``test/`` 4 photos per class, 40x24 (landscape, like a phone), in four formats."""
    root = tmp_path / "skin photos"
    kinds = ["png", "webp", "cmyk", "exif"]
    for class_index, name in enumerate(CLASSES):
        for split, count, first_shade in (("train", 6, 0), ("test", 4, 40)):
            for i in range(count):
                jpeg = write_jpeg(root / split / name / f"{name} ({i}).jpg", size=(40, 24), color=class_colour(class_index, first_shade + 5 * i))
                kind = kinds[i % len(kinds)]
                _save_as(jpeg, jpeg.with_name(jpeg.stem + SUFFIXES[kind]), kind)
    return root


@pytest.fixture
def trained(clinical_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import yaml

    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(clinical_tree), "--config", str(config), "--out", str(run)]) == 0
    return run


@pytest.mark.slow
def test_a_clinical_tree_as_published_trains_evaluates_and_predicts(clinical_tree: Path, trained: Path, tmp_path: Path) -> None:
    assert json.loads((trained / "classes.json").read_text()) == sorted(CLASSES)
    splits = pd.read_csv(trained / "splits.csv")
    test = splits[splits["split"] == "test"]
    # the test folder stays the test set, whole: every file of every format
    assert sorted(Path(p).relative_to(clinical_tree).as_posix() for p in test["path"]) == sorted(
        p.relative_to(clinical_tree).as_posix() for p in (clinical_tree / "test").rglob("*.*"))
    assert {Path(p).suffix for p in test["path"]} == {".png", ".webp", ".jpg"}
    assert set(splits.loc[splits["split"] != "test", "path"].map(lambda p: Path(p).parts[-3])) == {"train"}
    assert {"train", "val"} <= set(splits["split"])
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["test"]["n"] == len(test) == 12
    scored = pd.read_csv(trained / "eval" / "test" / "predictions.csv")
    assert len(scored) == 12 and set(scored["true"]) == set(CLASSES)

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(trained), str(clinical_tree / "test"), "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    assert len(predicted) == 12 and set(predicted["predicted"]) <= set(CLASSES)


@pytest.mark.slow
def test_exif_orientation_is_applied_alike_in_the_run_and_in_predict(clinical_tree: Path, trained: Path, tmp_path: Path) -> None:
    columns = [f"prob_{c}" for c in sorted(CLASSES)]
    scored = pd.read_csv(trained / "eval" / "test" / "predictions.csv").set_index("path")
    rotated = next((clinical_tree / "test" / CLASSES[0]).glob("* exif.jpg"))
    # the same pixels without the tag: what a reader that ignored EXIF would see
    untagged = tmp_path / "untagged" / rotated.name
    untagged.parent.mkdir()
    Image.open(rotated).save(untagged, format="JPEG", quality=100, exif=Image.Exif())
    assert read_image(rotated).size == (40, 24) and read_image(untagged).size == (24, 40)
    out = tmp_path / "p.csv"
    assert main(["predict", str(trained), str(rotated), str(untagged), "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    as_read = predicted[predicted["path"] == str(rotated)][columns].to_numpy()[0]
    as_stored = predicted[predicted["path"] == str(untagged)][columns].to_numpy()[0]
    in_run = scored.loc[str(rotated), columns].to_numpy(dtype=float)
    assert abs(as_read - in_run).max() < 1e-4  # evaluation and predict read the file the same way
    assert abs(as_stored - in_run).max() > 1e-3  # and the orientation matters to this model: the check can fail
