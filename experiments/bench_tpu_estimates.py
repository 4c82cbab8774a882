"""TPU view of the layer benchmarks: XLA's cost estimate of a training step on one TPU v5e chip.

The same comparisons as ``bench_monarch`` (dense vs Monarch, nblocks 4 and ~sqrt(n)) and
``bench_moe`` (dense FFN vs expert-choice MoE of the same active FLOPs), each a training step
(``efflax.curves.training_step``: loss value and gradients, forward kept), compiled for a
compile-only TPU v5e chip from libtpu (``shared/TPU-WITHOUT-TPU.md``) without a TPU. Reported per
step: XLA's FLOP and byte counts and its ``optimal_seconds`` estimate beside the analytic FLOPs
of the step. These are **XLA's estimates, not measurements**, and on this libtpu they are
incomplete for whole steps: ``optimal_seconds`` is negative where a fusion has no estimate (a
-1 s sentinel per such fusion; shown as "n/a") and the FLOP count can miss batched products
inside fusions (a count below the analytic one is flagged). The analytic roofline time
(analytic FLOPs at the chip's 197 TFLOP/s bf16 peak) is shown as the lower bound it is. Monarch
runs its XLA implementation (``implementation='xla'``): the numbers say what XLA's own fusion of
the two block-diagonal products would cost on the chip, the path ``'auto'`` takes where no TPU
kernel applies.

Needs libtpu (the ``.venv-xla`` environment: ``make plan-env``, or ``pip install
'efflax[tpu]'``); elsewhere it says so and exits 0.

    python -m experiments.bench_tpu_estimates           # n in {1024, 4096, 8192}, 8192 tokens
    python -m experiments.bench_tpu_estimates --quick   # n in {1024, 4096}
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from efflax import curves  # noqa: E402
from efflax.nn import DenseFeedForward  # noqa: E402
from efflax.nn import MoEFeedForward  # noqa: E402
from efflax.nn import monarch_shapes  # noqa: E402
from experiments.bench_monarch import nblocks_for  # noqa: E402
from pallas_kernels import monarch_matmul  # noqa: E402

CHIP = "v5e:1x1"
V5E_PEAK_FLOPS = 197e12  # bf16 dense, vendor spec sheet (shared/TPU-WITHOUT-TPU.md)
# per training step, each for efflax's layer and then for its baseline
COLUMNS = ("XLA est. ms", "analytic GFLOP", "roofline ms (analytic FLOPs / peak)", "XLA GFLOP",
           "XLA MB accessed", "temp MiB")  # fmt: skip


def tpu_chip():
    """One compile-only TPU v5e device, or None (with the reason) where libtpu is missing."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=CHIP, platform="tpu").devices[0], ""
    except Exception as e:  # noqa: BLE001 - any failure here means: no libtpu to compile with
        return None, f"{type(e).__name__}: {e}"[:200]


def estimate(fn, args, device, analytic_flops: float) -> list[str]:
    """The cells of :data:`COLUMNS` for ``jit(fn)(*args)`` compiled for ``device``: XLA's cost
    estimate (``program_stats``) beside the analytic FLOPs of the step."""
    sharding = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    stats = curves.program_stats(jax.jit(fn), *specs)
    seconds, flops = stats.optimal_seconds, stats.flops
    flag = " (below analytic)" if flops is not None and flops < 0.99 * analytic_flops else ""
    return [
        "n/a" if seconds is None or seconds < 0 else f"{seconds * 1e3:.3f}",
        f"{analytic_flops / 1e9:.1f}",
        f"{analytic_flops / V5E_PEAK_FLOPS * 1e3:.3f}",
        "n/a" if flops is None else f"{flops / 1e9:.1f}{flag}",
        f"{stats.bytes_accessed / 1e6:.0f}",
        f"{stats.temp_bytes / 2**20:.0f}",
    ]


def monarch_rows(device, sizes, tokens: int) -> list[tuple]:
    dtype = jnp.bfloat16
    rows = []
    for n in sizes:
        x = jax.ShapeDtypeStruct((tokens, n), dtype)
        dense_step = curves.training_step(lambda x, w: x @ w, argnums=(0, 1))
        dense_args = (x, jax.ShapeDtypeStruct((n, n), dtype), x)
        dense = estimate(dense_step, dense_args, device, analytic_flops=6.0 * tokens * n * n)
        for option in (4, "sqrt"):
            nb = nblocks_for(n, option)
            w1, w2 = monarch_shapes(n, n, nb)
            layer = lambda x, w1, w2: monarch_matmul(x, w1, w2, implementation="xla")
            args = (x, jax.ShapeDtypeStruct(w1, dtype), jax.ShapeDtypeStruct(w2, dtype), x)
            flops = 6.0 * tokens * (math.prod(w1) + math.prod(w2))
            monarch = estimate(curves.training_step(layer, argnums=(0, 1, 2)), args, device, flops)
            rows.append(_progress((f"Monarch n={n} nblocks={nb}", monarch, dense)))
    return rows


def moe_rows(device, *, batch: int, tokens: int, d: int, hidden: int, experts: int) -> list[tuple]:
    x = jnp.zeros((batch, tokens, d), jnp.bfloat16)
    moe = MoEFeedForward(hidden=hidden, num_experts=experts, router="expert_choice",
                         capacity_factor=2.0, dtype=jnp.bfloat16)  # fmt: skip
    # both: two products of [tokens, d] x [d, 2h] forward (expert choice: 2 slots per token of
    # width h), three times that for the step; the router's products are not counted
    active = 6.0 * 2 * batch * tokens * d * 2 * hidden
    cells = []
    for layer in (moe, DenseFeedForward(2 * hidden, dtype=jnp.bfloat16)):
        params = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
        loss = lambda p, x, layer=layer: jnp.mean(
            jnp.square(layer.apply({"params": p}, x).astype(jnp.float32))
        )
        step = jax.value_and_grad(loss, argnums=(0, 1))
        cells.append(estimate(step, (params, x), device, active))
    name = f"expert choice MoE (E={experts}, capacity 2) vs dense FFN 2h, {batch}x{tokens} tokens"
    return [_progress((f"{name}, d={d}, h={hidden}", *cells))]


def _progress(row: tuple) -> tuple:
    """Prints the row's estimated time and FLOPs as it is compiled, and returns it."""
    layer, ours, base = row
    line = f"{layer}: XLA est. {ours[0]} vs {base[0]} ms; XLA GFLOP {ours[3]} vs {base[3]}"
    print(line, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {1024, 4096}")
    args = parser.parse_args(argv)
    device, why = tpu_chip()
    if device is None:
        print(f"no libtpu to compile for TPU here ({why}); run it in .venv-xla (make plan-env)")
        return
    sizes = (1024, 4096) if args.quick else (1024, 4096, 8192)
    print(f"compiling for {device.device_kind} (compile-only, {CHIP}); jax {jax.__version__}")
    rows = monarch_rows(device, sizes, tokens=8192)
    rows += moe_rows(device, batch=32, tokens=128, d=256, hidden=256, experts=8)
    print(
        "\nXLA's cost estimates for a training step (loss value + gradients), not measurements;"
        " n/a: XLA gave no time estimate"
    )
    header = ["training step (bf16, one v5e chip)"]
    header += [title for column in COLUMNS for title in (column, f"baseline {column}")]
    cells = [
        [layer, *(c for pair in zip(ours, base, strict=True) for c in pair)]
        for layer, ours, base in rows
    ]
    print(curves.markdown_table(header, cells))


if __name__ == "__main__":
    main()
