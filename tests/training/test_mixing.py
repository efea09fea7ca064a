"""Mixup / CutMix: pixels, lambda, the mixed loss, probability and the last-epochs stop."""

import pytest
import torch
import torch.nn.functional as F

from dermlab.config import MixingConfig
from dermlab.errors import ConfigError
from dermlab.losses import create_loss
from dermlab.training.mixing import MIXERS, CutMix, MixedBatch, create_mixer, mixed_loss

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
