"""The decoded-image cache: built once, reused, invalidated by content, never trusted half-built, and giving
the same eval tensors as decoding the files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dermlab.data.cache as cache_module
from dermlab.data.cache import build_image_cache, cached_size, content_key, create_image_loader, resize_geometry
from dermlab.data.datamodule import DermDataModule, ImageDataset
from dermlab.data.images import read_image
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError, DataError

PREPROCESSING = Preprocessing((48, 56), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLASSES = ["a", "b"]


def _textured_jpeg(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    """A JPEG with gradients, noise and a blob: resampling differences show up on it, unlike on flat colour."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, 128 + 60 * np.sin(x / 7.0 + seed)], axis=-1)
    pixels += rng.normal(0, 20, pixels.shape)
    cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
    pixels[(y - cy) ** 2 + (x - cx) ** 2 < (height // 5) ** 2] *= 0.4
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return [_textured_jpeg(tmp_path / "images" / f"img{i}.jpg", seed=i) for i in range(6)]


@pytest.fixture
def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every file the cache decodes."""
    decoded: list[str] = []

    def counting_read(path, *args, **kwargs):
        decoded.append(str(path))
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "read_image", counting_read)
    return decoded


def _frame(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "label": [CLASSES[i % 2] for i in range(len(paths))]})


def test_second_build_is_a_hit_without_decoding(images: list[Path], tmp_path: Path, count_decodes: list[str]) -> None:
    first = build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    assert sorted(count_decodes) == sorted(map(str, images))
    assert first.decoded == len(images)
    count_decodes.clear()
    second = build_image_cache(reversed(images), tmp_path / "cache", (48, 56), progress=False)
    assert count_decodes == [] and second.decoded == 0
    assert second.store == first.store
    for path in images:
        np.testing.assert_array_equal(second.array(path), first.array(path))
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 1


def test_moved_dataset_hits_the_cache_by_content(images: list[Path], tmp_path: Path, count_decodes: list[str]) -> None:
    build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    moved = []
    for path in images:
        target = tmp_path / "moved" / path.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
        moved.append(target)
    count_decodes.clear()
    cache = build_image_cache(moved, tmp_path / "cache", (48, 56), progress=False)
    assert count_decodes == [] and len(cache) == len(moved)


def test_changed_content_invalidates_and_only_that_image_is_decoded(
    images: list[Path], tmp_path: Path, count_decodes: list[str]
) -> None:
    old = build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    before = old.array(images[2]).copy()
    _textured_jpeg(images[2], seed=99)  # same path, new pixels
    count_decodes.clear()
    new = build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    assert count_decodes == [str(images[2])]  # the other rows are copied from the old store
    assert new.store != old.store
    assert not np.array_equal(new.array(images[2]), before)
    np.testing.assert_array_equal(new.array(images[0]), old.array(images[0]))
    expected = np.asarray(create_transform("none", PREPROCESSING, train=False).transforms[0](read_image(images[2])))
    np.testing.assert_array_equal(new.array(images[2]), expected)


def test_other_size_or_filter_is_a_separate_store(images: list[Path], tmp_path: Path, count_decodes: list[str]) -> None:
    build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    count_decodes.clear()
    bigger = build_image_cache(images, tmp_path / "cache", (48, 56), margin=0.25, progress=False)
    bilinear = build_image_cache(images, tmp_path / "cache", (48, 56), interpolation="bilinear", progress=False)
    assert len(count_decodes) == 2 * len(images)
    assert bigger.size == (60, 70) and bigger.array(images[0]).shape == (60, 70, 3)
    assert bilinear.store != bigger.store


@pytest.mark.parametrize("damage", ["no_index", "truncated_array", "no_array", "wrong_index", "foreign_keys"])
def test_a_half_built_store_is_never_trusted(
    images: list[Path], tmp_path: Path, count_decodes: list[str], damage: str
) -> None:
    cache = build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    index = cache.store.with_suffix(".json")
    if damage == "no_index":
        index.unlink()
    elif damage == "truncated_array":
        data = cache.store.read_bytes()
        cache.store.write_bytes(data[: len(data) // 2])
    elif damage == "no_array":
        cache.store.unlink()
    elif damage == "foreign_keys":  # right geometry and count, rows for other images
        values = json.loads(index.read_text())
        values["rows"] = {f"other{i}": row for i, row in enumerate(values["rows"].values())}
        index.write_text(json.dumps(values))
    else:
        index.write_text('{"geometry": {}, "rows": {}}')
    (cache.store.parent / ".leftover.npy.123.tmp").write_bytes(b"half a build")
    count_decodes.clear()
    rebuilt = build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    assert len(count_decodes) == len(images)  # nothing reused from the damaged store
    np.testing.assert_array_equal(rebuilt.array(images[1]), np.asarray(rebuilt.read(images[1])))


@pytest.mark.parametrize("margin", [0.0, 0.25])
def test_eval_tensors_match_decoding_the_files(images: list[Path], tmp_path: Path, margin: float) -> None:
    transform = create_transform("none", PREPROCESSING, train=False)
    cache = build_image_cache(images, tmp_path / "cache", PREPROCESSING.input_size, margin=margin, progress=False)
    from_files = ImageDataset(_frame(images), CLASSES, transform)
    from_cache = ImageDataset(_frame(images), CLASSES, transform, image_loader=cache)
    difference = max(float((from_files[i][0] - from_cache[i][0]).abs().max()) for i in range(len(images)))
    if margin == 0.0:
        assert difference == 0.0  # the cached image already has the input size: the transform's resize is a no-op
    else:
        # two resamplings (to 1.25x, then to 1x) instead of one. Measured on this texture: max 0.12 in
        # normalised units (about 7 of 255 grey levels), mean 0.015; on 600x450 HAM10000 images at 224 px:
        # max 0.16, mean 0.006
        assert 0.0 < difference < 0.35
        mean = np.mean([float((from_files[i][0] - from_cache[i][0]).abs().mean()) for i in range(len(images))])
        assert mean < 0.03


def test_augmented_views_from_the_cache_equal_those_from_files(images: list[Path], tmp_path: Path) -> None:
    transform = create_transform("derm", PREPROCESSING, train=True)
    cache = build_image_cache(images, tmp_path / "cache", PREPROCESSING.input_size, progress=False)
    from_files = ImageDataset(_frame(images), CLASSES, transform)
    from_cache = ImageDataset(_frame(images), CLASSES, transform, image_loader=cache)
    for i in range(3):
        assert torch.equal(from_files[(i, 1000 + i)][0], from_cache[(i, 1000 + i)][0])


def test_concurrent_worker_readers_see_the_same_batches(images: list[Path], tmp_path: Path) -> None:
    frame = _frame(images).assign(split="val")
    transform = create_transform("none", PREPROCESSING, train=False)
    cache = build_image_cache(images, tmp_path / "cache", PREPROCESSING.input_size, progress=False)

    def batches(workers: int, loader) -> torch.Tensor:
        module = DermDataModule(
            frame, CLASSES, transform, transform, eval_batch_size=2, num_workers=workers, image_loader=loader
        )
        return torch.cat([images for images, _ in module.val_dataloader()])

    assert torch.equal(batches(2, cache), batches(0, read_image))


def test_pickled_cache_reopens_its_memory_map(images: list[Path], tmp_path: Path) -> None:
    cache = build_image_cache(images, tmp_path / "cache", (48, 56), progress=False)
    expected = cache.array(images[0]).copy()  # opens the memory map in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._array is None  # a worker opens its own map
    np.testing.assert_array_equal(clone.array(images[0]), expected)
    assert images[0] in clone and tmp_path / "other.jpg" not in clone


def test_a_path_outside_the_cache_is_read_from_its_file(images: list[Path], tmp_path: Path) -> None:
    cache = build_image_cache(images[:2], tmp_path / "cache", (48, 56), progress=False)
    assert cache.read(images[3]).size == (160, 120)
    with pytest.raises(KeyError):
        cache.array(images[3])


def test_unreadable_file_raises_data_error_naming_it(images: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "images" / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="bad.jpg"):
        build_image_cache([*images, bad], tmp_path / "cache", (48, 56), progress=False)
    with pytest.raises(DataError, match="missing.jpg"):
        content_key(tmp_path / "missing.jpg")
    assert not list((tmp_path / "cache" / "images").glob("*.json"))


def test_geometry_comes_from_the_transform(images: list[Path], tmp_path: Path) -> None:
    bilinear = Preprocessing((40, 30), PREPROCESSING.mean, PREPROCESSING.std, "bilinear")
    transform = create_transform("reference-b", bilinear, train=True)
    assert resize_geometry(transform) == ((40, 30), "bilinear")
    loader = create_image_loader(images, tmp_path / "cache", transform, progress=False)
    assert loader.size == (40, 30)
    assert create_image_loader(images, None, transform) is read_image
    assert create_image_loader(images, tmp_path / "cache", lambda image: image) is read_image
    assert cached_size((100, 200), 0.1) == (110, 220)
    with pytest.raises(ConfigError):
        cached_size((100, 200), -0.5)


@pytest.mark.slow
def test_training_run_uses_the_image_cache_and_channels_last(ham_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from dermlab.config import Config, apply_overrides
    from dermlab.models.checkpoint import load_checkpoint
    from dermlab.training.run import train_run

    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    overrides = [
        f"data.path={ham_dir}", "model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "data.num_workers=0",
        "data.batch_size=8", "train.stage1_epochs=0", "train.stage2_epochs=1", f"data.cache_dir={tmp_path / 'cache'}",
        "train.channels_last=true",
    ]
    train_run(apply_overrides(Config(), overrides), tmp_path / "run")
    (store,) = (tmp_path / "cache" / "images").glob("*.npy")
    assert np.load(store, mmap_mode="r").shape == (56, 32, 32, 3)  # every image of every split, at the input size
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stem = saved["state_dict"]["model.backbone.conv_stem.weight"]
    assert stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
    assert load_checkpoint(tmp_path / "run").classes  # channels-last weights load back into a plain model


def test_channels_last_and_compile_apply_in_place_without_renaming_weights() -> None:
    """``train.channels_last`` / ``train.compile`` (wired by the training run's trainer callback)."""
    from types import SimpleNamespace

    from dermlab.training.run import _ChannelsLastAndCompile

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    keys = list(model.state_dict())
    _ChannelsLastAndCompile(channels_last=True, compile=True).setup(None, SimpleNamespace(model=model), "fit")
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
    assert model._compiled_call_impl is not None  # compiled lazily, on the first call
    assert list(model.state_dict()) == keys  # checkpoints keep their keys
