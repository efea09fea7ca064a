"""Losses by name, each checked against its formula written out with loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from dermlab.errors import ConfigError
from dermlab.losses import LOSSES, create_loss, list_losses

COUNTS = [6, 3, 1]
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, -2.0, 1.5]])
LABELS = torch.tensor([0, 2, 1, 2])
ALL_LOSSES = ["cross_entropy", "weighted_cross_entropy", "focal", "balanced_softmax", "ldam"]


def _softmax_row(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(value - top) for value in row]
    return [value / sum(exps) for value in exps]


def _one_hot(labels: torch.Tensor, classes: int = 3) -> torch.Tensor:
    return F.one_hot(labels, classes).float()


def test_registry_lists_every_loss() -> None:
    assert set(ALL_LOSSES) <= set(list_losses())
    assert LOSSES.list() == list_losses()


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="balanced_softmax, cross_entropy, focal"):
        create_loss("dice", COUNTS)


def test_unknown_option_names_the_option() -> None:
    with pytest.raises(ConfigError, match="gama"):
        create_loss("focal", COUNTS, gama=2.0)


def test_cross_entropy_matches_loop_and_torch() -> None:
    loss = create_loss("cross_entropy", COUNTS)(LOGITS, LABELS)
    expected = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        expected -= math.log(_softmax_row(row)[label]) / len(LABELS)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    smoothed = create_loss("cross_entropy", COUNTS, label_smoothing=0.1)(LOGITS, LABELS)
    reference = F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(float(reference), rel=1e-5)


def test_weighted_cross_entropy_matches_loop_and_torch_for_hard_labels() -> None:
    module = create_loss("weighted_cross_entropy", COUNTS, weights="inverse")
    weights = [sum(COUNTS) / n for n in COUNTS]
    weights = [w * 3 / sum(weights) for w in weights]
    assert module.class_weight.tolist() == pytest.approx(weights, rel=1e-6)
    numerator = denominator = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        numerator -= weights[label] * math.log(_softmax_row(row)[label])
        denominator += weights[label]
    assert float(module(LOGITS, LABELS)) == pytest.approx(numerator / denominator, rel=1e-5)
    for smoothing in (0.0, 0.2):
        options = {"weights": "effective", "beta": 0.9, "label_smoothing": smoothing}
        module = create_loss("weighted_cross_entropy", COUNTS, **options)
        reference = F.cross_entropy(LOGITS, LABELS, weight=module.class_weight, label_smoothing=smoothing)
        assert float(module(LOGITS, LABELS)) == pytest.approx(float(reference), rel=1e-5)


def test_weighted_cross_entropy_soft_targets_normalise_by_target_weight() -> None:
    module = create_loss("weighted_cross_entropy", COUNTS, weights=[1.0, 2.0, 4.0])
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    numerator = denominator = 0.0
    for row, target in zip(LOGITS.tolist(), soft.tolist()):
        probs = _softmax_row(row)
        numerator -= sum(w * y * math.log(p) for w, y, p in zip([1.0, 2.0, 4.0], target, probs))
        denominator += sum(w * y for w, y in zip([1.0, 2.0, 4.0], target))
    assert float(module(LOGITS, soft)) == pytest.approx(numerator / denominator, rel=1e-5)


def test_focal_matches_loop() -> None:
    gamma, alpha = 1.5, [0.5, 1.0, 2.0]
    module = create_loss("focal", COUNTS, gamma=gamma, alpha=alpha)
    expected = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        p = _softmax_row(row)[label]
        expected -= alpha[label] * (1 - p) ** gamma * math.log(p) / len(LABELS)
    assert float(module(LOGITS, LABELS)) == pytest.approx(expected, rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    module = create_loss("focal", COUNTS, gamma=0.0)
    assert float(module(LOGITS, LABELS)) == pytest.approx(float(F.cross_entropy(LOGITS, LABELS)), rel=1e-6)
    smoothed = create_loss("focal", COUNTS, gamma=0.0, label_smoothing=0.1)(LOGITS, LABELS)
    reference = F.cross_entropy(LOGITS, LABELS, label_smoothing=0.1)
    assert float(smoothed) == pytest.approx(float(reference), rel=1e-6)


def test_focal_alpha_by_name_is_normalised() -> None:
    module = create_loss("focal", COUNTS, alpha="inverse")
    assert float(module.class_weight.mean()) == pytest.approx(1.0, rel=1e-6)


def test_balanced_softmax_is_cross_entropy_on_shifted_logits() -> None:
    tau = 0.7
    module = create_loss("balanced_softmax", COUNTS, tau=tau)
    shift = torch.tensor([math.log(n / sum(COUNTS)) for n in COUNTS])
    expected = F.cross_entropy(LOGITS + tau * shift, LABELS)
    assert float(module(LOGITS, LABELS)) == pytest.approx(float(expected), rel=1e-5)


def test_ldam_subtracts_margins_from_target_logit() -> None:
    module = create_loss("ldam", COUNTS, max_margin=0.5, scale=2.0)
    margins = [n**-0.25 for n in COUNTS]
    margins = [0.5 * m / max(margins) for m in margins]
    expected = 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        shifted = [2.0 * (z - (margins[c] if c == label else 0.0)) for c, z in enumerate(row)]
        expected -= math.log(_softmax_row(shifted)[label]) / len(LABELS)
    assert float(module(LOGITS, LABELS)) == pytest.approx(expected, rel=1e-5)


def test_ldam_deferred_reweighting_starts_at_drw_epoch() -> None:
    module = create_loss("ldam", COUNTS, drw_epoch=2, beta=0.9)
    assert module.class_weight is None
    module.set_epoch(2)
    assert module.class_weight is not None
    assert float(module.class_weight.mean()) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_one_hot_soft_targets_equal_hard_labels(name: str) -> None:
    module = create_loss(name, COUNTS, label_smoothing=0.1)
    hard = module(LOGITS, LABELS)
    soft = module(LOGITS, _one_hot(LABELS))
    assert float(soft) == pytest.approx(float(hard), rel=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_sample_weight_is_a_weighted_mean(name: str) -> None:
    module = create_loss(name, COUNTS)
    weights = torch.tensor([1.0, 0.0, 2.0, 1.0])
    # repeating sample 2 and dropping sample 1 is the same as weights (1, 0, 2, 1)
    repeated = torch.tensor([0, 2, 2, 3])
    expected = module(LOGITS[repeated], LABELS[repeated])
    assert float(module(LOGITS, LABELS, sample_weight=weights)) == pytest.approx(float(expected), rel=1e-5)
    assert float(module(LOGITS, LABELS, sample_weight=torch.zeros(4))) == 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("soft", [False, True])
def test_gradients_finite_on_extreme_logits(name: str, soft: bool) -> None:
    options = {"gamma": 0.5, "alpha": "inverse"} if name == "focal" else {}
    module = create_loss(name, COUNTS, **options)
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, -1e4, 1e4]], requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    target = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) if soft else labels
    loss = module(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


def test_bad_targets_raise() -> None:
    module = create_loss("cross_entropy", COUNTS)
    with pytest.raises(ValueError, match="integers"):
        module(LOGITS, LABELS.float())
    with pytest.raises(ValueError, match="shape"):
        module(LOGITS, torch.zeros(4, 2))
    with pytest.raises(ConfigError, match="label_smoothing"):
        create_loss("cross_entropy", COUNTS, label_smoothing=1.5)
