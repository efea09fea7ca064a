"""A run's declared stages, and the combinations refused before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermlab.config import Config, apply_overrides, load_config
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.transforms import create_transform, describe_transform
from dermlab.errors import ConfigError
from dermlab.training.checks import check_combinations
from dermlab.training.run import STAGE_BUILDERS
from dermlab.training.stages import STAGE_INPUTS, plan_stages

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_the_default_recipe_is_a_linear_probe_on_cached_features_then_the_whole_network_on_images() -> None:
    config = load_config(CONFIGS / "ham10000.yaml")
    probe, finetune = plan_stages(config)
    assert (probe.name, probe.inputs, probe.frozen_backbone, probe.views) == ("stage1", "features", True, config.train.feature_views)
    assert (probe.epochs, probe.lr, probe.ema) == (config.train.stage1_epochs, config.train.stage1_lr, False)
    assert (finetune.name, finetune.inputs, finetune.unfreeze, finetune.ema) == ("stage2", "pixels", "all", True)
    assert finetune.epoch_offset == config.train.stage1_epochs
    assert finetune.batch_size == (config.train.stage2_batch_size or config.data.batch_size)
    assert "the whole network on images" in finetune.describe()
    assert "EMA of the weights" in finetune.describe()


def test_mixing_is_declared_where_it_applies_and_where_it_does_not() -> None:
    trunk = ["train.unfreeze=3", "train.stage2_cached_views=2"]
    cached = plan_stages(apply_overrides(Config(), ["mixing.method=cutmix", "mixing.stage1=false", *trunk]))
    assert [(stage.inputs, stage.mixing) for stage in cached] == [("features", "none"), ("trunk", "cutmix")]
    assert "no cutmix (mixing.stage1 is off)" in cached[0].describe("cutmix")
    assert "cutmix of the trunk maps" in cached[1].describe("cutmix")
    probe = plan_stages(apply_overrides(Config(), ["mixing.method=mixup", *trunk]))
    assert [(stage.inputs, stage.mixing) for stage in probe] == [("features", "mixup"), ("trunk", "mixup")]
    assert "mixup of the pooled features" in probe[0].describe("mixup")
    on_pixels = plan_stages(apply_overrides(Config(), ["mixing.method=cutmix", "train.cached_features=false"]))
    assert [(stage.inputs, stage.mixing) for stage in on_pixels] == [("pixels", "cutmix"), ("pixels", "cutmix")]
    unmixed = plan_stages(Config())
    assert "mix" not in unmixed[0].describe("none")


def test_a_stage_left_at_zero_epochs_is_not_planned() -> None:
    only_probe = plan_stages(apply_overrides(Config(), ["train.stage2_epochs=0"]))
    assert [stage.name for stage in only_probe] == ["stage1"]
    only_finetune = plan_stages(apply_overrides(Config(), ["train.stage1_epochs=0"]))
    assert [(stage.name, stage.epoch_offset) for stage in only_finetune] == [("stage2", 0)]


def test_without_augmentation_a_cache_holds_one_exact_view() -> None:
    stages = plan_stages(apply_overrides(Config(), ["data.augmentation=none", "train.unfreeze=2", "train.stage2_cached_views=4"]))
    assert [stage.views for stage in stages] == [1, 1]


def test_every_stage_input_has_a_builder() -> None:
    assert set(STAGE_BUILDERS) == set(STAGE_INPUTS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.devices=2", "train.strategy=ddp"], "train.cached_features=false"),
        (["train.devices=2", "train.cached_features=false", "train.unfreeze=2", "train.stage2_cached_views=2"], "train.stage2_cached_views=0"),
        (["train.num_nodes=2", "train.stage1_epochs=2"], "does not run under DDP"),
        (["train.unfreeze=2", "train.stage2_cached_views=2", "train.layer_decay=0.8"], "train.layer_decay"),
        (["train.unfreeze=2", "train.stage2_cached_views=2", "distill.method=kd", "distill.teachers=[run]"], "distillation"),
        (["model.metadata_fusion=true", "mixing.method=mixup"], "mixing.method='mixup'"),
        (["mixing.method=cutmix"], "mixing.stage1=false"),  # a cached stage 1 has no regions to cut
        (["mixing.method=switch"], "train.cached_features=false"),
        (["mixing.method=mixup", "distill.method=kd", "distill.teachers=[run]"], "teachers' cached logits"),
        (["model.metadata_fusion=true", "distill.method=kd", "distill.teachers=[run]"], "distill.method='kd'"),
    ],
)
def test_combinations_that_would_not_run_as_written_are_refused_up_front(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_combinations(apply_overrides(Config(), overrides))


def test_ddp_runs_once_the_caches_are_switched_off_by_name() -> None:
    check_combinations(apply_overrides(Config(), ["train.devices=2", "train.strategy=ddp", "train.cached_features=false"]))
    check_combinations(apply_overrides(Config(), ["train.devices=2", "train.stage1_epochs=0"]))  # no stage 1: no cache
    check_combinations(apply_overrides(Config(), ["train.devices=1"]))  # one process: the caches run


def test_an_edited_augmentation_changes_the_feature_cache_key() -> None:
    from torchvision.transforms import v2

    pre = Preprocessing(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    derm = create_transform("derm", pre, train=True)
    assert describe_transform(derm) == describe_transform(create_transform("derm", pre, train=True))
    assert describe_transform(derm) != describe_transform(create_transform("derm-robust", pre, train=True))
    assert describe_transform(derm) != describe_transform(create_transform("derm", pre, train=False))
    # RandomApply's repr leaves its probability out; the key does not
    sometimes = v2.Compose([v2.RandomApply([v2.GaussianBlur(3)], p=0.2)])
    often = v2.Compose([v2.RandomApply([v2.GaussianBlur(3)], p=0.8)])
    assert repr(sometimes) == repr(often)
    assert describe_transform(sometimes) != describe_transform(often)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.sampler=balance", "data.sampler"),
        ("data.layout=ham", "data.layout"),
        ("data.augmentation=dermoscopy", "data.augmentation"),
        ("mixing.method=mix", "mixing.method"),
        ("distill.curriculum_shape=steep", "distill.curriculum_shape"),
        ("loss.name=focus", "loss.name"),
        ("evaluation.tta=[hflip,spin]", "evaluation.tta"),
        ("train.optimizer=sgdm", "train.optimizer"),
        ("train.scheduler=step", "train.scheduler"),
        ("evaluation.decision_rule=bayes", "evaluation.decision_rule"),
    ],
)
def test_an_unknown_name_is_refused_naming_its_field_and_the_registered_names(override: str, field: str) -> None:
    from dermlab.training.checks import check_names

    config = apply_overrides(Config(), [override])  # the config holds plain strings: the registry decides
    with pytest.raises(ConfigError, match=rf"^{field.replace('.', '[.]')}: unknown .*valid"):
        check_names(config)


def test_every_registered_name_passes() -> None:
    from dermlab.data.datasets import layout_choices
    from dermlab.training.checks import check_names
    from dermlab.training.mixing import MIXERS
    from dermlab.training.samplers import SAMPLERS

    for layout in layout_choices():
        check_names(apply_overrides(Config(), [f"data.layout={layout}"]))
    for sampler in SAMPLERS:
        check_names(apply_overrides(Config(), [f"data.sampler={sampler}"]))
    for method in MIXERS:
        check_names(apply_overrides(Config(), [f"mixing.method={method}"]))
    from dermlab.training.module import LR_SCHEDULES, OPTIMIZERS

    for optimizer in OPTIMIZERS:
        check_names(apply_overrides(Config(), [f"train.optimizer={optimizer}"]))
    for schedule in LR_SCHEDULES:
        check_names(apply_overrides(Config(), [f"train.scheduler={schedule}"]))
