"""What a run checks before it reads or trains anything: its names and its combinations.

- :func:`check_names`: config fields that pick a component by name (``data.layout``, ``data.augmentation``,
  ``data.sampler``, ``loss.name``, ``mixing.method``, ``train.optimizer``, ``train.scheduler``,
  ``distill.curriculum_shape``, ``model.color_constancy``, ``evaluation.decision_rule``,
  ``evaluation.tta`` / ``tta_candidates`` views, ``evaluation.abstain_scores``) are plain strings in
  :mod:`dermlab.config`, so no name is written twice; each is looked up in its registry, the one list of its
  family's names, and an unknown one is refused naming the field and the valid names.
- :func:`check_combinations`: sections that would not run together as written are refused with a one-line
  reason and the settings that would run, instead of one of them being quietly dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from dermlab.config import Config
from dermlab.data.datasets import AUTO_LAYOUT, LAYOUTS
from dermlab.data.transforms import AUGMENTATIONS, COLOR_CONSTANCY
from dermlab.errors import ConfigError
from dermlab.evaluation.abstention import ABSTENTION_SCORES, needs_features, needs_levels
from dermlab.evaluation.decision import RULES
from dermlab.evaluation.tta import resolve_tta_views
from dermlab.losses import LOSSES
from dermlab.registry import Registry
from dermlab.training.curriculum import CURRICULUM_SHAPES
from dermlab.training.mixing import MIXERS
from dermlab.training.module import LR_SCHEDULES, OPTIMIZERS
from dermlab.training.samplers import SAMPLERS

__all__ = ["check_combinations", "check_names"]


def check_names(config: Config) -> None:
    """Refuse the first name of ``config`` that its registry does not hold (one line naming the field)."""
    data = config.data
    if data.layout != AUTO_LAYOUT:
        _check("data.layout", data.layout, LAYOUTS, extra=[AUTO_LAYOUT])
    _check("data.augmentation", data.augmentation, AUGMENTATIONS)
    _check("data.sampler", data.sampler, SAMPLERS)
    _check("loss.name", config.loss.name, LOSSES)
    _check("mixing.method", config.mixing.method, MIXERS)
    _check("train.optimizer", config.train.optimizer, OPTIMIZERS)
    _check("train.scheduler", config.train.scheduler, LR_SCHEDULES)
    if config.evaluation.decision_rule not in RULES:
        raise ConfigError(f"evaluation.decision_rule: unknown rule {config.evaluation.decision_rule!r}; valid names: {', '.join(RULES)}")
    _check("distill.curriculum_shape", config.distill.curriculum_shape, CURRICULUM_SHAPES)
    if config.model.color_constancy:
        _check("model.color_constancy", config.model.color_constancy, COLOR_CONSTANCY)
    for field, value in (("evaluation.tta", config.evaluation.tta), *(("evaluation.tta_candidates", c) for c in config.evaluation.tta_candidates)):
        try:
            resolve_tta_views(value)
        except ConfigError as error:
            raise ConfigError(f"{field}: {error}") from None
    for score in config.evaluation.abstain_scores:
        _check("evaluation.abstain_scores", score, ABSTENTION_SCORES)
    evaluation = config.evaluation
    if evaluation.abstain_false_rejection > 0 and not evaluation.feature_statistics:
        for score, needs in (("mahalanobis", needs_features), ("level", needs_levels)):
            if needs(evaluation.abstain_scores):
                raise ConfigError(
                    f"evaluation.abstain_scores has {score}, which needs evaluation.feature_statistics: true "
                    "(its statistics are fitted with the feature statistics)"
                )


def _check(field: str, name: str, registry: Registry, extra: Iterable[str] = ()) -> None:
    if name not in registry:
        valid = ", ".join([*extra, *registry.list()])
        raise ConfigError(f"{field}: unknown {registry.family} {name!r}; valid names: {valid}")


def check_combinations(config: Config) -> None:
    """Refuse, before anything trains, the combinations of sections that would not run as written.

    - metadata fusion with Mixup / CutMix (the images would mix, the metadata not) or with distillation (the
      teachers see images only);
    - CutMix / switch in a cached stage 1 (pooled features have no regions to cut), and mixing there with
      distillation (the teachers' cached logits are of unmixed views);
    - the cached trunk of stage 2 with distillation (the teachers need the student's images) or with layer-wise
      learning-rate decay (built for the whole network on images);
    - the feature caches under DDP: they are computed in one process, and switching them off there would
      silently train another recipe, so the run asks for them to be switched off by name.
    """
    if config.model.metadata_fusion and config.mixing.method != "none":
        raise ConfigError(f"model.metadata_fusion does not work with mixing.method={config.mixing.method!r}; set mixing.method=none")
    if config.model.metadata_fusion and config.distill.method != "none":
        raise ConfigError(f"model.metadata_fusion does not work with distill.method={config.distill.method!r}; set distill.method=none")
    if config.model.metadata_dropout > 0 and not config.model.metadata_fusion:
        raise ConfigError(
            f"model.metadata_dropout={config.model.metadata_dropout} withholds metadata from a head that reads none; "
            "set model.metadata_fusion=true or model.metadata_dropout=0"
        )
    train = config.train
    cached_probe_mixes = config.mixing.method != "none" and config.mixing.stage1 and train.cached_features and train.stage1_epochs > 0
    if cached_probe_mixes and config.mixing.method != "mixup":
        raise ConfigError(
            f"mixing.method={config.mixing.method} cuts image regions, and the cached stage 1 trains on pooled "
            "features: set mixing.stage1=false (stage 1 unmixed, later stages mixed) or train.cached_features=false"
        )
    if cached_probe_mixes and config.distill.method != "none":
        raise ConfigError(
            "mixing in the cached stage 1 would mix the features but not the teachers' cached logits: set "
            "mixing.stage1=false or train.cached_features=false"
        )
    if train.stage2_cached_views > 0 and train.stage2_epochs > 0 and config.distill.method != "none":
        raise ConfigError("train.stage2_cached_views does not combine with distillation (the teachers see the images); set it to 0")
    if train.stage2_cached_views > 0 and train.stage2_epochs > 0 and train.layer_decay < 1.0:
        raise ConfigError(
            "train.layer_decay sets the learning rates of the blocks stage 2 trains on images; over the cached trunk "
            "(train.stage2_cached_views) they would be ignored: set train.layer_decay=1 or train.stage2_cached_views=0"
        )
    if train.multi_process and train.cached_features and train.stage1_epochs > 0:
        raise ConfigError(
            "train.cached_features caches stage 1's features in one process and does not run under DDP "
            f"(devices={train.devices}, strategy={train.strategy}, num_nodes={train.num_nodes}); set "
            "train.cached_features=false (stage 1 then trains on images, with a fresh augmentation each epoch)"
        )
    if train.multi_process and train.stage2_cached_views > 0 and train.stage2_epochs > 0:
        raise ConfigError(
            "train.stage2_cached_views caches the frozen trunk's maps in one process and does not run under DDP; "
            "set train.stage2_cached_views=0 (stage 2 then trains on images)"
        )
