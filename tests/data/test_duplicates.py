"""Copies and near-copies: found under resizing, re-encoding, flips, rotations and crops; never merged across
different lesions; kept in one split; a shipped test folder keeps its images while their copies leave train."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermlab.cli import main
from dermlab.config import Config, DataConfig, apply_overrides
from dermlab.data.datasets import load_dataset
from dermlab.data.duplicates import (
    EXCLUDED_FILE,
    copies_of_run_training,
    copy_group_table,
    copy_pairs,
    group_copies,
    record_excluded_copies,
    resolve_copies,
)
from dermlab.data.image_hashes import DIHEDRAL_TRANSPOSES, compute_image_hashes, dihedral_phashes, hash_images
from dermlab.data.splits import create_splits, load_splits, save_splits
from dermlab.errors import ConfigError

CLASSES = ("acne", "eczema", "nevi")


def _lesion(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A synthetic dermoscopy-like photo: uneven skin, an irregular off-centre lesion with texture."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = rng.normal(0.0, 1.0, (4, 5)).astype(np.float32)
    light = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    skin = rng.uniform([190, 140, 120], [235, 185, 165])
    image = skin[None, None, :] + 14.0 * light[..., None]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    angle = np.arctan2(yy - cy, xx - cx)
    radius = rng.uniform(0.15, 0.3) * min(width, height) * (1 + 0.25 * np.sin(3 * angle + rng.uniform(0, 6)))
    stretch = rng.uniform(0.6, 1.6)
    inside = np.hypot((xx - cx) * stretch, (yy - cy) / stretch) <= radius
    texture = rng.normal(0.0, 18.0, (height, width))[..., None]
    image[inside] = rng.uniform([50, 25, 15], [150, 100, 80]) + texture[inside]
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, keep: float) -> Image.Image:
    width, height = image.size
    dx, dy = int(width * (1 - keep) / 2), int(height * (1 - keep) / 2)
    return image.crop((dx, dy, width - dx, height - dy))


COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resized to half": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC),
    "resized to 1.5x": lambda im: im.resize(
        (im.width * 3 // 2, im.height * 3 // 2), Image.Resampling.BICUBIC
    ),
    "jpeg quality 60": lambda im: _jpeg(im, 60),
    "flipped": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "rotated 90 degrees": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "cropped to 90%": lambda im: _crop(im, 0.9),
    "cropped to 90%, re-encoded, rotated": lambda im: _jpeg(_crop(im, 0.9), 60).transpose(
        Image.Transpose.ROTATE_270
    ),
}


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)
    return path


def _folders(root: Path, lesions_per_class: int = 6, first_seed: int = 0) -> Path:
    """``root/<class>/l<seed>.jpg``: distinct synthetic lesions, ``lesions_per_class`` per class."""
    seed = first_seed
    for name in CLASSES:
        for _ in range(lesions_per_class):
            _save(_lesion(seed), root / name / f"l{seed:03d}.jpg")
            seed += 1
    return root


# --- hashing ------------------------------------------------------------------------------------------------


def test_dihedral_hashes_are_imagehash_phash_of_each_flip_and_rotation() -> None:
    imagehash = pytest.importorskip("imagehash")
    rng = np.random.default_rng(0)
    thumbnails = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
    thumbnails[:, :10, :14] = 255  # asymmetric, so every transform differs
    hashes = dihedral_phashes(thumbnails)
    assert hashes.shape == (6, 8) and hashes.dtype == np.uint64
    for thumbnail, row in zip(thumbnails, hashes):
        image = Image.fromarray(thumbnail)
        expected = [
            str(imagehash.phash(image if t is None else image.transpose(t))) for t in DIHEDRAL_TRANSPOSES
        ]
        assert [f"{int(h):016x}" for h in row] == expected
    assert len(set(hashes[0].tolist())) == 8


def test_a_png_resaved_from_a_jpeg_has_the_same_pixel_digest(tmp_path: Path) -> None:
    jpeg = _save(_lesion(1), tmp_path / "a.jpg")
    png = _save(Image.open(jpeg).convert("RGB"), tmp_path / "b.png")
    other = _save(_lesion(2), tmp_path / "c.jpg")
    hashes = compute_image_hashes([jpeg, png, other])
    assert hashes.pixels[0] == hashes.pixels[1] != hashes.pixels[2]
    assert copy_pairs(hashes, "exact").tolist() == [[0, 1]]


@pytest.mark.parametrize("copy", list(COPIES))
def test_near_copies_are_found(copy: str) -> None:
    originals = [_lesion(seed) for seed in range(4)]
    hashes = hash_images([*originals, *(COPIES[copy](image) for image in originals)])
    pairs = {tuple(p) for p in copy_pairs(hashes, "near").tolist()}
    assert pairs == {(i, i + 4) for i in range(4)}, f"{copy}: {sorted(pairs)}"
    assert copy_pairs(hashes, "exact").size == 0  # none of them has the same pixels


def test_different_synthetic_lesions_are_not_merged() -> None:
    hashes = hash_images([_lesion(seed) for seed in range(60)])
    assert copy_pairs(hashes, "near").size == 0


def test_hashes_are_cached_by_file_content_and_new_files_only_are_decoded(tmp_path: Path) -> None:
    data = _folders(tmp_path / "data", lesions_per_class=2)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    first = compute_image_hashes(paths, tmp_path / "cache")
    assert first.decoded == len(paths) and list((tmp_path / "cache" / "duplicates").glob("hashes-*.npz"))
    again = compute_image_hashes(paths, tmp_path / "cache")
    assert again.decoded == 0
    np.testing.assert_array_equal(again.phash, first.phash)
    np.testing.assert_array_equal(again.colour, first.colour)
    added = _save(_lesion(99), data / "acne" / "new.jpg")
    grown = compute_image_hashes([*paths, str(added)], tmp_path / "cache")
    assert grown.decoded == 1
    for store in (tmp_path / "cache" / "duplicates").glob("hashes-*.npz"):
        store.write_bytes(b"not a store")  # a damaged cache is never trusted: everything is decoded again
    assert compute_image_hashes(paths, tmp_path / "cache").decoded == len(paths)


def test_worker_processes_hash_exactly_as_this_process_does(tmp_path: Path, monkeypatch) -> None:
    import sys

    import dermlab.data.image_hashes as image_hashes

    if sys.platform != "linux":
        pytest.skip("worker processes are forked on Linux only")
    data = _folders(tmp_path / "data", lesions_per_class=2)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    inline = compute_image_hashes(paths, workers=1)
    monkeypatch.setattr(image_hashes, "_PROCESSES_FROM", 2)
    forked = compute_image_hashes(paths, workers=2)
    np.testing.assert_array_equal(forked.pixels, inline.pixels)
    np.testing.assert_array_equal(forked.phash, inline.phash)
    np.testing.assert_array_equal(forked.colour, inline.colour)


# --- datasets and splits ------------------------------------------------------------------------------------


def _copy_into(source: Path, target: Path, copy: str) -> Path:
    return _save(COPIES[copy](Image.open(source).convert("RGB")), target)


def test_copy_groups_merge_with_lesion_groups_and_never_span_two_splits(tmp_path: Path) -> None:
    root = _folders(tmp_path / "data", lesions_per_class=8)
    _copy_into(root / "acne" / "l000.jpg", root / "acne" / "copy-a.jpg", "jpeg quality 60")
    _copy_into(root / "acne" / "l000.jpg", root / "acne" / "copy-b.png", "rotated 90 degrees")
    _copy_into(root / "eczema" / "l008.jpg", root / "eczema" / "copy-c.jpg", "cropped to 90%")
    (root / "nevi" / "copy-d.jpg").write_bytes((root / "nevi" / "l016.jpg").read_bytes())  # byte-identical
    assert main(["split", str(root), "--out", str(tmp_path / "run"), "--seed", "3"]) == 0
    saved = pd.read_csv(tmp_path / "run" / "splits.csv")
    table = load_dataset(root)
    copies = group_copies(table.frame, compute_image_hashes(table.frame["path"]))
    groups = copy_group_table(copies)
    assert sorted(groups["size"]) == [2, 2, 3] and set(groups["kind"]) == {"exact", "near"}
    split_of = saved.set_index("image_id")["split"]
    for paths in groups["paths"]:
        ids = [Path(p).relative_to(root).as_posix() for p in paths]
        assert split_of[ids].nunique() == 1, ids
        assert saved.set_index("image_id").loc[ids, "group"].nunique() == 1
    assert (saved.groupby("group")["split"].nunique() == 1).all()


def test_lesion_ids_and_copies_are_one_relation(tmp_path: Path) -> None:
    rows = []
    for number in range(6):
        path = _save(_lesion(number), tmp_path / "images" / f"i{number}.jpg")
        rows.append(
            {
                "image_id": f"i{number}",
                "path": f"images/{path.name}",
                "label": "a",
                "lesion_id": f"L{number // 2}",
            }
        )
    _copy_into(
        tmp_path / "images" / "i1.jpg", tmp_path / "images" / "i6.jpg", "flipped"
    )  # lesion L0's image...
    rows.append(
        {"image_id": "i6", "path": "images/i6.jpg", "label": "a", "lesion_id": "L2"}
    )  # ...filed under L2
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    table = load_dataset(tmp_path / "labels.csv")
    resolved = resolve_copies(table, DataConfig())
    group = resolved.table.frame.set_index("image_id")["group"]
    assert group["i0"] == group["i1"] == group["i6"] == group["i4"] == group["i5"] == "L0"
    assert group["i2"] == group["i3"] == "L1"
    assert resolved.merged_groups == 1 and resolved.excluded.empty


def _shipped_test_folder(root: Path) -> Path:
    seed = 0
    for split, count in (("train", 6), ("test", 2)):
        for name in CLASSES:
            for _ in range(count):
                _save(_lesion(seed), root / split / name / f"l{seed:03d}.jpg")
                seed += 1
    test_image = root / "test" / "eczema" / "l020.jpg"
    _copy_into(test_image, root / "train" / "eczema" / "copy-of-test.jpg", "resized to half")
    (root / "train" / "nevi" / "same-bytes.jpg").write_bytes(
        (root / "test" / "nevi" / "l022.jpg").read_bytes()
    )
    return root


def test_a_shipped_test_folder_keeps_all_its_images_while_its_copies_leave_train(tmp_path: Path) -> None:
    root = _shipped_test_folder(tmp_path / "data")
    table = load_dataset(root)
    resolved = resolve_copies(table, DataConfig())
    assert sorted(resolved.excluded["image_id"]) == [
        "train/eczema/copy-of-test.jpg",
        "train/nevi/same-bytes.jpg",
    ]
    assert set(resolved.excluded["reason"]) == {"copy of a test-folder image"}
    assert set(resolved.excluded["copy_of"]) == {"test/eczema/l020.jpg", "test/nevi/l022.jpg"}
    splits = create_splits(resolved.table, seed=1)
    frame = resolved.table.frame.assign(split=splits)
    shipped_test = table.frame["image_id"][table.frame["fixed_split"] == "test"]
    assert sorted(frame.loc[frame["split"] == "test", "image_id"]) == sorted(shipped_test)
    assert len(frame) == len(table.frame) - 2

    lines = record_excluded_copies(resolved, tmp_path / "run")
    listed = pd.read_csv(tmp_path / "run" / EXCLUDED_FILE)
    assert sorted(listed["image_id"]) == sorted(resolved.excluded["image_id"])
    assert "2 image(s) left out (2 copies of test-folder images)" in lines[0]

    kept = resolve_copies(table, DataConfig(keep_test_copies=True))
    assert kept.excluded.empty and kept.kept_test_copies == 2 and len(kept.table.frame) == len(table.frame)


@pytest.mark.slow  # imports the training stack
def test_train_run_data_leaves_test_copies_out_and_lists_them(tmp_path: Path, caplog) -> None:
    from dermlab.data.run_data import prepare_run_data

    root = _shipped_test_folder(tmp_path / "data")
    config = apply_overrides(Config(), [f"data.path={root}", "data.num_workers=0"])
    with caplog.at_level("WARNING"):
        data = prepare_run_data(config, tmp_path / "run")
    assert "copies: 2 image(s) left out" in caplog.text
    assert "train/eczema/copy-of-test.jpg" not in set(data.frame["image_id"])
    assert (data.frame["split"] == "test").sum() == 6
    assert len(pd.read_csv(tmp_path / "run" / EXCLUDED_FILE)) == 2
    assert list((tmp_path / "run" / "cache" / "duplicates").glob("hashes-*.npz"))  # hashed once, kept
    again = prepare_run_data(config, tmp_path / "run")  # reuses splits.csv and the cached hashes
    pd.testing.assert_frame_equal(again.frame, data.frame)


def test_copies_with_conflicting_labels_are_reported_and_left_out(tmp_path: Path) -> None:
    root = _folders(tmp_path / "data", lesions_per_class=4)
    _copy_into(root / "acne" / "l000.jpg", root / "nevi" / "mislabelled.jpg", "jpeg quality 60")
    table = load_dataset(root)
    resolved = resolve_copies(table, DataConfig())
    assert sorted(resolved.excluded["image_id"]) == ["acne/l000.jpg", "nevi/mislabelled.jpg"]
    assert set(resolved.excluded["reason"]) == {"conflicting labels (acne, nevi)"}
    kept = resolve_copies(table, DataConfig(drop_conflicting_copies=False))
    assert kept.excluded.empty
    group = kept.table.frame.set_index("image_id")["group"]
    assert group["acne/l000.jpg"] == group["nevi/mislabelled.jpg"]
    off = resolve_copies(table, apply_overrides(Config(), ["data.duplicates=none"]).data)
    assert off.table is table and off.copies is None


def test_a_splits_file_listing_now_excluded_copies_still_loads(tmp_path: Path) -> None:
    root = _shipped_test_folder(tmp_path / "data")
    table = load_dataset(root)
    old = save_splits(
        table, create_splits(table, seed=0), tmp_path / "splits.csv"
    )  # written without copy rules
    resolved = resolve_copies(table, DataConfig())
    splits = load_splits(old, resolved.table, left_out=resolved.excluded["image_id"])
    assert len(splits) == len(resolved.table.frame) and splits.notna().all()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.duplicates=fuzzy", "data.duplicates"),
        ("data.near_copy_threshold=33", "data.near_copy_threshold"),
        ("data.near_copy_threshold=1.5", "data.near_copy_threshold"),
        ("data.near_copy_color_tolerance=-1", "data.near_copy_color_tolerance"),
    ],
)
def test_bad_copy_settings_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(Config(), [override])


# --- reports ------------------------------------------------------------------------------------------------


def test_info_reports_copies_and_writes_every_group(tmp_path: Path, capsys) -> None:
    root = _shipped_test_folder(tmp_path / "data")
    _copy_into(root / "train" / "acne" / "l000.jpg", root / "train" / "eczema" / "wrong-class.jpg", "flipped")
    csv_file = tmp_path / "copies.csv"
    assert (
        main(["info", str(root), "--duplicates", str(csv_file), "--cache-dir", str(tmp_path / "cache")]) == 0
    )
    out = capsys.readouterr().out
    assert "near: pHash within" in out
    assert "exact copies        1 group(s), 2 images" in out
    assert "near copies         2 group(s), 4 images" in out
    assert "conflicting labels  1 group(s), 2 images" in out
    assert "across folders      2 group(s) (1 pixel-identical), 4 images" in out
    assert "test/nevi/l022.jpg (nevi)" in out
    listed = pd.read_csv(csv_file)
    assert len(listed) == 6 and listed["copy_group"].nunique() == 3
    assert set(listed.columns) >= {"copy_group", "kind", "image_id", "path", "label", "fixed_split", "phash"}
    assert list((tmp_path / "cache" / "duplicates").glob("hashes-*.npz"))


def test_images_of_another_dataset_that_copy_training_images_are_found(tmp_path: Path) -> None:
    root = _folders(tmp_path / "data", lesions_per_class=3)
    table = load_dataset(root)
    run = tmp_path / "run"
    save_splits(table, pd.Series(["train"] * 6 + ["val"] * 3, index=table.frame.index), run / "splits.csv")
    other = tmp_path / "other"
    _copy_into(root / "acne" / "l000.jpg", other / "acne" / "x.jpg", "cropped to 90%")  # a train image
    (other / "nevi").mkdir(parents=True)
    (other / "nevi" / "y.jpg").write_bytes((root / "acne" / "l001.jpg").read_bytes())  # a train image
    _copy_into(root / "nevi" / "l006.jpg", other / "nevi" / "z.jpg", "flipped")  # a val image: not training
    _save(_lesion(50), other / "acne" / "new.jpg")
    frame = load_dataset(other).frame
    copies = copies_of_run_training(frame, run, DataConfig())
    assert sorted(Path(p).name for p in copies["path"]) == ["x.jpg", "y.jpg"]
    assert copies.set_index(copies["path"].map(lambda p: Path(p).name))["exact"].to_dict() == {
        "x.jpg": False,
        "y.jpg": True,
    }
    assert copies_of_run_training(frame, tmp_path / "no-run", DataConfig()) is None


@pytest.mark.slow  # a model scores the images end to end
def test_evaluate_on_another_dataset_warns_about_copies_of_training_images(tmp_path: Path, capsys) -> None:
    import torch

    from dermlab.config import ModelConfig
    from dermlab.models.checkpoint import save_checkpoint
    from dermlab.models.factory import create_model, resolve_preprocessing

    root = _folders(tmp_path / "data", lesions_per_class=2)
    table = load_dataset(root)
    run = tmp_path / "run"
    save_splits(table, pd.Series(["train"] * 4 + ["val", "test"], index=table.frame.index), run / "splits.csv")
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32], weights="none"))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    preprocessing = resolve_preprocessing(model, config.model)
    save_checkpoint(run / "checkpoints" / "best.ckpt", model, config, list(CLASSES), preprocessing)
    other = tmp_path / "other"
    _copy_into(root / "acne" / "l000.jpg", other / "acne" / "copy.jpg", "jpeg quality 60")  # a training image
    _save(_lesion(70), other / "eczema" / "new.jpg")
    _save(_lesion(71), other / "nevi" / "new.jpg")
    assert main(["evaluate", str(run), "--data", str(other), "--out", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 3 images of" in err and "copies of the run's training images" in err
    listed = pd.read_csv(tmp_path / "eval" / "copies_of_training.csv")
    assert listed["path"].map(lambda p: Path(p).name).tolist() == ["copy.jpg"]
    assert listed["copy_of"].map(lambda p: Path(p).name).tolist() == ["l000.jpg"]
