"""Mixup / CutMix: pixels, lambda, the mixed loss, probability, the last-epochs stop, and training end to end."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dermlab.config import MixingConfig, ModelConfig
from dermlab.errors import ConfigError
from dermlab.losses import create_loss
from dermlab.models.factory import DermClassifier, create_model
from dermlab.training.mixing import MIXERS, CutMix, MixedBatch, create_mixer, mixed_loss
from dermlab.training.module import ClassifierModule

IMAGES = torch.arange(4 * 2 * 6 * 8, dtype=torch.float32).reshape(4, 2, 6, 8)
TARGETS = torch.tensor([0, 1, 2, 1])


def _mixer(method: str, seed: int = 0, **fields: float):
    generator = torch.Generator().manual_seed(seed)
    return create_mixer(MixingConfig(method=method, **fields), 3, generator=generator)


def test_mixup_pixels_are_the_convex_combination() -> None:
    batch = _mixer("mixup", mixup_alpha=0.4)(IMAGES, TARGETS)
    assert batch.index is not None and 0.0 <= batch.lam <= 1.0
    expected = batch.lam * IMAGES + (1 - batch.lam) * IMAGES[batch.index]
    torch.testing.assert_close(batch.images, expected)
    assert torch.equal(batch.targets_a, TARGETS)
    assert torch.equal(batch.targets_b, TARGETS[batch.index])


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_a_box_from_the_paired_sample(seed: int) -> None:
    batch = _mixer("cutmix", seed=seed)(IMAGES, TARGETS)
    pasted = batch.images != IMAGES
    source = IMAGES[batch.index]
    # pixels that changed come from the paired sample; the others are untouched
    assert torch.equal(batch.images[pasted], source[pasted])
    changed = (batch.images == source) & (batch.index != torch.arange(4)).view(4, 1, 1, 1)
    box = changed.any(dim=0).any(dim=0)  # (H, W): where the paired image shows
    rows, cols = box.any(dim=1).nonzero().flatten(), box.any(dim=0).nonzero().flatten()
    area = 0
    if rows.numel():
        area = (int(rows.max()) - int(rows.min()) + 1) * (int(cols.max()) - int(cols.min()) + 1)
    assert int(box.sum()) == area  # one rectangle
    assert batch.lam == pytest.approx(1 - area / (6 * 8))


def test_cutmix_box_lambda_is_corrected_at_the_border() -> None:
    mixer = CutMix(alpha=1.0, generator=torch.Generator().manual_seed(3))
    for _ in range(20):
        top, bottom, left, right = mixer._box(10, 12, lam=0.2)
        assert 0 <= top <= bottom <= 10 and 0 <= left <= right <= 12


def test_mixed_loss_equals_hand_mix_for_every_loss() -> None:
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    batch = MixedBatch(IMAGES, TARGETS, torch.tensor([2, 2, 0, 1]), 0.3)
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    for name in ["cross_entropy", "weighted_cross_entropy", "focal", "balanced_softmax"]:
        loss_fn = create_loss(name, [5, 3, 2])
        loss_a, loss_b = loss_fn(logits, batch.targets_a, weights), loss_fn(logits, batch.targets_b, weights)
        expected = 0.3 * loss_a + 0.7 * loss_b
        torch.testing.assert_close(mixed_loss(loss_fn, logits, batch, sample_weight=weights), expected)
    hand = 0.3 * F.cross_entropy(logits, TARGETS) + 0.7 * F.cross_entropy(logits, batch.targets_b)
    torch.testing.assert_close(mixed_loss(torch.nn.CrossEntropyLoss(), logits, batch), hand)


def test_soft_targets_of_a_mixed_batch() -> None:
    batch = MixedBatch(IMAGES, TARGETS, torch.tensor([2, 1, 0, 0]), 0.25)
    soft = batch.soft_targets(3)
    assert soft[0].tolist() == [0.25, 0.0, 0.75]
    assert soft[1].tolist() == [0.0, 1.0, 0.0]


def test_prob_zero_is_identity() -> None:
    batch = _mixer("switch", prob=0.0)(IMAGES, TARGETS)
    assert batch.images is IMAGES and batch.lam == 1.0 and batch.index is None
    assert torch.equal(batch.targets_b, TARGETS)
    assert not create_mixer(MixingConfig(method="none"), 3).active(0, 10)


def test_prob_applies_mixing_to_that_share_of_batches() -> None:
    mixer = _mixer("mixup", prob=0.5)
    mixed = sum(mixer(IMAGES, TARGETS).index is not None for _ in range(200))
    assert 70 <= mixed <= 130


def test_switch_uses_both_methods() -> None:
    mixer = _mixer("switch", switch_prob=0.5)
    kinds = set()
    for _ in range(30):
        batch = mixer(IMAGES, TARGETS)
        changed = batch.images != IMAGES
        is_cutmix = torch.equal(batch.images[changed], IMAGES[batch.index][changed])
        kinds.add("cutmix" if is_cutmix else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_stop_epochs_turns_mixing_off_in_the_last_epochs() -> None:
    mixer = _mixer("mixup", stop_epochs=2)
    assert [mixer.active(epoch, 5) for epoch in range(5)] == [True, True, True, False, False]
    assert all(_mixer("cutmix").active(epoch, 5) for epoch in range(5))


def test_same_generator_seed_gives_same_batch() -> None:
    first, second = _mixer("switch", seed=7)(IMAGES, TARGETS), _mixer("switch", seed=7)(IMAGES, TARGETS)
    assert first.lam == second.lam and torch.equal(first.images, second.images)
    torch.manual_seed(11)
    global_first = create_mixer(MixingConfig(method="mixup"), 3)(IMAGES, TARGETS)
    torch.manual_seed(11)
    global_second = create_mixer(MixingConfig(method="mixup"), 3)(IMAGES, TARGETS)
    assert global_first.lam == global_second.lam


def test_bad_method_and_alpha_raise_config_error() -> None:
    assert MIXERS.list() == ["cutmix", "mixup", "none", "switch"]
    with pytest.raises(ConfigError, match="mixing.method.*valid names: cutmix, mixup, none, switch"):
        create_mixer(MixingConfig(method="mosaic"), 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mixing.mixup_alpha"):
        create_mixer(MixingConfig(method="mixup", mixup_alpha=0.0), 3)


# --------------------------------------------------------------------------------------------- end to end
# ClassifierModule trained by a real Trainer: the loss of each step is recomputed by hand from the logits the
# module itself produced, against both label sets.
class _SpyMixer:
    """The real mixer, keeping every :class:`MixedBatch` it hands to the module."""

    def __init__(self, mixer) -> None:
        self.mixer = mixer
        self.batches: list[MixedBatch] = []

    def active(self, epoch: int, max_epochs: int | None) -> bool:
        return self.mixer.active(epoch, max_epochs)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        batch = self.mixer(images, targets)
        self.batches.append(batch)
        return batch


class _StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _fit(module: ClassifierModule, inputs: torch.Tensor, targets: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    recorder = _StepLosses()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[recorder],
    )
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=8, shuffle=False)
    trainer.fit(module, loader)
    return recorder.losses


def _tiny_classifier() -> DermClassifier:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="test_efficientnet", drop_rate=0.0), 3, load_weights=False)
    with torch.no_grad():  # confident logits, so the losses against the two label sets differ clearly
        model.head.weight.mul_(20.0)
    return model


def _record_logits(model: DermClassifier) -> list[torch.Tensor]:
    logits: list[torch.Tensor] = []
    model.head.register_forward_hook(lambda module, args, output: logits.append(output.detach().clone()))
    return logits


def _assert_losses_are_mixed(spy: _SpyMixer, logits: list[torch.Tensor], losses: list[torch.Tensor]) -> None:
    assert len(spy.batches) == len(logits) == len(losses) == 3  # one mix, one forward, one loss per step
    differences = []
    for batch, step_logits, loss in zip(spy.batches, logits, losses):
        assert batch.index is not None and 0.05 < batch.lam < 0.95  # really mixed, by a real share
        assert not torch.equal(batch.targets_a, batch.targets_b)
        loss_a = F.cross_entropy(step_logits, batch.targets_a)
        loss_b = F.cross_entropy(step_logits, batch.targets_b)
        assert abs(float(loss_a - loss_b)) > 0.01  # so the check below tells the two label sets apart
        torch.testing.assert_close(loss, batch.lam * loss_a + (1 - batch.lam) * loss_b, rtol=1e-5, atol=1e-6)
        differences.append(abs(float(loss - loss_a)))
    assert max(differences) > 0.1  # not the unmixed loss against the first labels alone


def _data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus a class-coloured offset, so the logits depend on the class and the two label sets matter."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(24) % 3
    inputs = 0.5 * torch.randn(24, *shape, generator=generator)
    inputs[torch.arange(24), targets] += 2.0  # channel = class
    return inputs, targets


@pytest.mark.parametrize("method", ["mixup", "cutmix"])
def test_training_step_loss_is_mixed_against_both_labels_on_pixels(method: str) -> None:
    images, targets = _data((3, 16, 16))
    model = _tiny_classifier()
    # as run.py builds it: the global RNG, reseeded by the module at every step
    spy = _SpyMixer(create_mixer(MixingConfig(method=method, mixup_alpha=1.0), 3))
    module = ClassifierModule(model, create_loss("cross_entropy", [8, 8, 8]), ["a", "b", "c"], mixer=spy,
                              mixed_loss=mixed_loss, scheduler="constant")
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    logits = _record_logits(model)
    losses = _fit(module, images, targets)
    _assert_losses_are_mixed(spy, logits, losses)
    for step, (batch, network_input) in enumerate(zip(spy.batches, seen)):
        original = images[8 * step : 8 * step + 8]
        assert torch.equal(network_input, batch.images)  # the network saw the mixed pixels
        assert torch.equal(batch.targets_a, targets[8 * step : 8 * step + 8])
        assert torch.equal(batch.targets_b, batch.targets_a[batch.index])
        if method == "mixup":
            torch.testing.assert_close(batch.images, batch.lam * original + (1 - batch.lam) * original[batch.index])
        else:
            pasted = (batch.images != original).any(dim=1)  # (N, H, W): pixels from the paired image
            from_partner = batch.images == original[batch.index]
            assert from_partner.all(dim=1)[pasted].all()
            moved = batch.index != torch.arange(8)
            assert pasted[moved].float().mean().item() == pytest.approx(1 - batch.lam)


def test_training_step_mixes_cached_trunk_maps_in_stage2() -> None:
    """``train.stage2_cached_views``: the module mixes the frozen trunk's maps and the loss against both labels."""
    from dermlab.models.freezing import freeze_backbone, unfreeze_last_blocks
    from dermlab.models.trunk import split_frozen_trunk

    model = _tiny_classifier()
    freeze_backbone(model)
    unfreeze_last_blocks(model, "2")
    split = split_frozen_trunk(model)
    images, targets = _data((3, 16, 16))
    model.eval()  # the trunk's maps are cached in eval mode, as run.py does
    with torch.no_grad():
        maps = split.trunk(images)
    model.train()
    tail_inputs: list[torch.Tensor] = []

    def tail(features: torch.Tensor) -> torch.Tensor:
        tail_inputs.append(features.detach().clone())
        return split.tail(features)

    spy = _SpyMixer(create_mixer(MixingConfig(method="mixup", mixup_alpha=1.0), 3))
    module = ClassifierModule(model, create_loss("cross_entropy", [8, 8, 8]), ["a", "b", "c"], mixer=spy,
                              mixed_loss=mixed_loss, feature_fn=tail, scheduler="constant")
    logits = _record_logits(model)
    losses = _fit(module, maps, targets)
    _assert_losses_are_mixed(spy, logits, losses)
    for step, (batch, tail_input) in enumerate(zip(spy.batches, tail_inputs)):
        original = maps[8 * step : 8 * step + 8]
        assert torch.equal(tail_input, batch.images)
        torch.testing.assert_close(batch.images, batch.lam * original + (1 - batch.lam) * original[batch.index])


@pytest.mark.slow
@pytest.mark.parametrize("stage1", [True, False])
def test_a_cached_stage1_mixes_the_pooled_features_unless_told_not_to(
    stage1: bool, ham_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mixing.stage1`` (default on): the cached linear probe's Mixup mixes pooled feature vectors, one mix a
    step; off, stage 1 mixes nothing. Stage 2 (on images) mixes images either way."""
    from dermlab.config import Config, apply_overrides
    from dermlab.training.mixing import Mixer
    from dermlab.training.run import train_run

    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    mixed_shapes: list[tuple[int, ...]] = []
    real_call = Mixer.__call__

    def spying_call(self, images, targets):
        mixed_shapes.append(tuple(images.shape))
        return real_call(self, images, targets)

    monkeypatch.setattr(Mixer, "__call__", spying_call)
    config = apply_overrides(Config(), [
        f"data.path={ham_dir}", "model.name=test_efficientnet", "model.input_size=[32,32]", "data.num_workers=0",
        "data.batch_size=8", "model.weights=none", "data.augmentation=none", "mixing.method=mixup", "train.stage1_epochs=1",
        "train.stage2_epochs=1", "train.cached_features=true", f"data.cache_dir={tmp_path / 'cache'}",
        f"mixing.stage1={str(stage1).lower()}",
    ])
    train_run(config, tmp_path / "run")
    assert list((tmp_path / "cache" / "features").glob("*.pt")), "stage 1 did not train on cached features"
    stages = [json.loads((tmp_path / "run" / "checkpoints" / stage / "done.json").read_text()) for stage in ("stage1", "stage2")]
    assert stages[0]["global_step"] > 0 and stages[1]["global_step"] > 0
    features = [shape for shape in mixed_shapes if len(shape) == 2]  # (batch, pooled width)
    images = [shape for shape in mixed_shapes if len(shape) == 4 and shape[-2:] == (32, 32)]
    assert len(images) == stages[1]["global_step"]  # one mix of images per stage-2 step
    assert len(features) == (stages[0]["global_step"] if stage1 else 0)
    assert len(features) + len(images) == len(mixed_shapes)
