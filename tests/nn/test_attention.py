"""efflax.nn attention: the Flax drop-in, MultiHeadAttention (masks, dropout, decoding), RoPE."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from efflax._src.nn.attention import PADDING_SEGMENT_ID
from efflax.nn import MultiHeadAttention
from efflax.nn import apply_rotary_embedding
from efflax.nn import decode_overflowed
from efflax.nn import dot_product_attention
from efflax.nn import segment_ids_with_padding
from pallas_kernels import BlockSizes
from pallas_kernels import PallasTritonAttention

BATCH, SEQ, FEATURES, HEADS, HEAD_DIM = 2, 16, 32, 4, 8
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
F32 = dict(rtol=1e-5, atol=1e-5)
PALLAS = PallasTritonAttention(block_sizes=BlockSizes(16, 16), interpret=True)


def fast_jit(fn):
    """``jax.jit`` compiled with cheap XLA options (CPU compile time dominates these tests)."""
    jitted, compiled = jax.jit(fn), {}

    def call(*args):
        leaves = jax.tree.leaves(args)
        key = (jax.tree.structure(args), tuple((x.shape, x.dtype) for x in leaves))
        if key not in compiled:
            options = None if jax.default_backend() != "cpu" else _FAST_COMPILE
            compiled[key] = jitted.lower(*args).compile(compiler_options=options)
        return compiled[key](*args)

    return call


def normal(seed, shape, dtype=jnp.float32):
    # numpy draws: eager jax.random compiles a kernel per shape, which dominates small tests.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def qkv(seed=0, batch=(BATCH,)):
    shape = (*batch, SEQ, HEADS, HEAD_DIM)
    return normal(seed, shape), normal(seed + 1, shape), normal(seed + 2, shape)


LENGTHS = jnp.array([SEQ, 11])
REAL = jnp.arange(SEQ)[None, :] < LENGTHS[:, None]  # [batch, seq]: padding after the length


def flax_masks():
    """Masks in Flax's own form (float 0/1 from nn.make_*_mask, and a random bool one)."""
    arbitrary = np.random.default_rng(3).random((BATCH, 1, SEQ, SEQ)) < 0.6
    arbitrary |= np.eye(SEQ, dtype=bool)  # every query sees some key
    return {
        "causal": nn.make_causal_mask(jnp.ones((BATCH, SEQ))),
        "padding": nn.make_attention_mask(REAL, REAL),
        "arbitrary": jnp.asarray(arbitrary),
    }


@pytest.mark.parametrize(
    "case", ["causal", "padding", "arbitrary", "bias", "dropout_deterministic", "dropout"]
)
def test_drop_in_matches_flax_dot_product_attention(case):
    q, k, v = qkv()
    masks = flax_masks()
    kwargs = {"mask": masks.get(case, masks["causal"])}
    if case == "bias":
        kwargs["bias"] = normal(4, (1, HEADS, SEQ, SEQ))
    if case == "dropout_deterministic":
        kwargs |= dict(dropout_rate=0.5, deterministic=True)
    if case == "dropout":  # the same key draws the same dropout mask as Flax
        kwargs |= dict(dropout_rate=0.3, dropout_rng=jax.random.key(5), broadcast_dropout=False)
    ours = fast_jit(lambda q, k, v: dot_product_attention(q, k, v, **kwargs))(q, k, v)
    theirs = fast_jit(lambda q, k, v: nn.dot_product_attention(q, k, v, **kwargs))(q, k, v)
    # "padding": padded queries see no key; the drop-in gives Flax's mean of the values there
    chex.assert_trees_all_close(ours, theirs, **F32)


@pytest.mark.parametrize("extra", ["", "dropout", "bias"])
def test_drop_in_gives_flax_numbers_on_rows_that_see_no_key(extra):
    """A padded batch under causal + padding masks: padded queries see no key. As an
    `attention_fn` the drop-in gives Flax's values and gradients there (the mean of the values,
    after Flax's dropout); the op itself gives zeros."""
    q, k, v = qkv(12)
    mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((BATCH, SEQ))), flax_masks()["padding"])
    kwargs = {"mask": mask}
    if extra == "dropout":
        kwargs |= dict(dropout_rate=0.3, dropout_rng=jax.random.key(13))
    if extra == "bias":
        kwargs["bias"] = normal(14, (BATCH, HEADS, SEQ, SEQ))

    def value_and_grads(attention):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, **kwargs)))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    ours = fast_jit(lambda: value_and_grads(dot_product_attention))()
    theirs = fast_jit(lambda: value_and_grads(nn.dot_product_attention))()
    chex.assert_trees_all_close(ours, theirs, **F32)
    op_rows = pallas_kernels.dot_product_attention(q, k, v, mask=mask != 0)[1, 11:]
    np.testing.assert_array_equal(op_rows, 0.0)


def test_drop_in_inside_flax_module_matches_flax():
    """`nn.MultiHeadDotProductAttention(attention_fn=efflax.nn.dot_product_attention)` with a
    causal mask and dropout, sowing its weights, gives Flax's own module's numbers (the outputs
    and the sown attention weights)."""
    x = normal(6, (BATCH, SEQ, FEATURES))
    mask = nn.make_causal_mask(jnp.ones((BATCH, SEQ)))
    theirs = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=0.2)
    ours = theirs.clone(attention_fn=dot_product_attention)
    params = theirs.init(jax.random.key(7), x, mask=mask, deterministic=True)

    def run(module):
        apply = lambda p, x, key: module.apply(
            p,
            x,
            mask=mask,
            deterministic=False,
            rngs={"dropout": key},
            sow_weights=True,
            mutable=["intermediates"],
        )
        return fast_jit(apply)(params, x, jax.random.key(8))

    chex.assert_trees_all_close(run(ours), run(theirs), **F32)


def test_drop_in_tiles_structural_masks_and_refuses_what_the_kernel_cannot():
    """causal= and segment_ids= run on the Pallas kernel; a dense mask cannot."""
    q, k, v = qkv(9)
    ids = jnp.where(REAL, 0, 1)
    attend = lambda implementation: fast_jit(
        lambda q, k, v: dot_product_attention(
            q, k, v, causal=True, segment_ids=ids, implementation=implementation
        )
    )(q, k, v)
    chex.assert_trees_all_close(attend(PALLAS), attend("xla"), **F32)
    with pytest.raises(ValueError, match="pallas_triton: a dense boolean mask"):
        dot_product_attention(q, k, v, mask=flax_masks()["causal"], implementation="pallas")


def test_drop_in_takes_flax_batch_dims():
    """Flax's `[*batch, seq, heads, dim]` with two batch dims and a mask over one of them."""
    q, k, v = qkv(10, batch=(2, 3))
    mask = np.random.default_rng(11).random((3, 1, SEQ, SEQ)) < 0.7
    mask = jnp.asarray(mask | np.eye(SEQ, dtype=bool))
    both = lambda q, k, v, mask: (
        dot_product_attention(q, k, v, mask=mask),
        nn.dot_product_attention(q, k, v, mask=mask),
    )
    chex.assert_trees_all_close(*fast_jit(both)(q, k, v, mask), **F32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qk_attn_weights_einsum=jnp.einsum), "qk_attn_weights_einsum"),
        (dict(einsum_dot_general=jax.lax.dot_general), "einsum_dot_general"),
        (dict(dropout_rate=0.1), "dropout_rate=0.1 with deterministic=False needs a dropout_rng"),
        (dict(mask=jnp.ones((BATCH, 1, SEQ, SEQ + 1), bool)), "mask.shape=(2, 1, 16, 17)"),
        (dict(bias=jnp.ones((3, HEADS, SEQ, SEQ))), "bias.shape=(3, 4, 16, 16)"),
        (dict(deterministic=None), "deterministic=None"),
        (dict(sm_scale=float("nan")), "sm_scale=nan"),
        (dict(implementation="flash"), "implementation='flash'"),
    ],
)
def test_drop_in_refuses_what_it_cannot_honour(kwargs, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dot_product_attention(q, k, v, **kwargs)


# --------------------------------------------------------------------------------------------
# MultiHeadAttention
# --------------------------------------------------------------------------------------------


def packed_segment_ids(seed):
    starts = np.random.default_rng(seed).random((BATCH, SEQ)) < 0.15
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def test_module_pallas_matches_xla_values_and_gradients():
    """GQA, causal, RoPE, packed segments and padding on the Pallas kernel (a configured
    instance carries its block sizes) vs the XLA path: outputs and parameter gradients."""
    module = MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True, rope=True)
    x = normal(12, (BATCH, SEQ, FEATURES))
    call = dict(segment_ids=packed_segment_ids(13), padding_mask=REAL)
    params = module.init(jax.random.key(14), x)["params"]
    weights = normal(15, (BATCH, SEQ, FEATURES))

    def value_and_grad(implementation):
        loss = lambda p: jnp.sum(
            weights * module.clone(implementation=implementation).apply({"params": p}, x, **call)
        )
        return fast_jit(jax.value_and_grad(loss))(params)

    chex.assert_trees_all_close(value_and_grad(PALLAS), value_and_grad("xla"), rtol=1e-4, atol=1e-5)


def test_module_general_mask_and_its_errors():
    module = MultiHeadAttention(num_heads=HEADS, causal=True, implementation="xla")
    x = normal(16, (BATCH, SEQ, FEATURES))
    params = module.init(jax.random.key(17), x)
    # A general mask that equals the padding mask gives the same numbers.
    by_mask = module.apply(params, x, mask=REAL[:, None, None, :])
    by_padding = module.apply(params, x, padding_mask=REAL)
    chex.assert_trees_all_close(by_mask, by_padding, **F32)
    with pytest.raises(ValueError, match=r"mask.shape=\(2, 1, 16\) does not broadcast"):
        module.apply(params, x, mask=jnp.ones((BATCH, 1, SEQ), bool))
    with pytest.raises(ValueError, match=r"mask.shape=\(3, 1, 1, 16\).*\[2, 4, 16, 16\]"):
        module.apply(params, x, mask=jnp.ones((3, 1, 1, SEQ), bool))
    with pytest.raises(ValueError, match="pallas_triton: a dense boolean mask"):
        module.clone(implementation="pallas").apply(params, x, mask=REAL[:, None, None, :])


def test_module_dropout_follows_flax_conventions():
    module = MultiHeadAttention(num_heads=HEADS, dropout_rate=0.5, implementation="xla")
    x = normal(18, (BATCH, SEQ, FEATURES))
    params = module.init(jax.random.key(19), x, deterministic=True)
    plain = module.clone(dropout_rate=0.0).apply(params, x)
    deterministic = fast_jit(lambda p, x: module.apply(p, x, deterministic=True))
    chex.assert_trees_all_close(deterministic(params, x), plain, **F32)
    dropped = fast_jit(
        lambda p, x, key: module.apply(p, x, deterministic=False, rngs={"dropout": key})
    )
    first = dropped(params, x, jax.random.key(1))
    assert float(jnp.max(jnp.abs(first - dropped(params, x, jax.random.key(2))))) > 1e-2
    chex.assert_trees_all_close(first, dropped(params, x, jax.random.key(1)))
    attribute = module.clone(deterministic=True).apply(params, x)  # attribute instead of argument
    chex.assert_trees_all_close(attribute, plain, **F32)
    with pytest.raises(ValueError, match="deterministic"):
        module.apply(params, x)  # neither attribute nor argument
    with pytest.raises(Exception, match="dropout"):
        module.apply(params, x, deterministic=False)  # no 'dropout' rng


@pytest.mark.parametrize("implementation", ["xla", "reference", "pallas"])
def test_decoding_token_by_token_equals_the_full_causal_forward(implementation):
    """Prefill a prompt, then one token per call: the outputs equal the full causal forward
    (GQA with RoPE), and the cache holds only the key/value heads."""
    implementation = PALLAS if implementation == "pallas" else implementation
    module = MultiHeadAttention(
        num_heads=4, num_kv_heads=2, causal=True, rope=True, implementation=implementation
    )
    x = normal(20, (BATCH, SEQ, FEATURES))
    params = module.init(jax.random.key(21), x)["params"]
    full = fast_jit(module.apply)({"params": params}, x)
    decoder = module.clone(decode=True)
    cache = decoder.init(jax.random.key(21), x)["cache"]
    assert cache["cached_key"].shape == (BATCH, SEQ, 2, FEATURES // 4)
    step = fast_jit(
        lambda cache, x: decoder.apply({"params": params, "cache": cache}, x, mutable="cache")
    )
    prompt = 5
    out, variables = step(cache, x[:, :prompt])
    outs = [out]
    for t in range(prompt, SEQ):
        out, variables = step(variables["cache"], x[:, t : t + 1])
        outs.append(out)
    chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, **F32)
    assert int(variables["cache"]["cache_index"]) == SEQ


def test_decode_errors():
    module = MultiHeadAttention(num_heads=HEADS, causal=True, rope=True, decode=True)
    x = normal(22, (BATCH, 8, FEATURES))
    variables = module.init(jax.random.key(23), x)
    # The decode contract (shared with the GAU layers) is tested in tests/nn/test_decode.py.
    with pytest.raises(ValueError, match="9 positions on a cache of length 8"):
        module.apply(variables, normal(24, (BATCH, 9, FEATURES)), mutable="cache")
    _, filled = module.apply(variables, x, mutable="cache")
    with pytest.raises(ValueError, match="1 position at cache position 8 .*cache length 8"):
        module.apply({**variables, **filled}, x[:, :1], mutable="cache")
    # Under jit the index is not known when tracing: the position is dropped, attends to
    # nothing (zeros, never NaN) and the cache is flagged.
    over, state = fast_jit(lambda v, x: module.apply(v, x, mutable="cache"))(
        {**variables, **filled}, x[:, :1]
    )
    assert np.all(np.asarray(over) == 0.0)
    assert bool(decode_overflowed(state["cache"]))
    with pytest.raises(ValueError, match="decode=True does not take padding_mask"):
        module.apply(variables, x[:, :1], padding_mask=REAL[:, :1], mutable="cache")
    with pytest.raises(ValueError, match="decode=True needs causal=True"):
        module.clone(causal=False).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="re-initialise the cache"):
        module.apply(variables, normal(25, (3, 1, FEATURES)), mutable="cache")


def test_padding_equals_truncation():
    """Padded keys are ignored: real positions match the module run on the unpadded prefix."""
    module = MultiHeadAttention(num_heads=HEADS, rope=True, implementation="xla")
    x = normal(26, (1, SEQ, FEATURES))
    variables = module.init(jax.random.key(27), x)
    padded = fast_jit(lambda v, x, m: module.apply(v, x, padding_mask=m))(variables, x, REAL[1:])
    truncated = fast_jit(module.apply)(variables, x[:, :11])
    chex.assert_trees_all_close(padded[:, :11], truncated, **F32)


def test_bfloat16_module_close_to_float32():
    module = MultiHeadAttention(num_heads=HEADS, causal=True, implementation="xla")
    x = normal(28, (BATCH, SEQ, FEATURES))
    variables = module.init(jax.random.key(29), x)
    out32 = fast_jit(module.apply)(variables, x)
    out16 = fast_jit(module.clone(dtype=jnp.bfloat16).apply)(variables, x)
    assert out16.dtype == jnp.bfloat16
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    chex.assert_trees_all_close(out16.astype(jnp.float32), out32, rtol=2e-2, atol=2e-2)


def test_rotary_embedding_is_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n, and rope preserves norms."""
    q, k = normal(30, (1, 1, 1, 32)), normal(31, (1, 1, 1, 32))

    def score(m, n):
        rq = apply_rotary_embedding(q, jnp.array([[m]]))
        rk = apply_rotary_embedding(k, jnp.array([[n]]))
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(score(3, 1), score(12, 10), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-6)
    assert abs(score(3, 1) - score(1, 3)) > 1e-3
    rotated = apply_rotary_embedding(q, jnp.array([[17]]))
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-6)
    with pytest.raises(ValueError, match=r"positions.shape=\(2,\) must be \[1\]"):
        apply_rotary_embedding(q, jnp.arange(2))
    with pytest.raises(ValueError, match="base=0"):
        apply_rotary_embedding(q, jnp.arange(1), base=0)


def test_param_logical_axis_names():
    module = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=16, use_bias=True)
    variables = jax.eval_shape(module.init, jax.random.key(32), normal(33, (BATCH, SEQ, FEATURES)))
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


def test_segment_ids_with_padding():
    q_ids, kv_ids = segment_ids_with_padding(REAL, SEQ)
    np.testing.assert_array_equal(q_ids, 0)
    np.testing.assert_array_equal(kv_ids[1, 11:], PADDING_SEGMENT_ID)
    np.testing.assert_array_equal(kv_ids[1, :11], 0)
    ids = packed_segment_ids(34)
    q_ids, kv_ids = segment_ids_with_padding(REAL, SEQ, ids)
    np.testing.assert_array_equal(q_ids, ids)
    np.testing.assert_array_equal(kv_ids, jnp.where(REAL, ids, PADDING_SEGMENT_ID))
    assert segment_ids_with_padding(None, SEQ) is None


@pytest.mark.parametrize(
    "module_kwargs, call_kwargs, message",
    [
        (dict(implementation="triton"), {}, "implementation='triton'"),
        (dict(num_heads=4, num_kv_heads=3), {}, "num_kv_heads=3"),
        (dict(head_dim=15, rope=True), {}, "head_dim=15"),
        (dict(dropout_rate=1.5), {}, "dropout_rate=1.5"),
        (dict(causal=1), {}, "causal=1"),
        ({}, dict(padding_mask=jnp.ones((BATCH, SEQ + 1), bool)), "padding_mask.shape"),
        ({}, dict(segment_ids=jnp.zeros((BATCH, SEQ - 1), jnp.int32)), "segment_ids.shape"),
        ({}, dict(positions=jnp.arange(SEQ)), "positions"),
        ({}, dict(mask=jnp.ones((BATCH, 1, SEQ, SEQ), jnp.int32)), "mask.dtype=int32"),
    ],
)
def test_module_errors(module_kwargs, call_kwargs, message):
    module = MultiHeadAttention(**(dict(num_heads=HEADS) | module_kwargs))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        module.init(jax.random.key(0), normal(35, (BATCH, SEQ, FEATURES)), **call_kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", ["pallas", "cudnn", "auto"])
def test_gpu_implementations_match_xla_bfloat16(implementation):
    """Compiled kernels (no interpret mode) agree with XLA in bfloat16, output and gradients."""
    module_kwargs = dict(num_heads=4, num_kv_heads=2, head_dim=64, causal=True, rope=True)
    module_kwargs |= dict(dtype=jnp.bfloat16)
    x = normal(36, (2, 256, 256))
    mask = jnp.arange(256)[None, :] < jnp.array([[256], [200]])
    xla = MultiHeadAttention(**module_kwargs, implementation="xla")
    other = MultiHeadAttention(**module_kwargs, implementation=implementation)
    variables = xla.init(jax.random.key(21), x)

    def grads(module):
        def f(params):
            out = module.apply({"params": params}, x, padding_mask=mask)
            return jnp.mean(out.astype(jnp.float32) ** 2), out

        return fast_jit(jax.value_and_grad(f, has_aux=True))(variables["params"])

    (_, out_other), grads_other = grads(other)
    (_, out_xla), grads_xla = grads(xla)
    tol = dict(rtol=2e-2, atol=2e-2)
    chex.assert_trees_all_close(out_other.astype(jnp.float32), out_xla.astype(jnp.float32), **tol)
    chex.assert_trees_all_close(grads_other, grads_xla, **tol)
