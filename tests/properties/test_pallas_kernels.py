"""Properties of ``pallas_kernels``: Monarch matmuls (every implementation) and conversions.

The Pallas kernels run in interpret mode on a CPU, which is slow: only a couple of examples go
through them; the reference and XLA implementations take the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from _hyp import INVALID
from _hyp import VALID
from _hyp import assert_close
from _hyp import bad_ints
from _hyp import monarch64
from _hyp import normal
from _hyp import props
from _hyp import refused
from _hyp import seeds
from hypothesis import given
from hypothesis import strategies as st

import pallas_kernels as pk

# (k, q, p, l, s, r) with l * r == k * q: square, rectangular, and the general l != k form.
MONARCH_SHAPES = [(2, 4, 4, 2, 4, 4), (4, 2, 3, 2, 5, 4), (2, 3, 4, 3, 2, 2)]


_reference = jax.jit(pk.monarch_matmul_reference)


@functools.cache
def _jitted(implementation):
    return jax.jit(functools.partial(pk.monarch_matmul, implementation=implementation))


@VALID
@given(
    st.sampled_from(MONARCH_SHAPES),
    seeds,
    st.sampled_from(["reference", "xla"]),
    st.sampled_from([(3,), (2, 2), ()]),
    st.sampled_from([jnp.float32, jnp.bfloat16]),
)
def test_monarch_matmul_matches_numpy(shape, seed, implementation, batch, dtype):
    k, q, p, l, s, r = shape
    x = jnp.asarray(normal(seed, (*batch, k * p)), dtype)
    w1 = jnp.asarray(normal(seed + 1, (k, q, p)), dtype)
    w2 = jnp.asarray(normal(seed + 2, (l, s, r)), dtype)
    got = _jitted(implementation)(x, w1, w2)
    assert got.shape == (*batch, l * s) and got.dtype == dtype
    tolerance = 1e-4 if dtype == jnp.float32 else 5e-2
    assert_close(got, monarch64(x, w1, w2), rtol=tolerance, atol=tolerance * 4)
    assert_close(
        _reference(x, w1, w2),
        monarch64(x, w1, w2),
        rtol=tolerance,
        atol=tolerance * 4,
    )


@props(1)
@given(seeds)
def test_monarch_pallas_kernel_matches_numpy(seed):
    k, q, p, l, s, r = 2, 4, 4, 2, 4, 4
    x = jnp.asarray(normal(seed, (3, k * p)))
    w1, w2 = jnp.asarray(normal(seed + 1, (k, q, p))), jnp.asarray(normal(seed + 2, (l, s, r)))
    got = pk.monarch_matmul(x, w1, w2, implementation=pk.PallasTritonMonarch(interpret=True))
    assert_close(got, monarch64(x, w1, w2), rtol=1e-4, atol=1e-4)


@VALID
@given(st.sampled_from(MONARCH_SHAPES), seeds)
def test_monarch_to_dense_is_the_same_linear_map(shape, seed):
    k, q, p, l, s, r = shape
    w1, w2 = normal(seed, (k, q, p)), normal(seed + 1, (l, s, r))
    dense = pk.monarch_to_dense(jnp.asarray(w1), jnp.asarray(w2))
    assert_close(dense, monarch64(np.eye(k * p), w1, w2), rtol=1e-5, atol=1e-5)


@VALID
@given(st.sampled_from([(8, 8, 2), (8, 4, 4), (4, 8, 2)]), seeds)
def test_dense_to_monarch_projects_a_monarch_matrix_onto_itself(sizes, seed):
    d_in, d_out, nblocks = sizes
    rng = np.random.default_rng(seed)
    q = min(d_in, d_out) // nblocks
    w1 = rng.standard_normal((nblocks, q, d_in // nblocks))
    w2 = rng.standard_normal((nblocks, d_out // nblocks, q))
    matrix = monarch64(np.eye(d_in), w1, w2)
    f1, f2 = pk.dense_to_monarch(jnp.asarray(matrix, jnp.float32), nblocks)
    assert_close(monarch64(np.eye(d_in), f1, f2), matrix, rtol=1e-3, atol=1e-3)
    # Any dense matrix: the projection is the closest Monarch matrix, so no farther than the
    # test's own Monarch matrix.
    other = rng.standard_normal((d_in, d_out))
    g1, g2 = pk.dense_to_monarch(jnp.asarray(other, jnp.float32), nblocks)
    projected = monarch64(np.eye(d_in), g1, g2)
    assert np.linalg.norm(projected - other) <= np.linalg.norm(matrix - other) + 1e-3


@INVALID
@given(st.data())
def test_monarch_refuses(data):
    x, w1, w2 = jnp.ones((2, 8)), jnp.ones((2, 4, 4)), jnp.ones((2, 4, 4))
    case = data.draw(
        st.sampled_from(
            ["x_rank", "x_width", "x_dtype", "w1", "w2", "chain", "empty", "implementation",
             "matrix", "nblocks", "divide", "block_sizes", "num_warps", "row_chunk", "staged"]
        )
    )  # fmt: skip
    mm = pk.monarch_matmul
    if case == "x_rank":
        refused(lambda: mm(jnp.float32(1), w1, w2), "x")
    elif case == "x_width":
        refused(lambda: mm(jnp.ones((2, 6)), w1, w2), "x")
    elif case == "x_dtype":
        dtype = data.draw(st.sampled_from([jnp.int32, jnp.bool_, jnp.complex64]))
        refused(lambda: mm(x.astype(dtype), w1, w2), "x")
    elif case == "w1":
        refused(lambda: mm(x, data.draw(st.sampled_from([jnp.ones((4, 4)), "w1"])), w2), "w1")
    elif case == "w2":
        refused(lambda: mm(x, w1, data.draw(st.sampled_from([jnp.ones((4, 4)), w2 > 0]))), "w2")
    elif case == "chain":
        refused(lambda: mm(x, w1, jnp.ones((3, 4, 4))), "w2")
    elif case == "empty":
        refused(lambda: mm(x, jnp.ones((2, 0, 4)), w2), "w1")
    elif case == "implementation":
        bad = data.draw(st.sampled_from(["nope", "Pallas", 3, None]))
        refused(lambda: mm(x, w1, w2, implementation=bad), "implementation")
    elif case == "matrix":
        bad = data.draw(st.sampled_from([jnp.ones(8), jnp.ones((2, 8, 8)), jnp.ones((8, 8), bool)]))
        refused(lambda: pk.dense_to_monarch(bad, 2), "matrix")
    elif case == "nblocks":
        refused(
            lambda: pk.dense_to_monarch(
                jnp.ones((8, 8)), data.draw(bad_ints().filter(lambda v: v is not None and v == v))
            ),
            "nblocks",
        )
    elif case == "divide":
        refused(lambda: pk.dense_to_monarch(jnp.ones((8, 8)), 3), "nblocks")
    elif case == "block_sizes":
        arg = data.draw(
            st.sampled_from(["block_rows", "block_in", "block_rank", "block_out", "num_stages"])
        )
        refused(
            lambda: pk.MonarchBlockSizes(**{arg: data.draw(st.sampled_from([0, -4, 2.5, True]))}),
            arg,
        )
    elif case == "num_warps":
        refused(
            lambda: pk.MonarchBlockSizes(num_warps=data.draw(st.sampled_from([3, 0, 6]))),
            "num_warps",
        )
    elif case == "row_chunk":
        bad = data.draw(st.sampled_from([0, -1, "big", 2.5]))
        refused(lambda: mm(x, w1, w2, implementation=pk.XlaMonarch(row_chunk=bad)), "row_chunk")
    else:
        refused(
            lambda: pk.MonarchBlockSizes(staged=data.draw(st.sampled_from([1, "yes"]))), "staged"
        )
