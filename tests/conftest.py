"""Fixtures: tiny datasets in the real on-disk layouts, written to ``tmp_path``."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from fakes import (  # noqa: F401  (re-exported for older imports)
    HAM_CLASSES,
    HAM_COLUMNS,
    HAM_IMAGES_PER_CLASS,
    HAM_LESION_SIZES,
    FOLDER_CLASSES,
    class_colour,
    write_jpeg,
    write_ham10000,
)

# Tiny models gain nothing from intra-op threads, and on a 2-core machine they oversubscribe the cores.
torch.set_num_threads(1)

# Hypothesis: the suite (`make test`, CI) is derandomized, so a run can only fail for the code it runs, never
# for the luck of the draw; every case a search once found is kept as an explicit @example. `make fuzz`
# (HYPOTHESIS_PROFILE=fuzz) searches at random, and longer, for new ones.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

pytest_plugins = ["pytester", "ci_rules"]  # ci_rules: under CI=true a skipped test fails


@pytest.fixture(autouse=True)
def _seed_every_test() -> None:
    """The same random draws for a test whatever ran before it (or whether it runs alone)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def ham_dir(tmp_path: Path) -> Path:
    """Fake HAM10000: 7 classes x 8 images (6 lesions each, two with 2 images), split over part_1 / part_2."""
    return write_ham10000(tmp_path / "HAM10000")


@pytest.fixture
def folders_dir(tmp_path: Path) -> Path:
    """``root/<class>/*.jpg`` with 3 classes of 6 images."""
    root = tmp_path / "folders"
    for class_index, name in enumerate(FOLDER_CLASSES):
        for i in range(6):
            write_jpeg(root / name / f"img{i:02d}.jpg", color=class_colour(class_index, 4 * i))
    return root


@pytest.fixture
def folders_split_dir(tmp_path: Path) -> Path:
    """``root/train/<class>/`` (6 images each) and ``root/test/<class>/`` (2 images each), 3 classes."""
    root = tmp_path / "folders_split"
    for split, count in (("train", 6), ("test", 2)):
        for class_index, name in enumerate(FOLDER_CLASSES):
            for i in range(count):
                path = root / split / name / f"{split}{i:02d}.jpg"
                write_jpeg(path, color=class_colour(class_index, 4 * i))
    return root


@pytest.fixture
def csv_dataset(tmp_path: Path) -> Path:
    """``labels.csv`` (image_id, path, label, lesion_id) beside ``images/``; 3 classes x 5 images (3 lesions).

    Returns the CSV file."""
    root = tmp_path / "csvdata"
    rows = []
    for class_index, name in enumerate(FOLDER_CLASSES):
        for i in range(5):
            relative = f"images/{name}_{i}.jpg"
            write_jpeg(root / relative, color=class_colour(class_index, 4 * i))
            rows.append([f"{name}_{i}", relative, name, f"L{class_index}{i // 2}"])
    csv_file = root / "labels.csv"
    with open(csv_file, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image_id", "path", "label", "lesion_id"])
        writer.writerows(rows)
    return csv_file
