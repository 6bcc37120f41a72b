"""Loss composition: element losses, timestep weighting and the summed training loss."""

from .losses import LOSS_TYPES, element_loss
from .training_loss import FlowMatchingLoss, LossContext, TrainingLoss
from .weighting import WEIGHTING_SCHEMES, timestep_weight

__all__ = [
    "LOSS_TYPES",
    "WEIGHTING_SCHEMES",
    "FlowMatchingLoss",
    "LossContext",
    "TrainingLoss",
    "element_loss",
    "timestep_weight",
]
