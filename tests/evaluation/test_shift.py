"""The shift report: metrics under seeded corruptions, written as shift.json / shift.md, and ``evaluate --shift``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import class_colour, write_jpeg

from dermlab.config import Config, ModelConfig
from dermlab.data.corruptions import SHIFT_CORRUPTIONS, apply_corruption
from dermlab.data.images import read_image
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError, DataError
from dermlab.evaluation.evaluate import predict_logits
from dermlab.evaluation.metrics import compute_metrics
from dermlab.evaluation.shift import SHIFT_METRICS, shift_markdown, shift_report, write_shift_report
from dermlab.models.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing

CLASSES = ["nv", "mel", "bkl"]



@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared, busy machine torch's thread pool spins and runs ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained ``test_efficientnet`` at 32x32 over nv / mel / bkl, in a run folder."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32]))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    path = tmp_path_factory.mktemp("shift") / "run" / "checkpoints" / "best.ckpt"
    return save_checkpoint(path, model, config, CLASSES, resolve_preprocessing(model, config.model))


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> LoadedModel:
    return load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<class>/<n>.jpg``: three 48x36 (4:3) images per class in the class's colour."""
    root = tmp_path_factory.mktemp("shift_data") / "clinic"
    for class_index, name in enumerate(CLASSES):
        for i in range(3):
            write_jpeg(root / name / f"{name}{i}.jpg", size=(48, 36), color=class_colour(class_index, 10 * i))
    return root


@pytest.fixture(scope="module")
def frame(images_dir: Path) -> pd.DataFrame:
    paths = sorted(images_dir.glob("*/*.jpg"))
    return pd.DataFrame({"path": [str(p) for p in paths], "label": [p.parent.name for p in paths]})


def _metrics(loaded: LoadedModel, logits: np.ndarray, labels: pd.Series) -> dict:
    y_true = labels.map({name: i for i, name in enumerate(loaded.classes)}).to_numpy()
    return compute_metrics(y_true, torch.from_numpy(logits).double().softmax(1).numpy(), loaded.classes, target_class=None)


@pytest.fixture(scope="module")
def report(loaded: LoadedModel, frame: pd.DataFrame) -> pd.DataFrame:
    return shift_report(loaded, frame, seed=5, batch_size=4)


def test_one_row_per_condition_with_the_metrics(report: pd.DataFrame, frame: pd.DataFrame) -> None:
    assert list(report.index) == ["clean", *SHIFT_CORRUPTIONS]
    assert report.index.name == "corruption" and list(report.columns) == list(SHIFT_METRICS)
    for value in report.to_numpy().ravel():
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert report.attrs == {"seed": 5, "images": len(frame)}


def test_the_clean_row_matches_plain_evaluation(report: pd.DataFrame, loaded: LoadedModel, frame: pd.DataFrame) -> None:
    metrics = _metrics(loaded, predict_logits(loaded, frame), frame["label"])
    for metric in ("accuracy", "balanced_accuracy", "auc_macro"):
        assert report.loc["clean", metric] == pytest.approx(metrics[metric])


def test_a_corrupted_row_matches_corrupting_each_image_by_hand(report: pd.DataFrame, loaded: LoadedModel, frame: pd.DataFrame) -> None:
    """Image i gets ``apply_corruption(image, name, seed, i)`` and then the checkpoint's own preprocessing."""
    transform = create_transform("none", loaded.preprocessing, train=False)
    for name in ("colour_cast", "squash_1to1"):
        batch = torch.stack(
            [transform(apply_corruption(read_image(path), name, seed=5, index=i)) for i, path in enumerate(frame["path"])]
        )
        with torch.inference_mode():
            logits = loaded.model.eval()(batch).numpy()
        metrics = _metrics(loaded, logits, frame["label"])
        for metric in ("accuracy", "balanced_accuracy", "auc_macro"):
            assert report.loc[name, metric] == pytest.approx(metrics[metric], abs=1e-9)
        mel, nv = CLASSES.index("mel"), CLASSES.index("nv")
        keep = frame["label"].isin(["mel", "nv"]).to_numpy()
        from sklearn.metrics import roc_auc_score

        probabilities = torch.from_numpy(logits).softmax(1).numpy()
        expected = roc_auc_score(frame["label"][keep] == "mel", probabilities[keep, mel])
        assert report.loc[name, "mel_vs_nv_auc"] == pytest.approx(expected)
        assert nv != mel


def test_reports_are_reproducible_and_the_seed_matters(report: pd.DataFrame, loaded: LoadedModel, frame: pd.DataFrame) -> None:
    again = shift_report(loaded, frame, corruptions=["colour_cast", "vignette"], seed=5)
    pd.testing.assert_frame_equal(again, report.loc[["clean", "colour_cast", "vignette"]], check_exact=False, rtol=1e-9)
    other_seed = shift_report(loaded, frame, corruptions=["colour_cast"], seed=6)
    assert list(other_seed.index) == ["clean", "colour_cast"]


def test_mel_vs_nv_auc_is_none_without_both_classes(loaded: LoadedModel, frame: pd.DataFrame) -> None:
    only_mel_and_bkl = frame[frame["label"] != "nv"]
    out = shift_report(loaded, only_mel_and_bkl, corruptions=["jpeg30"])
    assert out["mel_vs_nv_auc"].tolist() == [None, None]
    assert all(isinstance(v, float) for v in out["accuracy"])


def test_bad_requests_raise_before_any_inference(loaded: LoadedModel, frame: pd.DataFrame) -> None:
    missing = pd.DataFrame({"path": ["/nonexistent.jpg"], "label": ["nv"]})
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        shift_report(loaded, missing, corruptions=["blur", "fog"])
    with pytest.raises(ConfigError, match="clean"):
        shift_report(loaded, missing, corruptions=["clean"])
    with pytest.raises(DataError, match="empty"):
        shift_report(loaded, frame.iloc[:0])
    with pytest.raises(DataError, match=r"\['scc'\]"):
        shift_report(loaded, frame.assign(label="scc"))


def test_write_shift_report(report: pd.DataFrame, tmp_path: Path) -> None:
    with_none = report.copy()
    with_none.loc["blur", "mel_vs_nv_auc"] = None
    json_path, markdown_path = write_shift_report(with_none, tmp_path / "eval" / "shift")
    assert (json_path.name, markdown_path.name) == ("shift.json", "shift.md")
    data = json.loads(json_path.read_text())
    assert (data["seed"], data["images"]) == (5, 9)
    assert [row["corruption"] for row in data["rows"]] == ["clean", *SHIFT_CORRUPTIONS]
    blur = next(row for row in data["rows"] if row["corruption"] == "blur")
    assert blur["mel_vs_nv_auc"] is None
    assert blur["accuracy"] == pytest.approx(report.loc["blur", "accuracy"])
    markdown = markdown_path.read_text()
    assert markdown == shift_markdown(with_none)
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "corruption" not in line]
    assert len(table) == 1 + len(SHIFT_CORRUPTIONS)
    delta = report.loc["jpeg30", "accuracy"] - report.loc["clean", "accuracy"]
    assert f"{report.loc['jpeg30', 'accuracy']:.3f} ({delta:+.3f})" in markdown
    assert "| blur |" in markdown and "n/a" in markdown


@pytest.mark.slow
def test_evaluate_shift_command(checkpoint: Path, images_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dermlab.cli import main

    code = main(["evaluate", str(checkpoint), "--data", str(images_dir), "--corruptions", "jpeg30, vignette", "--shift-seed", "2"])
    assert code == 0
    out_dir = checkpoint.parent.parent / "eval" / "clinic-test-shift"
    data = json.loads((out_dir / "shift.json").read_text())
    assert [row["corruption"] for row in data["rows"]] == ["clean", "jpeg30", "vignette"]
    assert data["seed"] == 2 and data["images"] == 9
    printed = capsys.readouterr().out
    assert "vignette" in printed and "mel vs nv AUC" in printed and str(out_dir / "shift.md") in printed
    assert main(["evaluate", str(checkpoint), "--data", str(images_dir), "--corruptions", "fog"]) == 2
    assert "unknown corruption 'fog'" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), "--data", str(images_dir), "--corruptions", "jpeg30", "--external", str(images_dir)]) == 0
    data = json.loads((out_dir / "shift.json").read_text())
    assert [row["corruption"] for row in data["rows"]] == ["clean", "jpeg30", "external: clinic"]
    assert data["rows"][2]["accuracy"] == pytest.approx(data["rows"][0]["accuracy"])  # the same images, uncorrupted


@pytest.mark.slow
def test_a_robust_recipe_trains_and_its_run_gets_a_shift_report(
    ham_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """derm-robust + letterbox + Shades of Gray train end to end; the checkpoint keeps them; --shift reads them."""
    from dermlab.cli import main
    from dermlab.config import apply_overrides
    from dermlab.training.run import train_run

    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    overrides = [
        f"data.path={ham_dir}", "model.name=test_efficientnet", "model.weights=none", "model.input_size=[24,32]", "data.num_workers=0",
        "data.batch_size=8", "train.stage1_epochs=0", "train.stage2_epochs=1", "data.augmentation=derm-robust",
        "model.resize_mode=letterbox", "model.color_constancy=shades_of_gray", "model.color_constancy_p=4",
    ]
    run = tmp_path / "run"
    train_run(apply_overrides(Config(), overrides), run)
    stored = load_checkpoint(run).preprocessing
    assert (stored.resize_mode, stored.color_constancy, stored.color_constancy_p) == ("letterbox", "shades_of_gray", 4.0)
    assert main(["evaluate", str(run), "--shift", "--corruptions", "colour_cast,squash_1to1"]) == 0
    data = json.loads((run / "eval" / "shift" / "shift.json").read_text())
    test_images = (pd.read_csv(run / "splits.csv")["split"] == "test").sum()
    assert data["images"] == test_images and [r["corruption"] for r in data["rows"]] == ["clean", "colour_cast", "squash_1to1"]
    assert "squash_1to1" in capsys.readouterr().out


def test_an_external_folder_of_some_classes_gets_its_own_row_scored_like_the_clean_one(
    loaded: LoadedModel, frame: pd.DataFrame, images_dir: Path, tmp_path: Path
) -> None:
    """A real shift beside the imitated ones: the external row equals clean scoring of those images alone."""
    external = frame[frame["label"].isin(["mel", "nv"])].reset_index(drop=True)
    report = shift_report(loaded, frame, corruptions=["jpeg30"], batch_size=4, external={"other clinic": external})
    assert list(report.index) == ["clean", "jpeg30", "external: other clinic"]
    alone = shift_report(loaded, external, corruptions=[], batch_size=4)
    for metric in SHIFT_METRICS:
        assert report.loc["external: other clinic", metric] == pytest.approx(alone.loc["clean", metric])
    with pytest.raises(DataError, match="not among the model's classes"):
        shift_report(loaded, frame, corruptions=[], external={"x": external.assign(label="scc")})
