"""efflax: 2022's efficient-training methods as JAX, Flax and optax pieces.

Subpackages: ``efflax.data`` (offline datasets), ``efflax.training`` (harness),
``efflax.sharding`` (meshes and logical axes), ``efflax.distributed`` (multi-host runs),
``efflax.nn`` (modules), ``efflax.nnx`` (the modules from Flax NNX), ``efflax.losses`` (distillation, batch entropy, focal losses),
``efflax.optim`` (optimizers and probes), ``efflax.pruning`` (structured pruning: CoFi),
``efflax.models`` (small reference models), ``efflax.stats`` (estimates with intervals, verdicts),
``efflax.curves`` (accuracy-vs-time curves), ``efflax.plan`` (compile a step for TPU/GPU
targets without them: will it fit?); the Pallas kernels are in the sibling package
``pallas_kernels``.

The subpackages are imported on first use (``efflax.nn`` imports ``efflax/nn`` when first
touched), so ``import efflax`` is cheap. No import starts a JAX backend (tests/test_import.py),
so ``efflax.distributed.initialize()`` can still join a multi-process run after any efflax
import: JAX allows that only before its backend starts.
"""

import importlib

SUBPACKAGES = (
    "curves",
    "data",
    "distributed",
    "losses",
    "models",
    "nn",
    "nnx",
    "optim",
    "plan",
    "pruning",
    "sharding",
    "stats",
    "training",
)

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"efflax.{name}")
    raise AttributeError(f"module 'efflax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *SUBPACKAGES])
