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
from pathlib import Path
from typing import Literal

import numpy as np

from dermlab.data.synthetic_drawing import Lesion, render_canvas, render_view
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
        canvas = render_canvas(lesion, rng, height, width)
        for row in lesion_rows:
            view = render_view(canvas, rng, height, width)
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


def _sample_lesion(name: str, rng: np.random.Generator) -> Lesion:
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
    return Lesion(**traits, skin=skin, hairs=hairs)
