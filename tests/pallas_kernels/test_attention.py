"""The attention op family: one shared test base, subclassed for every implementation.

Every implementation runs the same cases (awkward lengths, GQA/MQA, causal, segment ids with
fully masked rows, padding, block-sparse masks, a causal ``q_offset``, dense masks, bias,
dropout, bfloat16), values and gradients against an oracle; a case an implementation cannot
express must be refused with a ``ValueError`` when it is asked for explicitly. Keys no query may
see hold NaN/inf in every case that has them: they must not influence anything.

On CPU the Pallas kernels run in interpret mode: shapes are few and tiny, and compiled with cheap
XLA options (the numerics do not depend on them). The ``gpu`` subclasses run the same cases
compiled (cuDNN in bfloat16, the only precision it takes).
"""

import functools
import math
import re
from typing import ClassVar

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ATTENTION_OP
from pallas_kernels import BlockSizes
from pallas_kernels import CudnnAttention
from pallas_kernels import MosaicTpuAttention
from pallas_kernels import PallasTritonAttention
from pallas_kernels import ReferenceAttention
from pallas_kernels import XlaAttention
from pallas_kernels import _compat
from pallas_kernels import block_mask_from_mask
from pallas_kernels import causal_block_mask
from pallas_kernels import dot_product_attention
from pallas_kernels import flash_attention
from pallas_kernels import flash_attention_reference
from pallas_kernels import local_block_mask
from pallas_kernels.attention import MosaicTpuBlockSizes
from pallas_kernels.op import forward_mode_autodiff

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(compiler_options=None if _compat.is_gpu() else _FAST_COMPILE)


def _segments(seed, batch, length, num_segments=3):
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, num_segments, (batch, length)), axis=1).astype(np.int32)


# Each case: shapes, dtype, the op's keyword arguments (built from the random inputs' rng), and
# `poison`: (batch index, kv positions) no query may see, filled with NaN (keys) and inf (values).
def _case_gqa_causal_segments():
    batch, q_len, kv_len = 2, 40, 48
    q_ids, kv_ids = _segments(1, batch, q_len), _segments(2, batch, kv_len)
    q_ids[0, 5:9] = 7  # no key has segment 7: fully masked rows
    kv_ids[1, 10:14] = 8  # no query has segment 8: these keys are never seen
    return dict(
        shape=(batch, q_len, kv_len, 4, 2, 16),
        kwargs=dict(causal=True, segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids))),
        poison=[(1, slice(10, 14)), (slice(None), slice(q_len, None))],  # + causal future
        empty_rows=(0, slice(5, 9)),
    )


def _case_bf16_mqa():
    return dict(shape=(1, 33, 20, 3, 1, 24), dtype="bfloat16", kwargs=dict(sm_scale=0.3))


def _case_block_sparse():
    heads, q_len, kv_len = 4, 48, 64
    mask = np.random.default_rng(3).random((heads, 3, 4)) < 0.6
    mask[:, :, 2] = False  # keys 32..47 are never seen
    mask[1, 0, :] = False  # head 1, queries 0..15 see nothing
    return dict(
        shape=(1, q_len, kv_len, heads, 2, 16),
        kwargs=dict(causal=True, block_mask=jnp.asarray(mask), block_shape=(16, 16)),
        poison=[(slice(None), slice(32, 48))],
    )


def _case_q_offset():
    q_len, kv_len, offset = 20, 40, 5
    return dict(
        shape=(2, q_len, kv_len, 2, 1, 16),
        kwargs=dict(causal=True, q_offset=jnp.int32(offset)),
        poison=[(slice(None), slice(offset + q_len, None))],
    )


def _case_mask_and_bias():
    batch, q_len, kv_len, heads = 2, 24, 32, 4
    rng = np.random.default_rng(4)
    mask = rng.random((batch, 1, q_len, kv_len)) < 0.7
    mask[:, :, :, 30:] = False  # never seen
    mask[1, :, 3] = False  # a fully masked row
    bias = rng.standard_normal((1, heads, q_len, kv_len)).astype(np.float32)
    return dict(
        shape=(batch, q_len, kv_len, heads, 2, 16),
        kwargs=dict(mask=jnp.asarray(mask), bias=jnp.asarray(bias)),
        poison=[(slice(None), slice(30, None))],
        empty_rows=(1, 3),
    )


def _case_padding_dropout():
    batch, length = 2, 32
    lengths = np.array([[length], [21]])
    padding = np.arange(length)[None, :] < lengths  # keys past the length are padding
    return dict(
        shape=(batch, length, length, 2, 2, 16),
        kwargs=dict(
            mask=jnp.asarray(padding)[:, None, None, :],
            dropout_rate=0.3,
            dropout_rng=jax.random.key(5),
            broadcast_dropout=False,
        ),
        poison=[(1, slice(21, None))],
    )


CASES = {
    "gqa_causal_segments": _case_gqa_causal_segments,
    "bf16_mqa_d24": _case_bf16_mqa,
    "block_sparse_causal": _case_block_sparse,
    "q_offset": _case_q_offset,
    "mask_and_bias": _case_mask_and_bias,
    "padding_dropout": _case_padding_dropout,
}


def _normal(rng, shape, dtype):
    # numpy draws: eager jax.random compiles a kernel per shape, which dominates small tests.
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _inputs(case, dtype):
    batch, q_len, kv_len, heads, kv_heads, head_dim = case["shape"]
    rng = np.random.default_rng(sum(case["shape"]))
    q = _normal(rng, (batch, q_len, heads, head_dim), dtype)
    k = _normal(rng, (batch, kv_len, kv_heads, head_dim), dtype)
    v = _normal(rng, (batch, kv_len, kv_heads, head_dim), dtype)
    return q, k, v, _normal(rng, q.shape, dtype)


def _poisoned(k, v, poison):
    for index in poison:
        k = k.at[index].set(jnp.nan)
        v = v.at[index].set(jnp.inf)
    return k, v


def _zeroed(k, v, poison):
    for index in poison:
        k, v = k.at[index].set(0), v.at[index].set(0)
    return k, v


def _output_and_grads(implementation, q, k, v, cotangent, kwargs):
    """Output and the vjp of <out, cotangent> w.r.t. q, k, v and (if given) the bias."""
    kwargs = dict(kwargs)
    bias = kwargs.pop("bias", None)

    def run(q, k, v, bias, cotangent):
        def attention(q, k, v, bias):
            return dot_product_attention(
                q, k, v, bias=bias, implementation=implementation, **kwargs
            )

        out, vjp = jax.vjp(attention, q, k, v, bias)
        grads = vjp(cotangent)
        return (out, *grads[:3], *grads[3:4]) if bias is not None else (out, *grads[:3])

    return _compile(run, q, k, v, bias, cotangent)(q, k, v, bias, cotangent)


def _flax_oracle(q, k, v, cotangent, kwargs):
    """The same attention written with ``flax.linen.dot_product_attention`` and an explicit
    dense mask: an oracle independent of the op (fully masked rows zeroed, as the op defines)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    visible = np.ones((batch, heads, q_len, kv_len), bool)
    rows, cols = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    if kwargs.get("causal"):
        visible &= rows + int(kwargs.get("q_offset", 0)) >= cols
    if kwargs.get("segment_ids") is not None:
        q_ids, kv_ids = (np.asarray(s) for s in kwargs["segment_ids"])
        visible &= (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
    if kwargs.get("block_mask") is not None:
        block_q, block_k = kwargs["block_shape"]
        tiles = np.asarray(kwargs["block_mask"])
        visible &= np.repeat(np.repeat(tiles, block_q, 1), block_k, 2)[None, :, :q_len, :kv_len]
    if kwargs.get("mask") is not None:
        visible &= np.asarray(kwargs["mask"])
    sees_any = jnp.asarray(visible.any(-1)).transpose(0, 2, 1)[..., None]
    scale = kwargs.get("sm_scale") or 1 / math.sqrt(head_dim)
    rate = kwargs.get("dropout_rate", 0.0)

    def attention(q, k, v, bias):
        q = q.astype(jnp.float32) * (scale * math.sqrt(head_dim))  # Flax scales by 1/sqrt(d)
        k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
        out = nn.dot_product_attention(
            q,
            k,
            v,
            bias=bias,
            mask=jnp.asarray(visible),
            dropout_rng=kwargs.get("dropout_rng"),
            dropout_rate=rate,
            broadcast_dropout=kwargs.get("broadcast_dropout", True),
            deterministic=rate == 0.0,
            precision=jax.lax.Precision.HIGHEST,
        )
        return jnp.where(sees_any, out, 0.0)

    def run(q, k, v, bias, cotangent):
        out, vjp = jax.vjp(attention, q, k, v, bias)
        grads = vjp(cotangent.astype(jnp.float32))
        return (out, *grads[:3], *grads[3:4]) if bias is not None else (out, *grads[:3])

    args = (q, k, v, kwargs.get("bias"), cotangent)
    return _compile(run, *args)(*args)


def _assert_close(actual, expected, dtype):
    tol = _TOLERANCE[dtype]
    names = ("out", "dq", "dk", "dv", "dbias")[: len(actual)]
    for name, a, e in zip(names, actual, expected, strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.all(np.isfinite(a)), f"{name} has non-finite values"
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=name)


@functools.cache
def _reference_result(name, dtype):
    """The oracle's output and gradients for a case (inputs zeroed where poisoned), computed
    once and shared by the implementations' test classes."""
    case = CASES[name]()
    q, k, v, cotangent = _inputs(case, dtype)
    k, v = _zeroed(k, v, case.get("poison", []))
    return _output_and_grads("reference", q, k, v, cotangent, case["kwargs"])


class AttentionOpTests:
    """The shared base: a subclass sets ``implementation`` and says what it refuses."""

    implementation: ClassVar = None
    dtype: ClassVar[str | None] = None  # run every case in this dtype (cuDNN: bfloat16)

    def refusal(self, case: dict, dtype: str) -> str | None:
        """The message (regex) with which the implementation refuses ``case``, or None."""
        return None

    def expected(self, name, dtype):
        return _reference_result(name, dtype)

    @pytest.mark.parametrize("name", sorted(CASES))
    def test_matches_oracle(self, name):
        case = CASES[name]()
        dtype = self.dtype or case.get("dtype", "float32")
        q, k, v, cotangent = _inputs(case, dtype)
        kwargs = case["kwargs"]
        reason = self.refusal(case, dtype)
        if reason is not None:
            with pytest.raises(ValueError, match=reason):
                dot_product_attention(q, k, v, implementation=self.implementation, **kwargs)
            return
        poison = case.get("poison", [])
        actual = _output_and_grads(
            self.implementation, q, *_poisoned(k, v, poison), cotangent, kwargs
        )
        expected = self.expected(name, dtype)
        for index in poison:  # unseen keys get exactly zero gradients
            for grad in actual[2:4]:
                np.testing.assert_array_equal(np.asarray(grad[index], np.float32), 0.0)
        actual = [np.array(x, np.float32) for x in actual]
        expected = [np.array(x, np.float32) for x in expected]
        for index in poison:  # the oracle ran with zeros there: their gradients are moot
            for grads in (actual, expected):
                grads[2][index] = grads[3][index] = 0.0
        _assert_close(actual, expected, dtype)
        if "empty_rows" in case:
            batch, rows = case["empty_rows"]
            np.testing.assert_array_equal(actual[0][batch, rows], 0.0)
            np.testing.assert_array_equal(actual[1][batch, rows], 0.0)

    def test_seen_non_finite_value_makes_only_its_rows_nan(self):
        """Causal: key 20 holds NaN; queries < 20 do not see it (finite, exact), the rest do."""
        case = dict(shape=(1, 40, 40, 2, 1, 16))
        dtype = self.dtype or "float32"
        q, k, v, _ = _inputs(case, dtype)
        if self.refusal(dict(case, kwargs=dict(causal=True)), dtype) is not None:
            pytest.skip("refuses the case")

        def attention(q, k, v, implementation=self.implementation):
            return dot_product_attention(q, k, v, causal=True, implementation=implementation)

        nan_value = v.at[:, 20].set(jnp.nan)
        out = _compile(attention, q, k, nan_value)(q, k, nan_value)
        prefix = (q[:, :20], k[:, :20], v[:, :20])
        prefix = _compile(functools.partial(attention, implementation="reference"), *prefix)(
            *prefix
        )
        assert np.all(np.isnan(np.asarray(out[:, 20:], np.float32)))
        _assert_close([out[:, :20]], [prefix], dtype)


class TestReference(AttentionOpTests):
    implementation = "reference"

    def expected(self, name, dtype):
        case = CASES[name]()
        q, k, v, cotangent = _inputs(case, dtype)
        return _flax_oracle(q, *_zeroed(k, v, case.get("poison", [])), cotangent, case["kwargs"])


class TestXla(AttentionOpTests):
    implementation = "xla"


def _pallas_refusal(case, dtype, name="pallas_triton"):
    kwargs = case["kwargs"]
    if kwargs.get("mask") is not None:
        return f"{name}.*dense boolean mask"
    if kwargs.get("bias") is not None:
        return f"{name}.*bias"
    if kwargs.get("dropout_rate", 0.0) > 0:
        return f"{name}.*dropout"
    return None


class TestPallasTritonInterpret(AttentionOpTests):
    implementation = PallasTritonAttention(block_sizes=BlockSizes(16, 16), interpret=True)

    def refusal(self, case, dtype):
        return _pallas_refusal(case, dtype)


class TestPallasMosaicTpuInterpret(AttentionOpTests):
    """The TPU kernels in TPU interpret mode on the CPU (tests/pallas_kernels/
    test_attention_tpu.py has their own cases and the TPU lowering)."""

    implementation = MosaicTpuAttention(block_sizes=MosaicTpuBlockSizes(16, 16), interpret=True)

    def refusal(self, case, dtype):
        return _pallas_refusal(case, dtype, "pallas_mosaic_tpu")


def test_block_sparse_backward_tiles_divide_the_mask():
    """Backward tiles smaller than the block mask's (16 x 16 under 32 x 32 tiles, the way the
    GPU defaults keep dK/dV in registers under a coarse mask): same values and gradients."""
    heads, q_len, kv_len = 4, 48, 64
    mask = np.random.default_rng(6).random((heads, 2, 2)) < 0.7
    mask[2, 0, :] = False
    kwargs = dict(causal=True, block_mask=jnp.asarray(mask), block_shape=(32, 32))
    q, k, v, cotangent = _inputs(dict(shape=(1, q_len, kv_len, heads, 2, 16)), "float32")
    tiles = PallasTritonAttention(block_sizes=BlockSizes(32, 32, 16, 16, 16, 16), interpret=True)
    actual = _output_and_grads(tiles, q, k, v, cotangent, kwargs)
    expected = _output_and_grads("reference", q, k, v, cotangent, kwargs)
    _assert_close(actual, expected, "float32")


@pytest.mark.gpu
class TestPallasTritonCompiled(AttentionOpTests):
    implementation = PallasTritonAttention(interpret=False)

    def refusal(self, case, dtype):
        return _pallas_refusal(case, dtype)


@pytest.mark.gpu
class TestCudnn(AttentionOpTests):
    implementation = "cudnn"
    dtype = "bfloat16"

    def refusal(self, case, dtype):
        kwargs = case["kwargs"]
        if kwargs.get("dropout_rate", 0.0) > 0:
            return "cudnn.*no dropout"
        _, q_len, kv_len, _, _, head_dim = case["shape"]
        if head_dim % 8:
            return "cudnn.*head_dim"
        dense = any(kwargs.get(n) is not None for n in ("mask", "segment_ids", "block_mask"))
        dense = dense or kwargs.get("q_offset") is not None or kwargs.get("bias") is not None
        if dense and (q_len % 2 or kv_len % 2):
            return "cudnn.*even lengths"
        return None


# --------------------------------------------------------------------------------------------
# Dispatch: 'auto' falls through refusals; explicit refusals are ValueErrors
# --------------------------------------------------------------------------------------------


def _small_inputs(dtype=jnp.float32):
    rng = np.random.default_rng(9)
    q = _normal(rng, (2, 16, 4, 16), dtype)
    return q, _normal(rng, (2, 16, 2, 16), dtype), _normal(rng, (2, 16, 2, 16), dtype)


def test_auto_order_and_aliases():
    names = lambda backend: [c.name for c in ATTENTION_OP.candidates("auto", backend)]
    assert names("gpu") == ["pallas_triton", "cudnn", "xla"]
    assert names("tpu") == ["pallas_mosaic_tpu", "xla"]
    assert names("cpu") == ["xla"]
    assert isinstance(ATTENTION_OP.get("pallas"), PallasTritonAttention)
    assert set(ATTENTION_OP.implementations) == {
        "xla",
        "pallas_triton",
        "cudnn",
        "pallas_mosaic_tpu",
        "reference",
    }
    for implementation in (XlaAttention(), ReferenceAttention(), CudnnAttention()):
        assert ATTENTION_OP.get(implementation) is implementation


def test_auto_falls_through_to_xla_when_the_kernels_refuse():
    """On a GPU backend a float32 call with a dense mask is refused by the Pallas kernel (dense
    mask) and by cuDNN (float32); 'auto' runs XLA and an explicit request says why not."""
    q, k, v = _small_inputs()
    mask = jnp.asarray(np.random.default_rng(10).random((2, 1, 16, 16)) < 0.8)
    auto_on_gpu = jax.jit(
        lambda q, k, v, mask: ATTENTION_OP(_normalised(q, k, v, mask=mask), backend="gpu")
    )
    xla = jax.jit(lambda q, k, v, mask: dot_product_attention(q, k, v, mask=mask))
    chex.assert_trees_all_close(auto_on_gpu(q, k, v, mask), xla(q, k, v, mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="implementation='pallas'.*dense boolean mask"):
        dot_product_attention(q, k, v, mask=mask, implementation="pallas")
    if not _compat.is_gpu():
        with pytest.raises(ValueError, match="implementation='cudnn'.*runs on gpu"):
            dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="cudnn: cuDNN attention needs bfloat16"):
        ATTENTION_OP(_normalised(q, k, v), "cudnn", backend="gpu")


def _normalised(q, k, v, **kwargs):
    from pallas_kernels.attention.base import check_arguments

    return check_arguments(q, k, v, **kwargs)


def test_forward_mode_autodiff_runs_the_xla_path():
    """jax.jvp cannot go through the kernel's custom_vjp; inside forward_mode_autodiff the
    Pallas request runs on XLA (same numbers), so Hessian-vector products work."""
    q, k, v = _small_inputs()
    f = lambda implementation: (
        lambda q: dot_product_attention(q, k, v, causal=True, implementation=implementation)
    )
    direction = v.repeat(2, axis=2)
    with forward_mode_autodiff():
        tangent = jax.jit(lambda q: jax.jvp(f("pallas"), (q,), (direction,))[1])(q)
    expected = jax.jit(lambda q: jax.jvp(f("xla"), (q,), (direction,))[1])(q)
    chex.assert_trees_all_close(tangent, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The kernel's own entry points and helpers
# --------------------------------------------------------------------------------------------


def test_flash_attention_entry_points_match():
    """`flash_attention` / `flash_attention_reference` keep their signatures and agree."""
    q, k, v = _small_inputs()
    blocks = BlockSizes(16, 16)
    mask = local_block_mask(16, 16, blocks, window_left=8)
    kwargs = dict(causal=True, block_mask=mask, block_sizes=blocks)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, **kwargs))(q, k, v)
    expected = jax.jit(lambda q, k, v: flash_attention_reference(q, k, v, **kwargs))(q, k, v)
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-5)


def test_memory_is_linear_in_sequence_length():
    """Compiled forward+backward temporaries of the kernel grow linearly and stay far below one
    S x S array, while the XLA path's hold one (so the check would catch it).

    On CPU the kernels compile in interpret mode, as a loop over the grid that slices each block
    out of the full arrays, so XLA's buffer assignment sees what the kernels keep alive.
    """

    def temp_bytes(implementation, seq_len):
        shape = jax.ShapeDtypeStruct((1, seq_len, 1, 32), jnp.float32)

        def loss(q, k, v):
            out = dot_product_attention(q, k, v, causal=True, implementation=implementation)
            return jnp.sum(out**2)

        compiled = _compile(jax.grad(loss, argnums=(0, 1, 2)), shape, shape, shape)
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = 4096, 16384
    score_matrix = long * long * 4
    pallas = PallasTritonAttention(interpret=True)
    flash_short, flash_long = temp_bytes(pallas, short), temp_bytes(pallas, long)
    assert flash_long < score_matrix / 16, (flash_long, score_matrix)
    assert flash_long < 4.5 * flash_short, (flash_short, flash_long)  # linear, not 16x
    assert temp_bytes("xla", long) > score_matrix


def test_kernels_lower_to_triton():
    """Cross-lowers forward + backward for CUDA (no GPU needed): the Triton lowering of the
    kernels with segments, a causal q_offset and GQA; compiling to PTX needs the GPU check."""
    batch, q_len, kv_len = 2, 300, 200
    q = jax.ShapeDtypeStruct((batch, q_len, 4, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, kv_len, 2, 64), jnp.bfloat16)
    ids = (jnp.zeros((batch, q_len), jnp.int32), jnp.zeros((batch, kv_len), jnp.int32))

    def fwd_bwd(q, k, v, cotangent):
        out, vjp = jax.vjp(
            lambda q, k, v: flash_attention(q, k, v, causal=True, segment_ids=ids, interpret=False),
            q,
            k,
            v,
        )
        offset = dot_product_attention(
            q,
            k,
            v,
            causal=True,
            q_offset=jnp.int32(7),
            implementation=PallasTritonAttention(interpret=False),
        )
        return out, vjp(cotangent), offset

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
    assert _compat.resolve_interpret(None) == (not _compat.is_gpu())
    assert _compat.resolve_interpret(False) is False
    for backend in ("gpu", "cpu"):
        for head_dim in (32, 64, 128, 256):
            sizes = BlockSizes.get_default(backend, head_dim=head_dim)
            assert min(sizes.dkv + sizes.dq + (sizes.block_q, sizes.block_k)) >= 16
    params = _compat.gpu_compiler_params(num_warps=4, num_stages=2)
    assert params.num_warps == 4 and params.num_stages == 2


# --------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument
# --------------------------------------------------------------------------------------------


def _bad_call(implementation="xla", **overrides):
    arrays = dict(
        query=jnp.ones((2, 20, 4, 32)), key=jnp.ones((2, 24, 2, 32)), value=jnp.ones((2, 24, 2, 32))
    )
    for name in arrays:
        arrays[name] = overrides.pop(name, arrays[name])
    return dot_product_attention(
        arrays["query"], arrays["key"], arrays["value"], implementation=implementation, **overrides
    )


_IDS = (jnp.zeros((2, 20), jnp.int32), jnp.zeros((2, 24), jnp.int32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(key=jnp.ones((3, 24, 2, 32)), value=jnp.ones((3, 24, 2, 32))), "batch differs"),
        (dict(key=jnp.ones((2, 24, 2, 16)), value=jnp.ones((2, 24, 2, 16))), "head_dim differs"),
        (dict(key=jnp.ones((2, 24, 3, 32)), value=jnp.ones((2, 24, 3, 32))), "num_kv_heads=3"),
        (dict(value=jnp.ones((2, 23, 2, 32))), "value.shape=(2, 23, 2, 32)"),
        (dict(query=jnp.ones((2, 20, 4, 32), jnp.int32)), "query.dtype=int32"),
        (dict(query=jnp.ones((2, 20, 4, 32), jnp.bfloat16)), "dtypes must match"),
        (dict(query=jnp.ones((20, 4, 32))), "query.shape=(20, 4, 32)"),
        (dict(query=jnp.ones((2, 0, 4, 32))), "empty dimension"),
        (dict(sm_scale=float("nan")), "sm_scale=nan"),
        (dict(sm_scale=float("inf")), "sm_scale=inf"),
        (dict(sm_scale=0.0), "sm_scale=0.0 must be > 0"),
        (dict(sm_scale=-1.0), "sm_scale=-1.0"),
        (dict(causal=1), "causal=1"),
        (dict(mask=jnp.ones((2, 4, 20, 23), bool)), "mask.shape=(2, 4, 20, 23) does not broadcast"),
        (dict(mask=jnp.ones((3, 1, 1, 24), bool)), "mask.shape=(3, 1, 1, 24)"),
        (dict(mask=jnp.ones((2, 1, 1, 24), jnp.int32)), "mask.dtype=int32"),
        (dict(bias=jnp.ones((1, 5, 20, 24))), "bias.shape=(1, 5, 20, 24)"),
        (dict(bias=jnp.ones((20, 24), bool)), "bias.dtype=bool"),
        (dict(segment_ids=(_IDS[0], _IDS[0])), "kv_segment_ids.shape=(2, 20)"),
        (dict(segment_ids=_IDS[0]), "q_len=20 != kv_len=24"),
        (dict(segment_ids=(_IDS[0].astype(jnp.float32), _IDS[1])), "q_segment_ids.dtype=float32"),
        (dict(segment_ids=[_IDS[0]]), "pair"),
        (dict(q_offset=3), "q_offset=3 only applies with causal=True"),
        (dict(q_offset=-1, causal=True), "q_offset=-1 must be >= 0"),
        (dict(q_offset=jnp.zeros(2, jnp.int32), causal=True), "q_offset.shape=(2,)"),
        (dict(q_offset=1.5, causal=True), "q_offset=1.5"),
        (dict(block_mask=jnp.ones((1, 2, 2), bool)), "block_shape=None"),
        (dict(block_mask=jnp.ones((1, 3, 2), bool), block_shape=(16, 16)), "block_mask"),
        (dict(block_mask=jnp.ones((3, 2, 2), bool), block_shape=(16, 16)), "[1 or 4, 2, 2]"),
        (dict(block_shape=(16, 16)), "block_shape=(16, 16) is only used with a block_mask"),
        (dict(dropout_rate=0.1), "dropout_rate=0.1 > 0 needs a dropout_rng"),
        (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), "dropout_rate=1.0"),
        (dict(dropout_rate=-0.1), "dropout_rate=-0.1"),
        (dict(dropout_rate=0.1, dropout_rng=jnp.ones(3)), "dropout_rng"),
        (dict(precision="fast"), "precision='fast'"),
        (dict(implementation="flash"), "implementation='flash' is not one of"),
        (
            dict(
                implementation=PallasTritonAttention(),
                query=jnp.ones((2, 20, 4, 512)),
                key=jnp.ones((2, 24, 2, 512)),
                value=jnp.ones((2, 24, 2, 512)),
            ),
            "head_dim=512",
        ),
        (
            dict(
                implementation=PallasTritonAttention(block_sizes=BlockSizes(16, 16, block_q_dq=32)),
                block_mask=jnp.ones((1, 2, 2), bool),
                block_shape=(16, 16),
            ),
            "backward tiles",
        ),
        (
            dict(
                implementation=PallasTritonAttention(block_sizes=BlockSizes(32, 16)),
                block_mask=jnp.ones((1, 2, 2), bool),
                block_shape=(16, 16),
            ),
            "forward tile",
        ),
    ],
)
def test_bad_inputs_raise(overrides, message):
    overrides = dict(overrides)
    implementation = overrides.pop("implementation", "xla")
    with pytest.raises(ValueError, match=re.escape(message)):
        _bad_call(implementation, **overrides)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: BlockSizes(block_q=24, block_k=16), "block_q=24"),
        (lambda: BlockSizes(block_q=16, block_k=8), "block_k=8"),
        (lambda: BlockSizes(16, 16, block_q_dkv=2048), "block_q_dkv=2048"),
        (lambda: BlockSizes(16, 16, num_warps=3), "num_warps=3"),
        (lambda: BlockSizes(16, 16, num_stages=0), "num_stages=0"),
        (lambda: PallasTritonAttention(block_sizes=(16, 16)), "block_sizes=(16, 16)"),
        (lambda: PallasTritonAttention(interpret="yes"), "interpret='yes'"),
        (lambda: local_block_mask(8, 8, (16, 16), window_left=-1), "window_left=-1"),
        (lambda: block_mask_from_mask(jnp.ones((2, 3, 4, 5), bool), (16, 16)), "element_mask"),
        (lambda: causal_block_mask(8, 8, (12, 16)), "block_q=12"),
        (
            lambda: flash_attention(*_small_inputs(), block_mask=jnp.ones((1, 1, 1), bool)),
            "block_mask needs the block_sizes",
        ),
    ],
)
def test_bad_configuration_raises(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_scalar_arrays_and_traced_scales():
    """A concrete 0-d JAX/NumPy scale is a number like the Python float; a traced one runs on
    the XLA path and the reference (the kernel needs it at trace time and says so)."""
    q, k, v = _small_inputs()
    want = dot_product_attention(q, k, v, sm_scale=0.3)
    for scale in (jnp.float32(0.3), np.float32(0.3), jnp.asarray(0.3)):
        chex.assert_trees_all_close(dot_product_attention(q, k, v, sm_scale=scale), want)
    traced = jax.jit(lambda s: dot_product_attention(q, k, v, sm_scale=s))(0.3)
    chex.assert_trees_all_close(traced, want, rtol=1e-6, atol=1e-6)
    auto_on_gpu = jax.jit(
        lambda s: ATTENTION_OP(_normalised(q, k, v, sm_scale=s, causal=True), backend="gpu")
    )
    chex.assert_trees_all_close(
        auto_on_gpu(0.3), dot_product_attention(q, k, v, sm_scale=0.3, causal=True), atol=1e-6
    )
    with pytest.raises(ValueError, match="pallas_triton: the kernel needs sm_scale known"):
        jax.jit(lambda s: dot_product_attention(q, k, v, sm_scale=s, implementation="pallas"))(0.3)
    for bad in (jnp.asarray(True), jnp.ones(2), -1.0, float("nan")):
        with pytest.raises(ValueError, match="sm_scale"):
            dot_product_attention(q, k, v, sm_scale=bad)


def test_64_bit_segment_ids_never_wrap():
    """int64 ids outside int32 would wrap (2**32 -> 0, seeing segment 0's keys): refused."""
    q, k, v = _small_inputs()
    ids = np.zeros((2, 16), np.int64)
    ids[:, 8:] = 2**32
    with pytest.raises(ValueError, match="outside the int32 range.*4294967296"):
        dot_product_attention(q, k, v, segment_ids=ids)
    in_range = np.where(np.arange(16) < 8, 0, 5).astype(np.int64)[None].repeat(2, 0)
    chex.assert_trees_all_close(
        dot_product_attention(q, k, v, segment_ids=in_range),
        dot_product_attention(q, k, v, segment_ids=in_range.astype(np.int32)),
    )
