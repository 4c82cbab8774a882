"""Properties of ``pallas_kernels``: Monarch matmuls (every implementation) and conversions.

The Pallas kernels run in interpret mode on a CPU, which is slow: only a couple of examples go
through them; the reference and XLA implementations take the rest.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hyp import INVALID
from _hyp import VALID
from _hyp import assert_close
from _hyp import attention64
from _hyp import bad_ints
from _hyp import f64
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


# --------------------------------------------------------------------------- attention

ATTENTION_CONFIGS = ["plain", "causal", "gqa", "mask_bias", "segments"]


def _attention_inputs(seed, config):
    kv_heads = 1 if config == "gqa" else 2
    q = normal(seed, (2, 8, 2, 8))
    k, v = normal(seed + 1, (2, 8, kv_heads, 8)), normal(seed + 2, (2, 8, kv_heads, 8))
    rng = np.random.default_rng(seed)
    kwargs, ref = {}, {}  # kwargs: arrays only (traced); causal is static, from the config
    if config in ("causal", "gqa"):
        ref["causal"] = True
    if config == "mask_bias":
        mask = rng.random((2, 1, 8, 8)) < 0.7
        bias = normal(seed + 3, (1, 2, 8, 8))
        kwargs.update(mask=jnp.asarray(mask), bias=jnp.asarray(bias))
        ref.update(mask=mask, bias=bias)
    if config == "segments":
        ids = np.sort(rng.integers(0, 3, (2, 8)), -1).astype(np.int32)
        kwargs["segment_ids"] = (jnp.asarray(ids), jnp.asarray(ids))
        ref["segments"] = (ids, ids)
    return q, k, v, kwargs, ref


@functools.cache
def _attention(implementation, config):
    causal = config in ("causal", "gqa")

    def run(q, k, v, kwargs):
        return pk.dot_product_attention(
            q, k, v, causal=causal, implementation=implementation, **kwargs
        )

    return jax.jit(run)


@VALID
@given(seeds, st.sampled_from(["reference", "xla"]), st.sampled_from(ATTENTION_CONFIGS))
def test_dot_product_attention_matches_numpy(seed, implementation, config):
    q, k, v, kwargs, ref = _attention_inputs(seed, config)
    got = _attention(implementation, config)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kwargs)
    assert_close(got, attention64(q, k, v, **ref), rtol=2e-4, atol=2e-5)


@props(1)
@given(seeds)
def test_flash_attention_kernel_matches_numpy(seed):
    q = normal(seed, (1, 32, 2, 16))
    k, v = normal(seed + 1, (1, 32, 1, 16)), normal(seed + 2, (1, 32, 1, 16))
    got = pk.flash_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True,
        block_sizes=pk.BlockSizes(16, 16), interpret=True,
    )  # fmt: skip
    assert_close(got, attention64(q, k, v, causal=True), rtol=2e-4, atol=2e-5)
    reference = pk.flash_attention_reference(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True
    )
    assert_close(reference, attention64(q, k, v, causal=True), rtol=2e-4, atol=2e-5)


def _tiles64(element, block_q, block_k):
    q_len, kv_len = element.shape
    qb, kb = -(-q_len // block_q), -(-kv_len // block_k)
    padded = np.zeros((qb * block_q, kb * block_k), bool)
    padded[:q_len, :kv_len] = element
    return padded.reshape(qb, block_q, kb, block_k).any((1, 3))


@props(6)
@given(
    st.sampled_from([1, 17, 48]), st.sampled_from([5, 32, 70]), st.sampled_from([(16, 16), (32, 16)]),
    st.one_of(st.none(), st.integers(0, 40)), st.one_of(st.none(), st.integers(0, 40)),
)  # fmt: skip
def test_block_masks_are_the_tiles_of_their_element_masks(q_len, kv_len, tiles, left, right):
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    element = np.ones((q_len, kv_len), bool)
    if left is not None:
        element &= j >= i - left
    if right is not None:
        element &= j <= i + right
    want = _tiles64(element, *tiles)
    got = pk.local_block_mask(q_len, kv_len, tiles, window_left=left, window_right=right)
    np.testing.assert_array_equal(np.asarray(got)[0], want)
    np.testing.assert_array_equal(
        np.asarray(pk.block_mask_from_mask(jnp.asarray(element), tiles))[0], want
    )
    causal = _tiles64(j <= i + np.zeros_like(j), *tiles)
    np.testing.assert_array_equal(np.asarray(pk.causal_block_mask(q_len, kv_len, tiles))[0], causal)


@INVALID
@given(st.data())
def test_attention_refuses(data):
    q = jnp.ones((1, 16, 2, 16))
    dpa = pk.dot_product_attention
    case = data.draw(
        st.sampled_from(
            ["rank", "dtype", "heads", "sm_scale", "causal", "mask", "bias", "segments", "dropout",
             "rng", "q_offset", "implementation", "block_sizes", "tiles", "lengths", "window",
             "element"]
        )
    )  # fmt: skip
    if case == "rank":
        refused(lambda: dpa(q[0], q[0], q[0]), "query")
    elif case == "dtype":
        dtype = data.draw(st.sampled_from([jnp.int32, jnp.complex64, jnp.bool_]))
        refused(lambda: dpa(q.astype(dtype), q.astype(dtype), q.astype(dtype)), "dtype")
    elif case == "heads":
        refused(lambda: dpa(jnp.ones((1, 16, 3, 16)), q, q), "heads")
    elif case == "sm_scale":
        bad = data.draw(st.sampled_from([float("nan"), float("inf"), -1.0, 0.0, "0.1"]))
        refused(lambda: dpa(q, q, q, sm_scale=bad), "sm_scale")
    elif case == "causal":
        refused(lambda: dpa(q, q, q, causal=data.draw(st.sampled_from([1, "yes", None]))), "causal")
    elif case == "mask":
        bad = data.draw(st.sampled_from([jnp.ones((1, 2, 16, 16)), jnp.ones((3, 5), bool)]))
        refused(lambda: dpa(q, q, q, mask=bad), "mask")
    elif case == "bias":
        bad = data.draw(st.sampled_from([jnp.ones((1, 2, 16, 16), jnp.int32), jnp.ones((3, 5))]))
        refused(lambda: dpa(q, q, q, bias=bad), "bias")
    elif case == "segments":
        bad = data.draw(
            st.sampled_from(
                [(jnp.zeros((1, 16)), jnp.zeros((1, 16))), (jnp.zeros((1, 4), jnp.int32),) * 2]
            )
        )
        refused(lambda: dpa(q, q, q, segment_ids=bad), "segment_ids")
    elif case == "dropout":
        refused(
            lambda: dpa(
                q,
                q,
                q,
                dropout_rate=data.draw(st.sampled_from([1.0, -0.1, float("nan")])),
                dropout_rng=jax.random.key(0),
            ),
            "dropout_rate",
        )
    elif case == "rng":
        refused(
            lambda: dpa(
                q, q, q, dropout_rate=0.5, dropout_rng=data.draw(st.sampled_from([None, 0]))
            ),
            "dropout_rng",
        )
    elif case == "q_offset":
        refused(
            lambda: dpa(q, q, q, causal=True, q_offset=data.draw(st.sampled_from([-1, 1.5]))),
            "q_offset",
        )
    elif case == "implementation":
        refused(
            lambda: dpa(q, q, q, implementation=data.draw(st.sampled_from(["nope", "cudnn", 3]))),
            "implementation",
            "cudnn",
        )
    elif case == "block_sizes":
        arg = data.draw(st.sampled_from(["block_q", "block_k", "num_warps"]))
        refused(lambda: pk.BlockSizes(**{arg: data.draw(st.sampled_from([0, 3, True, 2.5]))}), arg)
    elif case == "tiles":
        refused(
            lambda: pk.causal_block_mask(32, 32, data.draw(st.sampled_from([(0, 16), (16,), "x"]))),
            "block",
        )
    elif case == "lengths":
        arg = data.draw(st.sampled_from(["q_len", "kv_len"]))
        refused(
            lambda: pk.causal_block_mask(
                **{"q_len": 32, "kv_len": 32, arg: data.draw(st.sampled_from([0, -1, 32.0]))},
                block_sizes=(16, 16),
            ),
            arg,
        )
    elif case == "window":
        arg = data.draw(st.sampled_from(["window_left", "window_right"]))
        kwargs = {
            "window_left": 2,
            "window_right": 0,
            arg: data.draw(st.sampled_from([-1, 1.5, float("nan")])),
        }
        refused(lambda: pk.local_block_mask(32, 32, (16, 16), **kwargs), arg)
    else:
        bad = data.draw(st.sampled_from([jnp.ones(32, bool), jnp.ones((32, 32)) * 0.5]))
        refused(lambda: pk.block_mask_from_mask(bad, (16, 16)), "mask")


# --------------------------------------------------------------------------- mixed chunk


def _mixed_chunk64(qq, qk, v, lq, lk, *, chunk, causal, quad_scale, lin_scale, bias, key_mask):
    t = qq.shape[1]
    # masked positions are padding: the op computes them from zeroed inputs
    real = np.asarray(key_mask)[..., None]
    qq, qk, v = (np.where(real, f64(x), 0.0) for x in (qq, qk, v))
    if lq is not None:
        lq, lk = (np.where(real, f64(x), 0.0) for x in (lq, lk))
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    same = (i // chunk) == (j // chunk)
    order = (j <= i) if causal else np.ones((t, t), bool)
    scores = (
        np.einsum("bis,bjs->bij", f64(qq), f64(qk)) * quad_scale + f64(bias)[i % chunk, j % chunk]
    )
    weights = (same & order) * np.maximum(scores, 0) ** 2
    if lq is not None:
        earlier = ((j // chunk) < (i // chunk)) if causal else np.ones((t, t), bool)
        weights = weights + earlier * lin_scale * np.einsum("bis,bjs->bij", f64(lq), f64(lk))
    weights = weights * np.asarray(key_mask)[:, None, :]
    return np.einsum("bij,bje->bie", weights, f64(v))


@functools.cache
def _mixed_chunk(implementation, **static):
    def run(qq, qk, v, lq, lk, bias, key_mask):
        return pk.mixed_chunk_attention(
            qq, qk, v, lq, lk, bias=bias, key_mask=key_mask, implementation=implementation,
            **static,
        )  # fmt: skip

    return jax.jit(run)


@VALID
@given(
    seeds,
    st.sampled_from(["reference", "xla"]),
    st.booleans(),
    st.sampled_from([4, 5]),
    st.booleans(),
)
def test_mixed_chunk_attention_matches_numpy(seed, implementation, causal, chunk, linear):
    rng = np.random.default_rng(seed)
    qq, qk = normal(seed, (2, 12, 4)), normal(seed + 1, (2, 12, 4))
    v = normal(seed + 2, (2, 12, 6))
    lq, lk = (
        (normal(seed + 3, (2, 12, 3)), normal(seed + 4, (2, 12, 3))) if linear else (None, None)
    )
    bias = normal(seed + 5, (chunk, chunk), 0.1)
    key_mask = rng.random((2, 12)) < 0.8
    kwargs = dict(chunk_size=chunk, causal=causal, quad_scale=0.25, lin_scale=0.5)
    run = _mixed_chunk(implementation, **kwargs)
    lin = (None, None) if lq is None else (jnp.asarray(lq), jnp.asarray(lk))
    got = run(
        jnp.asarray(qq), jnp.asarray(qk), jnp.asarray(v), *lin, jnp.asarray(bias),
        jnp.asarray(key_mask),
    )  # fmt: skip
    want = _mixed_chunk64(
        qq,
        qk,
        v,
        lq,
        lk,
        chunk=chunk,
        causal=causal,
        quad_scale=0.25,
        lin_scale=0.5,
        bias=bias,
        key_mask=key_mask,
    )
    assert_close(got, want, rtol=2e-4, atol=2e-4)


@INVALID
@given(st.data())
def test_mixed_chunk_refuses(data):
    q, v = jnp.ones((2, 16, 4)), jnp.ones((2, 16, 8))
    mca = pk.mixed_chunk_attention
    case = data.draw(
        st.sampled_from(
            [
                "chunk",
                "causal",
                "scale",
                "pair",
                "dtype",
                "rank",
                "keys",
                "value",
                "mask",
                "bias",
                "implementation",
                "block_sizes",
            ]
        )
    )
    if case == "chunk":
        refused(lambda: mca(q, q, v, chunk_size=data.draw(bad_ints()), causal=False), "chunk_size")
    elif case == "causal":
        refused(
            lambda: mca(q, q, v, chunk_size=8, causal=data.draw(st.sampled_from([1, "no", None]))),
            "causal",
        )
    elif case == "scale":
        arg = data.draw(st.sampled_from(["quad_scale", "lin_scale"]))
        refused(
            lambda: mca(
                q,
                q,
                v,
                q,
                q,
                chunk_size=8,
                causal=False,
                **{arg: data.draw(st.sampled_from([float("nan"), float("inf"), "1"]))},
            ),
            arg,
        )
    elif case == "pair":
        refused(lambda: mca(q, q, v, q, chunk_size=8, causal=False), "lin_k", "lin_q")
    elif case == "dtype":
        refused(
            lambda: mca(q.astype(jnp.int32), q, v, chunk_size=8, causal=False), "quad_q", "dtype"
        )
    elif case == "rank":
        refused(lambda: mca(q[0], q[0], v[0], chunk_size=8, causal=False), "quad_q")
    elif case == "keys":
        refused(lambda: mca(q, jnp.ones((2, 16, 3)), v, chunk_size=8, causal=False), "quad_k")
    elif case == "value":
        refused(lambda: mca(q, q, jnp.ones((2, 8, 8)), chunk_size=8, causal=False), "value")
    elif case == "mask":
        bad = data.draw(st.sampled_from([jnp.ones((2, 16)), jnp.ones((2, 15), bool)]))
        refused(lambda: mca(q, q, v, chunk_size=8, causal=False, key_mask=bad), "key_mask")
    elif case == "bias":
        refused(lambda: mca(q, q, v, chunk_size=8, causal=False, bias=jnp.ones((3, 3))), "bias")
    elif case == "implementation":
        refused(
            lambda: mca(q, q, v, chunk_size=8, causal=False, implementation="x"), "implementation"
        )
    else:
        from pallas_kernels import mixed_chunk

        refused(lambda: mixed_chunk.PallasTritonMixedChunk(block_sizes="x"), "block_sizes")


# --------------------------------------------------------------------------------------------
# Masked positions reach nothing: every implementation of every masked op
# --------------------------------------------------------------------------------------------

# What a masked (padded) position may hold; none of it may reach a real output or gradient.
# (A finite value near float32's max is left out: products of it overflow inside the kernels'
# backward tiles before the mask selects them away.)
POISONS = [float("nan"), float("inf"), -float("inf"), 1e4]


def _masked_implementations(family):
    """Every implementation in the op's table that runs here (the Pallas kernels in interpret
    mode off a GPU; cuDNN only on a GPU)."""
    names = list(family.implementations)
    if not pk._compat.is_gpu():
        names = [n for n in names if family.implementations[n].platforms in (None, ("cpu",))]
    return names


def _poisoned(x, where, poison):
    """``x`` with the positions ``where`` (``[batch, seq]`` bool) replaced by ``poison``."""
    where = where.reshape(where.shape + (1,) * (x.ndim - 2))
    return jnp.where(where, jnp.asarray(poison, x.dtype), x)


def _real_values_and_grads(fn, inputs, real_rows, real_cols):
    """Outputs at real query rows and the gradients (of a fixed weighting of those outputs)
    at real positions: ``real_rows`` for the query-side inputs, ``real_cols`` otherwise."""
    out, vjp = jax.vjp(fn, *inputs)
    cotangent = jnp.asarray(normal(99, out.shape), out.dtype)
    cotangent = _poisoned(cotangent, ~real_rows, 0.0)
    grads = vjp(cotangent)
    return out, grads


def _assert_masked_positions_reach_nothing(clean, dirty, rows, cols_of_input):
    (out_c, grads_c), (out_d, grads_d) = clean, dirty
    assert_close(np.asarray(out_d)[rows], f64(np.asarray(out_c)[rows]), rtol=1e-6, atol=1e-6)
    for g_c, g_d, cols in zip(grads_c, grads_d, cols_of_input, strict=True):
        assert_close(np.asarray(g_d)[cols], f64(np.asarray(g_c)[cols]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("implementation", _masked_implementations(pk.ATTENTION_OP))
@props(4)
@given(seeds, st.sampled_from(POISONS), st.booleans())
def test_attention_masked_positions_reach_nothing(implementation, seed, poison, causal):
    """Padded keys/values and padded queries (segment-id padding, with and without a causal
    mask) may hold NaN, inf or huge values: the outputs at real queries and the gradients at
    real positions are those of clean inputs, for every implementation."""
    batch, seq, heads, kv_heads, head_dim = 2, 12, 2, 1, 8
    lengths = np.array([seq, 7])
    real = np.arange(seq)[None, :] < lengths[:, None]
    q_ids = jnp.asarray(np.where(real, 0, 1), jnp.int32)  # padded queries see no key
    kv_ids = jnp.asarray(np.where(real, 0, 2), jnp.int32)  # padded keys: seen by nobody
    q = jnp.asarray(normal(seed, (batch, seq, heads, head_dim)))
    k = jnp.asarray(normal(seed + 1, (batch, seq, kv_heads, head_dim)))
    v = jnp.asarray(normal(seed + 2, (batch, seq, kv_heads, head_dim)))
    impl = pk.ATTENTION_OP.get(implementation)
    if isinstance(impl, pk.PallasTritonAttention) and not pk._compat.is_gpu():
        impl = pk.PallasTritonAttention(interpret=True)
    fn = jax.jit(
        lambda q, k, v: pk.dot_product_attention(
            q, k, v, causal=causal, segment_ids=(q_ids, kv_ids), implementation=impl
        )
    )
    real_j = jnp.asarray(real)
    clean = _real_values_and_grads(fn, (q, k, v), real_j, real_j)
    dirty_inputs = tuple(_poisoned(x, ~real_j, poison) for x in (q, k, v))
    dirty = _real_values_and_grads(fn, dirty_inputs, real_j, real_j)
    _assert_masked_positions_reach_nothing(clean, dirty, real, (real, real, real))


@pytest.mark.parametrize("implementation", _masked_implementations(pk.mixed_chunk.MIXED_CHUNK_OP))
@props(4)
@given(
    seeds,
    st.sampled_from(POISONS),
    st.booleans(),
    st.sampled_from(["quad_k", "lin_k", "value", "quad_q", "lin_q", "all"]),
)
def test_mixed_chunk_masked_positions_reach_nothing(implementation, seed, poison, causal, where):
    """A masked key (``key_mask`` False) holding NaN, inf or a huge value in ``quad_k``,
    ``lin_k``, ``value`` (or its ``quad_q``/``lin_q``) changes no output at a real position
    and no gradient at one, for every implementation."""
    batch, seq, s, e, chunk = 2, 10, 8, 8, 4
    lengths = np.array([seq, 6])
    real = np.arange(seq)[None, :] < lengths[:, None]
    names = ("quad_q", "quad_k", "value", "lin_q", "lin_k")
    inputs = tuple(
        jnp.asarray(normal(seed + i, (batch, seq, e if n == "value" else s)))
        for i, n in enumerate(names)
    )
    bias = jnp.asarray(normal(seed + 9, (chunk, chunk)))
    impl = pk.mixed_chunk.MIXED_CHUNK_OP.get(implementation)
    if isinstance(impl, pk.mixed_chunk.PallasTritonMixedChunk) and not pk._compat.is_gpu():
        impl = pk.mixed_chunk.PallasTritonMixedChunk(interpret=True)
    key_mask = jnp.asarray(real)
    fn = jax.jit(
        lambda qq, qk, v, lq, lk: pk.mixed_chunk_attention(
            qq,
            qk,
            v,
            lq,
            lk,
            chunk_size=chunk,
            causal=causal,
            quad_scale=0.5,
            lin_scale=0.25,
            bias=bias,
            key_mask=key_mask,
            implementation=impl,
        )
    )
    clean = _real_values_and_grads(fn, inputs, key_mask, key_mask)
    dirty_inputs = tuple(
        _poisoned(x, ~key_mask, poison) if where in (n, "all") else x
        for n, x in zip(names, inputs, strict=True)
    )
    dirty = _real_values_and_grads(fn, dirty_inputs, key_mask, key_mask)
    _assert_masked_positions_reach_nothing(clean, dirty, real, (real,) * 5)
