"""read_image / open_image_bytes: conversions to RGB and one clear DataError per kind of bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import write_jpeg
from dermlab.data.images import open_image_bytes, read_image
from dermlab.errors import DataError


def _pixel(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[0, 0])


def test_rgb_jpeg_is_read_fully(tmp_path: Path) -> None:
    image = read_image(write_jpeg(tmp_path / "a.jpg", size=(40, 20)))
    assert image.mode == "RGB" and image.size == (40, 20)


@pytest.mark.parametrize(
    ("mode", "value", "suffix", "expected"),
    [
        ("L", 77, ".png", (77, 77, 77)),
        ("1", 1, ".bmp", (255, 255, 255)),
        ("RGBA", (255, 0, 0, 0), ".png", (255, 255, 255)),  # fully transparent: composited on white
        ("RGBA", (255, 0, 0, 255), ".png", (255, 0, 0)),
        ("LA", (10, 0), ".png", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), ".jpg", (255, 0, 0)),
    ],
)
def test_modes_become_rgb(tmp_path: Path, mode: str, value: object, suffix: str, expected: tuple) -> None:
    path = tmp_path / f"x{suffix}"
    Image.new(mode, (4, 4), value).save(path)
    image = read_image(path)
    assert image.mode == "RGB"
    assert _pixel(image) == pytest.approx(expected, abs=2)


def test_palette_with_transparency_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0] * 256)
    image.save(tmp_path / "p.png", transparency=0)
    assert _pixel(read_image(tmp_path / "p.png")) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100], [65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    gray = np.asarray(read_image(tmp_path / "g16.png"))[..., 0]
    assert gray.tolist() == [[0, 100], [255, 200]]


def test_32_bit_integer_and_float_images(tmp_path: Path) -> None:
    Image.fromarray(np.full((2, 2), 65535, dtype=np.int32), mode="I").save(tmp_path / "i.tif")
    Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    assert _pixel(read_image(tmp_path / "i.tif")) == (255, 255, 255)
    assert _pixel(read_image(tmp_path / "f.tif")) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.new("RGB", (40, 20)).save(tmp_path / "e.jpg", exif=exif)
    assert read_image(tmp_path / "e.jpg").size == (20, 40)


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert _pixel(read_image(tmp_path / "a.gif")) == pytest.approx((255, 0, 0), abs=8)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: int(len(buffer.getvalue()) * 0.7)])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.jpg", "file not found"),
        (lambda d: _write(d / "empty.jpg", b""), "empty file"),
        (lambda d: _write(d / "text.jpg", b"not an image"), "not an image file"),
        (lambda d: _truncated_jpeg(d / "cut.jpg"), "truncated"),
        (lambda d: d, "is a folder"),
    ],
    ids=["missing", "zero-byte", "text", "truncated", "folder"],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as caught:
        read_image(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and reason in message and "\n" not in message


def test_max_pixels_is_per_call_and_leaves_pillow_alone(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "a.jpg", size=(40, 20))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match="too large"):
        read_image(path, max_pixels=799)
    assert read_image(path, max_pixels=800).size == (40, 20)
    assert read_image(path, max_pixels=None).size == (40, 20)
    assert Image.MAX_IMAGE_PIXELS == before


def test_open_image_bytes(tmp_path: Path) -> None:
    data = write_jpeg(tmp_path / "a.jpg").read_bytes()
    assert open_image_bytes(data).size == (32, 32)
    with pytest.raises(DataError, match=r"^photo.jpg: empty file"):
        open_image_bytes(b"", name="photo.jpg")
    with pytest.raises(DataError, match=r"^upload: not an image file"):
        open_image_bytes(b"hello")
    with pytest.raises(DataError, match=r"^upload: truncated"):
        open_image_bytes(_truncated_jpeg(tmp_path / "cut.jpg").read_bytes())
    with pytest.raises(DataError, match="too large"):
        open_image_bytes(data, max_pixels=100)
