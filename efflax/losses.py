"""Training losses: USI distillation with mixup/cutmix, layerwise batch entropy, cyclical focal."""

from efflax._src.losses.distillation import distillation_loss
from efflax._src.losses.distillation import soft_target_cross_entropy
from efflax._src.losses.mixing import cutmix
from efflax._src.losses.mixing import mix_batch
from efflax._src.losses.mixing import mixup

__all__ = [
    "cutmix",
    "distillation_loss",
    "mix_batch",
    "mixup",
    "soft_target_cross_entropy",
]
