"""The Monarch op: one test base run for every implementation against the einsum oracle.

Pallas implementations run in interpret mode on CPU and compiled on a GPU (``interpret=None``);
the ``gpu`` class runs the same base compiled, on the same shapes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import MonarchBlockSizes
from pallas_kernels import PallasMosaicTpuMonarch
from pallas_kernels import PallasTritonMonarch
from pallas_kernels import ReferenceMonarch
from pallas_kernels import XlaMonarch
from pallas_kernels import dense_to_monarch
from pallas_kernels import monarch_matmul
from pallas_kernels import monarch_matmul_reference
from pallas_kernels import monarch_to_dense
from pallas_kernels._compat import H100_DEVICE_KIND
from pallas_kernels._compat import abstract_platform
from pallas_kernels._compat import cuda_lowering
from pallas_kernels.monarch import MONARCH_OP
from pallas_kernels.monarch import MonarchCall
from pallas_kernels.monarch import default_block_sizes

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (batch, w1 [k, q, p], w2 [l, s, r]); all with r % k == 0 and power-of-two blocks, so every
# implementation (compiled Triton too) runs them.
SHAPES = {
    # square, nblocks 2: t = 32 (the tensor-core path), two leading dims, rows not a multiple
    "square_t32": ((5, 7), (2, 64, 64), (2, 64, 64)),
    # nblocks 8 = sqrt(64): inner rank t = 1 (CUDA-core path), three leading dims
    "sqrt_rank1": ((2, 3, 1), (8, 8, 8), (8, 8, 8)),
    # rectangular, in < out (MonarchDense 64 -> 128, nblocks 4): t = 4, padded to 16
    "rect_up": ((9,), (4, 16, 16), (4, 32, 16)),
    # rectangular, in > out, k != l; no leading dims
    "rect_down": ((), (4, 8, 8), (2, 8, 16)),
}
# l*r == k*q but r % k != 0: only the reference and XLA paths take it.
GENERAL = ((3, 2), (8, 6, 5), (12, 3, 4))


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(seed, batch, w1_shape, w2_shape, dtype=jnp.float32):
    k, _, p = w1_shape
    l, s, _ = w2_shape
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (*batch, k * p))
    w1 = jax.random.normal(keys[1], w1_shape) / np.sqrt(w1_shape[2])
    w2 = jax.random.normal(keys[2], w2_shape) / np.sqrt(w2_shape[2])
    dy = jax.random.normal(keys[3], (*batch, l * s))
    return [a.astype(dtype) for a in (x, w1, w2, dy)]


def _value_and_grads(fn, x, w1, w2, dy):
    y, vjp = jax.vjp(fn, x, w1, w2)
    return (y, *vjp(dy))


class MonarchOpTest:
    """Values and gradients of one implementation against ``monarch_matmul_reference``."""

    implementation = None
    shapes = tuple(SHAPES)
    accepts_general_shapes = True
    check_bfloat16 = True

    def _fn(self):
        impl = self.implementation
        return jax.jit(
            lambda *a: _value_and_grads(
                lambda x, w1, w2: monarch_matmul(x, w1, w2, implementation=impl), *a
            )
        )

    def test_float32_values_and_grads(self):
        fn = self._fn()
        for seed, name in enumerate(self.shapes):
            x, w1, w2, dy = _inputs(seed, *SHAPES[name])
            got = fn(x, w1, w2, dy)
            want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
            for what, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
                assert g.shape == w.shape and g.dtype == w.dtype, (name, what)
                assert _rel_err(g, w) < TOLERANCE[jnp.float32], (name, what, _rel_err(g, w))

    def test_bfloat16_against_float32_oracle(self):
        if not self.check_bfloat16:
            pytest.skip("same code as another class's bfloat16 test")
        x, w1, w2, dy = _inputs(7, *SHAPES["square_t32"], dtype=jnp.bfloat16)
        got = self._fn()(x, w1, w2, dy)
        want = _value_and_grads(
            monarch_matmul_reference, *[a.astype(jnp.float32) for a in (x, w1, w2, dy)]
        )
        for what, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
            assert g.dtype == jnp.bfloat16, what
            assert _rel_err(g, w) < TOLERANCE[jnp.bfloat16], (what, _rel_err(g, w))

    def test_general_shapes(self):
        x, w1, w2, _ = _inputs(3, *GENERAL)
        if self.accepts_general_shapes:
            impl = self.implementation
            got, want = jax.jit(
                lambda *a: (monarch_matmul(*a, implementation=impl), monarch_matmul_reference(*a))
            )(x, w1, w2)
            assert got.shape == (3, 2, 36)
            assert _rel_err(got, want) < 1e-6
        else:
            with pytest.raises(ValueError, match="r % k == 0|power-of-two"):
                monarch_matmul(x, w1, w2, implementation=self.implementation)


class TestReference(MonarchOpTest):
    implementation = "reference"
    shapes = ("rect_down",)
    check_bfloat16 = False


class TestXla(MonarchOpTest):
    implementation = "xla"  # on CPU: chunks of 32 rows for these small blocks
    shapes = ("square_t32", "rect_down")


class TestXlaChunked(MonarchOpTest):
    # 9 rows in chunks of 8: padded to 16, the custom VJP recomputes each chunk
    implementation = XlaMonarch(row_chunk=8)
    shapes = ("rect_up",)
    check_bfloat16 = False


class TestPallasTritonDefault(MonarchOpTest):
    """The per-shape chooser: fused kernel, t = 1 on the CUDA cores, t = 4 padded to 16."""

    implementation = PallasTritonMonarch()
    accepts_general_shapes = True  # interpret mode; r % k != 0 runs the staged path


class TestPallasTritonTiled(MonarchOpTest):
    """Explicit small tiles: chunked reductions and rank, tiled output and weight gradients,
    partial sums over row splits."""

    implementation = PallasTritonMonarch(
        block_sizes=MonarchBlockSizes(
            16,
            block_in=32,
            block_rank=16,
            block_out=32,
            weight_grad_block_out=16,
            weight_grad_row_splits=3,
            staged=False,
        )
    )
    shapes = ("square_t32",)
    accepts_general_shapes = False
    check_bfloat16 = False


class TestPallasTritonStaged(MonarchOpTest):
    """Two block-diagonal GEMM kernels with the permutation between them (large blocks)."""

    implementation = PallasTritonMonarch(
        block_sizes=MonarchBlockSizes(16, block_in=16, block_rank=16, block_out=16, staged=True)
    )
    shapes = ("square_t32", "rect_up")
    accepts_general_shapes = True  # interpret mode; r % k != 0 runs the staged path


class TestPallasMosaicTpu(MonarchOpTest):
    """The Mosaic TPU kernels in TPU interpret mode: every shape, ``r % k != 0`` included."""

    implementation = PallasMosaicTpuMonarch(interpret=True)


@pytest.mark.gpu
class TestPallasTritonCompiled(MonarchOpTest):
    implementation = PallasTritonMonarch(interpret=False)
    accepts_general_shapes = False


def test_auto_falls_through_on_gpu_and_is_xla_elsewhere():
    assert [c.name for c in MONARCH_OP.candidates("auto", backend="cuda")] == [
        "pallas_triton",
        "xla",
    ]
    assert [c.name for c in MONARCH_OP.candidates("auto", backend="cpu")] == ["xla"]
    assert [c.name for c in MONARCH_OP.candidates("auto", backend="tpu")] == [
        "pallas_mosaic_tpu",
        "xla",
    ]
    x, w1, w2, _ = _inputs(5, *GENERAL)
    x2d = x.reshape(-1, x.shape[-1])
    # compiled for a GPU the kernel refuses widths that are not powers of two and the XLA path
    # answers (same numbers); traced here for an abstract GPU device
    op = lambda *a: MONARCH_OP(MonarchCall(*a))
    with abstract_platform("gpu", H100_DEVICE_KIND):
        jaxpr = str(jax.make_jaxpr(op)(x2d, w1, w2))
    assert "pallas_call" not in jaxpr
    x, w1, w2, _ = _inputs(5, *SHAPES["rect_down"])
    x = x[None]  # indexed outside the abstract mesh (JAX >= 0.12.1 would lower it there)
    with abstract_platform("gpu", H100_DEVICE_KIND):
        jaxpr = str(jax.make_jaxpr(op)(x, w1, w2))
    assert "pallas_call" in jaxpr


def test_dense_round_trip_and_projection_optimality():
    matrix = jax.random.normal(jax.random.key(2), (96, 48))
    w1, w2 = dense_to_monarch(matrix, 3)
    monarch = monarch_to_dense(w1, w2)
    # a Monarch matrix projects onto itself
    w1b, w2b = dense_to_monarch(monarch, 3)
    assert w1b.shape == w1.shape and w2b.shape == w2.shape
    assert _rel_err(monarch_to_dense(w1b, w2b), monarch) < 1e-5
    # the projection is at least as close as any perturbation of it
    best = jnp.linalg.norm(matrix - monarch)
    scales = 10.0 ** -jnp.arange(5.0)
    keys = jax.random.split(jax.random.key(10), 2)
    pw1 = w1 + scales[:, None, None, None] * jax.random.normal(keys[0], (5, *w1.shape))
    pw2 = w2 + scales[:, None, None, None] * jax.random.normal(keys[1], (5, *w2.shape))
    perturbed = jax.vmap(monarch_to_dense)(pw1, pw2)
    assert jnp.all(best <= jnp.linalg.norm(matrix - perturbed, axis=(1, 2)) * (1 + 1e-6))
    # and the reference is the product with its dense matrix
    x = jax.random.normal(jax.random.key(4), (3, 96))
    assert _rel_err(monarch_matmul_reference(x, w1, w2), x @ monarch) < 1e-5


def test_sqrt_nblocks_projection_is_rank_one_per_block():
    matrix = jax.random.normal(jax.random.key(3), (16, 16))
    monarch = monarch_to_dense(*dense_to_monarch(matrix, 4))
    blocks = np.asarray(monarch).reshape(4, 4, 4, 4).transpose(0, 2, 1, 3)
    ranks = np.linalg.matrix_rank(blocks.reshape(16, 4, 4), tol=1e-5)
    assert np.all(ranks == 1)


def test_bad_arguments_raise():
    x = jnp.ones((3, 16))
    w = jnp.ones((4, 4, 4))
    with pytest.raises(ValueError, match="x.shape"):
        monarch_matmul(jnp.ones((3, 12)), w, w)
    with pytest.raises(ValueError, match="l\\*r"):
        monarch_matmul(x, w, jnp.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="w1"):
        monarch_matmul_reference(x, jnp.ones((16, 16)), w)
    with pytest.raises(ValueError, match="dtype"):
        monarch_matmul(x.astype(jnp.int32), w, w)
    with pytest.raises(ValueError, match="implementation='cuda'"):
        monarch_matmul(x, w, w, implementation="cuda")
    bad_tiles = PallasTritonMonarch(block_sizes=MonarchBlockSizes(block_in=3, staged=False))
    with pytest.raises(ValueError, match="block_in"):
        monarch_matmul(x, w, w, implementation=bad_tiles)
    with pytest.raises(ValueError, match="block_rows"):
        MonarchBlockSizes(block_rows=0)
    with pytest.raises(ValueError, match="row_chunk"):
        XlaMonarch(row_chunk=0)
    with pytest.raises(ValueError, match="nblocks"):
        dense_to_monarch(jnp.ones((16, 12)), 8)
    with pytest.raises(ValueError, match="matrix"):
        dense_to_monarch(jnp.ones((16,)), 4)
    assert ReferenceMonarch() == MONARCH_OP.get("reference")


def test_chooser_keeps_accumulators_small_and_rows_wgmma_sized():
    """The per-shape defaults: <= 64 float32 accumulator registers per thread, 64-row tiles
    with one warpgroup (Hopper wgmma) where the rows and the rank allow a tensor-core dot."""
    for width_out in (64, 256, 1024, 4096):
        for rank in (1, 2, 16, 32):
            bs = default_block_sizes(
                "chain", rows=8192, width_in=256, rank=rank, width_out=width_out
            )
            threads = 32 * bs.num_warps
            per_out = bs.block_rows * (1 if rank >= 16 else 1 + bs.block_rank)
            budget = 64 if rank >= 16 else 32  # CUDA-core kernels: half (ptxas caps at 64)
            assert bs.block_out * per_out / threads <= budget, (width_out, rank, bs)
            assert bs.block_rows == (64 if rank >= 16 else 32) and bs.num_warps == 4
    gemm = default_block_sizes("gemm", rows=8192, width_in=1024, rank=0, width_out=1024)
    assert (gemm.block_rows, gemm.block_out, gemm.num_warps) == (128, 128, 8)
    assert default_block_sizes("gemm", rows=20, width_in=64, rank=0, width_out=64).block_rows == 32


@pytest.mark.parametrize("staged", [False, True])
def test_lowers_for_triton_gpu(staged):
    """The forward and backward kernels lower to Triton IR for CUDA (no GPU needed to lower)."""
    x = jnp.ones((128, 256), jnp.bfloat16)
    w = jnp.ones((4, 64, 64), jnp.bfloat16)
    impl = PallasTritonMonarch(
        block_sizes=None if not staged else MonarchBlockSizes(staged=True), interpret=False
    )

    def fwd_bwd(x, w1, w2):
        y, vjp = jax.vjp(lambda *a: monarch_matmul(*a, implementation=impl), x, w1, w2)
        return vjp(y)

    with cuda_lowering():
        text = jax.jit(fwd_bwd).trace(x, w, w).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("triton") >= 3


@pytest.mark.parametrize(
    ("w1_shape", "w2_shape"),
    [((2, 24, 48), (2, 24, 24)), ((4, 130, 200), (4, 200, 130)), ((3, 10, 7), (5, 4, 6))],
)
def test_pallas_takes_every_shape_the_xla_path_takes(w1_shape, w2_shape):
    """Widths that are not powers of two (96 -> 48 with nblocks 2, 800 -> 520) and r % k != 0
    run in interpret mode: the tiles divide what they tile, r % k != 0 takes the staged path."""
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.standard_normal(w1_shape), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal(w2_shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((5, w1_shape[0] * w1_shape[2])), jnp.float32)
    pallas = PallasTritonMonarch(interpret=True)

    cotangent = jnp.asarray(rng.standard_normal((5, w2_shape[0] * w2_shape[1])), jnp.float32)

    def value_and_grads(implementation):
        loss = lambda *a: jnp.sum(cotangent * monarch_matmul(*a, implementation=implementation))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w1, w2)

    chex.assert_trees_all_close(
        value_and_grads(pallas), value_and_grads("reference"), rtol=3e-4, atol=3e-4
    )
