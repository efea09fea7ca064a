"""Tests for the synthetic dermoscopy generator and ``dermlab synth`` (tiny images, fast)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermlab.cli import main
from dermlab.data.synthetic import (
    METADATA_COLUMNS,
    MIN_IMAGES,
    SYNTHETIC_CLASS_PROPORTIONS,
    allocate_class_counts,
    generate_synthetic_dataset,
)
from dermlab.errors import ConfigError

CLASSES = list(SYNTHETIC_CLASS_PROPORTIONS)
LOCALIZATIONS = {
    "back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "scalp",
    "neck", "hand", "ear", "genital", "acral", "unknown",
}


@pytest.fixture(scope="module")
def ham_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synth") / "ham", images=60, size=32, seed=3)


@pytest.fixture(scope="module")
def metadata(ham_root: Path) -> pd.DataFrame:
    return pd.read_csv(ham_root / "HAM10000_metadata.csv")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_class_order_matches_the_dataset_loader() -> None:
    datasets = pytest.importorskip("dermlab.data.datasets")
    assert CLASSES == datasets.HAM10000_CLASSES


@pytest.mark.parametrize("images", [MIN_IMAGES, 60, 100, 2000, 10015])
def test_allocation_sums_and_respects_minimum(images: int) -> None:
    counts = allocate_class_counts(images)
    assert list(counts) == CLASSES
    assert sum(counts.values()) == images
    assert min(counts.values()) >= 5
    assert counts["nv"] == max(counts.values())


def test_allocation_follows_ham10000_proportions() -> None:
    assert allocate_class_counts(10015) == SYNTHETIC_CLASS_PROPORTIONS
    counts = allocate_class_counts(2000)
    total = sum(SYNTHETIC_CLASS_PROPORTIONS.values())
    for name, count in counts.items():
        assert abs(count - 2000 * SYNTHETIC_CLASS_PROPORTIONS[name] / total) <= 1, name


def test_ham10000_layout_files_and_columns(ham_root: Path, metadata: pd.DataFrame) -> None:
    assert list(metadata.columns) == METADATA_COLUMNS
    assert len(metadata) == 60 and metadata["image_id"].is_unique
    assert metadata["dx"].value_counts().to_dict() == allocate_class_counts(60)
    files = sorted(path.stem for path in (ham_root / "HAM10000_images").glob("*.jpg"))
    assert files == sorted(metadata["image_id"])
    assert metadata["image_id"].str.fullmatch(r"ISIC_\d{7}").all()
    assert metadata["lesion_id"].str.fullmatch(r"HAM_\d{7}").all()
    with Image.open(ham_root / "HAM10000_images" / f"{metadata['image_id'][0]}.jpg") as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (43, 32)


def test_metadata_values_are_plausible(metadata: pd.DataFrame) -> None:
    assert set(metadata["dx_type"]) <= {"histo", "follow_up", "consensus", "confocal"}
    assert set(metadata["sex"]) <= {"male", "female", "unknown"}
    assert set(metadata["localization"]) <= LOCALIZATIONS
    ages = metadata["age"].dropna()
    assert ages.between(0, 85).all() and (ages % 5 == 0).all()


def test_lesions_have_several_views_of_one_class(metadata: pd.DataFrame) -> None:
    views = metadata.groupby("lesion_id")["image_id"].count()
    assert views.max() >= 2 and views.between(1, 4).all()
    shared = ["dx", "age", "sex", "localization", "dx_type"]
    per_lesion = metadata.groupby("lesion_id")[shared].nunique(dropna=False)
    assert (per_lesion == 1).all().all()
    lesions_per_class = metadata.groupby("dx")["lesion_id"].nunique()
    assert lesions_per_class.min() >= 3  # a lesion-grouped 6:2:2 split can reach every class


def test_views_of_one_lesion_differ(ham_root: Path, metadata: pd.DataFrame) -> None:
    lesion = metadata.groupby("lesion_id").size().idxmax()
    first, second = metadata.loc[metadata["lesion_id"] == lesion, "image_id"][:2]
    folder = ham_root / "HAM10000_images"
    pixels = [np.asarray(Image.open(folder / f"{i}.jpg"), dtype=float) for i in (first, second)]
    assert np.abs(pixels[0] - pixels[1]).mean() > 1.0


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path: Path) -> None:
    first = generate_synthetic_dataset(tmp_path / "a", images=MIN_IMAGES, size=16, seed=7)
    second = generate_synthetic_dataset(tmp_path / "b", images=MIN_IMAGES, size=16, seed=7)
    third = generate_synthetic_dataset(tmp_path / "c", images=MIN_IMAGES, size=16, seed=8)
    assert _digests(first) == _digests(second)
    assert _digests(first) != _digests(third)


def test_folders_layout(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "folders", images=MIN_IMAGES, size=16, layout="folders")
    assert sorted(path.name for path in root.iterdir()) == sorted(CLASSES)
    for name, count in allocate_class_counts(MIN_IMAGES).items():
        assert len(list((root / name).glob("ISIC_*.jpg"))) == count
    assert not (root / "HAM10000_metadata.csv").exists()


def test_refuses_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "d", images=MIN_IMAGES, size=16, layout="folders")
    with pytest.raises(ConfigError, match="not empty"):
        generate_synthetic_dataset(root, images=MIN_IMAGES, size=16)
    generate_synthetic_dataset(root, images=MIN_IMAGES, size=16, overwrite=True)
    assert sorted(path.name for path in root.iterdir()) == ["HAM10000_images", "HAM10000_metadata.csv"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"images": 0}, "images"),
        ({"images": -5}, "images"),
        ({"images": MIN_IMAGES - 1}, "images"),
        ({"size": 8}, "size"),
        ({"size": 0}, "size"),
        ({"layout": "csv"}, "layout"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        generate_synthetic_dataset(tmp_path / "bad", **{"images": MIN_IMAGES, "size": 16, **options})
    assert not (tmp_path / "bad").exists()


def test_cli_writes_dataset_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["synth", "--out", str(out), "--images", "40", "--size", "16", "--layout", "folders"]
    argv += ["--seed", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "nv" in printed and "wrote 40 images" in printed and str(out) in printed
    assert sum(1 for _ in out.rglob("*.jpg")) == 40


def test_cli_bad_arguments_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "x"), "--images", "0"]) == 2
    assert main(["synth", "--out", str(tmp_path / "x"), "--size", "4"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith("error: images:") and errors[1].startswith("error: size:")


def test_classes_differ_in_colour_but_overlap(ham_root: Path, metadata: pd.DataFrame) -> None:
    """Vascular lesions are redder than nevi, yet one colour statistic does not separate nv from the rest."""
    images = ham_root / "HAM10000_images"

    def green_to_red(image_id: str) -> float:
        """Green/red ratio of the reddest tenth of the image centre (low = red or purple)."""
        pixels = np.asarray(Image.open(images / f"{image_id}.jpg"), dtype=float)[8:24, 12:31]
        return float(np.percentile(pixels[..., 1] / (pixels[..., 0] + 1), 10))

    ratio = metadata["image_id"].map(green_to_red)
    by_class = ratio.groupby(metadata["dx"])
    assert by_class.mean()["vasc"] < by_class.mean()["nv"] - 0.15
    # Not trivial: many images of other classes fall inside the range that nevi cover.
    nv_low, nv_high = by_class.min()["nv"], by_class.max()["nv"]
    others = ratio[metadata["dx"] != "nv"]
    assert ((others >= nv_low) & (others <= nv_high)).mean() > 0.25
