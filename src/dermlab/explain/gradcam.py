"""Class activation maps by name, with the target layer resolved per backbone family.

The CAM classes come from the ``grad-cam`` package (``pytorch_grad_cam``). What this module adds: a registry
of methods, the target layer and reshape transform for each timm backbone family (looking inside a
``DermClassifier``'s ``.backbone``), and ``CamExplainer``, a context manager that registers hooks on entry,
releases them on exit, keeps the model's train/eval state and returns maps of the input's size in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from dermlab.errors import ConfigError
from dermlab.registry import Registry

__all__ = [
    "CAM_METHODS",
    "CamExplainer",
    "overlay_cam",
    "resolve_reshape_transform",
    "resolve_target_layer",
]

ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


class _QuietScoreCAM(ScoreCAM):
    """Score-CAM without a progress bar, masking the input one channel batch at a time.

    The upstream version builds every masked copy of the input at once (channels x 3 x H x W per image, over a
    gigabyte for a 2048-channel layer at 224 px) and prints a tqdm bar per image.
    """

    batch_size = 16

    def get_cam_weights(
        self,
        input_tensor: torch.Tensor,
        target_layer: nn.Module,
        targets: list[Callable[[torch.Tensor], torch.Tensor]],
        activations: np.ndarray,
        grads: np.ndarray | None,
    ) -> np.ndarray:
        with torch.no_grad():
            upsampled = nn.functional.interpolate(
                torch.from_numpy(activations).to(self.device),
                size=input_tensor.shape[-2:],
                mode="bilinear",
                align_corners=True,
            )
            flat = upsampled.flatten(2)
            mins = flat.min(dim=-1).values[:, :, None, None]
            maxs = flat.max(dim=-1).values[:, :, None, None]
            upsampled = (upsampled - mins) / (maxs - mins + 1e-8)
            scores = torch.empty(activations.shape[:2])
            for index, (target, image) in enumerate(zip(targets, input_tensor)):
                for start in range(0, upsampled.shape[1], self.batch_size):
                    masks = upsampled[index, start : start + self.batch_size, None]
                    outputs = self.model(image[None] * masks)
                    scores[index, start : start + len(masks)] = torch.stack([target(o) for o in outputs])
            return torch.softmax(scores, dim=-1).numpy()


CAM_METHODS: Registry[type[BaseCAM]] = Registry("CAM method")
CAM_METHODS.add("gradcam", GradCAM)
CAM_METHODS.add("gradcam++", GradCAMPlusPlus)
CAM_METHODS.add("hirescam", HiResCAM)
CAM_METHODS.add("scorecam", _QuietScoreCAM)
CAM_METHODS.add("eigencam", EigenCAM)
CAM_METHODS.add("layercam", LayerCAM)


# ------------------------------------------------------------------------------------------- target layers


class _TokensToGrid:
    """Turns ViT tokens ``(N, prefix + h*w, C)`` into a map ``(N, C, h, w)``, dropping the prefix tokens.

    The grid follows the input size when ``set_input_size`` was called (dynamic-size ViTs), else the patch
    embedding's fixed grid, else a square grid.
    """

    def __init__(self, patch_embed: nn.Module | None, num_prefix_tokens: int) -> None:
        self.patch_embed = patch_embed
        self.num_prefix_tokens = num_prefix_tokens
        self.input_size: tuple[int, int] | None = None

    def set_input_size(self, height: int, width: int) -> None:
        self.input_size = (int(height), int(width))

    def _grid(self, num_tokens: int) -> tuple[int, int]:
        candidates: list[tuple[int, int]] = []
        feat_size = getattr(self.patch_embed, "dynamic_feat_size", None)
        if self.input_size is not None and callable(feat_size):
            candidates.append(tuple(feat_size(self.input_size)))  # type: ignore[arg-type]
        grid_size = getattr(self.patch_embed, "grid_size", None)
        if grid_size is not None:
            candidates.append((int(grid_size[0]), int(grid_size[1])))
        side = round(num_tokens**0.5)
        candidates.append((side, side))
        for height, width in candidates:
            if height * width == num_tokens:
                return height, width
        raise ConfigError(f"cannot arrange {num_tokens} ViT patch tokens into a 2-D grid for the CAM")

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ConfigError(f"expected ViT tokens of shape (N, tokens, C), got {tuple(tokens.shape)}")
        patches = tokens[:, self.num_prefix_tokens :, :]
        height, width = self._grid(patches.shape[1])
        return patches.reshape(patches.shape[0], height, width, patches.shape[2]).permute(0, 3, 1, 2)


def _channels_last_to_first(features: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` -> ``(N, C, H, W)`` for backbones whose stages emit channels-last maps (e.g. Swin)."""
    return features.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _Resolved:
    family: str
    layer: nn.Module
    reshape_transform: ReshapeTransform | None


def _backbone_of(model: nn.Module) -> nn.Module:
    """The timm network inside a ``DermClassifier`` (``.backbone``), or the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else model


def _family_rules() -> list[tuple[str, type[nn.Module], Callable[[Any], nn.Module]]]:
    # Imported here so that importing dermlab.explain does not pull in every timm model module up front.
    from timm.models.convnext import ConvNeXt
    from timm.models.densenet import DenseNet
    from timm.models.efficientnet import EfficientNet
    from timm.models.inception_resnet_v2 import InceptionResnetV2
    from timm.models.resnet import ResNet

    # Each layer is the last spatial map before global pooling, taken after its activation so the map is not
    # dominated by negative pre-activation values. EfficientNet (b*, lite*, tf_*): bn2 is BatchNormAct2d, i.e.
    # conv_head -> BN -> SiLU/ReLU6. DenseNet: norm5 is BatchNormAct2d too.
    return [
        ("resnet", ResNet, lambda m: m.layer4[-1]),
        ("efficientnet", EfficientNet, lambda m: m.bn2),
        ("densenet", DenseNet, lambda m: m.features.norm5),
        ("inception_resnet_v2", InceptionResnetV2, lambda m: m.conv2d_7b),
        ("convnext", ConvNeXt, lambda m: m.stages[-1]),
    ]


def _is_vit_like(backbone: nn.Module) -> bool:
    return (
        hasattr(backbone, "blocks")
        and hasattr(backbone, "patch_embed")
        and hasattr(backbone, "num_prefix_tokens")
        and len(backbone.blocks) > 0
        and hasattr(backbone.blocks[-1], "norm1")
    )


def _resolve(model: nn.Module) -> _Resolved:
    backbone = _backbone_of(model)
    for family, cls, get_layer in _family_rules():
        if isinstance(backbone, cls):
            return _Resolved(family, get_layer(backbone), None)
    if _is_vit_like(backbone):  # ViT, DeiT (two prefix tokens), register-token ViTs, EVA-style blocks
        reshape = _TokensToGrid(backbone.patch_embed, int(backbone.num_prefix_tokens))
        return _Resolved("vit", backbone.blocks[-1].norm1, reshape)
    return _probe_last_feature_map(backbone)


def _probe_last_feature_map(backbone: nn.Module) -> _Resolved:
    """Generic fallback: run a dummy input and take the last module whose output is a 4-D spatial map."""
    name = type(backbone).__name__
    try:
        parameter = next(backbone.parameters())
        device, dtype = parameter.device, parameter.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))

    seen: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and module is not backbone:
            seen.append((module, tuple(output.shape)))

    handles = [module.register_forward_hook(record) for module in backbone.modules()]
    modes = {module: module.training for module in backbone.modules()}
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, channels, height, width, device=device, dtype=dtype))
    except Exception as error:  # any failure here means we cannot guess a layer
        message = f"cannot find a CAM target layer for {name}: dummy forward failed ({error})"
        raise ConfigError(message) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)

    num_features = getattr(backbone, "num_features", None)
    candidates = []
    for module, shape in seen:
        channels_last = num_features is not None and shape[3] == num_features and shape[1] != num_features
        spatial = shape[1] * shape[2] if channels_last else shape[2] * shape[3]
        if spatial > 1:  # skip maps already pooled to 1x1 (e.g. MobileNetV3's conv_head)
            candidates.append((module, channels_last))
    if not candidates:
        raise ConfigError(f"cannot find a CAM target layer for {name}: no module produces a 4-D feature map")
    layer, channels_last = candidates[-1]
    return _Resolved("generic", layer, _channels_last_to_first if channels_last else None)


def resolve_target_layer(model: nn.Module) -> nn.Module:
    """The layer whose activations the CAM uses, for a ``DermClassifier`` or a bare timm model.

    ResNet ``layer4[-1]``; EfficientNet (incl. Lite and tf_) ``bn2``; DenseNet ``features.norm5``;
    Inception-ResNet-v2 ``conv2d_7b``; ConvNeXt ``stages[-1]``; ViT/DeiT ``blocks[-1].norm1``; any other
    network: the last module with a spatial 4-D output on a dummy input. Raises ``ConfigError`` when there is
    none.
    """
    return _resolve(model).layer


def resolve_reshape_transform(model: nn.Module) -> ReshapeTransform | None:
    """The transform from the target layer's output to ``(N, C, h, w)``; ``None`` for CNN backbones."""
    return _resolve(model).reshape_transform


# ------------------------------------------------------------------------------------------- explainer


class CamExplainer:
    """Computes class activation maps; hooks live only inside the ``with`` block.

    >>> with CamExplainer(model, method="gradcam") as cam:
    ...     maps = cam(images)  # (N, H, W) float32 in [0, 1], for the predicted classes

    The model is put in eval mode inside the block and every module's train/eval flag is restored on exit.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "gradcam",
        target_layer: nn.Module | None = None,
        reshape_transform: ReshapeTransform | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.target_layer = target_layer
        self.reshape_transform = reshape_transform
        self._cam_class = CAM_METHODS.get(method)
        self._cam: BaseCAM | None = None
        self._modes: dict[nn.Module, bool] = {}
        self._reshape: ReshapeTransform | None = None

    def __enter__(self) -> CamExplainer:
        if self._cam is not None:
            raise RuntimeError("CamExplainer is already open")
        layer, reshape = self.target_layer, self.reshape_transform
        if layer is None:
            resolved = _resolve(self.model)
            layer = resolved.layer
            reshape = reshape if reshape is not None else resolved.reshape_transform
        self._reshape = reshape
        self._modes = {module: module.training for module in self.model.modules()}
        try:
            self.model.eval()
            self._cam = self._cam_class(model=self.model, target_layers=[layer], reshape_transform=reshape)
        except BaseException:
            self._restore_modes()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Release directly rather than through BaseCAM.__exit__, which swallows IndexError.
        self.close()

    def close(self) -> None:
        """Remove every hook and restore the model's train/eval flags (also done on leaving the block)."""
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam.outputs = None
            self._cam = None
        self._restore_modes()

    def _restore_modes(self) -> None:
        for module, training in self._modes.items():
            module.train(training)
        self._modes = {}

    def __call__(self, images: torch.Tensor, targets: Sequence[int] | None = None) -> np.ndarray:
        """CAMs for ``images`` ``(N, C, H, W)``: ``(N, H, W)`` float32 in ``[0, 1]``.

        ``targets`` gives one class index per image; ``None`` explains each image's predicted class.
        """
        if self._cam is None:
            raise RuntimeError("use CamExplainer inside a `with` block")
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ConfigError(f"CAM input must be a tensor of shape (N, C, H, W), got {shape}")
        cam_targets = None if targets is None else self._targets(images, targets)
        if isinstance(self._reshape, _TokensToGrid):
            self._reshape.set_input_size(images.shape[-2], images.shape[-1])

        cam = self._cam
        # Inside torch.no_grad()/inference_mode() the caller's context would break gradient methods; a fresh
        # leaf that requires grad keeps gradients flowing to the target layer even with a frozen backbone.
        with torch.inference_mode(False), torch.set_grad_enabled(cam.uses_gradients):
            inputs = images.detach().clone().requires_grad_(cam.uses_gradients)
            try:
                maps = cam(input_tensor=inputs, targets=cam_targets)
            finally:
                # Drop this call's activations, gradients, graph and parameter grads so nothing accumulates.
                cam.activations_and_grads.clear()
                cam.outputs = None
                self.model.zero_grad(set_to_none=True)
        maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return np.clip(maps, 0.0, 1.0)

    def _targets(self, images: torch.Tensor, targets: Sequence[int]) -> list[ClassifierOutputTarget]:
        targets = [int(target) for target in targets]
        if len(targets) != images.shape[0]:
            raise ConfigError(f"CAM targets: got {len(targets)} class indices for {images.shape[0]} images")
        num_classes = getattr(getattr(self.model, "head", None), "out_features", None)
        for target in targets:
            if target < 0 or (num_classes is not None and target >= num_classes):
                raise ConfigError(f"CAM target class index {target} is out of range ({num_classes} classes)")
        return [ClassifierOutputTarget(target) for target in targets]


# ------------------------------------------------------------------------------------------- overlay


def _as_rgb_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ConfigError(f"overlay image must be (H, W, 3) RGB, got shape {array.shape}")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
        return np.round(array * 255.0).astype(np.uint8)
    raise ConfigError(f"overlay image must be uint8 or float in [0, 1], got {array.dtype}")


def _resize_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D float map to ``(height, width)``."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ConfigError(f"CAM must be a 2-D map, got shape {values.shape}")
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(values).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def overlay_cam(
    image: Image.Image | np.ndarray,
    cam: np.ndarray,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """Blend a CAM (any size, values in ``[0, 1]``) as a colour map over an RGB image: uint8 (H, W, 3)."""
    import matplotlib

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"overlay alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb_uint8(image)
    heat = np.clip(np.nan_to_num(_resize_map(cam, rgb.shape[0], rgb.shape[1])), 0.0, 1.0)
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ConfigError(f"unknown colormap {colormap!r}") from None
    colored = cmap(heat)[:, :, :3] * 255.0
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colored
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)
