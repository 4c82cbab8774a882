"""The op interface: explicit and 'auto' dispatch, fall-through, forward-mode substitution."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.op import Implementation
from pallas_kernels.op import Op
from pallas_kernels.op import Unsupported
from pallas_kernels.op import forward_mode_autodiff


@dataclasses.dataclass(frozen=True)
class Fast(Implementation):
    name = "fast"
    supports_forward_mode = False
    max_size: int = 4

    def __call__(self, x):
        if x.size > self.max_size:
            raise Unsupported(f"x.size={x.size} > max_size={self.max_size}")
        return ("fast", 2 * x)


@dataclasses.dataclass(frozen=True)
class Plain(Implementation):
    name = "plain"

    def __call__(self, x):
        return ("plain", 2 * x)


@dataclasses.dataclass(frozen=True)
class GpuOnly(Implementation):
    name = "gpu_only"
    platforms = ("gpu",)

    def __call__(self, x):
        return ("gpu_only", 2 * x)


def make_op():
    op = Op(
        "double",
        auto_order={"gpu": ("gpu_only", "fast", "plain"), "*": ("fast", "plain")},
        aliases={"quick": "fast"},
    )
    for impl in (Fast(), Plain(), GpuOnly()):
        op.register(impl)
    return op


def test_auto_takes_the_first_that_accepts_and_falls_through():
    op = make_op()
    assert op.dispatch("auto", jnp.ones(3), backend="cpu")[0] == "fast"
    assert op.dispatch("auto", jnp.ones(8), backend="cpu")[0] == "plain"
    assert op.dispatch("auto", jnp.ones(3), backend="cuda")[0] == "gpu_only"


def test_explicit_refusal_is_a_value_error_with_the_reason():
    op = make_op()
    with pytest.raises(ValueError, match="implementation='fast'.*max_size=4"):
        op.dispatch("fast", jnp.ones(8), backend="cpu")
    with pytest.raises(ValueError, match="runs on gpu, not 'cpu'"):
        op.dispatch("gpu_only", jnp.ones(2), backend="cpu")


def test_names_aliases_and_configured_instances():
    op = make_op()
    assert op.dispatch("quick", jnp.ones(2), backend="cpu")[0] == "fast"
    assert op.dispatch(Fast(max_size=100), jnp.ones(8), backend="cpu")[0] == "fast"
    with pytest.raises(ValueError, match="not one of auto, fast, plain, gpu_only, quick"):
        op.dispatch("nope", jnp.ones(2))
    with pytest.raises(ValueError, match="must be a name"):
        op.dispatch(3, jnp.ones(2))


def test_forward_mode_context_replaces_custom_vjp_implementations():
    op = make_op()
    with forward_mode_autodiff():
        assert op.dispatch("fast", jnp.ones(2), backend="cpu")[0] == "plain"
        assert op.dispatch("auto", jnp.ones(2), backend="cpu")[0] == "plain"
    assert op.dispatch("fast", jnp.ones(2), backend="cpu")[0] == "fast"


def test_forward_mode_choice_happens_at_trace_time():
    op = make_op()
    f = lambda x: op.dispatch("auto", x, backend="cpu")[1].sum()
    with forward_mode_autodiff():
        value, tangent = jax.jvp(f, (jnp.ones(2),), (jnp.ones(2),))
    assert float(tangent) == 4.0
