"""The quickstart on every host of a multi-process run (docs/guides/multi-host.md).

Run one copy per host, or N local processes: efflax launch -n 2 --cpu-devices 2 -- python multihost_train.py
"""

import os

import efflax

efflax.distributed.initialize()  # first (JAX joins a run only before its backend starts); reads
# $EFFLAX_COORDINATOR_ADDRESS etc., or pass (address, num_processes, process_id); no-op alone
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from efflax.training import TrainState  # noqa: E402
from efflax.training import cross_entropy_loss_fn  # noqa: E402
from efflax.training import fit  # noqa: E402
from efflax.training import make_train_step  # noqa: E402

# A directory every host sees (a shared filesystem on a cluster); relative to where you start.
checkpoint_dir = os.path.abspath(os.environ.get("EFFLAX_CHECKPOINT_DIR", "checkpoints"))

mesh = efflax.sharding.make_mesh()  # every device of every host; hosts along 'data' (DCN)
loader = efflax.data.load("mnist1d", "train", batch_size=128, epochs=5, mesh=mesh)
model = efflax.models.CNN1D()
params = nn.unbox(model.init(jax.random.key(0), np.zeros((1, 40), np.float32))["params"])
state = TrainState.create(
    apply_fn=model.apply, params=params, tx=optax.adam(1e-2), rng=jax.random.key(1)
)
state, history = fit(
    state,
    make_train_step(cross_entropy_loss_fn()),
    loader,
    checkpoint_dir=checkpoint_dir,
    metrics_path="metrics.jsonl",
)
if efflax.distributed.is_primary():
    print(f"trained {int(state.step)} steps on {jax.process_count()} processes")
