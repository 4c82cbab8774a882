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
(analytic FLOPs at the chip's 197 TFLOP/s bf16 peak) is shown as the lower bound it is. Monarch runs its XLA implementation
(``implementation='xla'``): the numbers say what XLA's own fusion of the two block-diagonal
products would cost on the chip, the path ``'auto'`` takes where no TPU kernel applies.

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

from efflax.curves import training_step  # noqa: E402
from efflax.nn import DenseFeedForward  # noqa: E402
from efflax.nn import MoEFeedForward  # noqa: E402
from efflax.nn import monarch_shapes  # noqa: E402
from experiments.bench_monarch import nblocks_for  # noqa: E402
from pallas_kernels import monarch_matmul  # noqa: E402

CHIP = "v5e:1x1"


def tpu_chip():
    """One compile-only TPU v5e device, or None (with the reason) where libtpu is missing."""
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=CHIP, platform="tpu").devices[0], ""
    except Exception as e:  # noqa: BLE001 - any failure here means: no libtpu to compile with
        return None, f"{type(e).__name__}: {e}"[:200]


def estimate(fn, args, device) -> dict[str, float]:
    """XLA's cost estimate of ``jit(fn)(*args)`` compiled for ``device``."""
    mesh = Mesh(np.asarray([device]), ("x",))
    sharding = NamedSharding(mesh, PartitionSpec())
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), args)
    compiled = jax.jit(fn).lower(*specs).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes": float(cost.get("bytes accessed", float("nan"))),
        "seconds": float(cost.get("optimal_seconds", float("nan"))),
        "temp_bytes": float(compiled.memory_analysis().temp_size_in_bytes),
    }


V5E_PEAK_FLOPS = 197e12  # bf16 dense, vendor spec sheet (shared/TPU-WITHOUT-TPU.md)


def monarch_rows(device, sizes, tokens: int) -> list[dict]:
    dtype = jnp.bfloat16
    rows = []
    for n in sizes:
        x = jax.ShapeDtypeStruct((tokens, n), dtype)
        dense = estimate(
            training_step(lambda x, w: x @ w, argnums=(0, 1)),
            (x, jax.ShapeDtypeStruct((n, n), dtype), x),
            device,
        )
        dense["analytic_flops"] = 6.0 * tokens * n * n
        for option in (4, "sqrt"):
            nb = nblocks_for(n, option)
            w1, w2 = monarch_shapes(n, n, nb)
            layer = lambda x, w1, w2: monarch_matmul(x, w1, w2, implementation="xla")
            args = (x, jax.ShapeDtypeStruct(w1, dtype), jax.ShapeDtypeStruct(w2, dtype), x)
            monarch = estimate(training_step(layer, argnums=(0, 1, 2)), args, device)
            monarch["analytic_flops"] = 6.0 * tokens * (math.prod(w1) + math.prod(w2))
            rows.append({"layer": f"Monarch n={n} nblocks={nb}", "base": dense, "ours": monarch})
            print(_line(rows[-1]), flush=True)
    return rows


def moe_rows(device, *, batch: int, tokens: int, d: int, hidden: int, experts: int) -> list[dict]:
    x = jnp.zeros((batch, tokens, d), jnp.bfloat16)
    layers = {
        "dense": DenseFeedForward(2 * hidden, dtype=jnp.bfloat16),
        "expert_choice": MoEFeedForward(
            hidden=hidden,
            num_experts=experts,
            router="expert_choice",
            capacity_factor=2.0,
            dtype=jnp.bfloat16,
        ),
    }
    results = {}
    # both: two products of [tokens, d] x [d, 2h] forward (expert choice: 2 slots per token of
    # width h), three times that for the step; the router's products are not counted
    active = 6.0 * 2 * batch * tokens * d * 2 * hidden
    for name, layer in layers.items():
        params = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
        loss = lambda p, x, layer=layer: jnp.mean(
            jnp.square(layer.apply({"params": p}, x).astype(jnp.float32))
        )
        step = jax.value_and_grad(loss, argnums=(0, 1))
        results[name] = estimate(step, (params, jax.ShapeDtypeStruct(x.shape, x.dtype)), device)
        results[name]["analytic_flops"] = active
    row = {
        "layer": f"expert choice MoE (E={experts}, capacity 2) vs dense FFN 2h, "
        f"{batch}x{tokens} tokens, d={d}, h={hidden}",
        "base": results["dense"],
        "ours": results["expert_choice"],
    }
    print(_line(row), flush=True)
    return [row]


def _seconds(cost: dict) -> str:
    return f"{cost['seconds'] * 1e3:.3f}" if cost["seconds"] >= 0 else "n/a"


def _flops(cost: dict) -> str:
    flag = " (below analytic)" if cost["flops"] < 0.99 * cost["analytic_flops"] else ""
    return f"{cost['flops'] / 1e9:.1f}{flag}"


def _line(row: dict) -> str:
    base, ours = row["base"], row["ours"]
    return (
        f"{row['layer']}: XLA est. {_seconds(ours)} ms vs {_seconds(base)} ms; analytic FLOPs "
        f"{base['analytic_flops'] / ours['analytic_flops']:.1f}x fewer; XLA GFLOP {_flops(ours)}"
        f" vs {_flops(base)}; MB accessed {ours['bytes'] / 1e6:.0f} vs {base['bytes'] / 1e6:.0f}"
    )


def markdown_table(rows: list[dict]) -> str:
    header = [
        "training step (bf16, one v5e chip)",
        "XLA est. ms",
        "baseline XLA est. ms",
        "analytic GFLOP",
        "baseline analytic GFLOP",
        "roofline ms (analytic FLOPs / peak)",
        "baseline roofline ms",
        "XLA GFLOP",
        "baseline XLA GFLOP",
        "XLA MB accessed",
        "baseline XLA MB accessed",
        "temp MiB",
        "baseline temp MiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        b, o = r["base"], r["ours"]
        cells = [
            r["layer"],
            _seconds(o),
            _seconds(b),
            f"{o['analytic_flops'] / 1e9:.1f}",
            f"{b['analytic_flops'] / 1e9:.1f}",
            f"{o['analytic_flops'] / V5E_PEAK_FLOPS * 1e3:.3f}",
            f"{b['analytic_flops'] / V5E_PEAK_FLOPS * 1e3:.3f}",
            _flops(o),
            _flops(b),
            f"{o['bytes'] / 1e6:.0f}",
            f"{b['bytes'] / 1e6:.0f}",
            f"{o['temp_bytes'] / 2**20:.0f}",
            f"{b['temp_bytes'] / 2**20:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
