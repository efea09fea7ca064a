"""CamExplainer, target-layer resolution and overlays, on tiny timm networks at 32-48 px."""

from __future__ import annotations

import gc
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

from dermlab.errors import ConfigError
from dermlab.explain import (
    CAM_METHODS,
    CamExplainer,
    overlay_cam,
    resolve_reshape_transform,
    resolve_target_layer,
)
from dermlab.models.factory import DermClassifier

ALL_METHODS = ["gradcam", "gradcam++", "hirescam", "scorecam", "eigencam", "layercam"]


def _classifier(name: str, **kwargs: object) -> DermClassifier:
    torch.manual_seed(0)
    return DermClassifier(timm.create_model(name, pretrained=False, num_classes=0, **kwargs), num_classes=3)


def _tiny_vit(**kwargs: object) -> DermClassifier:
    return _classifier("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, **kwargs)


def _hooks_left(model: nn.Module) -> list[str]:
    left = []
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(module, kind, None):
                left.append(f"{name or '<root>'}.{kind}")
    return left


@pytest.fixture(scope="module")
def resnet() -> DermClassifier:
    return _classifier("test_resnet")


@pytest.fixture(scope="module")
def efficientnet() -> DermClassifier:
    return _classifier("test_efficientnet")


def test_registry_lists_the_methods() -> None:
    assert CAM_METHODS.list() == sorted(ALL_METHODS)
    with pytest.raises(ConfigError, match="valid names"):
        CamExplainer(nn.Linear(2, 2), method="nope")


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("model_name", ["resnet", "efficientnet"])
def test_every_method_gives_maps_of_the_input_size(method: str, model_name: str, request) -> None:
    model = request.getfixturevalue(model_name)
    images = torch.randn(1 if method == "scorecam" else 2, 3, 32, 48)  # non-square on purpose
    with CamExplainer(model, method=method) as cam:
        maps = cam(images)
    assert maps.shape == (images.shape[0], 32, 48)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert _hooks_left(model) == []


def test_explicit_targets_and_validation(resnet: DermClassifier) -> None:
    images = torch.randn(2, 3, 32, 32)
    with CamExplainer(resnet) as cam:
        by_target = [cam(images, targets=[target, target]) for target in range(3)]
        predicted = cam(images, targets=None)
        with pytest.raises(ConfigError, match="2 images"):
            cam(images, targets=[0])
        with pytest.raises(ConfigError, match="out of range"):
            cam(images, targets=[0, 3])
        with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
            cam(images[0])
    classes = resnet(images).argmax(dim=1).tolist()
    for row, cls in enumerate(classes):
        np.testing.assert_allclose(predicted[row], by_target[cls][row], atol=1e-5)


def test_vit_cam_on_tokens() -> None:
    model = _tiny_vit()
    assert resolve_target_layer(model) is model.backbone.blocks[-1].norm1
    reshape = resolve_reshape_transform(model)
    tokens = torch.randn(2, 1 + 16, 192)  # class token + a 4x4 grid
    assert reshape(tokens).shape == (2, 192, 4, 4)
    for method in ("gradcam", "layercam"):
        with CamExplainer(model, method=method) as cam:
            maps = cam(torch.randn(2, 3, 32, 32))
        assert maps.shape == (2, 32, 32) and 0.0 <= maps.min() and maps.max() <= 1.0
        assert maps.max() > 0.0
    assert _hooks_left(model) == []


def test_vit_non_square_with_dynamic_size() -> None:
    model = _tiny_vit(dynamic_img_size=True)
    with CamExplainer(model) as cam:
        maps = cam(torch.randn(1, 3, 32, 48))
    assert maps.shape == (1, 32, 48)


def test_deit_prefix_tokens_are_dropped() -> None:
    with torch.device("meta"):
        deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=0)
    assert deit.num_prefix_tokens == 2
    reshape = resolve_reshape_transform(deit)
    tokens = torch.arange(2 * (2 + 196) * 4, dtype=torch.float32).reshape(2, 2 + 196, 4)
    grid = reshape(tokens)
    assert grid.shape == (2, 4, 14, 14)
    assert torch.equal(grid[:, :, 0, 0], tokens[:, 2, :])  # first patch token, not a prefix token


@pytest.mark.parametrize(
    ("name", "layer_path"),
    [
        ("resnet18", "layer4.1"),
        ("efficientnet_lite0", "bn2"),
        ("tf_efficientnet_b0", "bn2"),
        ("densenet121", "features.norm5"),
        ("inception_resnet_v2", "conv2d_7b"),
        ("convnext_atto", "stages.3"),
        ("vit_tiny_patch16_224", "blocks.11.norm1"),
    ],
)
def test_target_layer_per_family(name: str, layer_path: str) -> None:
    with torch.device("meta"):  # only the lookup is tested: no weights allocated
        backbone = timm.create_model(name, pretrained=False, num_classes=0)
    expected = backbone.get_submodule(layer_path)
    assert resolve_target_layer(backbone) is expected
    assert resolve_target_layer(DermClassifier(backbone, num_classes=3)) is expected  # looks inside .backbone
    if not name.startswith("vit"):
        assert resolve_reshape_transform(backbone) is None


def test_fallback_finds_last_feature_map() -> None:
    model = _small_convnet()
    model.train()
    assert resolve_target_layer(model) is model[3]  # the pooled 1x1 map is not a feature map
    assert model.training and _hooks_left(model) == []
    with CamExplainer(model) as cam:
        assert cam(torch.randn(1, 3, 24, 40)).shape == (1, 24, 40)


def test_fallback_handles_channels_last_maps() -> None:
    backbone = timm.create_model("test_mambaout", pretrained=False, num_classes=0)  # stages emit (N, H, W, C)
    reshape = resolve_reshape_transform(backbone)
    assert reshape is not None
    assert reshape(torch.zeros(1, 5, 6, backbone.num_features)).shape == (1, backbone.num_features, 5, 6)


def test_fallback_error_when_no_feature_map() -> None:
    with pytest.raises(ConfigError, match="no module produces a 4-D feature map"):
        resolve_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 224 * 224, 2)))


def test_hooks_released_and_modes_restored(resnet: DermClassifier) -> None:
    resnet.train()
    resnet.backbone.bn1.eval()  # a frozen BN the caller set on purpose must stay in eval
    explainer = CamExplainer(resnet)
    with explainer as cam:
        assert _hooks_left(resnet) != []
        assert not any(module.training for module in resnet.modules())
        cam(torch.randn(1, 3, 32, 32))
    assert _hooks_left(resnet) == []
    assert resnet.training and resnet.backbone.layer1.training and not resnet.backbone.bn1.training
    assert all(parameter.grad is None for parameter in resnet.parameters())
    with pytest.raises(RuntimeError, match="with"):
        explainer(torch.randn(1, 3, 32, 32))
    with pytest.raises(ZeroDivisionError), CamExplainer(resnet):  # released on an exception too
        raise ZeroDivisionError
    assert _hooks_left(resnet) == []
    resnet.eval()


def test_works_under_no_grad_and_with_frozen_backbone() -> None:
    model = _classifier("test_resnet")
    images = torch.randn(1, 3, 64, 64)  # 64 px: a 2x2 map; at 32 px this net's last map is 1x1 (constant CAM)
    with CamExplainer(model, method="layercam") as cam:
        expected = cam(images)
    assert expected.max() > 0.0
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    with torch.inference_mode(), CamExplainer(model, method="layercam") as cam:
        maps = cam(images)
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_all_zero_cam_has_no_nan(resnet: DermClassifier) -> None:
    zeroed = _classifier("test_resnet")
    with torch.no_grad():
        zeroed.head.weight.zero_()  # every gradient is zero, so every CAM is zero
    for method in ("gradcam", "gradcam++", "layercam"):
        with CamExplainer(zeroed, method=method) as cam:
            maps = cam(torch.randn(2, 3, 32, 32))
        assert np.isfinite(maps).all() and (maps == 0).all()


def _small_convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )


def test_no_growth_over_many_calls() -> None:
    model = _small_convnet()  # the explainer's bookkeeping is what is tested; a tiny net keeps 50 calls cheap
    images = torch.randn(2, 3, 16, 16)

    def live() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        with warnings.catch_warnings():  # isinstance on some lazily deprecated torch objects warns
            warnings.simplefilter("ignore")
            return len(objects), sum(isinstance(obj, torch.Tensor) for obj in objects)

    gc.collect()
    gc.freeze()  # park the objects that already exist, so collecting and counting only sees new ones (fast)
    try:
        with CamExplainer(model) as cam:
            for _ in range(3):
                cam(images)
            objects_before, tensors_before = live()
            for _ in range(50):
                cam(images)
            objects_after, tensors_after = live()
    finally:
        gc.unfreeze()
    assert tensors_after <= tensors_before
    assert objects_after - objects_before < 200  # a leak of one object per call and layer would show as >= 50
    for _ in range(5):  # opening and closing the explainer does not accumulate hooks or state either
        with CamExplainer(model) as cam:
            cam(images)
    assert _hooks_left(model) == []


def test_overlay_cam() -> None:
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    cam = np.zeros((5, 5), dtype=np.float32)
    cam[0, 0] = 1.0
    out = overlay_cam(image, cam, alpha=0.5)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[-1, -1])  # hot corner differs from the cold one
    np.testing.assert_array_equal(overlay_cam(Image.fromarray(image), cam, alpha=0.0), image)
    assert overlay_cam(image, cam, colormap="turbo").shape == (40, 60, 3)
    with pytest.raises(ConfigError, match="alpha"):
        overlay_cam(image, cam, alpha=2.0)
    with pytest.raises(ConfigError, match="colormap"):
        overlay_cam(image, cam, colormap="not-a-map")


# ------------------------------------------------------------------------------------------- a trained network
def _planted(count: int, seed: int, quadrant: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """32 px noise; class 1 (every other image) adds a bright 8 px patch somewhere inside ``quadrant`` (row, col)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(count) % 2
    images = 0.5 * torch.randn(count, 3, 32, 32, generator=generator)
    for index in range(count):
        if targets[index] == 1:
            top, left = (int(v) for v in torch.randint(0, 16 - 8 + 1, (2,), generator=generator))
            top, left = top + 16 * quadrant[0], left + 16 * quadrant[1]
            images[index, :, top : top + 8, left : left + 8] += 2.0
    return images, targets


def _trained_on_planted_evidence(steps: int = 12, quadrant: tuple[int, int] = (0, 0)) -> DermClassifier:
    torch.manual_seed(0)
    # output_stride 8: a 4x4 last map at 32 px, so each quadrant is 2x2 cells of the CAM
    model = DermClassifier(timm.create_model("test_resnet", pretrained=False, num_classes=0, output_stride=8), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(steps):
        images, targets = _planted(16, seed=step, quadrant=quadrant)
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_gradcam_of_a_trained_network_peaks_where_the_evidence_is() -> None:
    model = _trained_on_planted_evidence()
    images, targets = _planted(16, seed=1000)  # held out
    with torch.no_grad():
        assert torch.equal(model(images).argmax(dim=1), targets)  # trained until it separates
    patched = images[targets == 1]
    with CamExplainer(model, method="gradcam") as cam:
        maps = cam(patched, targets=[1] * len(patched))
    for heat in maps:
        assert heat.max() > 0.5  # a real peak (an all-zero map would "peak" at pixel (0, 0) too)
        row, col = np.unravel_index(int(heat.argmax()), heat.shape)
        assert row < 16 and col < 16, f"CAM peaks at {(row, col)}, outside the top-left quadrant"
        top_left = heat[:16, :16].mean()
        others = [heat[:16, 16:].mean(), heat[16:, :16].mean(), heat[16:, 16:].mean()]
        assert top_left > 2 * max(others)
