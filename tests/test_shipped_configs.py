"""Every config and grid under ``configs/`` loads, every grid run's overrides apply, and stage-2 cuts are valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from dermlab.config import Config, apply_overrides, load_config
from dermlab.models.factory import create_model
from dermlab.models.freezing import freeze_backbone, unfreeze_last_blocks
from dermlab.models.trunk import split_frozen_trunk
from dermlab.training.checks import check_combinations, check_names
from dermlab.training.grid import load_grid, run_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _grid_configs() -> list[tuple[str, Config]]:
    configs = []
    for path in sorted((CONFIGS / "grids").glob("*.yaml")):
        grid = load_grid(path)
        for entry in grid["runs"]:
            configs.append((f"{path.stem}/{entry['name']}", run_config(grid, entry, "DATA")))
    return configs


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_every_grid_run_resolves_to_a_valid_config() -> None:
    configs = _grid_configs()
    assert {name.split("/")[0] for name, _ in configs} >= {"imbalance", "accuracy", "robustness"}
    names = dict(configs)
    # the overrides really land: the reference-A rebuild is not the default in disguise
    assert names["accuracy/reference_a"].data.augmentation == "reference-a"
    assert names["accuracy/reference_a"].model.input_size == [224, 224]
    assert names["accuracy/default"].model.input_size != [224, 224]
    # the default fine-tunes the whole network with EMA; the old default is the cached-trunk recipe it replaced
    assert names["accuracy/default"].train.ema and names["accuracy/default"].train.unfreeze == "all"
    assert names["accuracy/old_default"].train.stage2_cached_views == 4 and not names["accuracy/old_default"].train.ema
    assert names["accuracy/default-seed2"].train.seed != names["accuracy/default"].train.seed
    # the default has colour constancy at a square input; the rows that pin the previous recipe really do
    assert names["robustness/default"].model.color_constancy == "shades_of_gray"
    assert names["robustness/no_color_constancy"].model.color_constancy is None
    previous = names["accuracy/previous_default"]
    assert (previous.model.color_constancy, previous.model.input_size) == (None, [144, 192])
    assert names["accuracy/default"].model.input_size == [168, 168]
    assert names["accuracy/old_default"].model.color_constancy is None and names["accuracy/reference_a"].model.color_constancy is None
    # the default withholds a share of its metadata in training; the rows measured before it did not
    assert names["accuracy/default"].model.metadata_fusion and names["accuracy/default"].model.metadata_dropout > 0
    assert names["accuracy/no_metadata_dropout"].model.metadata_dropout == 0.0 == names["accuracy/previous_default"].model.metadata_dropout
    assert names["imbalance/cutmix_weighted_ce"].mixing.method == "cutmix"
    assert names["imbalance/cutmix_weighted_ce"].loss.name == "weighted_cross_entropy"


@pytest.mark.parametrize("name, config", _grid_configs(), ids=lambda c: c if isinstance(c, str) else "")
def test_every_grid_run_passes_the_checks_a_run_starts_with(name: str, config: Config) -> None:
    """Names in their registries and combinations that run as written: a bad row would fail only when reached."""
    check_names(config)
    check_combinations(config)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_passes_the_checks_a_run_starts_with(path: Path) -> None:
    config = load_config(path)
    check_names(config)
    check_combinations(config)


@pytest.mark.parametrize("name, config", [c for c in _grid_configs() if c[1].train.stage2_cached_views > 0], ids=lambda c: c if isinstance(c, str) else "")
def test_every_cached_stage2_cut_is_valid_for_its_backbone(name: str, config: Config) -> None:
    """A numeric unfreeze that leaves nothing frozen (or everything) would fail only after stage 1 on real data."""
    model_config = apply_overrides(config, ["model.weights=null", "model.pretrained=false"]).model
    model = create_model(model_config, num_classes=7, load_weights=False)
    freeze_backbone(model)
    unfreeze_last_blocks(model, config.train.unfreeze)
    split = split_frozen_trunk(model)
    assert 0 < split.index < split.length
