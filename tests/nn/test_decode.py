"""One decode contract for every module with ``decode=True`` (``efflax._src.nn._decode``).

``MultiHeadAttention``, ``FLASH``, ``FLASHQuad`` and ``TransformerLM`` over attention and over
FLASH blocks: the same checks of a step against the cache (batch, length), the same ValueError
past the cache outside ``jit``, and the same behaviour under ``jit`` (positions past the cache
are not written, their mixing output is zero, the index keeps counting and
``decode_overflowed`` flags it; never NaN).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.models import TransformerLM
from efflax.models import generate
from efflax.nn import FLASH
from efflax.nn import FLASHQuad
from efflax.nn import MultiHeadAttention
from efflax.nn import decode_overflowed

BATCH, LENGTH, FEATURES = 2, 6, 8
_GAU = dict(qk_dim=4, expansion=1.0, scale_init="one", causal=True, num_units=1)
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fn):
    """``jax.jit`` with cheap XLA options on CPU (the numbers do not depend on them)."""
    jitted, compiled = jax.jit(fn), {}

    def call(*args):
        leaves = jax.tree.leaves(args)
        key = (jax.tree.structure(args), tuple((x.shape, x.dtype) for x in leaves))
        if key not in compiled:
            options = None if jax.default_backend() != "cpu" else _FAST_COMPILE
            compiled[key] = jitted.lower(*args).compile(compiler_options=options)
        return compiled[key](*args)

    return call


class Decoder:
    """A module under the contract: its init (makes the cache) and its decode step."""

    def __init__(self, kind):
        self.kind = kind
        self.tokens = kind.startswith("lm")
        if kind == "mha":
            self.module = MultiHeadAttention(num_heads=2, causal=True, rope=True, decode=True)
            self.kwargs = {}
        elif kind in ("flash", "flash_quad"):
            cls = FLASH if kind == "flash" else FLASHQuad
            extra = {"chunk_size": 4} if kind == "flash" else {}
            self.module = cls(**_GAU, **extra)
            self.kwargs = {"decode": True}
        else:
            block = None
            if kind == "lm_flash":
                block = functools.partial(FLASH, chunk_size=4, **_GAU)
            self.module = TransformerLM(num_layers=1, d_model=FEATURES, num_heads=2, block=block)
            self.kwargs = {"decode": True}
        apply = functools.partial(self.module.apply, mutable=["cache"], **self.kwargs)
        self.eager = apply
        self.jitted = _jit(apply)

    def inputs(self, seed, batch, length):
        rng = np.random.default_rng(seed)
        if self.tokens:
            return jnp.asarray(rng.integers(0, 256, (batch, length)), jnp.int32)
        return jnp.asarray(rng.standard_normal((batch, length, FEATURES)), jnp.float32)

    def init(self):
        x = self.inputs(0, BATCH, LENGTH)
        variables = self.module.init(jax.random.key(0), x, **self.kwargs)
        # The cache made for LENGTH positions, zero-filled (as generate makes it).
        cache = jax.tree.map(jnp.zeros_like, variables["cache"])
        return {"params": variables["params"], "cache": cache}

    def step(self, variables, x, *, jit):
        out, state = (self.jitted if jit else self.eager)(variables, x)
        return out, {**variables, "cache": state["cache"]}


KINDS = ["mha", "flash", "flash_quad", "lm_mha", "lm_flash"]


@functools.cache
def _decoder(kind):
    return Decoder(kind)


@pytest.fixture(params=KINDS)
def decoder(request):
    return _decoder(request.param)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_step_of_another_batch_or_longer_than_the_cache_raises(decoder, jit):
    variables = decoder.init()
    name = "tokens" if decoder.tokens else "x" if decoder.kind.startswith("flash") else "inputs_q"
    with pytest.raises(ValueError, match=rf"{name}.*batch 1 on a cache of batch {BATCH}"):
        decoder.step(variables, decoder.inputs(1, 1, 1), jit=jit)
    with pytest.raises(ValueError, match=rf"batch 3 on a cache of batch {BATCH}"):
        decoder.step(variables, decoder.inputs(1, 3, 1), jit=jit)
    with pytest.raises(ValueError, match=rf"{LENGTH + 1} positions on a cache of length {LENGTH}"):
        decoder.step(variables, decoder.inputs(1, BATCH, LENGTH + 1), jit=jit)


def test_past_the_cache_outside_jit_raises_naming_length_and_position(decoder):
    variables = decoder.init()
    _, variables = decoder.step(variables, decoder.inputs(1, BATCH, LENGTH - 1), jit=False)
    with pytest.raises(
        ValueError, match=rf"2 positions at cache position {LENGTH - 1} .*cache length {LENGTH}"
    ):
        decoder.step(variables, decoder.inputs(2, BATCH, 2), jit=False)
    _, variables = decoder.step(variables, decoder.inputs(3, BATCH, 1), jit=False)
    assert not bool(decode_overflowed(variables["cache"]))
    with pytest.raises(ValueError, match=rf"cache position {LENGTH} .*cache length {LENGTH}"):
        decoder.step(variables, decoder.inputs(4, BATCH, 1), jit=False)


def test_past_the_cache_under_jit_drops_zeroes_and_flags(decoder):
    """Under jit: positions inside the cache decode as usual, those past it are not written,
    their mixing output is zero, and the cache is flagged. Never NaN."""
    variables = decoder.init()
    _, variables = decoder.step(variables, decoder.inputs(1, BATCH, LENGTH - 1), jit=True)
    # The last position alone (inside): the reference for the first position of the next step.
    last, inside = decoder.step(variables, decoder.inputs(2, BATCH, 1), jit=True)
    assert not bool(decode_overflowed(inside["cache"]))
    # Two positions from the last one: one inside, one past the end.
    x = jnp.concatenate([decoder.inputs(2, BATCH, 1), decoder.inputs(3, BATCH, 1)], axis=1)
    out, over = decoder.step(variables, x, jit=True)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out[:, :1], last, rtol=1e-5, atol=1e-5)
    assert bool(decode_overflowed(over["cache"]))
    # Nothing but the index differs from the cache after the position inside.
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(over["cache"]),
        jax.tree.leaves(inside["cache"]),
        strict=True,
    ):
        if "index" in jax.tree_util.keystr(path):
            assert int(a) == LENGTH + 1 and int(b) == LENGTH
        else:
            # Written from the same token by programs of other shapes: equal up to rounding.
            np.testing.assert_allclose(
                a, b, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path)
            )
    # Past the end the mixing output is zero: attention alone gives zeros (no bias), a GAU
    # block its residual input.
    if decoder.kind == "mha":
        np.testing.assert_array_equal(out[:, 1:], 0.0)
    elif decoder.kind.startswith("flash"):
        np.testing.assert_allclose(out[:, 1:], x[:, 1:], rtol=1e-6, atol=1e-6)
    # Further steps stay flagged and finite.
    out, further = decoder.step(over, decoder.inputs(4, BATCH, 1), jit=True)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(decode_overflowed(further["cache"]))


@pytest.mark.parametrize("kind", ["lm_mha", "lm_flash"])
def test_generate_never_runs_past_its_cache(kind):
    decoder = _decoder(kind)
    prompt = decoder.inputs(5, BATCH, 3)
    params = decoder.init()["params"]
    new = generate(decoder.module, params, prompt, max_new_tokens=3, temperature=0.0)
    assert new.shape == (BATCH, 3)


def test_decode_overflowed_refuses_what_is_not_a_cache():
    with pytest.raises(ValueError, match="cache holds no decoding module's cache"):
        decode_overflowed({"params": {}})
