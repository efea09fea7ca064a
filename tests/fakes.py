"""Fake files in the real on-disk layouts (fast: 32x32 JPEGs), shared by the tests.

Import them in a test with ``from fakes import write_jpeg`` (``tests/`` is on ``sys.path`` via pyproject's
``pythonpath``). The fixtures built on them live in ``conftest.py``.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HAM_CLASSES = ["nv", "mel", "bkl", "bcc", "akiec", "vasc", "df"]
HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
HAM_IMAGES_PER_CLASS = 8
HAM_LESION_SIZES = (2, 2, 1, 1, 1, 1)  # images per lesion: 8 images, 6 lesions per class
FOLDER_CLASSES = ["acne", "eczema", "nevi"]

# One colour per class, far apart, so a tiny model can learn the fixtures.
_CLASS_COLOURS = [
    (200, 60, 60),
    (60, 200, 60),
    (60, 60, 200),
    (200, 200, 60),
    (200, 60, 200),
    (60, 200, 200),
    (120, 120, 120),
]


def class_colour(index: int, shade: int = 0) -> tuple[int, int, int]:
    """Colour of class ``index``; ``shade`` varies it a little per image."""
    r, g, b = _CLASS_COLOURS[index % len(_CLASS_COLOURS)]
    return (min(r + shade, 255), min(g + shade, 255), min(b + shade, 255))


def write_jpeg(
    path: str | Path, size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (180, 120, 100)
) -> Path:
    """Write a small JPEG: skin-toned border around a ``color`` square; ``size`` is (width, height).

    Three darker skin spots, placed by the file name and the colour, make every image a picture of its own:
    without them images of one class differ by a shade only, and dermlab's copy detection
    (``dermlab.data.duplicates``) rightly calls them near copies of each other.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (224, 172, 150))
    width, height = size
    spots = random.Random(f"{path.name} {color}")  # str seeds are hashed with SHA-512: the same in every run
    radius = max(2, min(width, height) // 6)
    for _ in range(3):
        x, y = spots.randrange(width), spots.randrange(height)
        ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), fill=(150, 100, 80))
    image.paste(color, (width // 4, height // 4, width - width // 4, height - height // 4))
    image.save(path, format="JPEG", quality=90)
    return path


def write_ham10000(root: Path, images_per_class: int = HAM_IMAGES_PER_CLASS) -> Path:
    """A fake HAM10000 folder: the real metadata columns, images alternating between part_1 and part_2."""
    rows = []
    number = 24306
    for class_index, dx in enumerate(HAM_CLASSES):
        default = images_per_class == HAM_IMAGES_PER_CLASS
        lesion_sizes = list(HAM_LESION_SIZES) if default else [1] * images_per_class
        image_in_class = 0
        for lesion_index, lesion_size in enumerate(lesion_sizes):
            lesion_id = f"HAM_{class_index:03d}{lesion_index:04d}"
            for _ in range(lesion_size):
                image_id = f"ISIC_{number:07d}"
                part = 1 + number % 2
                write_jpeg(
                    root / f"HAM10000_images_part_{part}" / f"{image_id}.jpg",
                    color=class_colour(class_index, 4 * image_in_class),
                )
                age = "" if image_in_class == 3 else f"{30 + 5 * image_in_class}.0"
                sex = ("male", "female", "unknown")[image_in_class % 3]
                rows.append([lesion_id, image_id, dx, "histo", age, sex, "back"])
                number += 1
                image_in_class += 1
    with open(root / "HAM10000_metadata.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(HAM_COLUMNS)
        writer.writerows(rows)
    return root


def write_noise_images(folder: Path, count: int, colour: tuple[int, int, int], seed: int) -> list[str]:
    """``count`` 40x40 PNGs of Gaussian noise (sd 25) around one RGB ``colour``, seeded; their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index}.png"
        Image.fromarray(np.clip(rng.normal(colour, 25, (40, 40, 3)), 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths
