"""Networks: timm backbones with a linear head, their weights, preprocessing and freezing."""

from dermlab.models.factory import (
    RANDOM_WEIGHTS,
    DermClassifier,
    WeightsSource,
    create_model,
    load_weights_file,
    resolve_preprocessing,
    resolve_weights_source,
)
from dermlab.models.freezing import (
    freeze_backbone,
    list_backbone_blocks,
    set_frozen_batchnorm_eval,
    trainable_parameter_count,
    unfreeze_last_blocks,
)
from dermlab.models.weights import (
    PackagedWeights,
    get_packaged_weights,
    list_packaged_weights,
    load_packaged_state_dict,
)

__all__ = [
    "DermClassifier",
    "create_model",
    "load_weights_file",
    "resolve_preprocessing",
    "resolve_weights_source",
    "WeightsSource",
    "RANDOM_WEIGHTS",
    "freeze_backbone",
    "unfreeze_last_blocks",
    "set_frozen_batchnorm_eval",
    "list_backbone_blocks",
    "trainable_parameter_count",
    "PackagedWeights",
    "get_packaged_weights",
    "list_packaged_weights",
    "load_packaged_state_dict",
]
