"""Tests for pallas_kernels.flash_attention: kernels vs the plain-jnp reference.

On CPU the kernels run in Pallas interpret mode. Each distinct shape compiles the forward and both
backward kernels, so shapes are few and small; they are compiled with cheap XLA options (the
numerics do not depend on them).
"""

import re

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import block_mask_from_mask
from pallas_kernels.flash_attention import causal_block_mask
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention import local_block_mask

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-2}
_SMALL = BlockSizes(16, 16)
_GPU_INTERPRET = False  # the GPU test's kernels are compiled (set True to dry-run it on CPU)


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    on_cpu = jax.default_backend() == "cpu"
    return lowered.compile(compiler_options=_FAST_COMPILE if on_cpu else None)


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim), jnp.float32)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, cotangent))


def _output_and_grads(attention, q, k, v, cotangent, **kwargs):
    """Output and the vjp of <out, cotangent> (the gradient of a scalar function of out)."""

    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, **kwargs), q, k, v)
        return out, vjp(cotangent)

    return _compile(run, q, k, v, cotangent)(q, k, v, cotangent)


def _assert_close(actual, expected, dtype):
    tol = _TOLERANCE[jnp.dtype(dtype).type]
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.all(np.isfinite(a)), f"{name} has non-finite values"
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=name)


def _check_against_reference(
    *,
    seed=0,
    batch,
    q_len,
    kv_len,
    heads,
    kv_heads,
    head_dim,
    dtype=jnp.float32,
    block_sizes=_SMALL,
    nan_keys=None,
    segment_ids=None,
    interpret=None,
    **kwargs,
):
    q, k, v, cotangent = _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype)
    k_ref, v_ref = k, v
    if nan_keys is not None:
        # Keys no query may see, poisoned: a skipped tile never reads them, a computed-and-zeroed
        # tile would turn 0 * NaN into NaN. The reference gets zeros there instead.
        k = k.at[:, nan_keys].set(jnp.nan)
        v = v.at[:, nan_keys].set(jnp.nan)
        k_ref = k_ref.at[:, nan_keys].set(0)
        v_ref = v_ref.at[:, nan_keys].set(0)
    kwargs = dict(kwargs, block_sizes=block_sizes, segment_ids=segment_ids)
    actual = _output_and_grads(flash_attention, q, k, v, cotangent, interpret=interpret, **kwargs)
    expected = _output_and_grads(flash_attention_reference, q, k_ref, v_ref, cotangent, **kwargs)
    _assert_close((actual[0], *actual[1]), (expected[0], *expected[1]), dtype)
    return actual


@pytest.mark.parametrize(
    "case",
    [
        # Lengths not a multiple of the block, batch 2, head_dim 32.
        dict(batch=2, q_len=40, kv_len=40, heads=2, kv_heads=2, head_dim=32),
        # q_len != kv_len, GQA, head_dim 64, causal, different backward tiles; keys >= 64 are
        # above the diagonal for every query, so causal skipping is checked with NaN there.
        dict(
            batch=1,
            q_len=40,
            kv_len=72,
            heads=4,
            kv_heads=2,
            head_dim=64,
            causal=True,
            block_sizes=BlockSizes(
                16, 32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=16
            ),
            nan_keys=slice(64, None),
        ),
        # bfloat16, one head, batch 1, head_dim 128, causal.
        dict(
            batch=1,
            q_len=33,
            kv_len=33,
            heads=1,
            kv_heads=1,
            head_dim=128,
            dtype=jnp.bfloat16,
            causal=True,
        ),
        # float16, MQA, head_dim 40 (padded to 64 inside), q_len > kv_len, explicit scale.
        dict(
            batch=2,
            q_len=50,
            kv_len=20,
            heads=3,
            kv_heads=1,
            head_dim=40,
            dtype=jnp.float16,
            sm_scale=0.3,
        ),
    ],
    ids=["f32-tails", "f32-gqa-causal", "bf16-causal-d128", "f16-mqa-d40"],
)
def test_matches_reference(case):
    _check_against_reference(**case)


def test_segment_ids_and_fully_masked_rows():
    """Packed sequences, causal, q_len > kv_len; queries with segment id 9 see no key at all."""
    batch, q_len, kv_len = 2, 48, 40
    rng = np.random.default_rng(1)
    q_seg = np.sort(rng.integers(0, 3, (batch, q_len)), axis=1)
    kv_seg = np.sort(rng.integers(0, 3, (batch, kv_len)), axis=1)
    q_seg[0, 5:9] = 9
    q_seg[1, -3:] = 9
    segment_ids = (jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32))
    out, (dq, _, _) = _check_against_reference(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=2,
        kv_heads=1,
        head_dim=32,
        causal=True,
        segment_ids=segment_ids,
    )
    np.testing.assert_array_equal(np.asarray(out)[q_seg == 9], 0.0)
    np.testing.assert_array_equal(np.asarray(dq)[q_seg == 9], 0.0)


def test_block_mask_skips_tiles_and_equals_dense():
    """A per-head block mask (GQA) with one K/V block off everywhere (filled with NaN: it must
    never be read) and one query block with no tile at all (zeros, finite gradients)."""
    heads, q_len, kv_len = 4, 48, 64
    block_sizes = BlockSizes(16, 16)
    rng = np.random.default_rng(2)
    mask = rng.random((heads, 3, 4)) < 0.6
    mask[:, :, 2] = False  # keys 32..47 are never seen
    mask[1, 0, :] = False  # head 1, queries 0..15 see nothing
    out, _ = _check_against_reference(
        batch=1,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=2,
        head_dim=32,
        block_sizes=block_sizes,
        block_mask=jnp.asarray(mask),
        nan_keys=slice(32, 48),
    )
    np.testing.assert_array_equal(np.asarray(out)[:, :16, 1], 0.0)


def test_sliding_window_block_mask_with_causal():
    q_len = kv_len = 72
    block_sizes = BlockSizes(16, 16)
    mask = local_block_mask(q_len, kv_len, block_sizes, window_left=24, window_right=0)
    _check_against_reference(
        batch=1,
        q_len=q_len,
        kv_len=kv_len,
        heads=2,
        kv_heads=2,
        head_dim=32,
        causal=True,
        block_sizes=block_sizes,
        block_mask=mask,
    )


def test_reference_matches_jax_dot_product_attention():
    """The oracle itself agrees with jax.nn.dot_product_attention (GQA, causal, element mask)."""
    q, k, v, _ = _inputs(3, 2, 24, 24, 4, 2, 32, jnp.float32)
    block_sizes = BlockSizes(16, 16)
    block_mask = local_block_mask(24, 24, block_sizes, window_left=0, window_right=None)
    expanded = jnp.repeat(jnp.repeat(block_mask, 16, 1), 16, 2)[:, :24, :24]
    with jax.default_matmul_precision("highest"):
        expected = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal",))(
            q, k, v, mask=expanded[None], is_causal=True
        )
    reference = jax.jit(
        lambda q, k, v: flash_attention_reference(
            q, k, v, causal=True, block_mask=block_mask, block_sizes=block_sizes
        )
    )
    actual = reference(q, k, v)
    chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(
    batch=st.integers(1, 2),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 2),
    head_dim=st.sampled_from([16, 24, 32]),
    causal=st.booleans(),
    block_q=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32]),
)
def test_random_shapes(batch, q_len, kv_len, kv_heads, group, head_dim, causal, block_q, block_k):
    _check_against_reference(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=kv_heads * group,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=causal,
        block_sizes=BlockSizes(block_q, block_k),
    )


def test_memory_is_linear_in_sequence_length():
    """Compiled forward+backward temporaries grow linearly and stay far below one S x S array.

    On CPU the kernels compile in interpret mode, as a loop over the grid that slices each
    block out of the full arrays, so XLA's buffer assignment sees exactly what the kernels keep
    (blocks, not score matrices). The dense reference is measured beside it to show that the
    check would catch an S x S temporary.
    """

    def temp_bytes(attention, seq_len):
        shape = jax.ShapeDtypeStruct((1, seq_len, 1, 32), jnp.float32)
        loss = lambda q, k, v: jnp.sum(attention(q, k, v, causal=True) ** 2)
        compiled = _compile(jax.grad(loss, argnums=(0, 1, 2)), shape, shape, shape)
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = 4096, 16384
    score_matrix = long * long * 4
    flash_short, flash_long = temp_bytes(flash_attention, short), temp_bytes(flash_attention, long)
    assert flash_long < score_matrix / 16, (flash_long, score_matrix)
    assert flash_long < 4.5 * flash_short, (flash_short, flash_long)  # linear, not 16x
    assert temp_bytes(flash_attention_reference, long) > score_matrix


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        dict(dtype=jnp.bfloat16, head_dim=128, causal=True),
        dict(dtype=jnp.bfloat16, head_dim=64, causal=False, kv_len=700),
        dict(dtype=jnp.float32, head_dim=64, causal=True, segments=True),
        dict(dtype=jnp.bfloat16, head_dim=64, causal=True, window=256),
        dict(dtype=jnp.float16, head_dim=256, causal=False),
    ],
)
def test_compiled_on_gpu(case):
    """The same checks with the Triton kernels compiled, at default (GPU) tile sizes."""
    case = dict(case)
    q_len, kv_len = 1000, case.pop("kv_len", 1000)
    block_sizes = BlockSizes.get_default("gpu", head_dim=case["head_dim"])
    if window := case.pop("window", None):
        block_sizes = BlockSizes(64, 64)  # a block mask uses one tile for all three kernels
        case["block_mask"] = local_block_mask(q_len, kv_len, block_sizes, window_left=window)
    if case.pop("segments", False):
        ids = jnp.arange(max(q_len, kv_len)) // 300
        case["segment_ids"] = (jnp.tile(ids[:q_len], (2, 1)), jnp.tile(ids[:kv_len], (2, 1)))
    _check_against_reference(
        batch=2,
        q_len=q_len,
        kv_len=kv_len,
        heads=4,
        kv_heads=2,
        block_sizes=block_sizes,
        interpret=_GPU_INTERPRET,
        **case,
    )


@pytest.mark.parametrize(
    "dtype, head_dim, extra",
    [
        (jnp.float32, 64, dict(causal=True, segments=True)),
        (jnp.bfloat16, 128, dict(causal=True, block_sizes=BlockSizes(64, 64), block_mask=True)),
        (jnp.float16, 40, dict()),
    ],
    ids=["f32-causal-segments", "bf16-d128-block-mask", "f16-d40"],
)
def test_kernels_lower_to_triton(dtype, head_dim, extra):
    """Cross-lowers forward + backward for CUDA, so the Triton lowering is checked without a GPU
    (shapes, primitives, dynamic loops); compiling the Triton IR to PTX still needs one."""
    batch, q_len, kv_len, heads, kv_heads = 2, 300, 200, 4, 2
    extra = dict(extra)
    if extra.pop("segments", False):
        extra["segment_ids"] = (
            jnp.zeros((batch, q_len), jnp.int32),
            jnp.zeros((batch, kv_len), jnp.int32),
        )
    if extra.pop("block_mask", False):
        extra["block_mask"] = jnp.ones((heads, 5, 4), bool)
    q = jax.ShapeDtypeStruct((batch, q_len, heads, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)

    def fwd_bwd(q, k, v, cotangent):
        out, vjp = jax.vjp(
            lambda q, k, v: flash_attention(q, k, v, interpret=False, **extra), q, k, v
        )
        return out, vjp(cotangent)

    with _compat.cuda_lowering():  # JAX >= 0.11 needs an abstract GPU device to lower for
        lowered = jax.jit(fwd_bwd).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for name in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
        assert name in text


def test_block_mask_helpers():
    q_len, kv_len, tiles = 50, 70, (16, 32)
    rows, cols = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    chex.assert_trees_all_equal(
        causal_block_mask(q_len, kv_len, tiles),
        block_mask_from_mask(jnp.asarray(rows >= cols), tiles),
    )
    band = (cols >= rows - 20) & (cols <= rows + 5)
    chex.assert_trees_all_equal(
        local_block_mask(q_len, kv_len, BlockSizes(*tiles), window_left=20, window_right=5),
        block_mask_from_mask(jnp.asarray(band[None]), tiles),
    )
    assert causal_block_mask(q_len, kv_len, tiles).shape == (1, 4, 3)


def test_defaults_and_interpret_resolution():
    assert _compat.resolve_interpret(None) == (jax.default_backend() not in ("gpu", "cuda", "rocm"))
    assert _compat.resolve_interpret(False) is False
    for backend in ("gpu", "cpu"):
        for head_dim in (32, 64, 128, 256):
            sizes = BlockSizes.get_default(backend, head_dim=head_dim)
            assert min(sizes.dkv + sizes.dq + (sizes.block_q, sizes.block_k)) >= 16
    params = _compat.gpu_compiler_params(num_warps=4, num_stages=2)
    assert params.num_warps == 4 and params.num_stages == 2


def _bad_call(**overrides):
    q = jnp.ones((2, 20, 4, 32), jnp.float32)
    k = v = jnp.ones((2, 24, 2, 32), jnp.float32)
    kwargs = dict(q=q, k=k, v=v)
    kwargs.update(overrides)
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    return flash_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(k=jnp.ones((3, 24, 2, 32)), v=jnp.ones((3, 24, 2, 32))), "batch"),
        (dict(k=jnp.ones((2, 24, 2, 16)), v=jnp.ones((2, 24, 2, 16))), "head_dim"),
        (dict(k=jnp.ones((2, 24, 3, 32)), v=jnp.ones((2, 24, 3, 32))), "num_kv_heads=3"),
        (dict(q=jnp.ones((2, 20, 4, 32), jnp.int32)), "dtype"),
        (
            dict(
                q=jnp.ones((2, 20, 4, 512)),
                k=jnp.ones((2, 24, 2, 512)),
                v=jnp.ones((2, 24, 2, 512)),
            ),
            "head_dim=512",
        ),
        (dict(q=jnp.ones((20, 4, 32))), "q.shape"),
        (
            dict(segment_ids=(jnp.zeros((2, 20), jnp.int32), jnp.zeros((2, 20), jnp.int32))),
            "segment_ids shapes",
        ),
        (dict(segment_ids=jnp.zeros((2, 20), jnp.int32)), "pair"),
        (dict(segment_ids=(jnp.zeros((2, 20)), jnp.zeros((2, 24)))), "integer"),
        (
            dict(block_mask=jnp.ones((1, 3, 2), bool), block_sizes=BlockSizes(16, 16)),
            "block_mask.shape",
        ),
        (dict(block_mask=jnp.ones((3, 2, 2), bool), block_sizes=BlockSizes(16, 16)), "[1 or 4"),
        (dict(block_mask=jnp.ones((1, 2, 2), bool)), "block_sizes"),
        (
            dict(
                block_mask=jnp.ones((1, 2, 2), bool), block_sizes=BlockSizes(16, 16, block_q_dq=32)
            ),
            "backward tiles",
        ),
        (dict(causal=1), "causal=1"),
        (dict(interpret="yes"), "interpret='yes'"),
    ],
)
def test_bad_inputs_raise(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_call(**overrides)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_q=24, block_k=16), "block_q=24"),
        (dict(block_q=16, block_k=8), "block_k=8"),
        (dict(block_q=16, block_k=16, block_q_dkv=2048), "block_q_dkv=2048"),
        (dict(block_q=16, block_k=16, num_warps=3), "num_warps=3"),
        (dict(block_q=16, block_k=16, num_stages=0), "num_stages=0"),
    ],
)
def test_bad_block_sizes_raise(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BlockSizes(**kwargs)


def test_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="window_left=-1"):
        local_block_mask(8, 8, (16, 16), window_left=-1)
    with pytest.raises(ValueError, match="element_mask"):
        block_mask_from_mask(jnp.ones((2, 3, 4, 5), bool), (16, 16))
    with pytest.raises(ValueError, match="block_q=12"):
        causal_block_mask(8, 8, (12, 16))
