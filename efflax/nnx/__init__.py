"""Flax NNX support: every efflax linen module as an NNX module, sharded by its logical names.

``to_nnx(module, *sample_inputs, rngs=..., mesh=None)`` wraps ``flax.nnx.bridge.ToNNX`` and
initializes it; ``shard`` and ``logical_shardings`` place an NNX module's variables with
efflax's logical-axis table (``efflax.sharding.LOGICAL_AXIS_RULES``).
"""

from efflax._src.nnx.bridge import logical_shardings
from efflax._src.nnx.bridge import shard
from efflax._src.nnx.bridge import to_nnx
