"""Knowledge distillation: one teacher (Hinton et al. 2015) and group experts (LFME, Xiang et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "lfme_loss", "group_sample_masks"]


def _kl_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` per sample, in float32."""
    student_log_prob = F.log_softmax(student_logits.float() / temperature, dim=1)
    teacher_log_prob = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return F.kl_div(student_log_prob, teacher_log_prob, reduction="none", log_target=True).sum(dim=1)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float = 2.0) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T**2`` keeps gradient magnitudes comparable across temperatures. Teacher logits are detached.
    """
    _check_temperature(T)
    if student_logits.shape != teacher_logits.shape:
        shapes = f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        raise ValueError(f"student and teacher logits differ in shape: {shapes}")
    return T * T * _kl_per_sample(student_logits, teacher_logits, T).mean()


def group_sample_masks(labels: torch.Tensor, groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """One boolean mask ``(N,)`` per group: the samples whose label is one of the group's classes."""
    return [torch.isin(labels, torch.as_tensor(list(group), device=labels.device)) for group in groups]


def lfme_loss(
    student_logits: torch.Tensor,
    expert_logits: Sequence[torch.Tensor],
    groups: Sequence[Sequence[int]],
    weights: Sequence[float],
    T: float = 2.0,
    sample_masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """LFME distillation: ``sum_l w_l * T**2 * KL(softmax(z_l / T) || softmax(z_student[:, groups[l]] / T))``.

    Expert ``l`` predicts only the classes ``groups[l]``, its logits ``(N, len(groups[l]))`` in that order;
    the student's logits are restricted to the same columns before the softmax. Each KL is averaged over the
    batch: by default over all samples, as in LFME; ``sample_masks[l]`` (boolean ``(N,)``, e.g. from
    :func:`group_sample_masks`) averages expert ``l``'s term over the masked samples only (0 when none).
    ``weights`` are the per-expert weights (LFME fades them as the student catches up on validation).
    """
    _check_temperature(T)
    if not len(expert_logits) == len(groups) == len(weights):
        raise ValueError(
            f"lfme_loss needs one group and weight per expert: {len(expert_logits)} experts, "
            f"{len(groups)} groups, {len(weights)} weights"
        )
    if sample_masks is not None and len(sample_masks) != len(groups):
        raise ValueError(f"sample_masks has {len(sample_masks)} entries for {len(groups)} experts")
    total = student_logits.new_zeros((), dtype=torch.float32)
    for index, (logits, group, weight) in enumerate(zip(expert_logits, groups, weights)):
        columns = torch.as_tensor(list(group), dtype=torch.long, device=student_logits.device)
        if logits.ndim != 2 or tuple(logits.shape) != (student_logits.shape[0], len(columns)):
            raise ValueError(
                f"expert {index} logits must have shape {(student_logits.shape[0], len(columns))}, "
                f"got {tuple(logits.shape)}"
            )
        per_sample = _kl_per_sample(student_logits.index_select(1, columns), logits, T)
        mask = None if sample_masks is None else sample_masks[index]
        if mask is None:
            term = per_sample.mean()
        else:
            mask = mask.to(per_sample)
            term = (per_sample * mask).sum() / mask.sum().clamp_min(1.0)
        total = total + float(weight) * T * T * term
    return total
