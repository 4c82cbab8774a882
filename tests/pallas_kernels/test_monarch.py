"""Monarch kernel (interpret mode on CPU) vs the einsum reference, and dense <-> Monarch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.monarch import BlockSizes
from pallas_kernels.monarch import dense_to_monarch
from pallas_kernels.monarch import monarch_matmul
from pallas_kernels.monarch import monarch_matmul_reference
from pallas_kernels.monarch import monarch_to_dense

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(seed, batch, w1_shape, w2_shape, dtype):
    k, _, p = w1_shape
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (*batch, k * p), jnp.float32)
    w1 = jax.random.normal(keys[1], w1_shape, jnp.float32) / np.sqrt(w1_shape[2])
    w2 = jax.random.normal(keys[2], w2_shape, jnp.float32) / np.sqrt(w2_shape[2])
    l, s, _ = w2_shape
    dy = jax.random.normal(keys[3], (*batch, l * s), jnp.float32)
    return x.astype(dtype), w1.astype(dtype), w2.astype(dtype), dy.astype(dtype)


def _value_and_grads(fn, x, w1, w2, dy):
    y, vjp = jax.vjp(fn, x, w1, w2)
    return (y, *vjp(dy))


@pytest.mark.parametrize(
    "batch, w1_shape, w2_shape, block_sizes",
    [
        # square, nblocks 2 (t = 32 in two rank chunks: the matmul path), two leading dims, rows
        # not a multiple of the tile, chunked reduction, tiled weight gradients
        (
            (5, 7),
            (2, 64, 64),
            (2, 64, 64),
            BlockSizes(16, block_in=32, block_rank=16, weight_grad_block_out=32),
        ),
        # nblocks 8 = sqrt(64): rank-1 blocks; three leading dims, chunked reduction, tiled outputs
        ((2, 3, 1), (8, 8, 8), (8, 8, 8), BlockSizes(8, block_in=4, block_out=4)),
        # rectangular, in < out (MonarchDense shapes for 64 -> 128, nblocks 4)
        ((9,), (4, 16, 16), (4, 32, 16), BlockSizes(block_rows=8, weight_grad_row_splits=3)),
        # rectangular, in > out, k != l; no leading dims
        ((), (4, 8, 8), (2, 8, 16), BlockSizes(block_rows=8)),
    ],
)
def test_matches_reference_float32(batch, w1_shape, w2_shape, block_sizes):
    x, w1, w2, dy = _inputs(0, batch, w1_shape, w2_shape, jnp.float32)

    def kernel(x, w1, w2):
        return monarch_matmul(x, w1, w2, block_sizes=block_sizes, interpret=True)

    got = jax.jit(lambda *a: _value_and_grads(kernel, *a))(x, w1, w2, dy)
    want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert _rel_err(g, w) < TOLERANCE[jnp.float32], name
    # the reference itself is the dense product
    dense = x @ monarch_to_dense(w1, w2)
    assert _rel_err(want[0], dense) < 1e-5


def test_matches_reference_bfloat16():
    x, w1, w2, dy = _inputs(1, (20,), (2, 32, 32), (2, 32, 32), jnp.bfloat16)
    block_sizes = BlockSizes(block_rows=16)

    def kernel(x, w1, w2):
        return monarch_matmul(x, w1, w2, block_sizes=block_sizes, interpret=True)

    got = jax.jit(lambda *a: _value_and_grads(kernel, *a))(x, w1, w2, dy)
    # oracle: the same inputs in float32
    f32 = [a.astype(jnp.float32) for a in (x, w1, w2, dy)]
    want = _value_and_grads(monarch_matmul_reference, *f32)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
        assert g.dtype == jnp.bfloat16, name
        assert _rel_err(g, w) < TOLERANCE[jnp.bfloat16], name


@pytest.mark.parametrize("n_in, n_out, nblocks", [(16, 32, 4), (96, 48, 3)])
def test_dense_round_trip(n_in, n_out, nblocks):
    k = jax.random.key(2)
    matrix = jax.random.normal(k, (n_in, n_out))
    w1, w2 = dense_to_monarch(matrix, nblocks)
    monarch = monarch_to_dense(w1, w2)
    # a Monarch matrix projects onto itself
    w1b, w2b = dense_to_monarch(monarch, nblocks)
    assert w1b.shape == w1.shape and w2b.shape == w2.shape
    assert _rel_err(monarch_to_dense(w1b, w2b), monarch) < 1e-5
    # the projection is at least as close as any perturbation of it
    best = jnp.linalg.norm(matrix - monarch)
    assert best < jnp.linalg.norm(matrix)
    scales = 10.0 ** -jnp.arange(5.0)
    keys = jax.random.split(jax.random.key(10), 2)
    pw1 = w1 + scales[:, None, None, None] * jax.random.normal(keys[0], (5, *w1.shape))
    pw2 = w2 + scales[:, None, None, None] * jax.random.normal(keys[1], (5, *w2.shape))
    perturbed = jax.vmap(monarch_to_dense)(pw1, pw2)
    assert jnp.all(best <= jnp.linalg.norm(matrix - perturbed, axis=(1, 2)) * (1 + 1e-6))


def test_sqrt_nblocks_projection_is_rank_one_per_block():
    matrix = jax.random.normal(jax.random.key(3), (16, 16))
    monarch = monarch_to_dense(*dense_to_monarch(matrix, 4))
    blocks = np.asarray(monarch).reshape(4, 4, 4, 4).transpose(0, 2, 1, 3)
    ranks = np.linalg.matrix_rank(blocks.reshape(16, 4, 4), tol=1e-5)
    assert np.all(ranks == 1)


def test_bad_shapes_raise():
    x = jnp.ones((3, 16))
    w = jnp.ones((4, 4, 4))
    with pytest.raises(ValueError, match="x.shape"):
        monarch_matmul(jnp.ones((3, 12)), w, w)
    with pytest.raises(ValueError, match="l\\*r"):
        monarch_matmul(x, w, jnp.ones((4, 4, 3)))
    with pytest.raises(ValueError, match="w1"):
        monarch_matmul_reference(x, jnp.ones((16, 16)), w)
    with pytest.raises(ValueError, match="r % k"):
        monarch_matmul(jnp.ones((3, 8)), jnp.ones((4, 3, 2)), jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match="dtype"):
        monarch_matmul_reference(x.astype(jnp.int32), w, w)
    with pytest.raises(ValueError, match="block_in"):
        monarch_matmul(x, w, w, block_sizes=BlockSizes(block_in=3), interpret=True)
    with pytest.raises(ValueError, match="block_rows"):
        BlockSizes(block_rows=0)
    with pytest.raises(ValueError, match="nblocks"):
        dense_to_monarch(jnp.ones((16, 12)), 8)
    with pytest.raises(ValueError, match="matrix"):
        dense_to_monarch(jnp.ones((16,)), 4)


@pytest.mark.parametrize("w_shape", [(4, 64, 64), (16, 16, 16)])
def test_lowers_for_triton_gpu(w_shape):
    """The forward and backward kernels lower to Triton IR (no GPU needed to lower)."""
    x = jnp.ones((128, w_shape[0] * w_shape[2]), jnp.bfloat16)
    w = jnp.ones(w_shape, jnp.bfloat16)

    def fwd_bwd(x, w1, w2):
        y, vjp = jax.vjp(lambda *a: monarch_matmul(*a, interpret=False), x, w1, w2)
        return vjp(y)

    text = jax.jit(fwd_bwd).trace(x, w, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text


def test_chunked_reference_matches_unchunked():
    """The CPU fast path (rows in chunks, custom VJP recomputing the intermediate)."""
    x, w1, w2, dy = _inputs(4, (3, 13), (4, 8, 8), (2, 8, 16), jnp.float32)

    def chunked(x, w1, w2):
        return monarch_matmul_reference(x, w1, w2, row_chunk=8)  # 39 rows: padded to 40

    got = jax.jit(lambda *a: _value_and_grads(chunked, *a))(x, w1, w2, dy)
    want = _value_and_grads(monarch_matmul_reference, x, w1, w2, dy)
    for name, g, w in zip(("y", "dx", "dw1", "dw2"), got, want, strict=True):
        assert _rel_err(g, w) < 1e-6, name
