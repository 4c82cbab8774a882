"""Mixed-chunk attention: every implementation against the explicit T x T reference.

On CPU the Pallas kernels run in interpret mode; shapes are tiny and few (each distinct shape
compiles the forward and three backward kernels), compiled with cheap XLA options.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mixed_chunk import MIXED_CHUNK_OP
from pallas_kernels.mixed_chunk import BlockSizes
from pallas_kernels.mixed_chunk import PallasMosaicTpuMixedChunk
from pallas_kernels.mixed_chunk import PallasTritonMixedChunk
from pallas_kernels.mixed_chunk import mixed_chunk_attention
from pallas_kernels.mixed_chunk import mixed_chunk_attention_reference
from pallas_kernels.mixed_chunk.reference import mixed_chunk_weights
from pallas_kernels.op import forward_mode_autodiff

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_PALLAS = PallasTritonMixedChunk(block_sizes=BlockSizes(16, 16), interpret=True)
_IMPLEMENTATIONS = {
    "xla": "xla",
    "pallas": _PALLAS,
    "pallas_mosaic_tpu": PallasMosaicTpuMixedChunk(interpret=True),
}


def _compile(fn, *args):
    lowered = jax.jit(fn).lower(*args)
    on_cpu = jax.default_backend() == "cpu"
    return lowered.compile(compiler_options=_FAST_COMPILE if on_cpu else None)


def _inputs(seed, *, batch=2, seq=20, s=6, e=10, chunk=5, lin=True, dtype=jnp.float32):
    # numpy draws: no XLA compilation per shape.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
    qq, kq, ql, kl = (normal(batch, seq, s) for _ in range(4))
    v = normal(batch, seq, e)
    bias = normal(chunk, chunk).astype(jnp.float32)
    key_mask = jnp.asarray(rng.random((batch, seq)) < 0.8)
    cotangent = normal(batch, seq, e)
    if not lin:
        ql = kl = None
    return (qq, kq, v, ql, kl, bias), key_mask, cotangent


def _value_and_grads(attention, args, key_mask, cotangent, **kwargs):
    def run(args, key_mask, cotangent):
        def f(qq, kq, v, ql, kl, bias):
            return attention(qq, kq, v, ql, kl, bias=bias, key_mask=key_mask, **kwargs)

        out, vjp = jax.vjp(f, *args)
        return out, vjp(cotangent)

    return _compile(run, args, key_mask, cotangent)(args, key_mask, cotangent)


def _assert_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.all(np.isfinite(a))
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_mosaic_tpu"])
def test_matches_the_explicit_reference_values_and_gradients(impl, causal):
    # chunk 5 divides the length 20; chunk 8 leaves a last chunk of 4 (padded by the kernels).
    for chunk in (5, 8):
        args, key_mask, cotangent = _inputs(chunk, chunk=chunk)
        kwargs = dict(chunk_size=chunk, causal=causal, quad_scale=0.4, lin_scale=0.3)
        expected = _value_and_grads(
            mixed_chunk_attention_reference, args, key_mask, cotangent, **kwargs
        )
        actual = _value_and_grads(
            mixed_chunk_attention,
            args,
            key_mask,
            cotangent,
            implementation=_IMPLEMENTATIONS[impl],
            **kwargs,
        )
        _assert_close(actual, expected, 1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_mosaic_tpu"])
def test_quadratic_only_is_gau_attention(impl):
    # No linear term and a chunk longer than the sequence: one relu^2 attention over all of it.
    args, key_mask, cotangent = _inputs(1, seq=13, chunk=16, lin=False)
    kwargs = dict(chunk_size=16, causal=True, quad_scale=1 / 13)
    expected = _value_and_grads(
        mixed_chunk_attention_reference, args, key_mask, cotangent, **kwargs
    )
    actual = _value_and_grads(
        mixed_chunk_attention,
        args,
        key_mask,
        cotangent,
        implementation=_IMPLEMENTATIONS[impl],
        **kwargs,
    )
    _assert_close(actual, expected, 1e-5)


def test_reference_weights_follow_the_definition():
    # Spot-check the oracle itself: causal, chunk 3, no bias/mask, quad_scale 1, lin_scale 1.
    (qq, kq, _, ql, kl, _), _, _ = _inputs(2, batch=1, seq=7, chunk=3)
    w = np.asarray(
        mixed_chunk_weights(
            qq,
            kq,
            ql,
            kl,
            chunk_size=3,
            causal=True,
            quad_scale=1.0,
            lin_scale=1.0,
            bias=None,
            key_mask=None,
        )
    )[0]
    q, k, lq, lk = (np.asarray(x[0], np.float64) for x in (qq, kq, ql, kl))
    for i in range(7):
        for j in range(7):
            if j // 3 == i // 3 and j <= i:
                expected = max(q[i] @ k[j], 0.0) ** 2
            elif j // 3 < i // 3:
                expected = lq[i] @ lk[j]
            else:
                expected = 0.0
            np.testing.assert_allclose(w[i, j], expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_is_close_to_the_float32_reference():
    args, key_mask, _ = _inputs(3, chunk=8, dtype=jnp.bfloat16)
    kwargs = dict(chunk_size=8, causal=True, quad_scale=0.2, lin_scale=0.2)

    def both(qq, kq, v, ql, kl, bias, key_mask):
        out = mixed_chunk_attention(
            qq, kq, v, ql, kl, bias=bias, key_mask=key_mask, implementation="xla", **kwargs
        )
        f32 = [x.astype(jnp.float32) for x in (qq, kq, v, ql, kl)]
        return out, mixed_chunk_attention_reference(*f32, bias=bias, key_mask=key_mask, **kwargs)

    out, expected = _compile(both, *args, key_mask)(*args, key_mask)
    assert out.dtype == jnp.bfloat16
    _assert_close(out, expected, 3e-2)


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_mosaic_tpu"])
def test_causal_outputs_before_t_do_not_change_when_token_t_changes(impl):
    # Exactly: the exclusive prefix sum is a shift, so no later chunk enters through rounding.
    args, _, _ = _inputs(4, seq=24, chunk=8)
    kwargs = dict(chunk_size=8, causal=True, quad_scale=0.3, lin_scale=0.3)

    def run(qq, kq, v, ql, kl, bias):
        return mixed_chunk_attention(
            qq, kq, v, ql, kl, bias=bias, implementation=_IMPLEMENTATIONS[impl], **kwargs
        )

    fn = _compile(run, *args)
    base = np.asarray(fn(*args))
    for t in (3, 8, 13):  # inside the first chunk, a chunk's first token, mid-chunk
        bumped = [x if i == 5 else x.at[:, t].add(1.5) for i, x in enumerate(args)]
        out = np.asarray(fn(*bumped))
        assert np.array_equal(out[:, :t], base[:, :t]), f"token {t} leaked backwards"
        assert not np.allclose(out[:, t:], base[:, t:])


def test_forward_mode_autodiff_falls_back_from_the_kernel():
    args, key_mask, _ = _inputs(5, seq=10, chunk=4)
    kwargs = dict(chunk_size=4, causal=True, bias=args[5], key_mask=key_mask)
    tangent = jnp.asarray(np.random.default_rng(9).standard_normal(args[2].shape, np.float32))

    def jvps(v, tangent):
        f = lambda v: mixed_chunk_attention(
            *args[:2], v, *args[3:5], implementation=_PALLAS, **kwargs
        )
        with forward_mode_autodiff():
            _, actual = jax.jvp(f, (v,), (tangent,))
        g = lambda v: mixed_chunk_attention_reference(*args[:2], v, *args[3:5], **kwargs)
        return actual, jax.jvp(g, (v,), (tangent,))[1]

    actual, expected = _compile(jvps, args[2], tangent)(args[2], tangent)
    chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_auto_is_xla_on_cpu_and_the_kernel_first_on_gpu_and_tpu():
    assert [c.name for c in MIXED_CHUNK_OP.candidates("auto", "cpu")] == ["xla"]
    assert [c.name for c in MIXED_CHUNK_OP.candidates("auto", "cuda")] == [
        "pallas_triton",
        "xla",
    ]
    assert [c.name for c in MIXED_CHUNK_OP.candidates("auto", "tpu")] == [
        "pallas_mosaic_tpu",
        "xla",
    ]
    assert MIXED_CHUNK_OP.get("pallas").name == "pallas_triton"


def test_bad_input_is_a_value_error_naming_the_value():
    (qq, kq, v, ql, kl, _), _, _ = _inputs(6, seq=8, chunk=4)
    call = lambda **kw: mixed_chunk_attention(
        **{"quad_q": qq, "quad_k": kq, "value": v, "chunk_size": 4, "causal": True, **kw}
    )
    with pytest.raises(ValueError, match="chunk_size=0 must be an int >= 1"):
        call(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size=-3"):
        call(chunk_size=-3)
    with pytest.raises(ValueError, match=r"bias.shape=\(3, 3\) must be \[chunk_size, chunk_size\]"):
        call(bias=jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"key_mask.shape=\(2, 7\) must be \[batch, seq\]"):
        call(key_mask=jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="key_mask.dtype=float32 must be bool"):
        call(key_mask=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="lin_q and lin_k must both be given"):
        call(lin_q=ql)
    with pytest.raises(ValueError, match="dtypes must match"):
        call(value=v.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"quad_k.shape=\(2, 8, 5\) must equal"):
        call(quad_k=kq[..., :5])
    with pytest.raises(ValueError, match="causal=1 must be a bool"):
        call(causal=1)
    with pytest.raises(ValueError, match="quad_scale=nan must be a finite number"):
        call(quad_scale=float("nan"))
    with pytest.raises(ValueError, match="implementation='cudnn' is not one of"):
        call(implementation="cudnn")
    with pytest.raises(ValueError, match="block=24 must be a power of two"):
        BlockSizes(block=24)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_kernels_match_the_reference_on_a_gpu(causal, dtype):
    # Paper-like widths, a chunk that leaves a short last chunk, the default GPU tiles.
    args, key_mask, cotangent = _inputs(10, batch=2, seq=1000, s=128, e=256, chunk=256, dtype=dtype)
    kwargs = dict(chunk_size=256, causal=causal, quad_scale=1 / 256, lin_scale=1 / 256)
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    expected = _value_and_grads(
        mixed_chunk_attention_reference, f32(args), key_mask, f32(cotangent), **kwargs
    )
    actual = _value_and_grads(
        mixed_chunk_attention,
        args,
        key_mask,
        cotangent,
        implementation=PallasTritonMixedChunk(interpret=False),
        **kwargs,
    )
    _assert_close(actual, expected, 1e-4 if dtype == jnp.float32 else 3e-2)
