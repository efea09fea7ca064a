"""Dataset readers on fake files in the real layouts, and every kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from fakes import FOLDER_CLASSES, HAM_CLASSES, write_jpeg
from dermlab.config import DataConfig
from dermlab.data.datasets import HAM10000_CLASSES, LAYOUTS, detect_layout, load_dataset
from dermlab.errors import ConfigError, DataError


def _write_csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


# --- layouts ------------------------------------------------------------------------------------------------


def test_layouts_registered() -> None:
    assert LAYOUTS.list() == ["csv", "folders", "ham10000"]
    assert HAM10000_CLASSES == HAM_CLASSES


def test_detect_layout(ham_dir: Path, folders_dir: Path, folders_split_dir: Path, csv_dataset: Path) -> None:
    assert detect_layout(ham_dir) == "ham10000"
    assert detect_layout(folders_dir) == "folders"
    assert detect_layout(folders_split_dir) == "folders"
    assert detect_layout(csv_dataset) == "csv"
    assert detect_layout(csv_dataset.parent) == "csv"


def test_detect_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset not found"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        detect_layout(tmp_path)


def test_ham10000(ham_dir: Path) -> None:
    table = load_dataset(ham_dir)
    frame = table.frame
    assert table.layout == "ham10000" and table.classes == HAM10000_CLASSES
    assert len(frame) == 56 and frame["image_id"].is_unique
    assert list(frame.columns) == [
        "image_id", "path", "label", "group", "fixed_split", "age", "sex", "localization"
    ]
    assert "dx_type" not in frame.columns
    assert frame["path"].map(lambda p: Path(p).is_absolute() and Path(p).is_file()).all()
    folders = {Path(p).parent.name for p in frame["path"]}
    assert folders == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    assert frame["group"].nunique() == 42 and frame["group"].str.startswith("HAM_").all()
    assert frame["age"].dtype == float and frame["age"].isna().sum() == 7
    assert (frame["fixed_split"] == "").all()
    assert table.class_counts().tolist() == [8] * 7


def test_ham10000_keeps_all_classes_and_mask_column(ham_dir: Path) -> None:
    metadata = ham_dir / "HAM10000_metadata.csv"
    frame = pd.read_csv(metadata)
    frame = frame[frame["dx"] != "df"].copy()
    write_jpeg(ham_dir / "masks" / "m.png")
    frame["mask_path"] = ["masks/m.png"] + [""] * (len(frame) - 1)
    frame.to_csv(metadata, index=False)
    table = load_dataset(ham_dir)
    assert table.classes == HAM10000_CLASSES and table.class_counts()["df"] == 0
    assert (table.frame["mask_path"] != "").sum() == 1 and Path(table.frame["mask_path"][0]).is_file()


def test_ham10000_single_image_folder_and_configured_classes(ham_dir: Path) -> None:
    for part in ("HAM10000_images_part_1", "HAM10000_images_part_2"):
        for image in (ham_dir / part).iterdir():
            image.rename(_mkdir(ham_dir / "HAM10000_images") / image.name)
        (ham_dir / part).rmdir()
    table = load_dataset(ham_dir, DataConfig(classes=["mel", "nv"], skip_bad=True))
    assert table.classes == ["mel", "nv"] and len(table.frame) == 16 and len(table.skipped) == 40


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def test_folders(folders_dir: Path) -> None:
    table = load_dataset(folders_dir)
    assert table.layout == "folders" and table.classes == FOLDER_CLASSES
    assert len(table.frame) == 18 and (table.frame["group"] == table.frame["image_id"]).all()
    assert table.frame["image_id"][0] == "acne/img00.jpg"
    assert table.frame["image_id"].is_unique and (table.frame["fixed_split"] == "").all()


def test_folders_class_order_from_config(folders_dir: Path) -> None:
    table = load_dataset(folders_dir, DataConfig(classes=["nevi", "acne", "eczema"]))
    assert table.classes == ["nevi", "acne", "eczema"]


def test_folders_with_split_folders(folders_split_dir: Path) -> None:
    (folders_split_dir / "train").rename(folders_split_dir / "Training")
    write_jpeg(folders_split_dir / "Valid" / "acne" / "v.jpg")
    table = load_dataset(folders_split_dir)
    counts = table.frame["fixed_split"].value_counts().to_dict()
    assert counts == {"train": 18, "test": 6, "val": 1}
    assert table.classes == FOLDER_CLASSES


def test_folders_two_train_folders_rejected(folders_split_dir: Path) -> None:
    shutil.copytree(folders_split_dir / "train", folders_split_dir / "training")
    with pytest.raises(DataError, match="both 'train' and 'training' are train folders"):
        load_dataset(folders_split_dir)


def test_csv_layout(csv_dataset: Path) -> None:
    table = load_dataset(csv_dataset)
    frame = table.frame
    assert table.layout == "csv" and table.root == csv_dataset.parent
    assert table.classes == FOLDER_CLASSES and len(frame) == 15
    assert frame["group"].nunique() == 9 and frame["image_id"][0] == "acne_0"
    assert Path(frame["path"][0]) == csv_dataset.parent / "images" / "acne_0.jpg"


def test_csv_bom_semicolons_and_configured_columns(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a.jpg")
    write_jpeg(tmp_path / "sub" / "b.jpg")
    text = "file;diagnosis;patient\na.jpg;mel;p1\nsub/b.jpg;nv;p1\n"
    csv_file = _write_csv(tmp_path / "data.csv", text, "utf-8-sig")
    config = DataConfig(csv_path_column="file", csv_label_column="diagnosis", csv_group_column="patient")
    table = load_dataset(csv_file, config)
    assert table.frame["image_id"].tolist() == ["a.jpg", "sub/b.jpg"]
    assert table.frame["group"].tolist() == ["p1", "p1"] and table.classes == ["mel", "nv"]


def test_csv_tab_delimited_with_dx_and_mask(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "images" / "a.jpg")
    write_jpeg(tmp_path / "masks" / "a.png")
    _write_csv(tmp_path / "labels.csv", "path\tdx\tmask_path\nimages/a.jpg\tmel\tmasks/a.png\n")
    table = load_dataset(tmp_path)
    assert table.layout == "csv" and table.frame["label"][0] == "mel"
    assert table.frame["mask_path"][0] == str(tmp_path / "masks" / "a.png")


# --- bad input ----------------------------------------------------------------------------------------------


def test_missing_image_names_the_line(csv_dataset: Path) -> None:
    (csv_dataset.parent / "images" / "acne_2.jpg").unlink()
    with pytest.raises(DataError, match=r"labels.csv line 4: image file not found: .*acne_2.jpg"):
        load_dataset(csv_dataset)
    table = load_dataset(csv_dataset, DataConfig(skip_bad=True))
    assert len(table.frame) == 14 and len(table.skipped) == 1 and "line 4" in table.skipped[0]


def test_ham_missing_image_and_unknown_label(ham_dir: Path) -> None:
    metadata = ham_dir / "HAM10000_metadata.csv"
    lines = metadata.read_text().splitlines()
    lines[2] = lines[2].replace(",nv,", ",melanoma,")
    lines.append("HAM_9,ISIC_9999999,nv,histo,50.0,male,back")
    metadata.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3: label 'melanoma' is not one of the classes \(nv, mel"):
        load_dataset(ham_dir)
    table = load_dataset(ham_dir, DataConfig(skip_bad=True))
    assert len(table.frame) == 55 and len(table.skipped) == 2
    assert "line 58: image ISIC_9999999 not found in HAM10000_images_part_1/" in table.skipped[1]


def test_unreadable_image_found_only_when_verifying(folders_dir: Path) -> None:
    (folders_dir / "acne" / "img03.jpg").write_bytes(b"not a jpeg")
    assert len(load_dataset(folders_dir).frame) == 18  # existence only: fast
    with pytest.raises(DataError, match=r"img03.jpg: not an image file"):
        load_dataset(folders_dir, verify_images=True)
    table = load_dataset(folders_dir, DataConfig(skip_bad=True))  # skip_bad verifies by default
    assert len(table.frame) == 17 and "img03.jpg" in table.skipped[0]


def test_label_outside_class_list(folders_dir: Path, csv_dataset: Path) -> None:
    with pytest.raises(DataError, match=r"nevi: class 'nevi' is not one of the classes \(acne, eczema\)"):
        load_dataset(folders_dir, DataConfig(classes=["acne", "eczema"]))
    with pytest.raises(DataError, match=r"labels.csv line 12: label 'nevi' is not one of the classes"):
        load_dataset(csv_dataset, DataConfig(classes=["acne", "eczema"]))


def test_csv_missing_column(csv_dataset: Path) -> None:
    with pytest.raises(DataError, match=r"labels.csv: missing column 'diagnosis' \(columns: image_id, path"):
        load_dataset(csv_dataset, DataConfig(csv_label_column="diagnosis"))
    with pytest.raises(DataError, match=r"missing column 'patient'"):
        load_dataset(csv_dataset, DataConfig(csv_group_column="patient"))


def test_empty_class_folder(folders_dir: Path) -> None:
    (folders_dir / "warts").mkdir()
    (folders_dir / "warts" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"warts: class folder 'warts' holds no images"):
        load_dataset(folders_dir)
    table = load_dataset(folders_dir, DataConfig(skip_bad=True))
    assert table.classes == FOLDER_CLASSES and len(table.skipped) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("a.jpg,mel\n,nv\n", r"line 3: empty 'path' cell"),
        ("a.jpg,mel\nb.jpg,NaN\n", r"line 3: empty 'label' cell"),
        ("a.jpg,mel\n\na.jpg,nv\n", r"line 4: duplicate image id 'a.jpg' \(first on line 2\)"),
        ("a.jpg,mel\n../outside.jpg,nv\n", r"line 3: path '../outside.jpg' points outside the dataset"),
        ("a.jpg,mel\nb.jpg,nv,extra\n", r"line 3: 3 fields where the header has 2"),
    ],
    ids=["empty-path", "nan-label", "duplicate", "outside-root", "ragged"],
)
def test_csv_bad_rows(tmp_path: Path, body: str, message: str) -> None:
    write_jpeg(tmp_path / "data" / "a.jpg")
    write_jpeg(tmp_path / "data" / "b.jpg")
    write_jpeg(tmp_path / "outside.jpg")
    csv_file = _write_csv(tmp_path / "data" / "labels.csv", "path,label\n" + body)
    with pytest.raises(DataError, match=message):
        load_dataset(csv_file)


def test_csv_absolute_path_outside_root_rejected(tmp_path: Path) -> None:
    outside = write_jpeg(tmp_path / "elsewhere.jpg")
    csv_file = _write_csv(tmp_path / "data" / "labels.csv", f"path,label\n{outside},mel\n")
    with pytest.raises(DataError, match="line 2: path .* points outside"):
        load_dataset(csv_file)


def test_csv_problems_skipped_and_listed(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "a.jpg")
    csv_file = _write_csv(tmp_path / "labels.csv", "path,label\na.jpg,mel\n,nv\nb.jpg,nv\na.jpg,mel\n")
    table = load_dataset(csv_file, DataConfig(skip_bad=True))
    assert len(table.frame) == 1 and table.classes == ["mel"]
    assert [m.split(": ", 1)[0][-6:] for m in table.skipped] == ["line 3", "line 5", "line 4"]


def test_nothing_usable(tmp_path: Path) -> None:
    csv_file = _write_csv(tmp_path / "labels.csv", "path,label\nmissing.jpg,mel\n")
    with pytest.raises(DataError, match=r"no usable images found \(1 skipped\)"):
        load_dataset(csv_file, DataConfig(skip_bad=True))


def test_load_dataset_needs_a_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no dataset given"):
        load_dataset(None)
    with pytest.raises(DataError, match="dataset not found"):
        load_dataset(tmp_path / "nope")
