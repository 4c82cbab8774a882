"""Will it fit? Compile a training step for a TPU slice or GPU host without one (``efflax plan``)."""

from efflax._src.plan.core import TARGETS
from efflax._src.plan.core import Plan
from efflax._src.plan.core import PlanError
from efflax._src.plan.core import Target
from efflax._src.plan.core import abstract_batch
from efflax._src.plan.core import abstract_train_state
from efflax._src.plan.core import collectives_of
from efflax._src.plan.core import compile_for
from efflax._src.plan.core import extrapolate
from efflax._src.plan.core import get_target
from efflax._src.plan.core import matmul_flops
from efflax._src.plan.core import shard_abstract
from efflax._src.plan.core import target_mesh
from efflax._src.plan.lm import SIZES
from efflax._src.plan.lm import LMConfig
from efflax._src.plan.lm import plan_lm

__all__ = [
    "SIZES",
    "TARGETS",
    "LMConfig",
    "Plan",
    "PlanError",
    "Target",
    "abstract_batch",
    "abstract_train_state",
    "collectives_of",
    "compile_for",
    "extrapolate",
    "get_target",
    "matmul_flops",
    "plan_lm",
    "shard_abstract",
    "target_mesh",
]
