"""Autoregressive sampling with a key/value cache: greedy, temperature and top-k.

One jitted program: a fixed-size cache (prompt length + new tokens) is allocated, the prompt is
run through the model in one call (prefill), then ``lax.scan`` feeds back one token per step, so
each new token costs one position of compute instead of a forward pass over the whole window.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _checks

__all__ = ["generate", "sample_logits"]


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None,
    *,
    temperature: float | jax.Array = 1.0,
    top_k: int | None = None,
    greedy: bool = False,
) -> jax.Array:
    """Draws one token id per row of ``logits [batch, vocab]`` (float32 arithmetic).

    ``greedy``: the argmax. Otherwise ``softmax(logits / temperature)`` restricted to the
    ``top_k`` largest logits (all when None).
    """
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy"))
def _generate(model, params, prompt, rng, temperature, *, max_new_tokens, top_k, greedy):
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((batch, total), jnp.int32), decode=True)
    )
    if "cache" not in shapes:
        raise ValueError(
            f"{type(model).__name__} keeps no 'cache' with decode=True: it cannot decode"
        )
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))
    rngs = jax.random.split(rng, max_new_tokens)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, greedy=greedy)

    def run(cache, tokens):
        logits, variables = model.apply(
            {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
        )
        return variables["cache"], logits[:, -1]

    cache, last_logits = run(cache, prompt)  # prefill
    first = sample(last_logits, rngs[0])

    def step(carry, step_rng):
        cache, token = carry
        cache, logits = run(cache, token[:, None])
        token = sample(logits, step_rng)
        return (cache, token), token

    _, rest = lax.scan(step, (cache, first), rngs[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: nn.Module,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """Samples ``max_new_tokens`` tokens after ``prompt`` with a key/value cache, under ``jit``.

    Args:
      model: a causal LM called as ``model.apply(variables, tokens, decode=True,
        mutable=['cache'])`` -> logits ``[batch, seq, vocab]`` that keeps its state in the
        ``'cache'`` collection (``efflax.models.TransformerLM`` does).
      params: the model's ``'params'``.
      prompt: int ``[batch, prompt_len]``, ``prompt_len >= 1``.
      max_new_tokens: tokens to sample (the cache holds ``prompt_len + max_new_tokens``).
      rng: PRNG key (needed unless ``temperature == 0``).
      temperature: ``0`` is greedy decoding (argmax); otherwise the logits are divided by it
        (finite, > 0).
      top_k: sample among the ``top_k`` most likely tokens only; None: all.

    Returns:
      int32 ``[batch, max_new_tokens]``: the sampled tokens (the prompt is not repeated).

    Example:
      >>> new = generate(lm, params, prompt_bytes[None], max_new_tokens=200, rng=key, top_k=40)
    """
    if getattr(prompt, "ndim", None) != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"prompt (shape {getattr(prompt, 'shape', None)}, dtype "
            f"{getattr(prompt, 'dtype', None)}) must be integer ids [batch, prompt_len]"
        )
    if min(prompt.shape) < 1:
        raise ValueError(f"prompt.shape={prompt.shape} must have batch and length >= 1")
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model={model!r} must be a Flax module (e.g. efflax.models.TransformerLM)"
        )
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None:
        # Inside the jitted loop an out-of-range id would read a clamped embedding row.
        _checks.indices_in_range("prompt", prompt, vocab)
    _checks.int_at_least("max_new_tokens", max_new_tokens)
    temperature = _checks.positive_float("temperature", temperature, allow_zero=True)
    if top_k is not None:
        _checks.int_at_least("top_k", top_k)
        if vocab is not None and top_k > vocab:
            raise ValueError(f"top_k={top_k} must be <= vocab_size={vocab}")
    greedy = temperature == 0.0
    if rng is not None:
        _checks.prng_key("rng", rng)
    if rng is None:
        if not greedy:
            raise ValueError(f"temperature={temperature} > 0 samples: pass rng=")
        rng = jax.random.key(0)  # unused by greedy decoding
    return _generate(
        model,
        params,
        jnp.asarray(prompt, jnp.int32),
        rng,
        jnp.float32(max(temperature, 1e-30)),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        greedy=greedy,
    )
