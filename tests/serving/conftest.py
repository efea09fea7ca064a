"""Fixtures for the serving tests: a real tiny checkpoint (resnet18 at 32 px, 3 classes) and image bytes.

Image helpers come as the ``images`` fixture (``images.sample()``, ``images.encode(image, "JPEG")``,
``images.png_header_only(w, h)``) rather than ``from fakes import``, which ``tests/conftest.py`` shadows.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dermlab.config import Config, ModelConfig
from dermlab.models.checkpoint import save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing

CLASSES = ["nv", "mel", "bkl"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding only ``checkpoints/best.ckpt`` of an untrained resnet18 at 32x32."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="resnet18", input_size=[32, 32]))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    root = tmp_path_factory.mktemp("run")
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, CLASSES, resolve_preprocessing(model, config.model))
    return root


FUSION = ModelConfig(name="test_efficientnet", input_size=[32, 32], metadata_fusion=True, weights="none")


def save_fusion_run(
    root: Path, config: Config | None = None, classes: list[str] = CLASSES, seed: int = 0, **extras: object
) -> Path:
    """A run folder with ``checkpoints/best.ckpt`` of an untrained metadata-fusion model (``config.model``,
    default :data:`FUSION`); the metadata encoder's weights are scaled up so metadata moves the probabilities."""
    torch.manual_seed(seed)
    config = config or Config(model=FUSION)
    model = create_model(config.model, len(classes), load_weights=False)
    with torch.no_grad():
        model.metadata_encoder[0].weight.mul_(8.0)
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, classes, resolve_preprocessing(model, config.model), **extras)
    return root


@pytest.fixture(scope="session")
def fusion_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained metadata-fusion run over nv / mel / bkl (no temperature, no abstention, no TTA)."""
    return save_fusion_run(tmp_path_factory.mktemp("fusion"))


@pytest.fixture(scope="session")
def predictor(run_dir: Path):
    from dermlab.serving.predictor import Predictor

    return Predictor.from_path(run_dir)


@pytest.fixture(scope="session")
def onnx_path(run_dir: Path, predictor) -> Path:
    from dermlab.serving.onnx_export import export_onnx

    return export_onnx(predictor.loaded, run_dir / "export" / "model.onnx")


def sample_image(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    """An RGB image with structure (a gradient and a blob), so flips and orientation change the prediction."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 120.0)], axis=-1)
    pixels[: height // 3, : width // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def image_bytes(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def images() -> SimpleNamespace:
    return SimpleNamespace(sample=sample_image, encode=image_bytes, png_header_only=png_header_only)


@pytest.fixture(scope="session")
def make_fusion_run():
    """:func:`save_fusion_run`, for tests that need a fusion run with their own config or extras."""
    return save_fusion_run
