"""Benchmark: sampling bytes from a byte LM with a key/value cache vs recomputing the window.

A small `efflax.models.TransformerLM` is trained briefly on `stdlib_text` (so it samples text,
not noise), then 200 bytes are sampled after a prompt in two ways, both one jitted program with
no recompilation:

- `cached`: `efflax.models.generate` (prefill the prompt, then one position per byte on a
  fixed-size key/value cache, `lax.scan`);
- `recompute`: the full causal forward over the whole fixed-length buffer for every byte (what a
  model without a cache must do), reading the logits at the last written position.

Greedy decoding is first checked to give the same bytes both ways. Then the two are timed
interleaved (``efflax.curves.interleaved_times``), and the bytes/s and their ratio are reported:
the ratio is meaningful on a loaded machine, the absolute rates less so.

Run: `python -m experiments.bench_generate [--quick] [--json out.json]`
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import efflax
from efflax._src.models.sampling import sample_logits
from efflax.models import TransformerLM
from efflax.models import generate


def byte_lm_loss_fn(params, state, batch, rng):
    """Next-byte cross-entropy on `batch['tokens'] [batch, seq + 1]`."""
    del rng
    tokens = jnp.asarray(batch["tokens"], jnp.int32)
    logits = state.apply_fn({"params": params}, tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, efflax.training.LossOutput(metrics={"bits_per_byte": loss / jnp.log(2.0)})


def train(model: TransformerLM, *, steps: int, seq_len: int, batch_size: int):
    """The trained parameters of `model`, after `steps` Adam steps on `stdlib_text`."""
    loader = efflax.data.load("stdlib_text", "train", batch_size, epochs=None, seq_len=seq_len)
    example = jnp.asarray(next(iter(loader))["tokens"][:, :-1], jnp.int32)
    state = efflax.training.seed_state(model, optax.adam(3e-3), seed=0, example=example)
    step = efflax.training.make_train_step(byte_lm_loss_fn)
    state, history = efflax.training.fit(
        state, step, loader, num_steps=steps, log_every=50, progress=False
    )
    for record in history:
        if "train/bits_per_byte" in record:
            print(f"step {record['step']}: {record['train/bits_per_byte']:.2f} bits/byte")
    return state.params


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k", "greedy"))
def generate_by_recomputing(
    model, params, prompt, rng, temperature=1.0, *, max_new_tokens, top_k=None, greedy=False
):
    """The same sampling without a cache: a full forward over the buffer for every token."""
    batch, prompt_len = prompt.shape
    buffer = jnp.zeros((batch, prompt_len + max_new_tokens), jnp.int32)
    buffer = buffer.at[:, :prompt_len].set(prompt)
    rngs = jax.random.split(rng, max_new_tokens)

    def body(i, buffer):
        position = prompt_len + i
        logits = model.apply({"params": params}, buffer)  # causal: later zeros do not matter
        last = lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
        token = sample_logits(last, rngs[i], temperature=temperature, top_k=top_k, greedy=greedy)
        return lax.dynamic_update_index_in_dim(buffer, token, position, axis=1)

    return lax.fori_loop(0, max_new_tokens, body, buffer)[:, prompt_len:]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and rounds")
    parser.add_argument("--new-bytes", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    steps, rounds = (150, 3) if args.quick else (600, 7)
    model = TransformerLM(num_layers=2, d_model=128, num_heads=4, implementation="xla")
    params = train(model, steps=steps, seq_len=256, batch_size=16)
    prompt_text = b"def __init__(self"
    prompt = jnp.asarray(np.frombuffer(prompt_text, np.uint8)[None], jnp.int32)
    key = jax.random.key(2)

    greedy = generate(model, params, prompt, max_new_tokens=64, temperature=0.0)
    greedy_again = generate_by_recomputing(
        model, params, prompt, key, max_new_tokens=64, greedy=True
    )
    same = bool(np.array_equal(greedy, greedy_again))
    print(f"greedy bytes identical with and without the cache: {same}")
    if not same:
        raise SystemExit("the cached and recomputed greedy samples differ: not timing")

    n = args.new_bytes
    sampling = dict(max_new_tokens=n, top_k=40)
    cached = functools.partial(
        generate, model, params, prompt, rng=key, temperature=0.8, **sampling
    )
    recompute = functools.partial(
        generate_by_recomputing, model, params, prompt, key, jnp.float32(0.8), **sampling
    )
    fns = {"cached": (cached, ()), "recompute": (recompute, ())}
    times = efflax.curves.interleaved_times(fns, rounds=rounds)
    medians = {name: t.median() for name, t in times.items()}
    rates = {name: n / seconds for name, seconds in medians.items()}
    ratio = medians["recompute"] / medians["cached"]
    sample = bytes(np.asarray(cached()[0], np.uint8)).decode("utf-8", "replace")
    print(f"sample: {prompt_text.decode()}{sample!r}")
    for name in medians:
        print(f"{name}: {rates[name]:.0f} bytes/s (median of {rounds}: {medians[name]:.3f} s)")
    device = jax.devices()[0].device_kind
    print(
        f"claim: a key/value cache makes sampling cheaper than recomputing the window | "
        f"measured: {rates['cached']:.0f} vs {rates['recompute']:.0f} bytes/s for {n} bytes, "
        f"{ratio:.1f}x (interleaved, {device})"
    )
    result = dict(new_bytes=n, prompt=prompt_text.decode(), train_steps=steps, device=device)
    result |= dict(median_seconds=medians, bytes_per_second=rates, speedup=ratio, times=times)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
