"""KD and LFME distillation losses against the formulas written out with loops."""

import math

import pytest
import torch

from dermlab.losses import group_sample_masks, kd_loss, lfme_loss


def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [value / temperature for value in row]
    top = max(scaled)
    exps = [math.exp(value - top) for value in scaled]
    return [value / sum(exps) for value in exps]


def _kl(teacher_row: list[float], student_row: list[float], temperature: float) -> float:
    p = _softmax(teacher_row, temperature)
    q = _softmax(student_row, temperature)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


STUDENT = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.5, 1.5, 0.0, -0.5]])


def test_kd_loss_matches_loop() -> None:
    teacher = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    temperature = 3.0
    expected = sum(_kl(t, s, temperature) for t, s in zip(teacher.tolist(), STUDENT.tolist())) / 2
    assert float(kd_loss(STUDENT, teacher, temperature)) == pytest.approx(temperature**2 * expected, rel=1e-5)
    assert float(kd_loss(STUDENT, STUDENT.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_does_not_train_the_teacher() -> None:
    student = STUDENT.clone().requires_grad_(True)
    teacher = torch.zeros(2, 4, requires_grad=True)
    kd_loss(student, teacher, 2.0).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_lfme_loss_matches_loop_on_expert_groups() -> None:
    groups = [[3, 0], [1, 2]]  # expert columns follow the group order, not the class order
    experts = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, -0.5], [1.0, 1.0]])]
    weights = [0.7, 0.3]
    temperature = 2.0
    expected = 0.0
    for group, expert, weight in zip(groups, experts, weights):
        total = 0.0
        for student_row, expert_row in zip(STUDENT.tolist(), expert.tolist()):
            total += _kl(expert_row, [student_row[c] for c in group], temperature)
        expected += weight * temperature**2 * total / 2
    loss = lfme_loss(STUDENT, experts, groups, weights, T=temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_lfme_sample_masks_average_over_masked_samples() -> None:
    groups = [[0, 1], [2, 3]]
    experts = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.5, -0.5], [1.0, 1.0]])]
    labels = torch.tensor([1, 3])
    masks = group_sample_masks(labels, groups)
    assert [mask.tolist() for mask in masks] == [[True, False], [False, True]]
    rows = STUDENT.tolist()
    expected = 4.0 * (
        _kl([1.0, 0.0], rows[0][0:2], 2.0) * 1.0 + _kl([1.0, 1.0], rows[1][2:4], 2.0) * 0.5
    )
    loss = lfme_loss(STUDENT, experts, groups, [1.0, 0.5], T=2.0, sample_masks=masks)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    empty = [torch.zeros(2, dtype=torch.bool), None]
    only_second = lfme_loss(STUDENT, experts, groups, [1.0, 0.5], T=2.0, sample_masks=empty)
    second_alone = lfme_loss(STUDENT, experts[1:], groups[1:], [0.5])
    assert float(only_second) == pytest.approx(float(second_alone), rel=1e-6)


def test_lfme_rejects_mismatched_experts() -> None:
    with pytest.raises(ValueError, match="one group and weight per expert"):
        lfme_loss(STUDENT, [torch.zeros(2, 2)], [[0, 1], [2, 3]], [1.0])
    with pytest.raises(ValueError, match="expert 0 logits"):
        lfme_loss(STUDENT, [torch.zeros(2, 3)], [[0, 1]], [1.0])
