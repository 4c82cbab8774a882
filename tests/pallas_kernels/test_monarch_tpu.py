"""The Monarch Mosaic TPU kernels in TPU interpret mode (CPU) against the einsum oracle.

What is particular to these kernels (the op's shared shapes run in test_monarch.py's
``TestPallasMosaicTpu``). Each call compiles the forward and the backward kernel; rows are
padded to 128-row tiles, so the interpret-mode grids have one to four steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels._compat import use_mesh
from pallas_kernels.monarch import MONARCH_OP
from pallas_kernels.monarch import MonarchCall
from pallas_kernels.monarch import PallasMosaicTpuMonarch
from pallas_kernels.monarch import monarch_matmul
from pallas_kernels.monarch.pallas_mosaic_tpu_kernel import BlockSizes
from pallas_kernels.monarch.pallas_mosaic_tpu_kernel import monarch_matmul_tpu
from pallas_kernels.monarch.pallas_mosaic_tpu_kernel import vmem_bytes
from pallas_kernels.monarch.reference import monarch_matmul_reference
from pallas_kernels.op import Unsupported

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (rows, w1 [k, q, p], w2 [l, s, r])
SHAPES = {
    # nblocks 4 = sqrt(16): an inner rank of 1 between an (input, output) block pair
    "sqrt_nblocks4": (3, (4, 4, 4), (4, 4, 4)),
    # nblocks 8 = sqrt(64), one row
    "sqrt_nblocks8_batch1": (1, (8, 8, 8), (8, 8, 8)),
    # rectangular, in > out, k != l
    "rect_down": (6, (4, 8, 8), (2, 8, 16)),
}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(seed, rows, w1_shape, w2_shape, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    k, _, p = w1_shape
    l, s, _ = w2_shape
    x = rng.standard_normal((rows, k * p))
    w1 = rng.standard_normal(w1_shape) / np.sqrt(w1_shape[2])
    w2 = rng.standard_normal(w2_shape) / np.sqrt(w2_shape[2])
    dy = rng.standard_normal((rows, l * s))
    return [jnp.asarray(a, jnp.float32).astype(dtype) for a in (x, w1, w2, dy)]


def _value_and_grads(fn, x, w1, w2, dy):
    y, vjp = jax.vjp(fn, x, w1, w2)
    return (y, *vjp(dy))


def _kernel(block_sizes=None):
    return jax.jit(
        lambda *a: _value_and_grads(
            lambda x, w1, w2: monarch_matmul_tpu(
                x, w1, w2, block_sizes=block_sizes, interpret=True
            ),
            *a,
        )
    )


def _check(got, want, tol, dtype):
    for what, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == dtype, what
        assert np.all(np.isfinite(np.asarray(g, np.float32))), what
        assert _rel_err(g, w) < tol, (what, _rel_err(g, w))


@pytest.mark.parametrize("name", ["sqrt_nblocks4", "sqrt_nblocks8_batch1"])
def test_float32_values_and_grads(name):
    x, w1, w2, dy = _inputs(len(name), *SHAPES[name])
    got = _kernel()(x, w1, w2, dy)
    want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
    _check(got, want, TOLERANCE[jnp.float32], jnp.float32)


@pytest.mark.parametrize("name", ["rect_down"])
def test_bfloat16_against_the_float32_oracle(name):
    x, w1, w2, dy = _inputs(7, *SHAPES[name], dtype=jnp.bfloat16)
    got = _kernel()(x, w1, w2, dy)
    want = _value_and_grads(
        monarch_matmul_reference, *[a.astype(jnp.float32) for a in (x, w1, w2, dy)]
    )
    _check(got, want, TOLERANCE[jnp.bfloat16], jnp.bfloat16)


def test_several_tiles_and_uneven_splits():
    # 300 rows in 128-row tiles: 3 tiles, 2 splits of 2 tiles (one all padding); the weight
    # gradients are summed over tiles inside a split and over splits outside.
    x, w1, w2, dy = _inputs(11, 300, (4, 8, 8), (4, 8, 8))
    for block_sizes in (None, BlockSizes(block_rows=128, splits=3)):
        got = _kernel(block_sizes)(x, w1, w2, dy)
        want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
        _check(got, want, TOLERANCE[jnp.float32], jnp.float32)


def test_compiled_refusals_name_the_xla_path():
    # Compiled for a TPU the kernel needs 8-aligned feature blocks and factors that fit VMEM;
    # it refuses before tracing any kernel (so this runs on a CPU).
    x, w1, w2, _ = _inputs(1, 6, (8, 6, 5), (12, 3, 4))
    with pytest.raises(Unsupported, match="multiples of 8.*implementation='xla'"):
        monarch_matmul_tpu(x, w1, w2, interpret=False)
    big = jax.ShapeDtypeStruct((4, 2048, 2048), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)
    with pytest.raises(Unsupported, match="VMEM.*implementation='xla'"):
        jax.eval_shape(lambda x, w: monarch_matmul_tpu(x, w, w, interpret=False), rows, big)


def test_refused_explicitly_is_a_value_error_and_falls_through_under_auto(monkeypatch):
    x, w1, w2, _ = _inputs(1, 6, (8, 6, 5), (12, 3, 4))  # widths 5, 3, 4: not 8-aligned
    with pytest.raises(ValueError, match="pallas_mosaic_tpu.*multiples of 8.*'xla'"):
        monarch_matmul(x, w1, w2, implementation=PallasMosaicTpuMonarch(interpret=False))
    monkeypatch.setattr(_compat, "backend_kind", lambda backend=None: "tpu")  # compiled, as on TPU
    on_tpu = lambda *a: MONARCH_OP(MonarchCall(*a), "auto", backend="tpu")  # noqa: E731
    assert "pallas_call" not in str(jax.make_jaxpr(on_tpu)(x, w1, w2))
    x, w1, w2, _ = _inputs(1, 256, (4, 8, 8), (4, 8, 8))
    assert "pallas_call" in str(jax.make_jaxpr(on_tpu)(x, w1, w2))


def test_block_sizes_are_checked():
    for bad in (0, 100, 64, True, 1.5):
        with pytest.raises(ValueError, match="block_rows"):
            BlockSizes(block_rows=bad)
    with pytest.raises(ValueError, match="splits"):
        BlockSizes(splits=0)
    with pytest.raises(ValueError, match="groups"):
        BlockSizes(groups=0)
    with pytest.raises(ValueError, match="block_sizes"):
        PallasMosaicTpuMonarch(block_sizes=128)
    x, w1, w2, _ = _inputs(1, *SHAPES["rect_down"])
    with pytest.raises(Unsupported, match="groups=3 must divide"):
        monarch_matmul_tpu(x, w1, w2, block_sizes=BlockSizes(groups=3), interpret=True)
    assert BlockSizes(block_rows=256, splits=2) == BlockSizes(256, 2)


def test_vmem_estimate_grows_with_the_tile_and_the_factors():
    small = vmem_bytes((64, 64, 64), (64, 64, 64), jnp.bfloat16, 128)
    assert small < vmem_bytes((64, 64, 64), (64, 64, 64), jnp.bfloat16, 256)
    big = vmem_bytes((16, 256, 256), (16, 256, 256), jnp.bfloat16, 128)
    assert small < big
    assert vmem_bytes((16, 256, 256), (16, 256, 256), jnp.bfloat16, 128, groups=4) < big / 2


@pytest.mark.parametrize("groups", [2, 4])
def test_output_blocks_in_groups(groups):
    # Each group of output blocks gets its own slice of w1 and its own w2 blocks; dx is summed
    # over the groups, the weight gradients are written group by group.
    rows, w1_shape, w2_shape = 20, (4, 8, 8), (4, 8, 8)
    x, w1, w2, dy = _inputs(groups, rows, w1_shape, w2_shape)
    got = _kernel(BlockSizes(groups=groups, splits=2))(x, w1, w2, dy)
    want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
    _check(got, want, TOLERANCE[jnp.float32], jnp.float32)


def test_lowers_to_mosaic_for_tpu():
    # Lowering (not compiling) runs Pallas' Mosaic lowering on a CPU-only install.
    x = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((32, 32, 32), jnp.bfloat16)

    def loss(x, w1, w2):
        # squared: the backward needs the forward's output, so neither kernel is dead code
        return jnp.sum(monarch_matmul_tpu(x, w1, w2, interpret=False).astype(jnp.float32) ** 2)

    text = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        .trace(x, w, w)
        .lower(lowering_platforms=("tpu",))
        .as_text()
    )
    assert text.count("tpu_custom_call") == 2


def test_under_a_mesh_the_rows_are_split_in_shard_map():
    # XLA cannot partition a Mosaic kernel: under a mesh the op runs it in shard_map (rows over
    # the mesh's axes, padded from 20 to 24; factor gradients summed over the devices).
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x, w1, w2, dy = _inputs(3, 20, (4, 8, 8), (4, 8, 8))
    impl = PallasMosaicTpuMonarch(interpret=True)

    def run(*args):
        return _value_and_grads(lambda *a: monarch_matmul(*a, implementation=impl), *args)

    with use_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(run)(x, w1, w2, dy))
        got = jax.jit(run)(x, w1, w2, dy)
    want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
    _check(got, want, TOLERANCE[jnp.float32], jnp.float32)


def test_tpu_check_cases_trace():
    # tools/tpu_cases/monarch.py: every case builds and traces (abstract evaluation only; the
    # compile check itself needs libtpu: tools/tpu_check.py).
    from tools.tpu_cases.monarch import CASES

    assert len(CASES) >= 18
    for case in CASES:
        fn, args = case.build()
        out = jax.eval_shape(fn, *args)
        assert jax.tree.leaves(out), case.name
