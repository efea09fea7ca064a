"""The dihedral and multi-crop TTA views."""

from __future__ import annotations

import timm
import torch

from dermlab.evaluation.tta import TTA_PRESETS, TTA_VIEWS, average_probabilities, resolve_tta_views, view_logits


def _symmetrised(batch: torch.Tensor) -> torch.Tensor:
    """The mean of ``batch`` over the 8 symmetries of the square: invariant under each of them."""
    return torch.stack([TTA_VIEWS.get(name)(batch) for name in TTA_PRESETS["dihedral"]]).mean(dim=0)


def test_dihedral_tta_of_a_symmetric_input_equals_the_identity_view() -> None:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=4).eval()
    x = _symmetrised(torch.randn(3, 3, 32, 32))
    views = resolve_tta_views("dihedral")
    assert len(views) == 8 and len(set(views)) == 8
    with torch.inference_mode():
        logits = view_logits(model, x, views)
        identity = model(x)
    assert torch.allclose(logits, identity.expand_as(logits), atol=1e-5)
    assert torch.allclose(torch.from_numpy(average_probabilities(logits)), torch.softmax(identity.double(), 1), atol=1e-6)
    # and a non-symmetric input is not: the views do differ
    with torch.inference_mode():
        asym = view_logits(model, torch.randn(3, 3, 32, 32), views)
    assert not torch.allclose(asym[0], asym[1], atol=1e-4)


def test_the_zoom_views_crop_the_centre_and_keep_the_size() -> None:
    x = torch.zeros(1, 3, 40, 50)
    x[..., 2:38, 2:48] = 1.0  # a frame of zeros 2 px wide around a block of ones
    for name in ("zoom90", "zoom80"):
        view = TTA_VIEWS.get(name)(x)
        assert view.shape == x.shape
        assert torch.allclose(view, torch.ones_like(view))  # the border is cut off
    constant = torch.full((2, 3, 24, 32), 0.25)
    assert torch.allclose(TTA_VIEWS.get("zoom90")(constant), constant)
    assert resolve_tta_views("crops") == ("identity", "zoom90", "zoom80")
