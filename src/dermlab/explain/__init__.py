"""Explanations: class activation maps, CAM galleries and agreement with lesion masks."""

from dermlab.explain.gallery import (
    GalleryItem,
    render_class_gallery,
    render_gallery,
    render_gallery_sheet,
    select_gallery_examples,
)
from dermlab.explain.gradcam import (
    CAM_METHODS,
    CamExplainer,
    overlay_cam,
    resolve_reshape_transform,
    resolve_target_layer,
)
from dermlab.explain.mask_agreement import (
    cam_energy_in_mask,
    mask_area_share,
    pointing_game_hit,
    summarise_mask_agreement,
)
from dermlab.explain.run_explain import (
    GalleryResult,
    ImageExplanation,
    compute_cams,
    explain_image,
    explain_run,
)
from dermlab.explain.run_masks import measure_mask_agreement

__all__ = [
    "CAM_METHODS",
    "CamExplainer",
    "GalleryItem",
    "GalleryResult",
    "ImageExplanation",
    "cam_energy_in_mask",
    "compute_cams",
    "explain_image",
    "explain_run",
    "mask_area_share",
    "measure_mask_agreement",
    "overlay_cam",
    "pointing_game_hit",
    "render_class_gallery",
    "render_gallery",
    "render_gallery_sheet",
    "resolve_reshape_transform",
    "resolve_target_layer",
    "select_gallery_examples",
    "summarise_mask_agreement",
]
