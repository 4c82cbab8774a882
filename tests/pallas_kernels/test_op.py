"""The op interface: explicit and 'auto' dispatch, fall-through, forward-mode substitution."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import _compat
from pallas_kernels.attention import ATTENTION_OP
from pallas_kernels.mixed_chunk import MIXED_CHUNK_OP
from pallas_kernels.monarch import MONARCH_OP
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
    return Op(
        "double",
        implementations=(Fast(), Plain(), GpuOnly()),
        auto_order={"gpu": ("gpu_only", "fast", "plain"), "*": ("fast", "plain")},
        aliases={"quick": "fast"},
    )


def test_the_table_is_checked():
    with pytest.raises(ValueError, match=r"\['missing'\] are not in the table"):
        Op("double", implementations=(Plain(),), auto_order={"*": ("plain", "missing")})
    with pytest.raises(ValueError, match="already in the table"):
        Op("double", implementations=(Plain(), Plain()), auto_order={"*": ("plain",)})


def test_auto_takes_the_first_that_accepts_and_falls_through():
    op = make_op()
    assert op(jnp.ones(3), "auto", backend="cpu")[0] == "fast"
    assert op(jnp.ones(8), "auto", backend="cpu")[0] == "plain"
    assert op(jnp.ones(3), "auto", backend="cuda")[0] == "gpu_only"


def test_explicit_refusal_is_a_value_error_with_the_reason():
    op = make_op()
    with pytest.raises(ValueError, match="implementation='fast'.*max_size=4"):
        op(jnp.ones(8), "fast", backend="cpu")
    with pytest.raises(ValueError, match="runs on gpu, not 'cpu'"):
        op(jnp.ones(2), "gpu_only", backend="cpu")


def test_names_aliases_and_configured_instances():
    op = make_op()
    assert op(jnp.ones(2), "quick", backend="cpu")[0] == "fast"
    assert op(jnp.ones(8), Fast(max_size=100), backend="cpu")[0] == "fast"
    with pytest.raises(ValueError, match="not one of auto, fast, plain, gpu_only, quick"):
        op(jnp.ones(2), "nope")
    with pytest.raises(ValueError, match="must be a name"):
        op(jnp.ones(2), 3)


def test_forward_mode_context_replaces_custom_vjp_implementations():
    op = make_op()
    with forward_mode_autodiff():
        assert op(jnp.ones(2), "fast", backend="cpu")[0] == "plain"
        assert op(jnp.ones(2), "auto", backend="cpu")[0] == "plain"
    assert op(jnp.ones(2), "fast", backend="cpu")[0] == "fast"


def test_forward_mode_choice_happens_at_trace_time():
    op = make_op()
    f = lambda x: op(x, "auto", backend="cpu")[1].sum()
    with forward_mode_autodiff():
        value, tangent = jax.jvp(f, (jnp.ones(2),), (jnp.ones(2),))
    assert float(tangent) == 4.0


@pytest.mark.skipif(not _compat.has_abstract_devices(), reason="this JAX has no AbstractDevice")
@pytest.mark.parametrize(
    ("platform", "device_kind", "expected"),
    [("tpu", "TPU v5 lite", "fast"), ("gpu", _compat.H100_DEVICE_KIND, "gpu_only")],
)
def test_auto_follows_the_platform_the_program_is_compiled_for(platform, device_kind, expected):
    """'auto' resolves by the devices of the (abstract) mesh a program is traced under, not by
    the host's default backend: tracing for a TPU or GPU mesh on a CPU host picks its order."""
    op = make_op()
    chosen = []

    def f(x):
        name, y = op(x)
        chosen.append(name)
        return y

    with _compat.abstract_platform(platform, device_kind):
        assert _compat.backend_kind() == platform
        jax.make_jaxpr(f)(jax.ShapeDtypeStruct((3,), jnp.float32))
    assert chosen == [expected]
    if platform == "gpu":
        with _compat.abstract_platform(platform, device_kind):
            names = [c.name for c in ATTENTION_OP.candidates()]
            assert names == ["pallas_triton", "cudnn", "xla"]
            assert [c.name for c in MONARCH_OP.candidates()] == ["pallas_triton", "xla"]
            assert [c.name for c in MIXED_CHUNK_OP.candidates()] == ["pallas_triton", "xla"]
    assert _compat.backend_kind() == jax.default_backend().replace("cuda", "gpu")
