"""The Pallas Mosaic TPU attention kernels, in TPU interpret mode on the CPU.

Values and gradients against efflax's float32 oracle (``implementation='reference'``) on small,
awkward shapes (lengths that are not a multiple of the tile, one head, GQA/MQA, batch 1), with
NaN/inf in keys no query may see; what the kernels cannot express is refused. Compiling them for
real TPU chips is ``make tpu-check`` (tools/tpu_check.py).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels.attention import ATTENTION_OP
from pallas_kernels.attention import dot_product_attention
from pallas_kernels.attention.base import check_arguments
from pallas_kernels.attention.pallas_mosaic_tpu import MosaicTpuAttention
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import BlockSizes
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import resolve_block_sizes
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import tile_config_problem
from pallas_kernels.attention.reference import ReferenceAttention
from pallas_kernels.op import Unsupported

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 2e-2}
_SMALL_TILES = MosaicTpuAttention(block_sizes=BlockSizes(16, 16), interpret=True)


def _attention(implementation, q, k, v, **kwargs):
    return dot_product_attention(q, k, v, implementation=implementation, **kwargs)


def _output_and_grads(implementation, q, k, v, cotangent, kwargs):
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda *a: _attention(implementation, *a, **kwargs), q, k, v)
        return (out, *vjp(cotangent))

    compiled = jax.jit(run).lower(q, k, v, cotangent).compile(compiler_options=_FAST_COMPILE)
    return [np.asarray(x, np.float32) for x in compiled(q, k, v, cotangent)]


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _inputs(shape, dtype):
    batch, q_len, kv_len, heads, kv_heads, head_dim = shape
    rng = np.random.default_rng(sum(shape))
    q = _normal(rng, (batch, q_len, heads, head_dim), dtype)
    k = _normal(rng, (batch, kv_len, kv_heads, head_dim), dtype)
    v = _normal(rng, (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, v, _normal(rng, q.shape, dtype)


def _segments(seed, batch, length, num_segments=3):
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, num_segments, (batch, length)), axis=1).astype(np.int32)


def _case_gqa_causal_segments():
    batch, q_len, kv_len = 2, 40, 48
    q_ids, kv_ids = _segments(1, batch, q_len), _segments(2, batch, kv_len)
    q_ids[0, 5:9] = 7  # no key has segment 7: fully masked rows
    kv_ids[1, 10:14] = 8  # no query has segment 8: these keys are never seen
    return dict(
        shape=(batch, q_len, kv_len, 4, 2, 16),
        kwargs=dict(causal=True, segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids))),
        poison=[(1, slice(10, 14)), (slice(None), slice(q_len, None))],
        empty_rows=(0, slice(5, 9)),
    )


def _case_bf16_mqa_batch1():
    return dict(shape=(1, 33, 20, 3, 1, 24), dtype="bfloat16", kwargs=dict(sm_scale=0.3))


def _case_block_sparse_gqa():
    heads, q_len, kv_len = 4, 48, 64
    mask = np.random.default_rng(3).random((heads, 3, 4)) < 0.6
    mask[:, :, 2] = False  # keys 32..47 are never seen
    mask[1, 0, :] = False  # head 1, queries 0..15 see nothing
    return dict(
        shape=(1, q_len, kv_len, heads, 2, 16),
        kwargs=dict(causal=True, block_mask=jnp.asarray(mask), block_shape=(16, 16)),
        poison=[(slice(None), slice(32, 48))],
        empty_rows=(0, slice(0, 16), 1),
    )


def _case_q_offset():
    q_len, kv_len, offset = 20, 40, 5
    return dict(
        shape=(2, q_len, kv_len, 2, 1, 16),
        kwargs=dict(causal=True, q_offset=jnp.int32(offset)),
        poison=[(slice(None), slice(offset + q_len, None))],
    )


def _case_one_head_default_tiles():
    # One head, batch 1, head_dim 64, a length no tile divides, the default (shrunk) tiles.
    return dict(
        shape=(1, 50, 37, 1, 1, 64),
        kwargs=dict(),
        implementation=MosaicTpuAttention(interpret=True),
    )


def _case_block_mask_shared_with_offset():
    q_len, kv_len = 24, 56
    mask = np.random.default_rng(5).random((1, 3, 7)) < 0.5
    mask[0, :, 0] = True
    return dict(
        shape=(1, q_len, kv_len, 2, 2, 32),
        kwargs=dict(
            causal=True, q_offset=jnp.int32(20), block_mask=jnp.asarray(mask), block_shape=(8, 8)
        ),
        implementation=MosaicTpuAttention(block_sizes=BlockSizes(8, 8), interpret=True),
    )


CASES = {
    "gqa_causal_segments": _case_gqa_causal_segments,
    "bf16_mqa_batch1_d24": _case_bf16_mqa_batch1,
    "block_sparse_gqa": _case_block_sparse_gqa,
    "q_offset": _case_q_offset,
    "one_head_default_tiles": _case_one_head_default_tiles,
    "block_mask_with_offset": _case_block_mask_shared_with_offset,
}


@functools.cache
def _expected(name, dtype):
    case = CASES[name]()
    q, k, v, cotangent = _inputs(case["shape"], dtype)
    for index in case.get("poison", []):
        k, v = k.at[index].set(0), v.at[index].set(0)
    return _output_and_grads(ReferenceAttention(), q, k, v, cotangent, case["kwargs"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    case = CASES[name]()
    dtype = case.get("dtype", "float32")
    q, k, v, cotangent = _inputs(case["shape"], dtype)
    poison = case.get("poison", [])
    for index in poison:  # keys no query sees: NaN keys, inf values
        k, v = k.at[index].set(jnp.nan), v.at[index].set(jnp.inf)
    implementation = case.get("implementation", _SMALL_TILES)
    actual = _output_and_grads(implementation, q, k, v, cotangent, case["kwargs"])
    expected = [x.copy() for x in _expected(name, dtype)]
    for index in poison:  # unseen keys get exactly zero gradients
        for grad in actual[2:4]:
            np.testing.assert_array_equal(grad[index], 0.0)
    tol = _TOLERANCE[dtype]
    for what, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        assert np.all(np.isfinite(a)), f"{what} has non-finite values"
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=what)
    if "empty_rows" in case:
        batch, rows, *head = case["empty_rows"]
        heads = slice(None) if not head else head[0]
        np.testing.assert_array_equal(actual[0][batch, rows, heads], 0.0)
        np.testing.assert_array_equal(actual[1][batch, rows, heads], 0.0)


def test_seen_non_finite_value_makes_only_its_rows_nan():
    """Causal: value 20 holds NaN; queries < 20 do not see it (exact), the rest become NaN."""
    q, k, v, _ = _inputs((1, 40, 40, 2, 1, 16), "float32")
    v = v.at[:, 20].set(jnp.nan)
    out = jax.jit(lambda q, k, v: _attention(_SMALL_TILES, q, k, v, causal=True))(q, k, v)
    prefix = _attention(ReferenceAttention(), q[:, :20], k[:, :20], v[:, :20], causal=True)
    assert np.all(np.isnan(np.asarray(out[:, 20:])))
    np.testing.assert_allclose(out[:, :20], prefix, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask=jnp.ones((1, 1, 16, 16), bool)), "dense boolean mask"),
        (dict(bias=jnp.ones((1, 1, 16, 16))), "additive bias"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "dropout"),
        (
            dict(block_mask=jnp.ones((1, 2, 2), bool), block_shape=(8, 8)),
            "must divide the mask tile",
        ),
    ],
)
def test_refuses_what_it_cannot_express(kwargs, message):
    """Asked for explicitly: a ValueError that names the implementation and says why; the
    implementation itself raises Unsupported (what 'auto' falls through)."""
    q, k, v, _ = _inputs((1, 16, 16, 2, 2, 16), "float32")
    with pytest.raises(ValueError, match="pallas_mosaic_tpu.*" + re.escape(message)):
        _attention(_SMALL_TILES, q, k, v, **kwargs)
    with pytest.raises(Unsupported, match=re.escape(message)):
        _SMALL_TILES(check_arguments(q, k, v, **kwargs))


def test_refusals_when_compiled_for_tpu():
    q, k, v, _ = _inputs((1, 16, 16, 2, 2, 16), "float32")
    compiled = MosaicTpuAttention(interpret=False)
    with pytest.raises(ValueError, match="head_dim=512"):
        big = jnp.ones((1, 16, 2, 512))
        _attention(compiled, big, big, big)
    with pytest.raises(ValueError, match="float16"):
        _attention(compiled, *(x.astype(jnp.float16) for x in (q, k, v)))
    mask = jnp.ones((1, 1, 1), bool)
    with pytest.raises(ValueError, match="multiple of 128"):
        _attention(compiled, q, k, v, block_mask=mask, block_shape=(16, 16))
    assert "multiple of 128" in tile_config_problem(BlockSizes(16, 16), interpret=False)
    assert tile_config_problem(BlockSizes(16, 16), interpret=True) is None


def _tpu_abstract_mesh():
    """Tracing for a v5e chip from the CPU: Mosaic asks the device for its TPU generation, and
    'auto' picks the implementation of the platform the mesh's devices belong to."""
    return _compat.abstract_platform("tpu", "TPU v5 lite")


def test_auto_picks_the_tpu_kernels_under_a_tpu_mesh_and_falls_through():
    """'auto' traced under a TPU (abstract) mesh runs the TPU kernels first; a call they cannot
    express (a dense mask) falls through to XLA. On the CPU, 'auto' stays on XLA."""
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    dense = jnp.ones((1, 1, 256, 256), bool)
    assert [c.name for c in ATTENTION_OP.candidates("auto", "tpu")][0] == "pallas_mosaic_tpu"

    def lowered_text(**kwargs):
        fn = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kwargs))
        return fn.trace(q, q, q).lower(lowering_platforms=("tpu",)).as_text()

    with _tpu_abstract_mesh():
        assert "flash_attention_tpu_fwd" in lowered_text(causal=True)
        assert "flash_attention_tpu_fwd" not in lowered_text(mask=dense)
    cpu_text = jax.jit(lambda q: dot_product_attention(q, q, q)).trace(q).lower().as_text()
    assert "flash_attention_tpu" not in cpu_text


def test_lowers_for_tpu():
    """Forward + backward lower to Mosaic (no TPU, no libtpu needed): three kernels, with
    segments, a traced q_offset, GQA, a block mask and a ragged bf16 length."""
    batch, q_len, kv_len = 1, 300, 700
    q = jax.ShapeDtypeStruct((batch, q_len, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, kv_len, 2, 128), jnp.bfloat16)
    ids = (jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32))
    mask = jnp.ones((1, 3, 6), bool)
    compiled = "pallas_mosaic_tpu"  # by name: compiled under a TPU mesh

    def loss(q, k, v):
        out = _attention(
            compiled,
            q,
            k,
            v,
            causal=True,
            q_offset=jnp.int32(7),
            segment_ids=ids,
            block_mask=mask,
            block_shape=(128, 128),
        )
        return jnp.sum(out.astype(jnp.float32))

    with _tpu_abstract_mesh():
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv)
        text = lowered.lower(lowering_platforms=("tpu",)).as_text()
    for name in ("flash_attention_tpu_fwd", "flash_attention_tpu_dq", "flash_attention_tpu_dkv"):
        assert name in text


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BlockSizes(12, 16), "block_q=12"),
        (lambda: BlockSizes(16, 8192), "block_k=8192"),
        (lambda: BlockSizes(16, 16, block_q_dq=True), "block_q_dq=True"),
        (lambda: MosaicTpuAttention(block_sizes=(16, 16)), "block_sizes=(16, 16)"),
        (lambda: MosaicTpuAttention(interpret="yes"), "interpret='yes'"),
        (lambda: resolve_block_sizes(BlockSizes(32, 32), (16, 16), 64), "block_q=32"),
    ],
)
def test_bad_configuration_raises(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_block_sizes_defaults():
    for head_dim in (64, 128, 256):
        sizes = BlockSizes.get_default(head_dim=head_dim)
        assert tile_config_problem(sizes, interpret=False) is None
    # With a block mask the default tiles shrink to divide the mask's tile.
    assert resolve_block_sizes(None, (256, 128), 128).dkv == (256, 128)
    assert resolve_block_sizes(None, (48, 24), 64).fwd == (48, 24)
