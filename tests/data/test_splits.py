"""Grouped, stratified, seeded splits; fixed test folders; splits.csv round trip; the real HAM10000 check."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dermlab.data.datasets import DatasetTable, load_dataset
from dermlab.data.splits import create_splits, load_splits, save_splits, split_count_table
from dermlab.errors import ConfigError, DataError

REAL_HAM10000 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "HAM10000"


def _groups_in_two_splits(table: DatasetTable, splits: pd.Series) -> int:
    return int((table.frame.assign(split=splits).groupby("group")["split"].nunique() > 1).sum())


def _max_share_gap_points(table: DatasetTable, splits: pd.Series) -> float:
    counts = split_count_table(table, splits)
    shares = counts.drop(index="total").div(counts.loc["total"], axis=1) * 100
    return float(shares[["train", "val", "test"]].sub(shares["total"], axis=0).abs().max().max())


def test_grouped_stratified_and_complete(ham_dir: Path) -> None:
    table = load_dataset(ham_dir)
    splits = create_splits(table)
    assert splits.index.equals(table.frame.index) and set(splits) == {"train", "val", "test"}
    assert _groups_in_two_splits(table, splits) == 0
    per_class = table.frame.assign(split=splits).groupby("label")["split"].nunique()
    assert (per_class == 3).all()  # every class in every split


def test_deterministic_from_seed(ham_dir: Path) -> None:
    table = load_dataset(ham_dir)
    first = create_splits(table, seed=7)
    assert first.equals(create_splits(table, seed=7))
    assert any(not first.equals(create_splits(table, seed=seed)) for seed in (8, 9))


def test_zero_ratio_leaves_split_empty(csv_dataset: Path) -> None:
    table = load_dataset(csv_dataset)
    splits = create_splits(table, ratios=(0.8, 0.2, 0.0))
    assert set(splits) == {"train", "val"} and _groups_in_two_splits(table, splits) == 0


def test_fixed_test_folder_is_kept(folders_split_dir: Path) -> None:
    table = load_dataset(folders_split_dir)
    splits = create_splits(table, ratios=(0.6, 0.2, 0.2))
    fixed = table.frame["fixed_split"]
    assert (splits[fixed == "test"] == "test").all()
    assert set(splits[fixed == "train"]) == {"train", "val"}
    counts = split_count_table(table, splits)
    assert counts.loc["total", "test"] == 6 and counts.loc["total", "total"] == 24
    assert counts.loc["total", "val"] in (4, 5)  # 18 training images split 0.75 / 0.25 by whole classes


def test_too_small_class(csv_dataset: Path) -> None:
    frame = pd.read_csv(csv_dataset)
    frame.loc[frame["label"] == "nevi", "lesion_id"] = ["N1", "N1", "N1", "N2", "N2"]
    frame.to_csv(csv_dataset, index=False)
    table = load_dataset(csv_dataset)
    with pytest.raises(DataError, match=r"class 'nevi' has 2 lesion group\(s\), too few to split"):
        create_splits(table)
    assert _groups_in_two_splits(table, create_splits(table, ratios=(0.7, 0.3, 0))) == 0


def test_class_without_images_is_an_error_at_split_time(ham_dir: Path) -> None:
    metadata = ham_dir / "HAM10000_metadata.csv"
    frame = pd.read_csv(metadata)
    frame[frame["dx"] != "vasc"].to_csv(metadata, index=False)
    table = load_dataset(ham_dir)
    with pytest.raises(DataError, match="class 'vasc' has no images"):
        create_splits(table)


def test_bad_ratios() -> None:
    with pytest.raises(ConfigError, match="split ratios"):
        create_splits(None, ratios=(0.5, 0.5))  # type: ignore[arg-type]


def test_save_and_load_round_trip(ham_dir: Path, tmp_path: Path) -> None:
    table = load_dataset(ham_dir)
    splits = create_splits(table)
    path = save_splits(table, splits, tmp_path / "run" / "splits.csv")
    saved = pd.read_csv(path)
    assert list(saved.columns) == ["image_id", "path", "label", "group", "split"] and len(saved) == 56
    assert load_splits(path, table).equals(splits)
    assert load_splits(tmp_path / "run", table).equals(splits)


def test_load_splits_rejects_unknown_and_missing_ids(ham_dir: Path, tmp_path: Path) -> None:
    table = load_dataset(ham_dir)
    path = save_splits(table, create_splits(table), tmp_path / "splits.csv")
    saved = pd.read_csv(path)
    saved.loc[4, "image_id"] = "ISIC_0000000"
    saved.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"splits.csv line 6: image id 'ISIC_0000000' is not in the dataset"):
        load_splits(path, table)
    saved.drop(index=4).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"1 image\(s\) of the dataset have no split"):
        load_splits(path, table)
    with pytest.raises(DataError, match="splits file not found"):
        load_splits(tmp_path / "nope.csv", table)


def test_split_count_table(ham_dir: Path) -> None:
    table = load_dataset(ham_dir)
    counts = split_count_table(table, create_splits(table))
    assert list(counts.index) == table.classes + ["total"]
    assert list(counts.columns) == ["train", "val", "test", "total"]
    assert counts.loc["total", "total"] == 56 and (counts["total"].iloc[:-1] == 8).all()


@pytest.mark.realdata
def test_real_ham10000_lesion_disjoint_and_stratified() -> None:
    if not (REAL_HAM10000 / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"{REAL_HAM10000} is not here")
    table = load_dataset(REAL_HAM10000)
    splits = create_splits(table, ratios=(0.6, 0.2, 0.2), seed=42)
    assert _groups_in_two_splits(table, splits) == 0
    assert _max_share_gap_points(table, splits) <= 1.5
    sizes = splits.value_counts(normalize=True)
    assert sizes["train"] == pytest.approx(0.6, abs=0.02) and sizes["test"] == pytest.approx(0.2, abs=0.02)
