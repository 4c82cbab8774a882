"""The mixed-chunk Mosaic TPU kernels in TPU interpret mode (CPU) against the explicit reference.

Each distinct shape compiles the forward and the backward kernel in interpret mode; shapes are
tiny and few.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _compat
from pallas_kernels._compat import use_mesh
from pallas_kernels.mixed_chunk import MIXED_CHUNK_OP
from pallas_kernels.mixed_chunk import PallasMosaicTpuMixedChunk
from pallas_kernels.mixed_chunk import mixed_chunk_attention
from pallas_kernels.mixed_chunk import mixed_chunk_attention_reference
from pallas_kernels.mixed_chunk.base import check_arguments
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel import BlockSizes


def _tpu(qq, kq, v, ql=None, kl=None, *, block_sizes=None, interpret=True, **kwargs):
    impl = PallasMosaicTpuMixedChunk(block_sizes=block_sizes, interpret=interpret)
    return mixed_chunk_attention(qq, kq, v, ql, kl, implementation=impl, **kwargs)


def _inputs(seed, *, batch=2, seq=20, s=6, e=10, chunk=5, lin=True, dtype=jnp.float32):
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
    @jax.jit
    def run(args, key_mask, cotangent):
        def f(qq, kq, v, ql, kl, bias):
            return attention(qq, kq, v, ql, kl, bias=bias, key_mask=key_mask, **kwargs)

        out, vjp = jax.vjp(f, *args)
        return out, vjp(cotangent)

    return run(args, key_mask, cotangent)


def _assert_close(actual, expected, tol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert a.shape == e.shape
        assert np.all(np.isfinite(a))
        scale = max(1.0, float(np.max(np.abs(e))))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale)


def test_quadratic_only_one_chunk_batch_1_non_causal():
    # (test_mixed_chunk.py runs the causal case for every implementation.) No linear term, a
    # chunk longer than the sequence (cut to it), batch 1, the chunk padded to 32 rows.
    args, key_mask, cotangent = _inputs(1, batch=1, seq=13, chunk=16, lin=False)
    kwargs = dict(chunk_size=16, causal=False, quad_scale=1 / 13)
    expected = _value_and_grads(
        mixed_chunk_attention_reference, args, key_mask, cotangent, **kwargs
    )
    actual = _value_and_grads(
        _tpu, args, key_mask, cotangent, block_sizes=BlockSizes(chunk_multiple=32), **kwargs
    )
    _assert_close(actual, expected, 1e-5)


def test_no_bias_no_mask():
    (qq, kq, v, ql, kl, _), _, cotangent = _inputs(2, seq=24, chunk=8)
    kwargs = dict(chunk_size=8, causal=True, quad_scale=0.3, lin_scale=0.2)

    def grads(attention):
        f = lambda *a: attention(*a, **kwargs)
        out, vjp = jax.vjp(f, qq, kq, v, ql, kl)
        return out, vjp(cotangent)

    _assert_close(jax.jit(lambda: grads(_tpu))(), grads(mixed_chunk_attention_reference), 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_against_the_float32_reference(causal):
    args, key_mask, cotangent = _inputs(3, chunk=8, dtype=jnp.bfloat16)
    kwargs = dict(chunk_size=8, causal=causal, quad_scale=0.2, lin_scale=0.2)
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    expected = _value_and_grads(
        mixed_chunk_attention_reference, f32(args), key_mask, f32(cotangent), **kwargs
    )
    actual = _value_and_grads(_tpu, args, key_mask, cotangent, **kwargs)
    assert actual[0].dtype == jnp.bfloat16
    assert all(g.dtype == a.dtype for g, a in zip(actual[1][:5], args[:5], strict=True))
    _assert_close(actual, expected, 3e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_masked_keys_holding_nan_and_inf_have_no_influence(causal):
    # NaN/inf stored at masked positions of every key-side input (K, K_lin, V): every output
    # and every gradient is finite and equal to the run with clean values there.
    args, key_mask, cotangent = _inputs(4, seq=24, chunk=8)
    kwargs = dict(chunk_size=8, causal=causal, quad_scale=0.3, lin_scale=0.3)
    poison = jnp.where(jnp.arange(24) % 2 == 0, jnp.nan, jnp.inf)[None, :, None]
    masked = ~key_mask[..., None]
    qq, kq, v, ql, kl, bias = args
    poisoned = (
        qq,
        jnp.where(masked, poison, kq),
        jnp.where(masked, -poison, v),
        ql,
        jnp.where(masked, poison, kl),
        bias,
    )
    clean = _value_and_grads(_tpu, args, key_mask, cotangent, **kwargs)
    dirty = _value_and_grads(_tpu, poisoned, key_mask, cotangent, **kwargs)
    for a, b in zip(jax.tree.leaves(dirty), jax.tree.leaves(clean), strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and masked keys get zero gradients
    for grad in (dirty[1][1], dirty[1][2], dirty[1][4]):
        assert not np.any(np.asarray(grad)[np.asarray(~key_mask)])


def test_bad_block_sizes_and_refusals():
    for bad in (0, 24, 8, True):
        with pytest.raises(ValueError, match="chunk_multiple"):
            BlockSizes(chunk_multiple=bad)
    with pytest.raises(ValueError, match="block_sizes"):
        PallasMosaicTpuMixedChunk(block_sizes=4)
    with pytest.raises(ValueError, match="interpret"):
        PallasMosaicTpuMixedChunk(interpret="yes")


def test_a_chunk_too_large_for_vmem_is_refused_explicitly_and_falls_through_under_auto(
    monkeypatch,
):
    # Compiled for a TPU, a chunk whose working set exceeds VMEM is refused before any kernel:
    # asked for by name, a ValueError naming the XLA path; under 'auto' the XLA path runs.
    big = jax.ShapeDtypeStruct((1, 8192, 1024), jnp.float32)
    small = jax.ShapeDtypeStruct((1, 512, 128), jnp.float32)
    with pytest.raises(ValueError, match="pallas_mosaic_tpu.*VMEM.*implementation='xla'"):
        jax.eval_shape(lambda z: _tpu(z, z, z, chunk_size=4096, causal=True, interpret=False), big)
    monkeypatch.setattr(_compat, "backend_kind", lambda backend=None: "tpu")  # compiled, as on TPU

    def auto_on_tpu(chunk_size):
        def run(z):
            call = check_arguments(
                z, z, z, None, None, chunk_size=chunk_size, causal=True, quad_scale=1.0,
                lin_scale=1.0, bias=None, key_mask=None,
            )  # fmt: skip
            return MIXED_CHUNK_OP(call, "auto", backend="tpu")

        return run

    assert "pallas_call" not in str(jax.make_jaxpr(auto_on_tpu(4096))(big))
    assert "pallas_call" in str(jax.make_jaxpr(auto_on_tpu(128))(small))


def test_lowers_to_mosaic_for_tpu():
    z = jax.ShapeDtypeStruct((2, 512, 128), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((128, 128), jnp.float32)

    def loss(qq, kq, v, ql, kl, bias):
        out = _tpu(qq, kq, v, ql, kl, chunk_size=128, causal=True, bias=bias, interpret=False)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    text = (
        jax.jit(jax.grad(loss, argnums=tuple(range(6))))
        .trace(z, z, z, z, z, bias)
        .lower(lowering_platforms=("tpu",))
        .as_text()
    )
    assert text.count("tpu_custom_call") == 2


def test_under_a_mesh_the_batch_is_split_in_shard_map():
    # XLA cannot partition a Mosaic kernel: under a mesh the op runs it in shard_map (batch over
    # the mesh's axes, the bias replicated and its gradient summed); a batch that does not
    # divide is refused, and 'xla' runs it.
    mesh = jax.make_mesh((2, 1), ("data", "model"))
    args, key_mask, cotangent = _inputs(6, batch=4, seq=16, chunk=8)
    kwargs = dict(chunk_size=8, causal=True, quad_scale=0.3, lin_scale=0.3)
    with use_mesh(mesh):
        actual = _value_and_grads(_tpu, args, key_mask, cotangent, **kwargs)
        odd, odd_mask, _ = _inputs(7, batch=3, seq=16, chunk=8)
        with pytest.raises(ValueError, match="batch=3 does not divide"):
            _tpu(*odd[:5], bias=odd[5], key_mask=odd_mask, **kwargs)
    expected = _value_and_grads(
        mixed_chunk_attention_reference, args, key_mask, cotangent, **kwargs
    )
    _assert_close(actual, expected, 1e-5)


def test_tpu_check_cases_trace():
    # tools/tpu_cases/mixed_chunk.py: every case builds and traces (abstract evaluation only).
    from tools.tpu_cases.mixed_chunk import CASES

    assert {c.min_kernels for c in CASES} == {0, 1, 2}
    for case in CASES:
        fn, args = case.build()
        assert jax.tree.leaves(jax.eval_shape(fn, *args)), case.name
