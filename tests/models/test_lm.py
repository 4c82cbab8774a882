"""efflax.models.TransformerLM and generate: shapes, axes, causality, decoding, sampling, errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.models import TransformerBlock
from efflax.models import TransformerLM
from efflax.models import generate

LM = TransformerLM(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, implementation="xla")
SMALL = LM.clone(num_layers=1)  # decoding and sampling compile per shape: keep them cheap
APPLY = jax.jit(SMALL.apply)


def tokens(seed, shape=(2, 12)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, shape), jnp.int32)


@functools.cache
def params():
    return nn.unbox(jax.jit(SMALL.init)(jax.random.key(0), tokens(0))["params"])


def test_logits_axes_and_dtypes():
    variables = jax.eval_shape(LM.clone(dtype=jnp.bfloat16).init, jax.random.key(0), tokens(0))
    specs = jax.tree.leaves(
        nn.get_partition_spec(variables),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    boxed = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(leaf, nn.Partitioned) for leaf in boxed), "a param lacks axis names"
    assert len(specs) == len(boxed) == 2 * 9 + 3
    names = nn.get_partition_spec(variables)["params"]
    assert tuple(names["embedding"]["embedding"]) == ("vocab", "embed")
    assert tuple(names["logits"]["kernel"]) == ("embed", "vocab")
    assert tuple(names["block_0"]["mlp"]["gate"]["kernel"]) == ("embed", "mlp")
    assert all(leaf.value.dtype == jnp.float32 for leaf in boxed)
    logits = jax.eval_shape(LM.clone(dtype=jnp.bfloat16).apply, variables, tokens(0))
    assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32


def test_causal():
    """Changing a later token leaves the earlier logits unchanged."""
    x = tokens(1)
    full = APPLY({"params": params()}, x)
    changed = APPLY({"params": params()}, x.at[:, 8].set((x[:, 8] + 1) % 256))
    chex.assert_trees_all_close(full[:, :8], changed[:, :8], rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(full[:, 8:] - changed[:, 8:]))) > 1e-3


def test_generate_greedy_and_top_k_sampling():
    """Cached decoding agrees with the full forward: greedy tokens are its argmax, top-k samples
    lie in its top k; sampling is reproducible from the key (prefill 5, then 7 steps)."""
    prompt = tokens(2, (2, 5))
    greedy = generate(SMALL, params(), prompt, max_new_tokens=7, temperature=0.0)
    assert greedy.shape == (2, 7) and greedy.dtype == jnp.int32
    logits = APPLY({"params": params()}, jnp.concatenate([prompt, greedy], axis=1))
    np.testing.assert_array_equal(jnp.argmax(logits[:, 4:-1], axis=-1), greedy)

    sample = functools.partial(
        generate, SMALL, params(), prompt, max_new_tokens=7, temperature=2.0, top_k=20
    )
    first, again = sample(rng=jax.random.key(3)), sample(rng=jax.random.key(3))
    np.testing.assert_array_equal(first, again)
    assert np.any(np.asarray(sample(rng=jax.random.key(4))) != np.asarray(first))
    logits = APPLY({"params": params()}, jnp.concatenate([prompt, first], axis=1))[:, 4:-1]
    top20 = jax.lax.top_k(logits, 20)[1]
    assert np.all(np.any(np.asarray(top20) == np.asarray(first)[..., None], axis=-1))
    assert np.any(np.asarray(first) != np.asarray(greedy))  # temperature 2 does sample


class MlpOnlyBlock(nn.Module):
    """A causal block without attention (a stand-in for another mixer); cannot decode."""

    @nn.compact
    def __call__(self, x, *, deterministic, decode):
        if decode:
            raise ValueError("MlpOnlyBlock cannot decode")
        return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(2 * x.shape[-1])(x)))


def test_block_factory_replaces_the_block():
    lm = LM.clone(block=MlpOnlyBlock)
    variables = jax.eval_shape(lm.init, jax.random.key(0), tokens(0))
    assert "attention" not in variables["params"]["block_0"]
    custom = LM.clone(block=functools.partial(TransformerBlock, num_heads=2, mlp_hidden=16))
    shapes = jax.eval_shape(custom.init, jax.random.key(0), tokens(0))["params"]["block_1"]
    assert nn.unbox(shapes)["mlp"]["gate"]["kernel"].shape == (32, 16)
    with pytest.raises(ValueError, match="MlpOnlyBlock cannot decode"):
        generate(lm, None, tokens(0, (1, 3)), max_new_tokens=2, temperature=0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=tokens(0).astype(jnp.float32)), "prompt"),
        (dict(prompt=jnp.zeros((2, 0), jnp.int32)), "prompt.shape=(2, 0)"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(temperature=1.0), "pass rng="),
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=257, rng=jax.random.key(0)), "top_k=257 must be <= vocab_size=256"),
    ],
)
def test_generate_errors(kwargs, message):
    kwargs = dict(prompt=tokens(0), max_new_tokens=3, temperature=0.0) | kwargs
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        generate(SMALL, params(), prompt, **kwargs)


def test_lm_errors():
    with pytest.raises(ValueError, match="must be integer ids"):
        LM.init(jax.random.key(0), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"token ids in \[0, 300\] must lie in \[0, 256\)"):
        LM.init(jax.random.key(0), jnp.array([[0, 300]]))
    with pytest.raises(ValueError, match="num_layers=0"):
        LM.clone(num_layers=0).init(jax.random.key(0), tokens(0))
