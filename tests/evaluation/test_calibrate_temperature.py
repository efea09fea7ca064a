"""Temperature scaling on a deliberately over-confident toy model, through the scoring pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from dermlab.config import EvaluationConfig
from dermlab.evaluation.calibration import expected_calibration_error, fit_temperature
from dermlab.evaluation.evaluate import score_logits
from dermlab.evaluation.tta import average_probabilities, fit_tta_temperature

CLASSES = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids oversubscription on a busy machine (40x slower otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _overconfident_toy_model(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A linear classifier fitted without regularisation on 24 noisy points in 20 dimensions.

    It separates its few training points perfectly, so its logits grow without bound: on new points from the
    same (heavily overlapping) classes it is far more confident than it is right. Returns val and test logits
    and labels.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 20, generator=generator) * 0.3

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % 3
        return centres[labels] + torch.randn(n, 20, generator=generator), labels

    train_x, train_y = sample(24)
    model = nn.Linear(20, 3)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(300):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(train_x), train_y).backward()
        optimiser.step()
    (val_x, val_y), (test_x, test_y) = sample(900), sample(900)
    with torch.no_grad():
        return model(val_x).numpy(), val_y.numpy(), model(test_x).numpy(), test_y.numpy()


def _frame(labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"image_id": [f"i{k}" for k in range(labels.size)], "path": [f"/x/i{k}.jpg" for k in range(labels.size)],
         "label": [CLASSES[k] for k in labels]}
    )


@pytest.mark.slow  # writes predictions.csv and the plots
def test_temperature_scaling_lowers_ece_of_an_overconfident_toy_model(tmp_path: Path) -> None:
    val_logits, val_y, test_logits, test_y = _overconfident_toy_model()
    raw = average_probabilities(test_logits)
    accuracy = float((raw.argmax(axis=1) == test_y).mean())
    assert raw.max(axis=1).mean() > accuracy + 0.2  # the toy really is over-confident

    temperature = fit_tta_temperature(val_logits, val_y)  # fitted on val only
    assert temperature > 1.5
    metrics = score_logits(test_logits, _frame(test_y), CLASSES, tmp_path, EvaluationConfig(), temperature=temperature)
    calibration = metrics["calibration"]
    assert calibration["temperature"] == pytest.approx(temperature)
    assert calibration["ece_before"] == pytest.approx(expected_calibration_error(test_y, raw))
    assert calibration["ece_after"] < calibration["ece_before"] / 2
    assert calibration["nll_after"] < calibration["nll_before"]
    assert metrics["ece"] == pytest.approx(calibration["ece_after"])  # the reported probabilities are calibrated
    assert metrics["accuracy"] == pytest.approx(accuracy)  # the predicted class never changes
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["calibration"]["ece_after"] == pytest.approx(calibration["ece_after"])
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    scaled = average_probabilities(test_logits, temperature)
    assert np.allclose(predictions[[f"prob_{c}" for c in CLASSES]].to_numpy(), scaled, atol=1e-6)
    assert (tmp_path / "reliability.png").stat().st_size > 0


def test_one_view_fit_is_plain_temperature_scaling() -> None:
    val_logits, val_y, _, _ = _overconfident_toy_model(seed=1)
    assert fit_tta_temperature(val_logits, val_y) == pytest.approx(fit_temperature(val_logits, val_y), rel=1e-6)
    assert fit_tta_temperature(val_logits[None], val_y) == pytest.approx(fit_temperature(val_logits, val_y), rel=1e-6)


def test_several_views_fit_the_temperature_of_their_averaged_probabilities() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(scale=1.5, size=(3000, 4))
    labels = np.array([rng.choice(4, p=np.exp(row) / np.exp(row).sum()) for row in base])
    identical = np.stack([base * 3.0] * 3)
    assert fit_tta_temperature(identical, labels) == pytest.approx(fit_temperature(base * 3.0, labels), rel=1e-3)
    assert fit_tta_temperature(identical, labels) == pytest.approx(3.0, rel=0.15)
    # views that disagree average to softer probabilities, so they need a lower temperature than one view
    noisy = np.stack([base * 3.0 + rng.normal(scale=2.0, size=base.shape) for _ in range(4)])
    assert fit_tta_temperature(noisy, labels) < fit_temperature(noisy[0], labels)
