"""Synthetic dermoscopy images: the embedded demo dataset and the test fixture generator.

Seven classes in HAM10000's proportions, each lesion photographed one to four times (rotated, zoomed,
relit views sharing a ``lesion_id``). Every class follows its textbook dermoscopic description, and every
image carries the nuisances of real dermoscopy (skin tones, hairs, dark scope corners, uneven light, ruler
marks). Traits are sometimes borrowed from another class and vary widely within a class, so a small CNN can
learn the task but does not solve it perfectly. Everything is drawn with vectorised numpy on coordinate grids
plus PIL drawing, and is byte-for-byte deterministic from the seed.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from dermlab.errors import ConfigError
from dermlab.io import atomic_write_text

__all__ = [
    "SYNTHETIC_CLASS_PROPORTIONS",
    "MIN_IMAGES_PER_CLASS",
    "MIN_LESIONS_PER_CLASS",
    "MIN_IMAGES",
    "MIN_SIZE",
    "MAX_SIZE",
    "METADATA_COLUMNS",
    "allocate_class_counts",
    "generate_synthetic_dataset",
]

# HAM10000 image counts per diagnosis (10,015 images); the order is HAM10000's class order.
SYNTHETIC_CLASS_PROPORTIONS: dict[str, int] = {
    "nv": 6705,
    "mel": 1113,
    "bkl": 1099,
    "bcc": 514,
    "akiec": 327,
    "vasc": 142,
    "df": 115,
}
# Five images over at least three lesions per class: enough for a lesion-grouped 6:2:2 split to put one
# lesion of every class in each of train, val and test.
MIN_IMAGES_PER_CLASS = 5
MIN_LESIONS_PER_CLASS = 3
MIN_IMAGES = MIN_IMAGES_PER_CLASS * len(SYNTHETIC_CLASS_PROPORTIONS)
MIN_SIZE = 16
MAX_SIZE = 1024
METADATA_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]

_CLASSES = list(SYNTHETIC_CLASS_PROPORTIONS)
_LAYOUTS = ("ham10000", "folders")
_JPEG_QUALITY = 90
# Views per lesion: HAM10000 has 1.34 images per lesion; a little more here so lesion grouping matters.
_VIEW_CHOICES = np.array([1, 2, 3, 4])
_VIEW_PROBABILITIES = np.array([0.55, 0.27, 0.12, 0.06])
# Probability that one trait group (shape, palette, structures) of a lesion is drawn from another class.
_BORROW_PROBABILITY = 0.12

# Metadata distributions, roughly as in HAM10000.
_LOCALIZATIONS = {
    "back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118, "abdomen": 1022,
    "face": 745, "chest": 407, "foot": 319, "unknown": 234, "neck": 168, "scalp": 128, "hand": 90,
    "ear": 56, "genital": 48, "acral": 7,
}
_DX_TYPES = {  # per class: histo, follow_up, consensus, confocal
    "nv": (0.35, 0.55, 0.10, 0.00),
    "mel": (0.98, 0.00, 0.02, 0.00),
    "bkl": (0.60, 0.00, 0.30, 0.10),
    "bcc": (1.00, 0.00, 0.00, 0.00),
    "akiec": (1.00, 0.00, 0.00, 0.00),
    "vasc": (0.60, 0.00, 0.40, 0.00),
    "df": (0.50, 0.00, 0.50, 0.00),
}
_AGE_MEANS = {"nv": 47, "mel": 61, "bkl": 64, "bcc": 67, "akiec": 67, "vasc": 50, "df": 53}


@dataclass
class _Lesion:
    """Everything that is fixed for one lesion; views add pose and lighting."""

    # shape
    radius: float
    aspect: float
    orientation: float
    harmonics: np.ndarray  # (k, 2): amplitude, phase for k = 1..K
    edge: float
    # palette (RGB in 0..1)
    colors: list[np.ndarray]
    opacity: float
    mottle: float
    # structures
    network: float = 0.0
    dots: int = 0
    blue_grey: float = 0.0
    vessels: int = 0
    ulcer: bool = False
    scales: float = 0.0
    lobules: int = 0
    central_white: float = 0.0
    cysts: int = 0
    # skin and hair
    skin: np.ndarray = field(default_factory=lambda: np.array([0.85, 0.65, 0.55]))
    hairs: int = 0


def allocate_class_counts(images: int) -> dict[str, int]:
    """Images per class for ``images`` in total: HAM10000's proportions, at least MIN_IMAGES_PER_CLASS each.

    Classes below the minimum are topped up from the largest class (nv).
    """
    _check_images(images)
    weights = np.array(list(SYNTHETIC_CLASS_PROPORTIONS.values()), dtype=float)
    exact = images * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: images - counts.sum()]] += 1
    for index in range(len(counts)):
        shortfall = MIN_IMAGES_PER_CLASS - counts[index]
        if shortfall > 0:
            counts[index] += shortfall
            counts[int(np.argmax(counts))] -= shortfall  # take from the largest class (nv)
    return {name: int(count) for name, count in zip(_CLASSES, counts)}


def generate_synthetic_dataset(
    out: str | Path,
    images: int = 2000,
    size: int = 128,
    layout: Literal["ham10000", "folders"] = "ham10000",
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dermoscopy dataset to ``out`` and return ``out``.

    Images are JPEGs ``size`` pixels high and ``round(size * 4 / 3)`` wide (HAM10000's 4:3 aspect).
    ``layout="ham10000"`` writes ``HAM10000_metadata.csv`` (``lesion_id, image_id, dx, dx_type, age, sex,
    localization``) and ``HAM10000_images/<image_id>.jpg``; ``layout="folders"`` writes
    ``<class>/<image_id>.jpg``. ``images`` must be at least MIN_IMAGES (35: five images over three lesions
    per class). ``out`` must be missing or empty unless ``overwrite`` is set, which first removes what a
    previous run wrote there. The same arguments always give byte-identical files.
    """
    _check_images(images)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"size: must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}")
    if layout not in _LAYOUTS:
        raise ConfigError(f"layout: must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    root = Path(out)
    _prepare_output(root, overwrite)

    images, size, seed = int(images), int(size), int(seed)
    height, width = size, int(round(size * 4 / 3))
    rows = _plan_dataset(allocate_class_counts(images), seed)
    image_dir = root / "HAM10000_images" if layout == "ham10000" else None
    for folder in [image_dir] if image_dir else [root / name for name in _CLASSES]:
        folder.mkdir(parents=True, exist_ok=True)

    for lesion_rows in _group_by_lesion(rows):
        first = lesion_rows[0]
        rng = np.random.default_rng([seed, first["_class_index"], first["_lesion_index"]])
        lesion = _sample_lesion(first["dx"], rng)
        canvas = _render_canvas(lesion, rng, height, width)
        for row in lesion_rows:
            view = _render_view(canvas, rng, height, width)
            folder = image_dir if image_dir else root / row["dx"]
            view.save(folder / f"{row['image_id']}.jpg", "JPEG", quality=_JPEG_QUALITY, subsampling=0)

    if layout == "ham10000":
        _write_metadata(root / "HAM10000_metadata.csv", rows)
    return root


# ----------------------------------------------------------------------------------------------- planning


def _check_images(images: int) -> None:
    if isinstance(images, bool) or not isinstance(images, (int, np.integer)) or images < MIN_IMAGES:
        raise ConfigError(
            f"images: must be an integer of at least {MIN_IMAGES} "
            f"({MIN_IMAGES_PER_CLASS} per class), got {images!r}"
        )


def _prepare_output(root: Path, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a folder")
    if not root.exists() or not any(root.iterdir()):
        return
    ours = [root / "HAM10000_metadata.csv", root / "HAM10000_images", *(root / name for name in _CLASSES)]
    if not overwrite:
        raise ConfigError(f"{root}: folder is not empty (overwrite replaces a synthetic dataset)")
    for path in ours:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _plan_dataset(counts: dict[str, int], seed: int) -> list[dict]:
    """One metadata row per image; views of a lesion are adjacent, ids are shuffled across classes."""
    rng = np.random.default_rng([seed, 1_000_003])
    lesions: list[tuple[int, int, int]] = []  # class index, lesion index, views
    for class_index, name in enumerate(_CLASSES):
        for lesion_index, views in enumerate(_split_into_lesions(counts[name], rng)):
            lesions.append((class_index, lesion_index, views))
    total = sum(counts.values())
    image_numbers = rng.permutation(total) + 1
    lesion_numbers = rng.permutation(len(lesions)) + 1
    localizations = list(_LOCALIZATIONS)
    location_p = np.array(list(_LOCALIZATIONS.values()), dtype=float)
    location_p /= location_p.sum()

    rows: list[dict] = []
    for number, (class_index, lesion_index, views) in zip(lesion_numbers, lesions):
        name = _CLASSES[class_index]
        dx_type = ["histo", "follow_up", "consensus", "confocal"][rng.choice(4, p=_DX_TYPES[name])]
        age: float = float(np.clip(5 * round(rng.normal(_AGE_MEANS[name], 15) / 5), 0, 85))
        if rng.random() < 0.01:
            age = math.nan
        sex = str(rng.choice(["male", "female", "unknown"], p=[0.54, 0.455, 0.005]))
        localization = localizations[rng.choice(len(localizations), p=location_p)]
        for _ in range(views):
            rows.append(
                {
                    "lesion_id": f"HAM_{number:07d}",
                    "image_id": f"ISIC_{image_numbers[len(rows)]:07d}",
                    "dx": name,
                    "dx_type": dx_type,
                    "age": age,
                    "sex": sex,
                    "localization": localization,
                    "_class_index": class_index,
                    "_lesion_index": lesion_index,
                }
            )
    return rows


def _split_into_lesions(count: int, rng: np.random.Generator) -> list[int]:
    """Split ``count`` images into lesions of 1-4 views, with at least MIN_LESIONS_PER_CLASS lesions."""
    views: list[int] = []
    while sum(views) < count:
        views.append(int(min(rng.choice(_VIEW_CHOICES, p=_VIEW_PROBABILITIES), count - sum(views))))
    while len(views) < min(MIN_LESIONS_PER_CLASS, count):
        largest = int(np.argmax(views))
        views[largest] -= 1
        views.append(1)
    return views


def _group_by_lesion(rows: list[dict]) -> list[list[dict]]:
    groups: list[list[dict]] = []
    for row in rows:
        if groups and groups[-1][0]["lesion_id"] == row["lesion_id"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _write_metadata(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(METADATA_COLUMNS)
    for row in rows:
        values = dict(row, age="" if math.isnan(row["age"]) else f"{row['age']:.1f}")
        writer.writerow([values[column] for column in METADATA_COLUMNS])
    atomic_write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------ class traits


def _color(rng: np.random.Generator, rgb: tuple[float, float, float], spread: float = 0.07) -> np.ndarray:
    base = np.array(rgb) * (1 + rng.normal(0, spread)) * (1 + rng.normal(0, spread / 2, 3))
    return np.clip(base, 0.02, 0.98)


def _shape_traits(name: str, rng: np.random.Generator) -> dict:
    """Border regularity and size: (radius range, harmonic amplitude, highest harmonic, edge softness)."""
    radius, amplitude, top, edge = {
        "nv": ((0.16, 0.34), 0.03, 4, (0.04, 0.10)),
        "mel": ((0.22, 0.40), 0.13, 9, (0.02, 0.06)),
        "bkl": ((0.18, 0.38), 0.07, 6, (0.02, 0.05)),
        "bcc": ((0.16, 0.34), 0.08, 6, (0.05, 0.12)),
        "akiec": ((0.16, 0.34), 0.09, 8, (0.08, 0.16)),
        "vasc": ((0.15, 0.32), 0.06, 6, (0.03, 0.07)),
        "df": ((0.12, 0.26), 0.03, 4, (0.08, 0.16)),
    }[name]
    harmonics = np.zeros((top, 2))
    for k in range(1, top + 1):
        harmonics[k - 1] = (abs(rng.normal(0, amplitude * (1.6 if k == 1 else 1.0) / math.sqrt(k))),
                            rng.uniform(0, 2 * math.pi))
    return {
        "radius": rng.uniform(*radius),
        "aspect": rng.uniform(0.7 if name in ("mel", "akiec") else 0.8, 1.0),
        "orientation": rng.uniform(0, math.pi),
        "harmonics": harmonics,
        "edge": rng.uniform(*edge),
    }


def _palette_traits(name: str, rng: np.random.Generator) -> dict:
    """Colours and their mixing: uniform brown for nv, several colours for mel, and so on."""
    if name == "nv":
        base = [(0.50, 0.32, 0.22), (0.38, 0.23, 0.15), (0.60, 0.42, 0.30)][rng.integers(3)]
        colors = [_color(rng, base), _color(rng, tuple(np.array(base) * 0.85), 0.04)]
        return {"colors": colors, "opacity": rng.uniform(0.75, 0.95), "mottle": rng.uniform(0.05, 0.25)}
    if name == "mel":
        choices = [(0.30, 0.18, 0.12), (0.14, 0.09, 0.08), (0.45, 0.47, 0.56), (0.55, 0.35, 0.25),
                   (0.70, 0.38, 0.36)]
        picked = [0, 1, 2, *rng.choice([3, 4], size=rng.integers(0, 3), replace=False)]
        colors = [_color(rng, choices[i], 0.09) for i in picked]
        return {"colors": colors, "opacity": rng.uniform(0.8, 0.97), "mottle": rng.uniform(0.6, 1.0)}
    if name == "bkl":
        colors = [_color(rng, rgb) for rgb in ((0.70, 0.56, 0.36), (0.50, 0.36, 0.22), (0.80, 0.70, 0.50))]
        return {"colors": colors, "opacity": rng.uniform(0.7, 0.92), "mottle": rng.uniform(0.5, 0.9)}
    if name == "bcc":
        colors = [_color(rng, (0.86, 0.56, 0.56)), _color(rng, (0.78, 0.44, 0.46))]
        return {"colors": colors, "opacity": rng.uniform(0.45, 0.75), "mottle": rng.uniform(0.2, 0.5)}
    if name == "akiec":
        colors = [_color(rng, rgb) for rgb in ((0.82, 0.60, 0.52), (0.70, 0.50, 0.40), (0.85, 0.50, 0.48))]
        return {"colors": colors, "opacity": rng.uniform(0.45, 0.75), "mottle": rng.uniform(0.4, 0.8)}
    if name == "vasc":
        colors = [_color(rng, rgb) for rgb in ((0.72, 0.16, 0.22), (0.45, 0.16, 0.36), (0.30, 0.06, 0.16))]
        return {"colors": colors, "opacity": rng.uniform(0.8, 0.97), "mottle": rng.uniform(0.3, 0.6)}
    colors = [_color(rng, (0.60, 0.40, 0.32)), _color(rng, (0.52, 0.32, 0.26))]  # df
    return {"colors": colors, "opacity": rng.uniform(0.55, 0.8), "mottle": rng.uniform(0.1, 0.35)}


def _structure_traits(name: str, rng: np.random.Generator) -> dict:
    """Dermoscopic structures that mark the class (each present with a class-specific probability)."""
    chance = rng.random
    if name == "nv":
        return {"network": rng.uniform(0.1, 0.35) if chance() < 0.7 else 0.0,
                "dots": int(rng.integers(0, 6)) if chance() < 0.3 else 0}
    if name == "mel":
        return {"network": rng.uniform(0.25, 0.5) if chance() < 0.6 else 0.0,
                "dots": int(rng.integers(4, 16)),
                "blue_grey": rng.uniform(0.4, 0.85) if chance() < 0.75 else 0.0}
    if name == "bkl":
        return {"cysts": int(rng.integers(3, 14)) if chance() < 0.7 else 0,
                "scales": rng.uniform(0.05, 0.2) if chance() < 0.3 else 0.0}
    if name == "bcc":
        return {"vessels": int(rng.integers(2, 5)) if chance() < 0.85 else 0,
                "ulcer": bool(chance() < 0.35),
                "blue_grey": rng.uniform(0.3, 0.6) if chance() < 0.3 else 0.0}
    if name == "akiec":
        return {"scales": rng.uniform(0.25, 0.55),
                "network": rng.uniform(0.1, 0.25) if chance() < 0.4 else 0.0}
    if name == "vasc":
        return {"lobules": int(rng.integers(3, 9))}
    return {"central_white": rng.uniform(0.35, 0.6) if chance() < 0.85 else 0.0,  # df
            "network": rng.uniform(0.1, 0.25) if chance() < 0.5 else 0.0}


def _sample_lesion(name: str, rng: np.random.Generator) -> _Lesion:
    """Draw a lesion of class ``name``; each trait group comes from another class now and then."""
    traits: dict = {}
    for draw in (_shape_traits, _palette_traits, _structure_traits):
        donor = name if rng.random() >= _BORROW_PROBABILITY else _CLASSES[rng.integers(len(_CLASSES))]
        traits.update(draw(donor, rng))
    # Fitzpatrick I-V, mostly fair as in HAM10000; dermoscopy skin looks pink-beige.
    darkness = rng.beta(1.3, 4.0)
    skin = (1 - darkness) * np.array([0.93, 0.76, 0.68]) + darkness * np.array([0.45, 0.30, 0.22])
    skin = np.clip(skin * (1 + rng.normal(0, 0.04, 3)), 0, 1)
    hairs = int(rng.integers(1, 16)) if rng.random() < 0.35 else 0
    return _Lesion(**traits, skin=skin, hairs=hairs)


# ------------------------------------------------------------------------------------------------ drawing


def _smooth_noise(rng: np.random.Generator, side: int, cells: int) -> np.ndarray:
    """Blobby noise of unit standard deviation: a coarse random grid upsampled bicubically."""
    grid = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    field_ = np.asarray(Image.fromarray(grid).resize((side, side), Image.Resampling.BICUBIC))
    return (field_ - field_.mean()) / (field_.std() + 1e-6)


def _blend(image: np.ndarray, color: np.ndarray, alpha: np.ndarray) -> None:
    """In place: image = image * (1 - alpha) + color * alpha."""
    alpha = np.clip(alpha, 0, 1)[..., None]
    image *= 1 - alpha
    image += alpha * color


@dataclass(frozen=True)
class _Canvas:
    """The square canvas's coordinates: in image heights, and in the lesion's own frame (``q``: 1 on its border)."""

    side: int
    height: int
    x: np.ndarray
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    q: np.ndarray
    theta: np.ndarray
    inside: np.ndarray  # soft lesion mask, 1 inside the border
    cells: int  # noise-field resolution


def _render_canvas(lesion: _Lesion, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """The lesion on skin (with hairs) on a square canvas large enough for any rotated, zoomed-out view.

    Painted in layers, in this order (the random draws follow it): skin and lesion body, the dermoscopic
    structures, then drawn marks (lobules, dots, cysts, ulcer, vessels, hairs).
    """
    canvas = _lesion_canvas(lesion, height, width)
    image = _paint_skin_and_body(lesion, rng, canvas)
    _paint_structures(lesion, rng, canvas, image)
    _paint_marks(lesion, rng, canvas, image)
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))


def _lesion_canvas(lesion: _Lesion, height: int, width: int) -> _Canvas:
    """The canvas side and coordinate fields for ``lesion``'s shape, orientation and border."""
    side = int(math.ceil(math.hypot(height, width) / 0.85)) + 4
    coords = (np.arange(side, dtype=np.float32) - side / 2) / height  # in image heights
    x, y = coords[None, :], coords[:, None]
    cos_o, sin_o = math.cos(lesion.orientation), math.sin(lesion.orientation)
    u = (x * cos_o + y * sin_o) / lesion.aspect
    v = -x * sin_o + y * cos_o
    r = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    border = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(lesion.harmonics, start=1):
        border += amplitude * np.cos(k * theta + phase)
    border *= lesion.radius
    q = r / np.maximum(border, 0.02)  # 0 at the centre, 1 on the border
    inside = 1 / (1 + np.exp(np.clip((q - 1) / lesion.edge, -30, 30)))
    cells = max(4, side // 24)
    return _Canvas(side, height, x, y, u, v, q, theta, inside, cells)


def _paint_skin_and_body(lesion: _Lesion, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Mottled skin with erythema, then the lesion body: colours mixed by noise, blended in by the soft mask."""
    side, cells, inside = canvas.side, canvas.cells, canvas.inside
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = lesion.skin * (1 + 0.04 * _smooth_noise(rng, side, cells))[..., None]
    erythema = 0.08 + 0.06 * _smooth_noise(rng, side, cells // 2 + 2)
    _blend(image, np.array([0.85, 0.45, 0.45]), erythema)

    # Lesion body: colours mixed by noise fields (uniform when mottle is low), stronger towards the centre.
    body = np.empty_like(image)
    body[:] = lesion.colors[0]
    for color in lesion.colors[1:]:
        weight = 0.5 + 0.5 * np.tanh(2.2 * _smooth_noise(rng, side, cells) - 0.6)
        _blend(body, color, weight * lesion.mottle)
    body *= (1 + 0.06 * _smooth_noise(rng, side, cells * 3))[..., None]
    _blend(image, body, inside * lesion.opacity)
    return image


def _paint_structures(lesion: _Lesion, rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> None:
    """Pigment network, blue-grey veil, scales and a central white patch, each as strong as the lesion says."""
    side, cells, inside, q, u, v, theta = canvas.side, canvas.cells, canvas.inside, canvas.q, canvas.u, canvas.v, canvas.theta
    if lesion.network > 0:  # pigment network: a dark mesh, warped, fading to the periphery
        period = 0.045 + 0.01 * rng.random()
        warp = (0.01 + 0.08 * lesion.network) * _smooth_noise(rng, side, cells)  # stronger = more atypical
        mesh = np.abs(np.sin((u + warp) * math.pi / period)) * np.abs(np.sin((v - warp) * math.pi / period))
        fade = np.clip(1.6 - q, 0, 1) * np.clip(0.6 + 0.5 * _smooth_noise(rng, side, cells), 0, 1)
        _blend(image, lesion.colors[0] * 0.5, lesion.network * inside * (1 - mesh) ** 5 * fade)
    if lesion.blue_grey > 0:  # blue-white veil / blue-grey areas, off-centre
        blob = _smooth_noise(rng, side, max(3, cells // 2)) + 0.8 * np.cos(theta - rng.uniform(0, 6.3))
        _blend(image, np.array([0.48, 0.52, 0.62]), lesion.blue_grey * inside * np.clip(blob - 0.3, 0, 1))
    if lesion.scales > 0:  # rough keratin: fine white speckle
        speckle = _smooth_noise(rng, side, side // 3)
        _blend(image, np.array([0.93, 0.90, 0.85]), lesion.scales * inside * np.clip(speckle - 0.5, 0, 1))
    if lesion.central_white > 0:  # dermatofibroma: central white scar-like patch
        patch = 1 / (1 + np.exp(np.clip((q - 0.45 - 0.1 * _smooth_noise(rng, side, cells)) / 0.08, -30, 30)))
        _blend(image, np.array([0.92, 0.88, 0.85]), lesion.central_white * patch)


def _paint_marks(lesion: _Lesion, rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> None:
    """Drawn marks: vascular lobules, dots and globules, cysts, ulceration, arborising vessels, hairs."""
    side, height, cells, inside, q, x, y = canvas.side, canvas.height, canvas.cells, canvas.inside, canvas.q, canvas.x, canvas.y
    overlay = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(overlay)
    center = side / 2
    scale = height * lesion.radius
    line = max(1, round(height / 128))
    if lesion.lobules:  # vascular lesion: red-purple lobules with pale septa
        layer = np.zeros((side, side), dtype=np.float32)
        for _ in range(lesion.lobules):
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.75)
            cx, cy = (math.cos(angle) * dist * lesion.radius, math.sin(angle) * dist * lesion.radius)
            rad = lesion.radius * rng.uniform(0.2, 0.45)
            layer = np.maximum(layer, np.clip(1 - ((x - cx) ** 2 + (y - cy) ** 2) / rad**2, 0, 1))
        _blend(image, (lesion.colors[0] + lesion.colors[-1]) / 2, 0.8 * layer**0.5 * inside)  # red-purple
        _blend(image, np.array([0.85, 0.72, 0.72]), 0.35 * inside * (layer < 0.08))
    for _ in range(lesion.dots):  # dark dots and globules
        angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.95)
        px, py = center + math.cos(angle) * dist * scale, center + math.sin(angle) * dist * scale
        rad = max(0.6, height * rng.uniform(0.006, 0.018))
        draw.ellipse((px - rad, py - rad, px + rad, py + rad), fill=int(rng.integers(150, 230)))
    dots = np.asarray(overlay, dtype=np.float32) / 255
    _blend(image, np.array([0.10, 0.07, 0.07]), dots)

    if lesion.cysts:  # milia-like cysts: small white-yellow dots
        overlay = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(overlay)
        for _ in range(lesion.cysts):
            angle, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.85)
            px, py = center + math.cos(angle) * dist * scale, center + math.sin(angle) * dist * scale
            rad = max(0.6, height * rng.uniform(0.006, 0.014))
            draw.ellipse((px - rad, py - rad, px + rad, py + rad), fill=200)
        _blend(image, np.array([0.95, 0.92, 0.78]), np.asarray(overlay, dtype=np.float32) / 255)
    if lesion.ulcer:  # ulceration: dark red-brown crust
        spot = _smooth_noise(rng, side, max(3, cells // 2)) + 1.5 * (1 - q)
        _blend(image, np.array([0.38, 0.12, 0.10]), 0.85 * np.clip(spot - 1.2, 0, 1) * inside)
    if lesion.vessels:  # arborising vessels: branching red lines tapering outwards
        overlay = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(overlay)
        for _ in range(lesion.vessels):
            angle = rng.uniform(0, 2 * math.pi)
            start = (center + math.cos(angle) * scale * rng.uniform(0.5, 0.9),
                     center + math.sin(angle) * scale * rng.uniform(0.5, 0.9))
            inward = angle + math.pi + rng.normal(0, 0.4)
            _draw_branch(draw, rng, start, inward, scale * 0.45, 2 * line + 1, 3)
        _blend(image, np.array([0.68, 0.08, 0.14]), np.asarray(overlay, dtype=np.float32) / 255)

    if lesion.hairs:  # dark hairs crossing the field
        overlay = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(overlay)
        for _ in range(lesion.hairs):
            p0, p1, p2 = rng.uniform(0, side, (3, 2))
            t = np.linspace(0, 1, 12)[:, None]
            points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
            ink = int(rng.integers(140, 230))
            draw.line([tuple(p) for p in points], fill=ink, width=line + 1, joint="curve")
        hair_color = np.array([0.12, 0.09, 0.07]) * rng.uniform(0.5, 1.5)
        _blend(image, hair_color, np.asarray(overlay, dtype=np.float32) / 255)


def _draw_branch(draw: ImageDraw.ImageDraw, rng: np.random.Generator, start: tuple[float, float],
                 angle: float, length: float, width: int, depth: int) -> None:
    end = (start[0] + math.cos(angle) * length, start[1] + math.sin(angle) * length)
    draw.line([start, end], fill=int(rng.integers(170, 240)), width=max(1, width))
    if depth > 1:
        for turn in (-1, 1):
            turned = angle + turn * rng.uniform(0.3, 0.9)
            _draw_branch(draw, rng, end, turned, length * rng.uniform(0.45, 0.7), width - 1, depth - 1)


def _render_view(canvas: Image.Image, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """One photograph of the lesion: rotation, zoom, shift, then lighting, scope corners, ruler, noise."""
    angle = rng.uniform(0, 2 * math.pi)
    zoom = rng.uniform(0.85, 1.2)
    shift = rng.normal(0, 0.05 * height, 2)
    cos_a, sin_a = math.cos(angle) / zoom, math.sin(angle) / zoom
    side = canvas.size[0]
    a, b, d, e = cos_a, -sin_a, sin_a, cos_a
    c = side / 2 + shift[0] - (a * width / 2 + b * height / 2)
    f = side / 2 + shift[1] - (d * width / 2 + e * height / 2)
    view = canvas.transform((width, height), Image.Transform.AFFINE, (a, b, c, d, e, f),
                            resample=Image.Resampling.BILINEAR)

    if rng.random() < 0.12:  # ruler marks along one edge
        draw = ImageDraw.Draw(view)
        step = max(3, round(height * rng.uniform(0.04, 0.07)))
        ink = tuple(int(rng.integers(20, 70)) for _ in range(3))
        edge = height - 1 - round(height * rng.uniform(0.03, 0.12))
        for i, position in enumerate(range(int(rng.integers(0, step)), width, step)):
            tick = round(height * (0.06 if i % 5 == 0 else 0.03))
            draw.line([(position, edge), (position, edge - tick)], fill=ink, width=1)
        draw.line([(0, edge), (width, edge)], fill=ink, width=1)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.ROTATE_180)

    image = np.asarray(view, dtype=np.float32) / 255
    xs = (np.arange(width, dtype=np.float32) - width / 2) / height
    ys = (np.arange(height, dtype=np.float32) - height / 2) / height
    x, y = xs[None, :], ys[:, None]
    light_angle = rng.uniform(0, 2 * math.pi)
    gradient = x * math.cos(light_angle) + y * math.sin(light_angle)
    light = rng.uniform(0.85, 1.1) * (1 + rng.uniform(0, 0.35) * gradient)  # uneven illumination
    radius2 = x * x + y * y
    light = light * (1 - rng.uniform(0.1, 0.35) * radius2)  # lens falloff
    if rng.random() < 0.45:  # dermoscope: dark corners outside the circular field
        scope = rng.uniform(0.55, 0.8)
        light = light / (1 + np.exp(np.clip((np.sqrt(radius2) - scope) / 0.015, -30, 30)))
    cast = 1 + rng.normal(0, 0.025, 3)  # white balance
    image = image * light[..., None] * cast
    image += rng.normal(0, rng.uniform(0.005, 0.025), image.shape)
    return Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
