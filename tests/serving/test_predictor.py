"""Predictor on a real tiny checkpoint: probabilities, batching, TTA, temperature, unreadable files, Grad-CAM."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from dermlab.errors import CheckpointError, ConfigError
from dermlab.serving.predictor import TTA_VIEWS, Predictor


def test_predict_images_gives_probabilities(predictor, images):
    batch = [images.sample(seed=i) for i in range(5)]
    probabilities = predictor.predict_images(batch)
    assert probabilities.shape == (5, len(predictor.classes))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert predictor.predict_images([]).shape == (0, 3)


def test_batching_does_not_change_the_result(run_dir, predictor, images):
    batch = [images.sample(seed=i) for i in range(5)]
    small = Predictor.from_path(run_dir, batch_size=2)
    assert np.allclose(small.predict_images(batch), predictor.predict_images(batch), atol=1e-6)


def test_metadata_comes_from_the_checkpoint(predictor, run_dir):
    assert predictor.classes == ["nv", "mel", "bkl"]
    assert predictor.model_id == f"resnet18:{run_dir.name}"
    assert predictor.preprocessing.input_size == (32, 32)
    assert predictor.engine == "torch" and predictor.can_explain


def test_tta_averages_flipped_views(run_dir, predictor, images):
    image = images.sample(seed=1)
    tta = Predictor.from_path(run_dir, tta=True)
    assert tta.tta_views == ("identity", "hflip", "vflip")
    views = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    expected = predictor.predict_images(views).mean(axis=0)
    assert np.allclose(tta.predict_images([image])[0], expected, atol=1e-5)
    assert not np.allclose(tta.predict_images([image])[0], predictor.predict_images([image])[0], atol=1e-7)


def test_tta_views_are_a_registry(run_dir):
    assert {"identity", "hflip", "vflip"} <= set(TTA_VIEWS.list())
    with pytest.raises(ConfigError, match="valid names"):
        Predictor.from_path(run_dir, tta=["identity", "rot45"])


def test_temperature_from_the_checkpoint_softens(predictor, images):
    image = images.sample(seed=2)
    hot = Predictor(replace(predictor.loaded, extras={"temperature": 4.0}))
    base = predictor.predict_images([image])[0]
    logits = np.log(base)
    expected = torch.softmax(torch.from_numpy(logits / 4.0), dim=0).numpy()
    assert hot.temperature == 4.0
    assert np.allclose(hot.predict_images([image])[0], expected, atol=1e-5)
    with pytest.raises(CheckpointError, match="temperature"):
        Predictor(replace(predictor.loaded, extras={"temperature": 0}))


def test_predict_paths_skips_unreadable_files(predictor, images, tmp_path):
    good = [tmp_path / f"good{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        images.sample(seed=i).save(path)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    order = [good[0], tmp_path / "text.png", good[1], tmp_path / "missing.png", tmp_path / "empty.jpg", good[2]]
    errors = []
    results = list(predictor.predict_paths(order, batch_size=2, on_error=lambda p, e: errors.append((p, str(e)))))
    assert [r.path for r in results] == good
    assert [p.name for p, _ in errors] == ["text.png", "missing.png", "empty.jpg"]
    assert all(p.name in message for p, message in errors)
    expected = predictor.predict_images([Image.open(p).convert("RGB") for p in good])
    assert np.allclose(np.stack([r.probabilities for r in results]), expected, atol=1e-6)


def test_concurrent_calls_match_sequential_ones(predictor, images):
    batches = [[images.sample(seed=i), images.sample(seed=i + 1)] for i in range(8)]
    expected = [predictor.predict_images(b) for b in batches]
    barrier = threading.Barrier(4)

    def call(index: int) -> np.ndarray:
        if index < 4:
            barrier.wait(timeout=10)
        if index % 4 == 0:
            predictor.explain(batches[index][0])
        return predictor.predict_images(batches[index])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, range(8)))
    for got, want in zip(results, expected):
        assert np.allclose(got, want, atol=1e-6)


def test_explain_returns_png_and_releases_hooks(predictor, images):
    model = predictor.loaded.model

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hook_count()
    png = predictor.explain(images.sample((80, 60)), target="mel")
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (80, 60)
    assert hook_count() == before
    assert not model.training
    big = Image.open(io.BytesIO(predictor.explain(images.sample((1024, 600)))))
    assert max(big.size) == 512


def test_explain_unknown_class_lists_valid_ones(predictor, images):
    with pytest.raises(ConfigError, match="nv, mel, bkl"):
        predictor.explain(images.sample(), target="scc")


def test_from_path_errors(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="torch, onnx"):
        Predictor.from_path(run_dir, engine="tensorrt")
    with pytest.raises(CheckpointError, match="dermlab export"):
        Predictor.from_path(tmp_path, engine="onnx")
