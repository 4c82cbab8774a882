"""efflax: 2022's efficient-training methods as JAX, Flax and optax pieces.

Subpackages: ``efflax.data`` (offline datasets), ``efflax.training`` (harness),
``efflax.sharding`` (meshes and logical axes), ``efflax.distributed`` (multi-host runs),
``efflax.nn`` (modules), ``efflax.losses`` (distillation, batch entropy, focal losses),
``efflax.optim`` (optimizers and probes), ``efflax.pruning`` (structured pruning: CoFi),
``efflax.models`` (small reference models); the Pallas kernels are in the sibling package
``pallas_kernels``.
"""

from efflax import data
from efflax import distributed
from efflax import losses
from efflax import models
from efflax import nn
from efflax import optim
from efflax import pruning
from efflax import sharding
from efflax import stats
from efflax import training

__version__ = "0.1.0"
