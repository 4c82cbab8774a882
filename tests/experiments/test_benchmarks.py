"""The benchmarks time what training runs: forward + backward of a scalar loss, forward kept.

No speed is asserted here; what is checked is that the programs a benchmark compares do the
work it claims (their matrix products in the compiled HLO), on small shapes.
"""

import jax
import jax.numpy as jnp
import pytest

from efflax.curves import program_stats
from efflax.curves import training_step
from experiments import bench_attention
from experiments import bench_moe
from experiments import bench_monarch


def _xw(n=64, tokens=32):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (tokens, n))
    w = jax.random.normal(keys[1], (n, n))
    cotangent = jax.random.normal(keys[2], (tokens, n))
    return x, w, cotangent


def test_a_training_step_keeps_the_forward_product_that_a_vjp_drops():
    x, w, cotangent = _xw()
    step = training_step(lambda x, w: x @ w, argnums=(0, 1))
    loss, (dx, dw) = step(x, w, cotangent)
    assert program_stats(step, x, w, cotangent).dots == 3  # forward, dx, dW
    assert jnp.allclose(loss, jnp.sum((x @ w) * cotangent), rtol=1e-5)
    assert jnp.allclose(dw, x.T @ cotangent, rtol=1e-4, atol=1e-4)
    # What the old benchmark timed: XLA drops the unused forward, so the check can fail.
    vjp_only = jax.jit(lambda x, w, dy: jax.vjp(lambda x, w: x @ w, x, w)[1](dy))
    assert program_stats(vjp_only, x, w, cotangent).dots == 2


def test_program_stats_counts_flops_on_cpu():
    x, w, cotangent = _xw()
    stats = program_stats(training_step(lambda x, w: x @ w, argnums=(0, 1)), x, w, cotangent)
    assert stats.flops is not None and stats.flops >= 3 * 2 * 32 * 64 * 64


@pytest.mark.parametrize("nblocks", [4, "sqrt"])
def test_bench_monarch_compares_steps_that_keep_their_forward(nblocks):
    rows = bench_monarch.bench(sizes=(256,), nblocks_options=(nblocks,), tokens=256, rounds=1)
    (row,) = rows
    assert row["timed_flop_ratio"] <= row["flop_ratio"]
    assert row["xla_rel_err"] < 1e-4


def test_bench_monarch_flops_count_the_recomputed_product():
    plain = bench_monarch.monarch_step_flops((4, 16, 16), (4, 16, 16), 8, recompute=False)
    chunked = bench_monarch.monarch_step_flops((4, 16, 16), (4, 16, 16), 8, recompute=True)
    assert plain["step"] == 3 * plain["fwd"]
    assert chunked["step"] == plain["step"] + plain["fwd"] // 2


@pytest.mark.parametrize("causal", [False, True])
def test_bench_attention_times_a_step_with_its_forward(causal):
    q, k, v, do = bench_attention.random_qkv(jax.random.key(0), 1, 64, 2, 32, jnp.float32)
    fn = bench_attention.make_attention("efflax_xla", causal=causal, head_dim=32, interpret=True)
    step = bench_attention.forward_backward(fn)
    # forward: q k^T and p v; backward: dv, dp, dq, dk
    assert program_stats(step, q, k, v, do).dots >= 6
    loss, grads = step(q, k, v, do)
    assert jnp.isfinite(loss) and len(grads) == 3


def test_bench_moe_steps_keep_their_products():
    rows = bench_moe.bench(batch=2, tokens=16, d=16, hidden=16, num_experts=4, rounds=1)
    names = {row[1] for row in rows}
    assert {"dense", "expert_choice/gather", "top2/einsum"} <= names
    dense = next(row for row in rows if row[1] == "dense")
    assert dense[5] == 1.0  # FLOP ratio of the dense step to itself, from XLA's count


def test_bench_monarch_products_alone_keep_all_seven_products():
    step, args = bench_monarch.products_only((4, 16, 16), (4, 16, 16), 32, jnp.float32)
    assert program_stats(step, *args).dots >= 7
    y, dw1, dw2, dx = step(*args)
    assert y.shape == (4, 32, 16) and dw1.shape == (4, 16, 16) and dx.shape == (4, 32, 16)
