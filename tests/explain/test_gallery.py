"""Gallery selection and rendering, without a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermlab.errors import ConfigError
from dermlab.explain import GalleryItem, render_class_gallery, render_gallery, render_gallery_sheet
from dermlab.explain import select_gallery_examples

CLASSES = ["nv", "mel", "bcc"]


def _predictions() -> tuple[list[str], list[str], np.ndarray]:
    y_true = ["nv", "nv", "nv", "nv", "mel", "mel", "mel"]
    y_pred = ["nv", "nv", "mel", "bcc", "mel", "nv", "nv"]
    y_prob = np.array(
        [
            [0.6, 0.3, 0.1],
            [0.9, 0.05, 0.05],
            [0.3, 0.6, 0.1],
            [0.1, 0.1, 0.8],
            [0.2, 0.7, 0.1],
            [0.5, 0.4, 0.1],
            [0.95, 0.04, 0.01],
        ]
    )
    return y_true, y_pred, y_prob


def test_select_most_confident() -> None:
    y_true, y_pred, y_prob = _predictions()
    picked = select_gallery_examples(y_true, y_pred, y_prob, CLASSES, per_class=2)
    assert picked["nv"] == {"correct": [1, 0], "wrong": [3, 2]}  # wrong: by confidence of the predicted class
    assert picked["mel"] == {"correct": [4], "wrong": [6, 5]}
    assert picked["bcc"] == {"correct": [], "wrong": []}
    true_indices, pred_indices = [0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 1, 0, 0]
    indices = select_gallery_examples(true_indices, pred_indices, y_prob, CLASSES, per_class=2)
    assert indices == picked  # class indices work like class names


def test_select_random_is_seeded_and_valid() -> None:
    y_true, y_pred, y_prob = _predictions()
    first = select_gallery_examples(y_true, y_pred, y_prob, CLASSES, per_class=1, seed=3, strategy="random")
    again = select_gallery_examples(y_true, y_pred, y_prob, CLASSES, per_class=1, seed=3, strategy="random")
    assert first == again
    assert first["nv"]["correct"][0] in (0, 1) and first["nv"]["wrong"][0] in (2, 3)


def test_select_rejects_bad_input() -> None:
    y_true, y_pred, y_prob = _predictions()
    with pytest.raises(ConfigError, match="unknown class 'xx'"):
        select_gallery_examples(["xx", *y_true[1:]], y_pred, y_prob, CLASSES)
    with pytest.raises(ConfigError, match="disagree"):
        select_gallery_examples(y_true, y_pred, y_prob[:, :2], CLASSES)
    with pytest.raises(ConfigError, match="strategy"):
        select_gallery_examples(y_true, y_pred, y_prob, CLASSES, strategy="best")  # type: ignore[arg-type]


def _item(true: str, pred: str, seed: int, as_pil: bool = False) -> GalleryItem:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    cam = rng.random((6, 8)).astype(np.float32)
    return GalleryItem(Image.fromarray(image) if as_pil else image, cam, true, pred, 0.75)


def _open_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_render_class_gallery_and_sheet(tmp_path: Path) -> None:
    items = [_item("mel", "mel", 0), _item("mel", "nv", 1, as_pil=True)]
    assert items[0].caption == "true: mel / predicted: mel / p=0.75"
    one = render_class_gallery(items, tmp_path / "mel.png", title="mel")
    empty = render_class_gallery([], tmp_path / "bcc.png", title="bcc")
    sheet = render_gallery_sheet({"mel": items, "bcc": []}, tmp_path / "sheet.png")
    for path in (one, empty, sheet):
        width, height = _open_png(path)
        assert width > 50 and height > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bcc.png", "mel.png", "sheet.png"]  # no temp files


def test_render_gallery_folder(tmp_path: Path) -> None:
    items_by_class = {"nv": [_item("nv", "nv", 2)], "a/b c": [_item("a/b c", "nv", 3)]}
    written = render_gallery(items_by_class, tmp_path / "g")
    assert [path.name for path in written] == ["nv.png", "a_b_c.png", "sheet.png"]
    for path in written:
        _open_png(path)
    with pytest.raises(ConfigError, match="overwrite"):
        render_gallery({"a b": [], "a/b": []}, tmp_path / "h")
