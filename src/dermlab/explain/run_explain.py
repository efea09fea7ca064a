"""Explaining a trained model: CAM galleries for a run, one-image overlays, and agreement with lesion masks.

The orchestration behind ``dermlab explain``. Everything is rebuilt from the checkpoint alone (classes,
preprocessing, architecture); CAMs are computed in batches inside one :class:`CamExplainer` block, at the
model's input size, and explain the predicted class unless a target is named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from dermlab.data.images import read_image
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.splits import split_rows
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError, DataError
from dermlab.explain.gallery import GalleryItem, render_gallery, render_gallery_sheet, select_gallery_examples
from dermlab.explain.gradcam import CAM_METHODS, CamExplainer, overlay_cam
from dermlab.io import atomic_save
from dermlab.models.checkpoint import LoadedModel, load_checkpoint, run_dir_of

__all__ = [
    "GalleryResult",
    "ImageExplanation",
    "compute_cams",
    "explain_image",
    "explain_run",
    "inference_device",
    "load_run_predictions",
    "render_overlay",
]

_DISPLAY_MAX_SIDE = 320  # gallery thumbnails: enough for a 2.4-inch panel at 100 dpi, cheap to keep in memory


@dataclass(frozen=True)
class GalleryResult:
    """What :func:`explain_run` wrote."""

    paths: list[Path]  # <class>.png for every class, then sheet.png
    report: Path | None  # the regenerated RUN/report.html
    predictions: Path  # the predictions.csv the examples were chosen from
    shown: int  # number of images drawn


@dataclass(frozen=True)
class ImageExplanation:
    """What :func:`explain_image` wrote and what the model said about the image."""

    path: Path
    predicted: str
    predicted_probability: float
    target: str
    target_probability: float
    empty_map: bool  # the CAM is zero everywhere: no positive evidence for the target in this layer


def inference_device() -> torch.device:
    """Where CAMs are computed: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------- CAMs


def compute_cams(
    model: nn.Module,
    images: Sequence[Image.Image],
    preprocessing: Preprocessing,
    targets: Sequence[int] | None = None,
    method: str = "gradcam",
    batch_size: int = 16,
    device: torch.device | None = None,
) -> np.ndarray:
    """CAMs ``(N, h, w)`` in ``[0, 1]`` at the model's input size for ``targets`` (``None``: the predictions).

    Images are preprocessed as the checkpoint says; one :class:`CamExplainer` serves every batch.
    """
    if batch_size < 1:
        raise ConfigError(f"CAM batch size must be >= 1, got {batch_size}")
    if targets is not None and len(targets) != len(images):
        raise ConfigError(f"CAM targets: {len(targets)} class indices for {len(images)} images")
    height, width = preprocessing.input_size
    if not images:
        return np.zeros((0, height, width), dtype=np.float32)
    device = device or inference_device()
    model = model.to(device)
    transform = create_transform("none", preprocessing, train=False)
    maps = []
    with CamExplainer(model, method=method) as explainer:
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(image) for image in images[start : start + batch_size]]).to(device)
            batch_targets = None if targets is None else list(targets[start : start + batch_size])
            maps.append(explainer(batch, batch_targets))
    return np.concatenate(maps)


@torch.inference_mode()
def _probabilities(
    model: nn.Module, images: Sequence[Image.Image], preprocessing: Preprocessing, batch_size: int = 32
) -> np.ndarray:
    """Softmax probabilities ``(N, C)`` for in-memory images, preprocessed as the checkpoint says."""
    device = next(model.parameters()).device
    transform = create_transform("none", preprocessing, train=False)
    was_training = model.training
    model.eval()
    try:
        outputs = [
            model(torch.stack([transform(image) for image in images[start : start + batch_size]]).to(device))
            .float()
            .softmax(dim=1)
            .cpu()
            for start in range(0, len(images), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(outputs).numpy()


def _thumbnail(image: Image.Image) -> Image.Image:
    shown = image.copy()
    shown.thumbnail((_DISPLAY_MAX_SIDE, _DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    return shown


# ------------------------------------------------------------------------------------------- run galleries


def _read_predictions(path: Path, classes: Sequence[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"image_id": str, "path": str, "true": str, "predicted": str},
                            keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read as CSV ({error})") from None
    needed = ["path", "true", "predicted", *(f"prob_{name}" for name in classes)]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        names = ", ".join(missing)
        raise DataError(f"{path}: missing column(s) {names} for the model's classes {list(classes)}")
    unknown = sorted(set(frame["predicted"]) - set(classes))
    if unknown:
        raise DataError(f"{path}: predicted classes {unknown} are not the model's classes {list(classes)}")
    return frame


def load_run_predictions(
    loaded: LoadedModel,
    run_dir: Path,
    split: str = "test",
    data: str | Path | None = None,
    batch_size: int = 64,
) -> tuple[pd.DataFrame, Path]:
    """The predictions to pick gallery examples from, and the ``predictions.csv`` they live in.

    Without ``data``: ``RUN/eval/<split>/predictions.csv``, made with ``evaluate_frame`` (as
    ``dermlab evaluate`` would) on the run's own split when missing. With ``data``: the same for that
    dataset, in ``RUN/eval/<data name>-<split>/`` (all its images when it has no ``split`` rows of that name).
    """
    data_name = Path(data).name if data else None
    out_dir = run_dir / "eval" / (f"{data_name}-{split}" if data_name else split)
    path = out_dir / "predictions.csv"
    if not path.is_file():
        # Lightning and the plotting stack come in only when inference is needed.
        from dermlab.evaluation.evaluate import evaluate_frame

        frame = _labelled_frame(loaded, run_dir, split, data)
        evaluate_frame(loaded, frame, out_dir, loaded.config.evaluation, batch_size=batch_size)
    return _read_predictions(path, loaded.classes), path


def _labelled_frame(loaded: LoadedModel, run_dir: Path, split: str, data: str | Path | None) -> pd.DataFrame:
    """The rows of ``split`` (``all``: every row) of the run's data or of ``data``, as evaluate reads them."""
    if data is not None:
        from dermlab.data.datasets import load_dataset

        table = load_dataset(data, replace(loaded.config.data, path=str(data), classes=loaded.classes))
        frame = table.frame.assign(split=table.frame["fixed_split"].replace("", "all"))
        unknown = sorted(set(frame["label"]) - set(loaded.classes))
        if unknown:
            raise DataError(f"{data}: classes {unknown} are unknown to the model ({loaded.classes})")
    else:
        if not (run_dir / "splits.csv").is_file():
            raise DataError(f"{run_dir}: no eval/{split}/predictions.csv and no splits.csv; pass --data DATA")
        from dermlab.data.run_data import prepare_run_data

        frame = prepare_run_data(loaded.config, run_dir).frame
    rows = split_rows(frame, split, whole_if_unsplit=data is not None)  # a dataset without splits: all of it
    if len(rows) == 0:
        raise DataError(f"{data or run_dir}: the {split} split is empty")
    return rows.reset_index(drop=True)


def explain_run(
    run_or_checkpoint: str | Path,
    data: str | Path | None = None,
    split: str = "test",
    method: str = "gradcam",
    per_class: int = 4,
    out_dir: str | Path | None = None,
    batch_size: int = 16,
    seed: int = 0,
    strategy: str = "confident",
    write_run_report: bool = True,
) -> GalleryResult:
    """Grad-CAM galleries of a run: up to ``per_class`` correct and ``per_class`` wrong images per true class.

    Examples come from the run's predictions on ``split`` (see :func:`load_run_predictions`); each CAM
    explains the predicted class. Writes ``<class>.png`` and ``sheet.png`` into ``out_dir`` (default
    ``RUN/gallery``) and then regenerates ``RUN/report.html``, which embeds ``RUN/gallery``.
    """
    loaded = load_checkpoint(run_or_checkpoint)
    run_dir = run_dir_of(run_or_checkpoint)
    CAM_METHODS.get(method)  # an unknown method fails here, before any inference
    predictions, predictions_path = load_run_predictions(loaded, run_dir, split, data)
    classes = loaded.classes
    known = predictions[predictions["true"].isin(classes)].reset_index(drop=True)
    if len(known) == 0:
        raise DataError(f"{predictions_path}: no row's true label is among the model's classes {classes}")
    probabilities = known[[f"prob_{name}" for name in classes]].to_numpy(dtype=np.float64)
    selection = select_gallery_examples(
        known["true"].tolist(), known["predicted"].tolist(), probabilities, classes,
        per_class=per_class, seed=seed, strategy=strategy,  # type: ignore[arg-type]
    )
    items_by_class, shown = _gallery_items(loaded, known, probabilities, selection, method, batch_size)
    target_dir = Path(out_dir) if out_dir is not None else run_dir / "gallery"
    paths = render_gallery(items_by_class, target_dir)
    widest = max(len(items) for items in items_by_class.values())
    if widest > 6:  # render_gallery's sheet stops at six per class: redraw it with every example
        render_gallery_sheet(items_by_class, paths[-1], max_per_class=widest)
    report = None
    if write_run_report:
        from dermlab.evaluation.report import write_report

        report = write_report(run_dir)
    return GalleryResult(paths=paths, report=report, predictions=predictions_path, shown=shown)


def _gallery_items(
    loaded: LoadedModel,
    known: pd.DataFrame,
    probabilities: np.ndarray,
    selection: dict[str, dict[str, list[int]]],
    method: str,
    batch_size: int,
) -> tuple[dict[str, list[GalleryItem]], int]:
    """The selected rows' thumbnails and CAMs (of the predicted class), correct then wrong, per true class;
    and how many images that is."""
    classes = loaded.classes
    rows = sorted({row for groups in selection.values() for group in groups.values() for row in group})
    images = {row: read_image(known.at[row, "path"]) for row in rows}
    index = {name: i for i, name in enumerate(classes)}
    cams = compute_cams(
        loaded.model,
        [images[row] for row in rows],
        loaded.preprocessing,
        targets=[index[known.at[row, "predicted"]] for row in rows],
        method=method,
        batch_size=batch_size,
    )
    cam_of = dict(zip(rows, cams))

    def item(row: int) -> GalleryItem:
        predicted = known.at[row, "predicted"]
        return GalleryItem(
            image=_thumbnail(images[row]),
            cam=cam_of[row],
            true_label=known.at[row, "true"],
            predicted_label=predicted,
            probability=float(probabilities[row, index[predicted]]),
        )

    items = {name: [item(row) for row in selection[name]["correct"] + selection[name]["wrong"]] for name in classes}
    return items, len(rows)


# ------------------------------------------------------------------------------------------- one image


def render_overlay(
    image: Image.Image,
    cam: np.ndarray,
    caption: str,
    out_path: str | Path,
    alpha: float = 0.4,
    dpi: int = 100,
) -> Path:
    """A PNG with the image and its CAM overlay side by side, captioned underneath."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_path = Path(out_path)
    if out_path.suffix.lower() != ".png":
        raise ConfigError(f"{out_path}: the overlay is written as PNG; give a .png file name")
    shown = _thumbnail(image) if max(image.size) > 2 * _DISPLAY_MAX_SIDE else image
    aspect = shown.size[1] / shown.size[0]
    figure = Figure(figsize=(8.0, 4.0 * aspect + 0.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for axis, pixels, title in (
        (axes[0], np.asarray(shown.convert("RGB")), "original"),
        (axes[1], overlay_cam(shown, cam, alpha), "class activation map"),
    ):
        axis.imshow(pixels)
        axis.set_title(title, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.supxlabel(caption, fontsize=10)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(out_path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    return out_path


def explain_image(
    run_or_checkpoint: str | Path,
    image_path: str | Path,
    target: str | None = None,
    method: str = "gradcam",
    out_path: str | Path | None = None,
) -> ImageExplanation:
    """CAM of one image for ``target`` (default: the predicted class) written as an overlay PNG.

    ``out_path`` defaults to ``<image stem>_<method>.png`` in the current folder. An unknown ``target`` raises
    ``ConfigError`` naming the model's classes.
    """
    loaded = load_checkpoint(run_or_checkpoint)
    classes = loaded.classes
    if target is not None and target not in classes:
        raise ConfigError(f"unknown target class {target!r}; the model's classes are {', '.join(classes)}")
    CAM_METHODS.get(method)  # an unknown method fails before any image is read
    image_path = Path(image_path)
    image = read_image(image_path)
    model = loaded.model.to(inference_device())
    probabilities = _probabilities(model, [image], loaded.preprocessing)[0]
    predicted = int(probabilities.argmax())
    target_index = predicted if target is None else classes.index(target)
    cam = compute_cams(model, [image], loaded.preprocessing, [target_index], method=method)[0]
    caption = f"predicted: {classes[predicted]} (p={probabilities[predicted]:.2f})"
    if target_index != predicted:
        caption = f"CAM for {classes[target_index]} (p={probabilities[target_index]:.2f}); " + caption
    empty = not bool(np.any(cam > 0))
    if empty:  # gradient CAMs keep only positive evidence; a blank overlay would otherwise look like a bug
        caption += f"; empty map: no positive evidence for {classes[target_index]}"
    caption += f"  [{method}, {loaded.model_id}]"
    safe_method = method.replace("+", "pp")
    out = Path(out_path) if out_path is not None else Path(f"{image_path.stem}_{safe_method}.png")
    render_overlay(image, cam, caption, out)
    return ImageExplanation(
        path=out,
        predicted=classes[predicted],
        predicted_probability=float(probabilities[predicted]),
        target=classes[target_index],
        target_probability=float(probabilities[target_index]),
        empty_map=empty,
    )
