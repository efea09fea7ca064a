"""`dermlab predict`, `dermlab export` and the `serve` parser, run in-process."""

from __future__ import annotations

import pandas as pd
import pytest

from dermlab.cli import build_parser, main


@pytest.fixture
def image_folder(tmp_path, images):
    """Good images in a nested folder, plus a text file, a truncated JPEG and an empty file named like images."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    images.sample(seed=0).save(root / "a.png")
    images.sample(seed=1).save(root / "sub" / "b.jpg")
    images.sample(seed=2).convert("L").save(root / "sub" / "c.tif")
    (root / "notes.txt").write_text("ignored: not an image extension")
    (root / "fake.jpg").write_text("this is text, not a JPEG")
    jpeg = images.encode(images.sample((64, 64)), "JPEG")
    (root / "sub" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "empty.png").write_bytes(b"")
    return root


def test_predict_folder_writes_good_rows_and_reports_bad_files(run_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    code = main(["predict", str(run_dir), str(image_folder), "--out", str(out), "--batch-size", "2"])
    captured = capsys.readouterr()
    assert code == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["image_id", "path", "predicted", "prob_nv", "prob_mel", "prob_bkl"]
    assert sorted(table["image_id"]) == ["a", "b", "c"]
    assert table[["prob_nv", "prob_mel", "prob_bkl"]].sum(axis=1).round(5).eq(1.0).all()
    assert set(table["predicted"]) <= {"nv", "mel", "bkl"}
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 3
    for name in ("fake.jpg", "cut.jpg", "empty.png"):
        assert sum(name in line for line in skipped) == 1
    assert "notes.txt" not in captured.err
    assert "3 images" in captured.out
    assert "no feature statistics" in captured.err  # said, not silently skipped


def test_predict_gives_each_image_its_feature_distance_and_the_set_its_familiarity(predictor, images, tmp_path, capsys):
    import numpy as np
    import torch

    from dermlab.evaluation.familiarity import fit_feature_statistics
    from dermlab.models.checkpoint import save_checkpoint

    photos = [images.sample((40, 36), seed=i) for i in range(24)]
    with torch.inference_mode():
        pooled = predictor.loaded.model.forward_features(predictor.preprocess(photos)).numpy()
    statistics = fit_feature_statistics(pooled[:16], pooled[16:], components=6)
    loaded, run = predictor.loaded, tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "best.ckpt", loaded.model, loaded.config, loaded.classes, loaded.preprocessing,
                    feature_statistics=statistics.to_dict())
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, photo in enumerate(photos[:6]):
        photo.save(folder / f"{index}.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    np.testing.assert_allclose(table.sort_values("image_id")["feature_distance"], statistics.distance(pooled[:6]), rtol=1e-4)
    err = capsys.readouterr().err
    assert "familiarity:" in err and "of these 6 images" in err


def test_predict_files_with_tta_and_onnx(run_dir, onnx_path, image_folder, tmp_path):
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    files = [str(image_folder / "a.png"), str(image_folder / "sub" / "b.jpg")]
    assert main(["predict", str(run_dir), *files, "--out", str(torch_csv), "--tta"]) == 0
    assert main(["predict", str(run_dir), *files, "--out", str(onnx_csv), "--tta", "--engine", "onnx"]) == 0
    a, b = pd.read_csv(torch_csv), pd.read_csv(onnx_csv)
    columns = ["prob_nv", "prob_mel", "prob_bkl"]
    assert (a[columns] - b[columns]).abs().to_numpy().max() < 1e-4


def test_predict_exits_2_when_nothing_is_readable(run_dir, tmp_path, capsys):
    (tmp_path / "x.jpg").write_text("nope")
    out = tmp_path / "p.csv"
    assert main(["predict", str(run_dir), str(tmp_path / "x.jpg"), str(tmp_path / "gone.png"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "x.jpg" in err and "gone.png" in err
    assert not out.exists()


def test_export_cli_writes_onnx_and_sidecar(run_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "--opset", "17"]) == 0
    assert out.is_file() and (tmp_path / "m.onnx.json").is_file()
    assert "m.onnx" in capsys.readouterr().out


def test_serve_defaults_to_localhost():
    args = build_parser().parse_args(["serve", "runs/x"])
    assert (args.host, args.port, args.max_upload_mb, args.engine, args.token) == ("127.0.0.1", 8000, 10.0, "torch", None)
    assert callable(args.handler)


def test_every_rule_flag_offers_exactly_the_decision_rules() -> None:
    from dermlab.evaluation.decision import RULES

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name in ("evaluate", "predict", "serve"):
        rule = next(action for action in commands[name]._actions if action.dest == "rule")
        assert tuple(rule.choices) == RULES, name


def test_every_engine_flag_offers_exactly_the_predictor_engines() -> None:
    """The CLI stays light (no torch for `--help`), so it writes the names; the predictor's list must match."""
    from dermlab.serving.predictor import ENGINES

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name in ("predict", "serve"):
        engine = next(action for action in commands[name]._actions if action.dest == "engine")
        assert tuple(engine.choices) == ENGINES, name
