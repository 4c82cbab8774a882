"""Structured pruning: hard-concrete gates and CoFi (masks, expected size, distillation, extraction)."""

from efflax._src.pruning.cofi import GROUPS
from efflax._src.pruning.cofi import AttentionSite
from efflax._src.pruning.cofi import CoFiStructure
from efflax._src.pruning.cofi import ExtractedModel
from efflax._src.pruning.cofi import FeedForwardSite
from efflax._src.pruning.cofi import NormSite
from efflax._src.pruning.cofi import apply_masks
from efflax._src.pruning.cofi import apply_with_layers
from efflax._src.pruning.cofi import cofi_distillation_loss
from efflax._src.pruning.cofi import cofi_optimizer
from efflax._src.pruning.cofi import cofi_pruning_loss
from efflax._src.pruning.cofi import cofi_pruning_state
from efflax._src.pruning.cofi import cofi_structure
from efflax._src.pruning.cofi import default_teacher_layers
from efflax._src.pruning.cofi import extract
from efflax._src.pruning.cofi import layer_distillation_loss
from efflax._src.pruning.hard_concrete import HardConcreteMask
from efflax._src.pruning.hard_concrete import mask_axis
