"""Reading images: the one place where files and uploads become RGB ``PIL.Image`` objects.

Every reader of pixels goes through :func:`read_image` (files) or :func:`open_image_bytes` (uploads), so every
problem with an image (missing, empty, not an image, truncated, too large) surfaces as one
``DataError("<path>: <why>")`` at the moment the image is read, during ``info``, training or serving alike.

Conversions to RGB:

- ``RGBA``, ``LA``, ``PA`` and palette images with transparency are **composited on white**. Dropping the
  alpha channel instead would show whatever the transparent pixels happen to hold (often black or stale
  colour), which differs between the tools that wrote the file; white is deterministic and reads as a cut-out
  on paper.
- 16-bit greyscale (``I;16`` and its byte orders) is scaled by ``255 / 65535`` (not clipped). 32-bit integer
  ``I`` images are treated the same way when their values exceed 255 (older Pillows and some TIFFs give
  16-bit data as ``I``); otherwise they already hold 8-bit values. Float ``F`` images in ``[0, 1]`` are
  scaled by 255, others clipped.
- ``CMYK`` (Adobe-inverted JPEGs are already handled by Pillow's JPEG reader), ``YCbCr``, ``LAB``, ``HSV``,
  ``1`` and ``L`` use Pillow's own conversions.
- Animated images (GIF, APNG, WebP, MPO) give their first frame.
- The EXIF orientation tag is applied (``ImageOps.exif_transpose``).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermlab.errors import DataError

__all__ = ["DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "read_image", "open_image_bytes"]

DEFAULT_MAX_PIXELS = 40_000_000
"""Images with more pixels than this are refused as possible decompression bombs (about 7300x5500)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""File suffixes (lower case) that dataset readers treat as images."""

_BOMB = "image too large, refused as a possible decompression bomb"
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read ``path`` fully into an RGB image, EXIF-transposed.

    ``max_pixels`` (``None`` = no limit of ours) applies to this call only; Pillow's global limit is left
    alone.
    Raises ``DataError("<path>: <why>")`` for a missing, empty, unreadable, truncated or too large file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed below; Pillow reads lazily from it
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    with stream:
        return _decode(stream, str(path), max_pixels)


def open_image_bytes(
    data: bytes, name: str = "upload", max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode an uploaded image held in memory; same checks and conversions as :func:`read_image`.

    ``name`` (e.g. the upload's file name) starts every error message.
    """
    if not data:
        raise DataError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(stream: IO[bytes], name: str, max_pixels: int | None) -> Image.Image:
    """Open, check the size from the header, fully decode the first frame and convert to RGB."""
    try:
        with warnings.catch_warnings():
            # Our per-call limit replaces Pillow's warning; its hard error still applies as an outer bound.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image file (format not recognised)") from None
    except Image.DecompressionBombError as error:
        raise DataError(f"{name}: {_BOMB} ({error})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise DataError(f"{name}: {_reason(error, 'cannot open image')}") from None
    # Not ``with image``: closing a Pillow image frees its pixels, and the caller closes the stream.
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"{name}: image too large ({width}x{height} = {width * height} pixels, limit {max_pixels}); "
            "refused as a possible decompression bomb"
        )
    if width == 0 or height == 0:
        raise DataError(f"{name}: image has no pixels ({width}x{height})")
    try:
        image.load()  # full decode now (first frame), so truncation fails here, not deep inside a batch
    except Image.DecompressionBombError as error:
        raise DataError(f"{name}: {_BOMB} ({error})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise DataError(f"{name}: {_reason(error, 'cannot decode image')}") from None
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make a readable image unreadable
        oriented = image
    return _to_rgb(oriented if oriented is not None else image, name)


def _reason(error: BaseException, what: str) -> str:
    """``what (detail)``, saying "truncated" plainly when Pillow's message hints at it."""
    detail = str(error) or type(error).__name__
    if "truncated" in detail.lower():
        return f"truncated or corrupt image ({detail})"
    return f"{what} ({detail})"


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I" or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode), mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise DataError(f"{name}: cannot convert image mode {mode} to RGB ({error})") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float greyscale values to 0..255."""
    values = values.astype(np.float64)
    if mode == "F":
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
    elif mode in _SIXTEEN_BIT_MODES or (values.size and values.max() > 255):
        values = values * (255.0 / 65535.0)
    return np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
