"""Tests for efflax.nn (attention): kernels agree, masks, GQA, rotary embeddings, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from efflax._src.nn.attention import IMPLEMENTATIONS
from efflax._src.nn.attention import PADDING_SEGMENT_ID
from efflax._src.nn.attention import resolve_implementation
from efflax.nn import MultiHeadAttention
from efflax.nn import apply_rotary_embedding
from efflax.nn import dot_product_attention
from efflax.nn import segment_ids_with_padding
from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import flash_attention_reference

BATCH, SEQ, FEATURES, HEADS, HEAD_DIM = 2, 32, 64, 2, 32
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}


def small_blocks() -> BlockSizes:
    """Tiles smaller than the sequence, so interpret mode loops over several of them."""
    return BlockSizes(block_q=16, block_k=16)


def random_inputs(seed: int, shape=(BATCH, SEQ, FEATURES), dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def ragged_padding_mask(lengths) -> jax.Array:
    return jnp.arange(SEQ)[None, :] < jnp.asarray(lengths)[:, None]


def packed_segment_ids(seed: int) -> jax.Array:
    """Random packed sequences: segment ids increase along the sequence."""
    starts = jax.random.bernoulli(jax.random.key(seed), 0.15, (BATCH, SEQ))
    return jnp.cumsum(starts, axis=1).astype(jnp.int32)


# name -> (module kwargs, call kwargs builder)
MODULE_CASES = {
    "plain": (dict(), lambda: {}),
    "causal_rope": (dict(causal=True, rope=True), lambda: {}),
    "gqa_padding": (
        dict(num_kv_heads=1),
        lambda: {"padding_mask": ragged_padding_mask([SEQ, 19])},
    ),
    "causal_gqa_rope_segments": (
        dict(num_heads=4, num_kv_heads=2, causal=True, rope=True),
        lambda: {
            "segment_ids": packed_segment_ids(3),
            "padding_mask": ragged_padding_mask([27, SEQ]),
        },
    ),
}


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_module_pallas_matches_xla(case):
    module_kwargs, call_kwargs = MODULE_CASES[case]
    module_kwargs = dict(num_heads=HEADS, head_dim=HEAD_DIM) | module_kwargs
    x = random_inputs(0)
    xla = MultiHeadAttention(**module_kwargs, implementation="xla")
    pallas = MultiHeadAttention(
        **module_kwargs, implementation="pallas", block_sizes=small_blocks()
    )
    variables = xla.init(jax.random.key(1), x, **call_kwargs())
    out_xla = jax.jit(xla.apply)(variables, x, **call_kwargs())
    out_pallas = jax.jit(pallas.apply)(variables, x, **call_kwargs())
    assert out_xla.shape == (BATCH, SEQ, FEATURES)
    assert np.all(np.isfinite(out_xla))
    chex.assert_trees_all_close(out_pallas, out_xla, **TOL["float32"])


def test_module_gradients_pallas_match_xla():
    module_kwargs = dict(num_heads=4, num_kv_heads=2, head_dim=HEAD_DIM, causal=True, rope=True)
    x = random_inputs(4)
    call_kwargs = {"padding_mask": ragged_padding_mask([SEQ, 21])}
    xla = MultiHeadAttention(**module_kwargs, implementation="xla")
    pallas = MultiHeadAttention(
        **module_kwargs, implementation="pallas", block_sizes=small_blocks()
    )
    variables = xla.init(jax.random.key(5), x)
    weights = random_inputs(6)

    def loss(module):
        def f(params, inputs):
            return jnp.sum(weights * module.apply({"params": params}, inputs, **call_kwargs))

        return jax.jit(jax.grad(f, argnums=(0, 1)))(variables["params"], x)

    chex.assert_trees_all_close(loss(pallas), loss(xla), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_dispatcher_xla_matches_reference(causal, kv_heads):
    """The XLA path with segment ids and fully masked rows equals the kernel's oracle."""
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (BATCH, SEQ, 4, HEAD_DIM))
    k, v = (jax.random.normal(key, (BATCH, SEQ, kv_heads, HEAD_DIM)) for key in keys[1:])
    q_ids = packed_segment_ids(8)
    # Segment 99 holds no keys, so those queries are fully masked.
    q_ids = q_ids.at[0, 5:9].set(99)
    segment_ids = (q_ids, packed_segment_ids(8))
    attention = jax.jit(
        lambda q: dot_product_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, implementation="xla"
        )
    )
    out = attention(q)
    expected = flash_attention_reference(q, k, v, causal=causal, segment_ids=segment_ids)
    chex.assert_trees_all_close(out, expected, **TOL["float32"])
    np.testing.assert_array_equal(out[0, 5:9], 0.0)

    grads = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(attention(q)))))(q)
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(grads[0, 5:9], 0.0)


def test_padding_equals_truncation():
    """Padded keys are ignored: real positions match the module run on the unpadded prefix."""
    length = 20
    module = MultiHeadAttention(num_heads=HEADS, causal=False, rope=True, implementation="xla")
    x = random_inputs(9, (1, SEQ, FEATURES))
    variables = module.init(jax.random.key(10), x)
    apply = jax.jit(module.apply)
    padded = apply(variables, x, padding_mask=ragged_padding_mask([length]))
    truncated = apply(variables, x[:, :length])
    chex.assert_trees_all_close(padded[:, :length], truncated, **TOL["float32"])


def test_bfloat16_module_close_to_float32():
    module = MultiHeadAttention(num_heads=HEADS, causal=True, implementation="xla")
    x = random_inputs(11)
    variables = module.init(jax.random.key(12), x)
    out32 = jax.jit(module.apply)(variables, x)
    out16 = jax.jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert out16.dtype == jnp.bfloat16
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    chex.assert_trees_all_close(out16.astype(jnp.float32), out32, **TOL["bfloat16"])


def test_rotary_embedding_is_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n, and rope preserves norms."""
    keys = jax.random.split(jax.random.key(13), 2)
    q = jax.random.normal(keys[0], (1, 1, 1, HEAD_DIM))
    k = jax.random.normal(keys[1], (1, 1, 1, HEAD_DIM))

    def score(m, n):
        rq = apply_rotary_embedding(q, jnp.array([[m]]))
        rk = apply_rotary_embedding(k, jnp.array([[n]]))
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)
    assert abs(score(3, 1) - score(1, 3)) > 1e-3
    rotated = apply_rotary_embedding(q, jnp.array([[17]]))
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-6)


def test_param_logical_axis_names():
    module = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=16, use_bias=True)
    variables = module.init(jax.random.key(14), random_inputs(15))
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["query"]["kernel"]) == ("embed", "heads", "kv")
    assert tuple(specs["key"]["kernel"]) == ("embed", "kv_heads", "kv")
    assert tuple(specs["value"]["kernel"]) == ("embed", "kv_heads", "kv")
    assert tuple(specs["out"]["kernel"]) == ("heads", "kv", "embed")
    assert tuple(specs["query"]["bias"]) == ("heads", "kv")
    assert tuple(specs["out"]["bias"]) == ("embed",)
    shapes = jax.tree.map(jnp.shape, nn.unbox(variables))["params"]
    assert shapes["query"]["kernel"] == (FEATURES, 4, 16)
    assert shapes["key"]["kernel"] == (FEATURES, 2, 16)
    assert shapes["out"]["kernel"] == (4, 16, FEATURES)


def test_resolve_implementation():
    assert set(IMPLEMENTATIONS) == {"pallas", "xla", "cudnn", "auto"}
    assert resolve_implementation("auto", "cpu") == "xla"
    assert resolve_implementation("auto", "gpu") == "pallas"
    assert resolve_implementation("cudnn", "gpu") == "cudnn"
    with pytest.raises(ValueError, match="'flash'"):
        resolve_implementation("flash")
    with pytest.raises(ValueError, match="cudnn"):
        resolve_implementation("cudnn", "cpu")


def test_segment_ids_with_padding():
    mask = ragged_padding_mask([SEQ, 5])
    q_ids, kv_ids = segment_ids_with_padding(mask, SEQ)
    np.testing.assert_array_equal(q_ids, 0)
    np.testing.assert_array_equal(kv_ids[1, 5:], PADDING_SEGMENT_ID)
    np.testing.assert_array_equal(kv_ids[1, :5], 0)
    ids = packed_segment_ids(16)
    q_ids, kv_ids = segment_ids_with_padding(mask, SEQ, ids)
    np.testing.assert_array_equal(q_ids, ids)
    np.testing.assert_array_equal(kv_ids, jnp.where(mask, ids, PADDING_SEGMENT_ID))
    assert segment_ids_with_padding(None, SEQ) is None


def test_errors():
    x = random_inputs(17)
    q = jax.random.normal(jax.random.key(18), (BATCH, SEQ, 4, HEAD_DIM))
    k = jax.random.normal(jax.random.key(19), (BATCH, SEQ, 3, HEAD_DIM))

    def init(**kwargs):
        call = kwargs.pop("call", {})
        return MultiHeadAttention(**(dict(num_heads=HEADS) | kwargs)).init(
            jax.random.key(0), x, **call
        )

    with pytest.raises(ValueError, match="implementation='triton'"):
        init(implementation="triton")
    with pytest.raises(ValueError, match="cudnn"):
        init(implementation="cudnn")
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        init(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim=15"):
        init(head_dim=15, rope=True)
    with pytest.raises(ValueError, match="block_sizes"):
        init(implementation="xla", block_sizes=small_blocks())
    with pytest.raises(ValueError, match="interpret"):
        init(implementation="xla", interpret=True)
    with pytest.raises(ValueError, match="padding_mask.shape"):
        init(call={"padding_mask": jnp.ones((BATCH, SEQ + 1), bool)})
    with pytest.raises(ValueError, match="segment_ids.shape"):
        init(call={"segment_ids": jnp.zeros((BATCH, SEQ - 1), jnp.int32)})
    with pytest.raises(ValueError, match="positions"):
        init(call={"positions": jnp.arange(SEQ)})
    with pytest.raises(ValueError, match="kv heads 3"):
        dot_product_attention(q, k, k, implementation="xla")
    with pytest.raises(ValueError, match="head_dim 16"):
        dot_product_attention(q, q[..., :16], q[..., :16], implementation="xla")
    with pytest.raises(ValueError, match="kv_segment_ids.shape"):
        ids = jnp.zeros((BATCH, SEQ), jnp.int32)
        dot_product_attention(q, q, q, segment_ids=(ids, ids[:, 1:]), implementation="xla")
    with pytest.raises(ValueError, match="float64|int32"):
        dot_product_attention(q.astype(jnp.int32), q, q, implementation="xla")


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "cudnn", "auto"])
def test_gpu_implementations_match_xla_bfloat16(implementation):
    """Compiled kernels (no interpret mode) agree with XLA in bfloat16, output and gradients."""
    module_kwargs = dict(num_heads=4, num_kv_heads=2, head_dim=64, causal=True, rope=True)
    module_kwargs |= dict(dtype=jnp.bfloat16)
    x = random_inputs(20, (2, 256, 256))
    mask = jnp.arange(256)[None, :] < jnp.array([[256], [200]])
    xla = MultiHeadAttention(**module_kwargs, implementation="xla")
    other = MultiHeadAttention(**module_kwargs, implementation=implementation)
    variables = xla.init(jax.random.key(21), x)

    def grads(module):
        def f(params):
            out = module.apply({"params": params}, x, padding_mask=mask)
            return jnp.mean(out.astype(jnp.float32) ** 2), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

    (_, out_other), grads_other = grads(other)
    (_, out_xla), grads_xla = grads(xla)
    chex.assert_trees_all_close(
        out_other.astype(jnp.float32), out_xla.astype(jnp.float32), **TOL["bfloat16"]
    )
    chex.assert_trees_all_close(grads_other, grads_xla, **TOL["bfloat16"])
