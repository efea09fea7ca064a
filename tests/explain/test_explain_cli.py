"""``dermlab explain`` end to end on a real tiny checkpoint: galleries, overlays, lesion-mask agreement.

The run folder is a ``test_efficientnet`` checkpoint at 32 px (random weights) from ``save_checkpoint``
plus a hand-made ``eval/test/predictions.csv``, so no training is needed. The mask dataset is a CSV layout
whose images hold a coloured square (the "lesion") and whose PNG masks are white exactly on that square.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermlab.cli import main
from dermlab.config import Config, ModelConfig
from dermlab.models.checkpoint import save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing

CLASSES = ["nv", "mel", "bkl"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SIZE = (64, 48)  # (width, height): not the model's 32x32, so images and masks are resized
LESION_BOX = (16, 12, 48, 36)  # the square's (left, top, right, bottom): a quarter of the image


def _write_lesion_image(path: Path, colour: tuple[int, int, int], shift: int = 0) -> Path:
    image = Image.new("RGB", IMAGE_SIZE, (224, 172, 150))
    left, top, right, bottom = LESION_BOX
    image.paste(colour, (left + shift, top, right + shift, bottom))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _write_mask(path: Path, shift: int = 0) -> Path:
    mask = Image.new("L", IMAGE_SIZE, 0)
    left, top, right, bottom = LESION_BOX
    mask.paste(255, (left + shift, top, right + shift, bottom))
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return path


@pytest.fixture(scope="module")
def mask_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``labels.csv`` (image_id, path, dx, mask_path): 6 images of nv, mel, bkl and a ``vasc`` (unknown)."""
    root = tmp_path_factory.mktemp("maskdata")
    labels = ["nv", "nv", "mel", "mel", "bkl", "vasc"]
    colours = [(90, 50, 30), (80, 40, 20), (40, 20, 60), (30, 10, 50), (120, 100, 60), (200, 30, 40)]
    rows = []
    for number, (label, colour) in enumerate(zip(labels, colours)):
        image = _write_lesion_image(root / "images" / f"img{number}.png", colour)
        mask = _write_mask(root / "masks" / f"img{number}_mask.png")
        relative_image, relative_mask = image.relative_to(root).as_posix(), mask.relative_to(root).as_posix()
        rows.append([f"img{number}", relative_image, label, relative_mask])
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image_id", "path", "dx", "mask_path"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def run_template(tmp_path_factory: pytest.TempPathFactory, mask_data: Path) -> Path:
    """A run folder: checkpoints/best.ckpt, eval/test/predictions.csv (one correct, one wrong per class)."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32]))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    root = tmp_path_factory.mktemp("run")
    preprocessing = resolve_preprocessing(model, config.model)
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, CLASSES, preprocessing)
    images = sorted((mask_data / "images").glob("*.png"))
    truth = ["nv", "nv", "mel", "mel", "bkl", "bkl"]
    predicted = ["nv", "mel", "mel", "nv", "bkl", "nv"]
    rows = []
    for number, (true, guess) in enumerate(zip(truth, predicted)):
        probabilities = np.full(len(CLASSES), 0.1)
        probabilities[CLASSES.index(guess)] = 0.8
        row = {"image_id": f"img{number}", "path": str(images[number]), "true": true, "predicted": guess}
        rows.append({**row, **{f"prob_{name}": p for name, p in zip(CLASSES, probabilities)}})
    predictions = root / "eval" / "test" / "predictions.csv"
    predictions.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(predictions, index=False)
    return root


@pytest.fixture
def run_dir(run_template: Path, tmp_path: Path) -> Path:
    """A fresh copy per test, so what one test writes (gallery, report) is not seen by another."""
    return Path(shutil.copytree(run_template, tmp_path / "run"))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_gallery_mode_writes_class_pngs_and_sheet_and_embeds_them_in_the_report(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(run_dir), "--per-class", "1"]) == 0
    gallery = run_dir / "gallery"
    for name in [*CLASSES, "sheet"]:
        assert _is_png(gallery / f"{name}.png"), name
    out = capsys.readouterr().out
    assert "6 images from" in out  # every class has one correct and one wrong prediction in the fixture
    assert str(gallery / "sheet.png") in out
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Grad-CAM gallery" in report
    for name in [*CLASSES, "sheet"]:
        assert f"gallery/{name}.png" in report


@pytest.mark.slow
def test_gallery_mode_out_folder_and_per_class_wider_than_the_default_sheet(
    run_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "elsewhere"
    args = ["explain", str(run_dir), "--per-class", "4", "--method", "gradcam++", "--out", str(out)]
    assert main(args) == 0
    assert _is_png(out / "sheet.png") and _is_png(out / "mel.png")
    assert not (run_dir / "gallery").exists()


@pytest.mark.slow
def test_gallery_mode_runs_inference_when_there_are_no_predictions(
    run_dir: Path, mask_data: Path, tmp_path: Path
) -> None:
    # Rows labelled with classes the model lacks would make evaluation refuse: keep nv / mel / bkl only.
    known = Path(shutil.copytree(mask_data, tmp_path / "known"))
    table = pd.read_csv(known / "labels.csv")
    table[table["dx"].isin(CLASSES)].to_csv(known / "labels.csv", index=False)
    (run_dir / "eval" / "test" / "predictions.csv").unlink()
    assert main(["explain", str(run_dir), "--data", str(known), "--per-class", "1"]) == 0
    predictions = pd.read_csv(run_dir / "eval" / "known-test" / "predictions.csv")
    assert len(predictions) == 5
    assert _is_png(run_dir / "gallery" / "sheet.png")


@pytest.mark.slow
def test_image_mode_writes_a_side_by_side_overlay(
    run_dir: Path, mask_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overlay.png"
    image = mask_data / "images" / "img0.png"
    assert main(["explain", str(image), "--run", str(run_dir), "--target", "bkl", "--out", str(out)]) == 0
    assert _is_png(out)
    width, height = Image.open(out).size
    assert width > height  # original and overlay side by side
    printed = capsys.readouterr().out
    assert "predicted " in printed and str(out) in printed
    if "CAM for" in printed:  # bkl was not the prediction
        assert "CAM for bkl" in printed


def test_image_mode_unknown_target_is_one_line_exit_2(
    run_dir: Path, mask_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "overlay.png"
    code = main(["explain", str(mask_data / "images" / "img0.png"), "--run", str(run_dir), "--target", "xyz",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'xyz'" in err and all(name in err for name in CLASSES)
    assert not out.exists()


def test_misused_flags_are_one_line_errors(
    run_dir: Path, mask_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(mask_data / "images" / "img0.png")
    assert main(["explain", image]) == 2  # an image needs --run
    assert "--run" in capsys.readouterr().err
    assert main(["explain", str(run_dir), "--target", "nv"]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["explain", str(run_dir), "--method", "nocam"]) == 2
    assert "gradcam" in capsys.readouterr().err  # lists the valid names


@pytest.mark.slow
def test_masks_mode_scores_trained_and_untrained_against_chance(
    run_dir: Path, mask_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", str(run_dir), "--masks", str(mask_data)]) == 0
    summary = json.loads((run_dir / "explain" / "mask_agreement.json").read_text(encoding="utf-8"))
    assert summary["n"] == 6
    assert summary["input_size"] == [32, 32]
    assert summary["cam_target"] == {"true_class": 5, "predicted_class": 1}  # vasc is unknown to the model
    for key in ("trained", "untrained", "centre_prior"):
        entry = summary[key]
        assert entry["n"] == 6
        for metric in ("mean_energy_in_mask", "pointing_game_hit_rate", "mean_mask_area_share"):
            assert 0.0 <= entry[metric] <= 1.0, (key, metric)
        # the lesion square is a quarter of the image, and stays so at the model's 32x32
        assert entry["mean_mask_area_share"] == pytest.approx(0.25, abs=0.02)
    # a centred blob puts more than the area share of its mass on a centred lesion, and peaks inside it
    assert summary["centre_prior"]["mean_energy_in_mask"] > 0.25
    assert summary["centre_prior"]["pointing_game_hit_rate"] == 1.0

    per_image = pd.read_csv(run_dir / "explain" / "mask_agreement.csv", keep_default_na=False)
    known = per_image["label"].isin(CLASSES)
    assert (per_image.loc[known, "trained_target"] == per_image.loc[known, "label"]).all()
    unknown = per_image[~known].iloc[0]
    assert unknown["label"] == "vasc" and unknown["trained_target"] == unknown["trained_predicted"]
    out = capsys.readouterr().out
    assert "untrained" in out and "chance" in out


@pytest.mark.slow
def test_masks_mode_limit_out_and_uneven_batches(run_dir: Path, mask_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "agreement.json"
    args = ["explain", str(run_dir), "--masks", str(mask_data), "--limit", "5", "--batch-size", "2"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads(out.read_text(encoding="utf-8"))
    per_image = pd.read_csv(out.with_suffix(".csv"), keep_default_na=False)
    assert len(per_image) == 5 and summary["trained"]["n"] == summary["untrained"]["n"] == 5
    # batches of 2, 2 and 1 merge into the plain means over the images
    for key in ("trained", "untrained"):
        assert summary[key]["mean_energy_in_mask"] == pytest.approx(per_image[f"{key}_energy_in_mask"].mean())
        hits = per_image[f"{key}_pointing_hit"].astype(bool)
        assert summary[key]["pointing_game_hit_rate"] == pytest.approx(hits.mean())
        assert summary[key]["mean_mask_area_share"] == pytest.approx(per_image["mask_area_share"].mean())


def test_masks_mode_needs_a_mask_column(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "nomasks"
    _write_lesion_image(root / "images" / "a.png", (90, 50, 30))
    (root / "labels.csv").write_text("image_id,path,dx\na,images/a.png,nv\n", encoding="utf-8")
    assert main(["explain", str(run_dir), "--masks", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mask" in err and str(root) in err


def test_the_help_lists_exactly_the_registered_cam_methods() -> None:
    """`--help` names the methods without importing grad-cam; the registry stays the list it must match."""
    from dermlab.cli import explain as explain_cli
    from dermlab.explain.gradcam import CAM_METHODS

    assert sorted(explain_cli._METHOD_NAMES.split(", ")) == sorted(CAM_METHODS.list())
