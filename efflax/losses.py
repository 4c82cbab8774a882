"""Training losses: USI distillation with mixup/cutmix, layerwise batch entropy, cyclical focal."""

from efflax._src.losses.batch_entropy import batch_entropy
from efflax._src.losses.batch_entropy import capture_activations
from efflax._src.losses.batch_entropy import lbe_loss
from efflax._src.losses.batch_entropy import lbe_penalty
from efflax._src.losses.distillation import distillation_loss
from efflax._src.losses.distillation import soft_target_cross_entropy
from efflax._src.losses.focal import cyclical_focal_loss
from efflax._src.losses.focal import cyclical_focal_schedule
from efflax._src.losses.focal import focal_loss
from efflax._src.losses.mixing import cutmix
from efflax._src.losses.mixing import mix_batch
from efflax._src.losses.mixing import mixup

__all__ = [
    "batch_entropy",
    "capture_activations",
    "cutmix",
    "cyclical_focal_loss",
    "cyclical_focal_schedule",
    "distillation_loss",
    "focal_loss",
    "lbe_loss",
    "lbe_penalty",
    "mix_batch",
    "mixup",
    "soft_target_cross_entropy",
]
