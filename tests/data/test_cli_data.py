"""``dermlab info`` and ``dermlab split``: output on good data, exit code 2 and one line on bad data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fakes import write_jpeg
from dermlab.cli import main


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_info_ham10000(ham_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(ham_dir)]) == 0
    out = capsys.readouterr().out
    assert "ham10000" in out and "56 in 7 classes, 42 groups" in out
    assert "age, sex, localization" in out and "sample of 56 of 56: 32x32 (56)" in out
    assert "akiec" in out and "dx_type" not in out


def test_info_fixed_split_folders(folders_split_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(folders_split_dir), "--layout", "folders", "--sample", "5"]) == 0
    out = capsys.readouterr().out
    assert "test folder" in out and "train folder" in out and "sample of 5 of 24" in out


def test_info_skip_bad_lists_skipped(folders_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folders_dir / "acne" / "img01.jpg").write_bytes(b"")
    assert main(["info", str(folders_dir), "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 item(s)" in out and "img01.jpg: empty file" in out and "17 in 3 classes" in out


def test_split_writes_csv_and_prints_table(ham_dir: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    argv = ["split", str(ham_dir), "--out", str(run_dir), "--ratios", "0.6", "0.2", "0.2", "--seed", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    saved = pd.read_csv(run_dir / "splits.csv")
    assert list(saved.columns) == ["image_id", "path", "label", "group", "split"] and len(saved) == 56
    assert (saved.groupby("group")["split"].nunique() == 1).all()
    for word in ("train", "val", "test", "total", "nv", "df", "none in two splits"):
        assert word in out


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        (
            lambda d: (d / "HAM10000_images_part_1" / "ISIC_0024306.jpg").unlink(),
            "line 2: image ISIC_0024306 not found",
        ),
        (lambda d: _replace_in_metadata(d, ",mel,", ",melanoma,"), "label 'melanoma' is not one of the"),
        (lambda d: _replace_in_metadata(d, "image_id,dx,", "image,dx,"), "missing column 'image_id'"),
    ],
    ids=["missing-image", "unknown-label", "missing-column"],
)
def test_bad_ham_input_exits_2(ham_dir: Path, tmp_path: Path, capsys, breakage, needle: str) -> None:
    breakage(ham_dir)
    assert needle in _one_error_line(capsys, ["split", str(ham_dir), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "splits.csv").exists()


def _replace_in_metadata(root: Path, old: str, new: str) -> None:
    metadata = root / "HAM10000_metadata.csv"
    metadata.write_text(metadata.read_text().replace(old, new, 1))


def test_truncated_image_exits_2_in_info(folders_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = write_jpeg(folders_dir / "acne" / "big.jpg", size=(64, 64))
    image.write_bytes(image.read_bytes()[:300])
    assert "big.jpg: " in _one_error_line(capsys, ["info", str(folders_dir)])


def test_empty_class_folder_exits_2(folders_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (folders_dir / "warts").mkdir()
    assert "class folder 'warts' holds no images" in _one_error_line(capsys, ["info", str(folders_dir)])


def test_too_small_class_and_bad_ratios_exit_2(folders_dir: Path, tmp_path: Path, capsys) -> None:
    for image in list((folders_dir / "nevi").iterdir())[1:]:
        image.unlink()
    out = ["--out", str(tmp_path / "run")]
    assert "class 'nevi' has 1 lesion group(s)" in _one_error_line(capsys, ["split", str(folders_dir), *out])
    bad_ratios = ["split", str(folders_dir), *out, "--ratios", "1", "-1", "0"]
    assert "split_ratios" in _one_error_line(capsys, bad_ratios)


def test_missing_dataset_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "dataset not found" in _one_error_line(capsys, ["info", str(tmp_path / "nope")])
