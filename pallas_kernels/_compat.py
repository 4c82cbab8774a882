"""The one place for Pallas / JAX API differences between JAX 0.10 and 0.11.

Kernels in `pallas_kernels` import these helpers instead of touching version-dependent names
directly, so an API move in JAX means one edit here:

- `default_interpret` / `resolve_interpret`: `interpret=None` means interpret mode unless the
  default backend is a GPU.
- `gpu_compiler_params`: the Triton compiler-params class is `plgpu.CompilerParams` since
  JAX 0.7 (`plgpu.TritonCompilerParams` before); the Triton backend is deprecated since 0.11,
  so its module is imported lazily and with its deprecation warning silenced.
- `multiple_of`: an alignment hint for dynamic slice starts (identity where unavailable).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
from jax.experimental import pallas as pl

_GPU_BACKENDS = ("gpu", "cuda", "rocm")


def default_interpret() -> bool:
    """Whether Pallas kernels should run in interpret mode on the default backend."""
    return jax.default_backend() not in _GPU_BACKENDS


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` -> interpret on CPU/TPU, compiled on GPU; a bool is returned unchanged."""
    if interpret is None:
        return default_interpret()
    if not isinstance(interpret, bool):
        raise ValueError(f"{interpret=} must be None, True or False")
    return interpret


@functools.cache
def _triton_module() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as plgpu
    return plgpu


def gpu_compiler_params(*, num_warps: int | None = None, num_stages: int | None = None) -> Any:
    """Compiler parameters for the Pallas Triton (GPU) backend, whatever the class is called."""
    plgpu = _triton_module()
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params_cls(num_warps=num_warps, num_stages=num_stages)


def compiler_params_kwargs(
    *, interpret: bool, num_warps: int | None, num_stages: int | None
) -> dict[str, Any]:
    """`pallas_call` keyword arguments carrying GPU compiler params (none in interpret mode)."""
    if interpret:
        return {}
    return {"compiler_params": gpu_compiler_params(num_warps=num_warps, num_stages=num_stages)}


def multiple_of(x: jax.Array, multiple: int) -> jax.Array:
    """Tells the compiler that `x` is a multiple of `multiple` (for aligned, vectorised loads)."""
    hint = getattr(pl, "multiple_of", None)
    return x if hint is None else hint(x, multiple)
