"""Grad-CAM galleries: choose which predictions to show, then draw them. No model in here.

Selection works on predictions alone; rendering takes images and already computed CAMs, so both can be tested
(and re-run) without a network. The run folder holds ``gallery/<class>.png`` and ``gallery/sheet.png``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from dermlab.errors import ConfigError
from dermlab.explain.gradcam import overlay_cam
from dermlab.io import atomic_save

__all__ = [
    "GalleryItem",
    "render_class_gallery",
    "render_gallery",
    "render_gallery_sheet",
    "select_gallery_examples",
]

Strategy = Literal["confident", "random"]


@dataclass(frozen=True)
class GalleryItem:
    """One example to draw: the image, its CAM, and what the model said about it."""

    image: Image.Image | np.ndarray
    cam: np.ndarray
    true_label: str
    predicted_label: str
    probability: float  # probability of the predicted class

    @property
    def correct(self) -> bool:
        return self.true_label == self.predicted_label

    @property
    def caption(self) -> str:
        return f"true: {self.true_label} / predicted: {self.predicted_label} / p={self.probability:.2f}"


# ------------------------------------------------------------------------------------------- selection


def _as_indices(labels: Sequence[int | str] | np.ndarray, classes: Sequence[str], name: str) -> np.ndarray:
    """Class names or class indices -> an int array of indices into ``classes``."""
    values = list(np.asarray(labels).tolist())
    lookup = {label: index for index, label in enumerate(classes)}
    indices = np.empty(len(values), dtype=np.int64)
    for position, value in enumerate(values):
        if isinstance(value, str):
            if value not in lookup:
                raise ConfigError(f"{name}[{position}]: unknown class {value!r}; classes are {list(classes)}")
            indices[position] = lookup[value]
        elif isinstance(value, int | float) and float(value).is_integer() and 0 <= int(value) < len(classes):
            indices[position] = int(value)
        else:
            raise ConfigError(
                f"{name}[{position}]: {value!r} is not a class name or an index below {len(classes)}"
            )
    return indices


def select_gallery_examples(
    y_true: Sequence[int | str] | np.ndarray,
    y_pred: Sequence[int | str] | np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    per_class: int = 4,
    seed: int = 0,
    strategy: Strategy = "confident",
) -> dict[str, dict[str, list[int]]]:
    """Pick up to ``per_class`` correct and ``per_class`` wrong examples for each true class.

    Returns ``{class: {"correct": [row, ...], "wrong": [row, ...]}}`` with row indices into the inputs, for
    every class in ``classes`` (empty lists where there is nothing to show). "wrong" holds images of true
    class ``c`` predicted as another class. ``y_true`` / ``y_pred`` are class names or indices; ``y_prob`` is
    ``(N, C)``.

    ``strategy="confident"`` (default) takes the most confident ones: correct rows by descending probability
    of ``c``, wrong rows by descending probability of the (wrong) predicted class, i.e. the most confident
    mistakes; ties go to the lower row index. ``strategy="random"`` samples without replacement with ``seed``.
    """
    if per_class < 0:
        raise ConfigError(f"gallery per_class must be >= 0, got {per_class}")
    if strategy not in ("confident", "random"):
        raise ConfigError(f"unknown gallery strategy {strategy!r}; valid names: confident, random")
    true = _as_indices(y_true, classes, "y_true")
    pred = _as_indices(y_pred, classes, "y_pred")
    prob = np.asarray(y_prob, dtype=np.float64)
    if len(true) != len(pred) or prob.shape != (len(true), len(classes)):
        raise ConfigError(
            f"gallery inputs disagree: {len(true)} true labels, {len(pred)} predictions, "
            f"probabilities of shape {prob.shape} for {len(classes)} classes"
        )
    rng = np.random.default_rng(seed)
    rows = np.arange(len(true))
    selection: dict[str, dict[str, list[int]]] = {}
    for class_index, name in enumerate(classes):
        groups: dict[str, list[int]] = {}
        for group, chosen, score_column in (
            ("correct", (true == class_index) & (pred == class_index), np.full(len(true), class_index)),
            ("wrong", (true == class_index) & (pred != class_index), pred),
        ):
            candidates = rows[chosen]
            if strategy == "random":
                picked = rng.permutation(candidates)[:per_class]
            else:
                scores = prob[candidates, score_column[candidates]]
                picked = candidates[np.lexsort((candidates, -scores))][:per_class]
            groups[group] = [int(row) for row in picked]
        selection[name] = groups
    return selection


# ------------------------------------------------------------------------------------------- rendering


def _new_figure(width_in: float, height_in: float):  # -> matplotlib.figure.Figure
    # The object-oriented API (Figure + Agg canvas) leaves pyplot's global state and backend alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, path: Path, dpi: int) -> Path:  # noqa: ANN001 - matplotlib Figure
    atomic_save(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return path


def _show(axis, pixels: np.ndarray, title: str | None = None, color: str = "black") -> None:  # noqa: ANN001
    axis.imshow(pixels)
    axis.set_xticks([])
    axis.set_yticks([])
    if title:
        axis.set_title(title, fontsize=8, color=color)


def _image_array(image: Image.Image | np.ndarray) -> np.ndarray:
    # overlay_cam with alpha=0 validates and converts the image the same way the overlay does.
    return overlay_cam(image, np.zeros((1, 1), dtype=np.float32), alpha=0.0)


def _empty_note(axis, text: str) -> None:  # noqa: ANN001
    axis.axis("off")
    axis.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, transform=axis.transAxes)


def render_class_gallery(
    items: Sequence[GalleryItem],
    out_path: str | Path,
    title: str | None = None,
    alpha: float = 0.4,
    colormap: str = "jet",
    dpi: int = 100,
) -> Path:
    """One PNG: a row per item with the original image and the CAM overlay, captioned true / predicted / p.

    Correct predictions are captioned in green, wrong ones in red. With no items the PNG says so, so a gallery
    folder always has one file per class.
    """
    out_path = Path(out_path)
    rows = max(len(items), 1)
    figure = _new_figure(5.0, 2.6 * rows + (0.4 if title else 0.0))
    if title:
        figure.suptitle(title, fontsize=11)
    if not items:
        _empty_note(figure.add_subplot(1, 1, 1), "no examples")
        return _save_figure(figure, out_path, dpi)
    axes = figure.subplots(rows, 2, squeeze=False)
    for row, item in enumerate(items):
        color = "green" if item.correct else "red"
        _show(axes[row][0], _image_array(item.image), "original")
        _show(axes[row][1], overlay_cam(item.image, item.cam, alpha, colormap), item.caption, color)
    return _save_figure(figure, out_path, dpi)


def render_gallery_sheet(
    items_by_class: Mapping[str, Sequence[GalleryItem]],
    out_path: str | Path,
    max_per_class: int = 6,
    alpha: float = 0.4,
    colormap: str = "jet",
    dpi: int = 100,
) -> Path:
    """One PNG for all classes: a row per class holding up to ``max_per_class`` overlays, captioned."""
    if not items_by_class:
        raise ConfigError("gallery sheet: no classes to draw")
    out_path = Path(out_path)
    columns = max(1, min(max_per_class, max(len(items) for items in items_by_class.values())))
    rows = len(items_by_class)
    figure = _new_figure(2.4 * columns + 0.6, 2.6 * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    for row, (name, items) in enumerate(items_by_class.items()):
        shown = list(items)[:max_per_class]
        for column in range(columns):
            axis = axes[row][column]
            if column < len(shown):
                item = shown[column]
                caption = f"true: {item.true_label}\npred: {item.predicted_label} p={item.probability:.2f}"
                _show(axis, overlay_cam(item.image, item.cam, alpha, colormap), caption,
                      "green" if item.correct else "red")
            elif column == 0:
                _empty_note(axis, "no examples")
            else:
                axis.axis("off")
        axes[row][0].set_ylabel(name, fontsize=11, rotation=90)
        if not shown:
            axes[row][0].text(-0.05, 0.5, name, ha="right", va="center", fontsize=11,
                              transform=axes[row][0].transAxes)
    return _save_figure(figure, out_path, dpi)


def _file_stem(name: str) -> str:
    """A class name as a safe file name: runs of anything but letters, digits, ``-_.`` become ``_``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "class"


def render_gallery(
    items_by_class: Mapping[str, Sequence[GalleryItem]],
    out_dir: str | Path,
    alpha: float = 0.4,
    colormap: str = "jet",
    dpi: int = 100,
) -> list[Path]:
    """Write ``<class>.png`` for every class and ``sheet.png`` into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    stems: dict[str, str] = {}
    for name in items_by_class:
        stem = _file_stem(name)
        if stem in stems.values() or stem == "sheet":
            raise ConfigError(f"gallery: class {name!r} would overwrite another file ({stem}.png)")
        stems[name] = stem
    paths = [
        render_class_gallery(items, out_dir / f"{stems[name]}.png", name, alpha, colormap, dpi)
        for name, items in items_by_class.items()
    ]
    sheet_path = out_dir / "sheet.png"
    sheet = render_gallery_sheet(items_by_class, sheet_path, alpha=alpha, colormap=colormap, dpi=dpi)
    paths.append(sheet)
    return paths
