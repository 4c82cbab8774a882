"""GatedAttentionUnit, FLASHQuad and FLASH: causality, padding, decoding, init knobs, bad input."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.models import TransformerLM
from efflax.models import generate
from efflax.nn import FLASH
from efflax.nn import Encoder
from efflax.nn import FLASHQuad
from efflax.nn import GatedAttentionUnit
from efflax.nn import relative_position_buckets

_SMALL = dict(qk_dim=8, expansion=1.0, scale_init="one")


def _x(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn):
    """jax.jit with cheap XLA options on CPU (the numerics do not depend on them)."""
    cache = {}

    def run(*args):
        key = jax.tree.structure(args), tuple((x.shape, x.dtype) for x in jax.tree.leaves(args))
        if key not in cache:
            lowered = jax.jit(fn).lower(*args)
            on_cpu = jax.default_backend() == "cpu"
            cache[key] = lowered.compile(compiler_options=_FAST_COMPILE if on_cpu else None)
        return cache[key](*args)

    return run


def _init_apply(module, x, **kwargs):
    variables = _jit(module.init)(jax.random.key(0), x)
    return variables, _jit(functools.partial(module.apply, **kwargs))


@pytest.mark.parametrize(
    "module",
    [FLASH(chunk_size=4, causal=True, **_SMALL), FLASHQuad(causal=True, num_units=1, **_SMALL)],
    ids=["flash", "flash_quad"],
)
def test_causal_outputs_before_t_are_exactly_unchanged(module):
    x = _x(0, (2, 14, 16))
    variables, apply = _init_apply(module, x)
    base = np.asarray(apply(variables, x))
    for t in (2, 4, 9):  # mid-chunk, a chunk's first token, mid-chunk later on
        out = np.asarray(apply(variables, x.at[:, t].add(1.0)))
        assert np.array_equal(out[:, :t], base[:, :t]), f"token {t} leaked backwards"
        assert not np.allclose(out[:, t], base[:, t])


def test_padded_tokens_do_not_change_real_outputs():
    module = FLASH(chunk_size=4, causal=False, **_SMALL)
    x = _x(1, (2, 11, 16))
    mask = jnp.arange(11)[None, :] < jnp.array([[11], [7]])
    variables, apply = _init_apply(module, x)
    masked = _jit(lambda v, x, mask: module.apply(v, x, padding_mask=mask))
    base = np.asarray(masked(variables, x, mask))
    other = np.asarray(masked(variables, x.at[1, 7:].set(_x(2, (4, 16))), mask))
    np.testing.assert_array_equal(other[1, :7], base[1, :7])
    np.testing.assert_array_equal(other[0], base[0])
    # Without the mask the padded tokens are seen (the test can fail).
    unmasked = np.asarray(apply(variables, x))
    assert not np.allclose(unmasked[1, :7], base[1, :7])


@pytest.mark.parametrize(
    "module",
    [
        FLASH(chunk_size=4, causal=True, normalization="length", **_SMALL),
        FLASHQuad(causal=True, num_units=1, **_SMALL),
    ],
    ids=["flash", "flash_quad"],
)
def test_decoding_token_by_token_matches_the_full_causal_pass(module):
    x = _x(3, (2, 10, 16))
    variables, apply = _init_apply(module, x)
    full = np.asarray(apply(variables, x))
    # A cache made from shapes and zero-filled, as efflax.models.generate makes it.
    shapes = jax.eval_shape(functools.partial(module.init, decode=True), jax.random.key(0), x)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    step = _jit(functools.partial(module.apply, decode=True, mutable=["cache"]))
    outs = []
    for start, stop in ((0, 1), (1, 10)):  # one token, then several in one call
        out, state = step({"params": variables["params"], "cache": cache}, x[:, start:stop])
        cache = state["cache"]
        outs.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_every_implementation_gives_the_same_unit_and_parameter_gradients():
    x = _x(4, (2, 9, 16))
    unit = functools.partial(GatedAttentionUnit, chunk_size=4, causal=True, **_SMALL)
    variables = unit().init(jax.random.key(0), x)

    def grads(implementation):
        loss = lambda p: jnp.sum(jnp.sin(unit(implementation=implementation).apply(p, x)))
        return _jit(jax.value_and_grad(loss))(variables)

    expected = grads("reference")
    for name in ("pallas",):  # 'xla' (auto on CPU) is what the other tests run
        actual = grads(name)
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=name)


def test_parameters_carry_logical_axis_names_and_paper_shapes():
    d, s = 16, 8
    x = jax.ShapeDtypeStruct((1, 8, d), jnp.float32)
    variables = jax.eval_shape(
        GatedAttentionUnit(chunk_size=4, qk_dim=s).init, jax.random.key(0), x
    )
    params = variables["params"]
    leaves = jax.tree.leaves(params, is_leaf=lambda p: isinstance(p, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(p, nn.LogicallyPartitioned) for p in leaves)
    assert params["uv"]["kernel"].names == ("embed", "mlp")
    assert params["uv"]["kernel"].value.shape == (d, 2 * 2 * d)  # u and v, e = 2d
    assert params["z"]["kernel"].value.shape == (d, s)
    assert params["qk_scale"].value.shape == (4, s)  # quad q, quad k, lin q, lin k
    quad = jax.eval_shape(GatedAttentionUnit(qk_dim=s).init, jax.random.key(0), x)
    assert quad["params"]["qk_scale"].value.shape == (2, s)


def test_paper_scale_init_makes_attention_vanish_at_initialisation():
    # gamma ~ N(0, 0.02) and relu^2(qk / C): the attended values are ~1e-10 of those with
    # gamma around 1 (PAPERS.md); the knob exists for that reason.
    x = _x(6, (1, 32, 32))

    def attended_norm(scale_init):
        unit = GatedAttentionUnit(
            qk_dim=16, scale_init=scale_init, rope=False, relative_position_bias=False
        )
        variables = _jit(unit.init)(jax.random.key(0), x)
        gamma = nn.meta.unbox(variables["params"])["qk_scale"]
        y = _jit(unit.apply)(variables, x) - x
        return float(jnp.mean(gamma)), float(jnp.linalg.norm(y))

    paper_gamma, paper = attended_norm("paper")
    one_gamma, one = attended_norm("one")
    assert abs(paper_gamma) < 0.02 and abs(one_gamma - 1) < 0.02
    assert paper < 1e-6 * one


def test_flash_blocks_work_as_the_encoder_ffn_and_in_bfloat16():
    x = _x(7, (2, 12, 3))
    gau = functools.partial(GatedAttentionUnit, chunk_size=4, pre_norm_residual=False, **_SMALL)
    model = Encoder(
        num_layers=1, d_model=16, num_heads=2, mlp_hidden=32, num_classes=5, moe=gau, moe_every=1
    )
    variables, apply = _init_apply(model, x)
    assert "ffn" in variables["params"]["block_0"]
    assert apply(variables, x).shape == (2, 5)
    # FLASH as the Encoder's whole block, with padding: padded tokens change nothing.
    flash = functools.partial(FLASH, chunk_size=4, **_SMALL)
    model = Encoder(
        num_layers=2, d_model=16, num_heads=2, mlp_hidden=32, num_classes=5, block=flash
    )
    mask = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
    variables = model.init(jax.random.key(0), x, padding_mask=mask)
    assert "gau_0" in variables["params"]["block_1"]
    apply = jax.jit(lambda v, x: model.apply(v, x, padding_mask=mask))
    changed = x.at[1, 7:].set(100.0)
    np.testing.assert_array_equal(apply(variables, x)[1], apply(variables, changed)[1])
    block = FLASH(chunk_size=4, dtype=jnp.bfloat16, **_SMALL)
    h = _x(8, (2, 12, 16)).astype(jnp.bfloat16)
    variables, apply = _init_apply(block, h)
    out = apply(variables, h)
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))


def test_relative_position_buckets():
    rel = jnp.arange(-200, 201)
    buckets = functools.partial(relative_position_buckets, num_buckets=32, max_distance=128)
    causal, both = _jit(
        lambda r: (buckets(r, bidirectional=False), buckets(r, bidirectional=True))
    )(rel)
    assert int(causal[200]) == 0 and int(causal[199]) == 1  # the query itself, one step back
    assert bool(np.all(causal[200:] == 0))  # future keys share bucket 0 (masked anyway)
    assert int(causal.max()) == 31 and bool(np.all(np.diff(causal[:201]) <= 0))
    assert int(both[201]) == 17 and int(both[199]) == 1 and int(both.max()) == 31


def test_bad_input_is_a_value_error_naming_the_value():
    x = _x(9, (2, 8, 16))
    # Checks run at trace time: abstract evaluation is enough.
    init = lambda module, *a, **kw: jax.eval_shape(
        functools.partial(module.init, **kw), jax.random.key(0), *a
    )
    with pytest.raises(ValueError, match="chunk_size=0 must be an int >= 1"):
        init(FLASH(chunk_size=0), x)
    with pytest.raises(ValueError, match="chunk_size=-2"):
        init(GatedAttentionUnit(chunk_size=-2), x)
    with pytest.raises(ValueError, match="qk_dim=15 must be even when rope=True"):
        init(FLASH(qk_dim=15), x)
    init(FLASH(qk_dim=15, rope=False, chunk_size=4), x)  # odd is fine without RoPE
    with pytest.raises(ValueError, match=r"padding_mask \(shape \(2, 7\), dtype bool\)"):
        init(FLASH(chunk_size=4), x, padding_mask=jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="dtype float32"):
        init(FLASHQuad(), x, padding_mask=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="normalization='seq' must be one of"):
        init(FLASH(normalization="seq"), x)
    with pytest.raises(ValueError, match="normalization_length=0 must be an int >= 1"):
        init(FLASHQuad(normalization_length=0), x)
    with pytest.raises(ValueError, match="scale_init='zero' must be one of"):
        init(FLASH(scale_init="zero"), x)
    with pytest.raises(ValueError, match="decode=True needs causal=True"):
        init(FLASH(), x, decode=True)
    with pytest.raises(ValueError, match=r"x.shape=\(8, 16\) must be \[batch, seq, features\]"):
        init(GatedAttentionUnit(), x[0])


@pytest.mark.parametrize(
    "block",
    [
        functools.partial(FLASH, chunk_size=4, causal=True, **_SMALL),
        # A fixed normalisation length: the weights do not depend on the prefix length, so a
        # cached decode equals re-running the growing prefix.
        functools.partial(FLASHQuad, causal=True, normalization_length=16, **_SMALL),
    ],
    ids=["flash", "flash_quad"],
)
def test_blocks_in_the_transformer_lm_generate_like_the_full_forward(block):
    lm = TransformerLM(num_layers=2, d_model=16, block=block)
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, 256, (2, 5)), jnp.int32)
    params = _jit(lm.init)(jax.random.key(0), tokens)["params"]
    new = np.asarray(generate(lm, params, tokens, max_new_tokens=6, temperature=0.0))
    # Greedy decoding without a cache: the blocks are causal, so one forward pass over the
    # whole sequence gives at each position the logits of its prefix.
    sequence = jnp.asarray(np.concatenate([np.asarray(tokens), new], axis=1))
    logits = np.asarray(_jit(lambda p, t: lm.apply({"params": p}, t))(params, sequence))
    np.testing.assert_array_equal(new, np.argmax(logits[:, 4:-1], axis=-1))
