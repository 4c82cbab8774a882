"""Benchmark: a training step through a Monarch layer vs through a dense layer of the same size.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
arXiv 2204.00595 (2022). Square layers n -> n over a batch of tokens. Both sides time the same
kind of work, the forward and backward of a scalar loss of the layer's output
(``efflax.curves.training_step``: loss value and gradients for the input and the weights), and
each compiled program is checked to keep its forward (``program_stats``: the dense step has its 3
products; timed as ``vjp(f)(dy)`` XLA would drop the dense forward and not Monarch's). Each
Monarch path is checked against the reference (and the reference against the dense matrix it
stands for) before it is timed; timing is round-robin over dense and Monarch
(``efflax.curves.interleaved_times``: wall and process-CPU medians of the same rounds).

FLOPs: ``FLOP ratio`` is dense / Monarch for the layer's forward (nblocks / 2 for square layers,
the number the paper's speed-ups are measured against); ``timed FLOP ratio`` is the ratio of the
work actually timed (dense: forward, dx, dW = 3 products; Monarch: 2 forward products, 4 backward
products, plus the first product again where the XLA path recomputes it per row chunk).
``efficiency`` = speed-up / FLOP ratio.

On CPU the Pallas kernel would run in interpret mode, which is not a timing: only the XLA path
is timed there. On GPU the inputs are bfloat16 and both paths are timed.

    python -m experiments.bench_monarch            # n in {1024, 4096, 8192}, 2048 tokens
    python -m experiments.bench_monarch --quick    # n in {1024, 4096}, 2048 tokens, fewer rounds
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from efflax.curves import interleaved_times
from efflax.curves import program_stats
from efflax.curves import training_step
from efflax.nn import monarch_shapes
from experiments._flops import monarch_step_flops
from pallas_kernels import PallasTritonMonarch
from pallas_kernels import XlaMonarch
from pallas_kernels import monarch_matmul
from pallas_kernels import monarch_matmul_reference
from pallas_kernels import monarch_to_dense
from pallas_kernels._compat import is_gpu
from pallas_kernels.monarch.reference import einsum
from pallas_kernels.monarch.reference import einsum32


def nblocks_for(n: int, nblocks: str | int) -> int:
    """'sqrt' -> the largest power of two <= sqrt(n) (sqrt(n) itself when n is an even power)."""
    if nblocks == "sqrt":
        return 2 ** int(math.floor(math.log2(math.isqrt(n))))
    return int(nblocks)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def products_only(w1_shape, w2_shape, tokens: int, dtype):
    """The XLA path's products alone: the step's 7 batched einsums (forward 2, the recomputed
    first product, backward 4) on inputs already in block-major layout, with no layout copies.
    Dense time over this time is the speed-up the products allow: the bound that layout work
    (``[rows, blocks*width] <-> [blocks, rows, width]`` and the permutation) eats into."""
    k, q, p = w1_shape
    l, s, r = w2_shape

    def products(xt, xt_again, dyt, w1, w2):
        h = einsum("jcp,jqp->jcq", xt, w1)
        z = h.reshape(l, tokens, r)  # a bitcast stands in for the permutation (no copy)
        y = einsum("lcr,lsr->lcs", z, w2)
        # recomputed in the backward (from a second buffer: XLA would merge it with h)
        z2 = einsum("jcp,jqp->jcq", xt_again, w1).reshape(l, tokens, r)
        dw2 = einsum32("lcs,lcr->lsr", dyt, z2)
        dh = einsum("lcs,lsr->lcr", dyt, w2).reshape(k, tokens, q)
        dw1 = einsum32("jcq,jcp->jqp", dh, xt)
        dx = einsum("jcq,jqp->jcp", dh, w1)
        return y, dw1, dw2, dx

    keys = jax.random.split(jax.random.key(0), 4)
    xt = jax.random.normal(keys[0], (k, tokens, p), jnp.float32).astype(dtype)
    args = (
        xt,
        xt + 0,
        jax.random.normal(keys[1], (l, tokens, s), jnp.float32).astype(dtype),
        jax.random.normal(keys[2], w1_shape, jnp.float32).astype(dtype),
        jax.random.normal(keys[3], w2_shape, jnp.float32).astype(dtype),
    )
    step = jax.jit(products)
    assert program_stats(step, *args).dots >= 7, "the products-only program lost a product"
    return step, args


def bench(sizes=(1024, 4096), nblocks_options=(4, "sqrt"), tokens: int = 2048, *, rounds=9):
    on_gpu = is_gpu()
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    tol = 2e-2 if on_gpu else 1e-4
    rows = []
    for n in sizes:
        keys = jax.random.split(jax.random.key(n), 5)
        x = jax.random.normal(keys[0], (tokens, n), jnp.float32).astype(dtype)
        cotangent = jax.random.normal(keys[1], (tokens, n), jnp.float32).astype(dtype)
        kernel = (jax.random.normal(keys[2], (n, n)) / math.sqrt(n)).astype(dtype)
        dense_step = training_step(lambda x, w: x @ w, argnums=(0, 1))
        dense_args = (x, kernel, cotangent)
        assert program_stats(dense_step, *dense_args).dots >= 3, "the dense step lost a product"
        dense_flops = 6 * tokens * n * n
        for option in nblocks_options:
            nb = nblocks_for(n, option)
            w1_shape, w2_shape = monarch_shapes(n, n, nb)
            w1 = (jax.random.normal(keys[3], w1_shape) / math.sqrt(w1_shape[2])).astype(dtype)
            w2 = (jax.random.normal(keys[4], w2_shape) / math.sqrt(w2_shape[2])).astype(dtype)
            check = x[:256].astype(jnp.float32)
            w1_32, w2_32 = w1.astype(jnp.float32), w2.astype(jnp.float32)
            ref32 = monarch_matmul_reference(check, w1_32, w2_32)
            dense_equiv = check @ monarch_to_dense(w1_32, w2_32)
            assert _rel_err(ref32, dense_equiv) < 1e-4, "reference != its dense matrix"
            xla = XlaMonarch()
            chunk = xla.resolved_row_chunk(w1_shape, w2_shape)
            paths = {"xla": xla}
            if on_gpu:
                paths["pallas"] = PallasTritonMonarch(interpret=False)
            flops = monarch_step_flops(w1_shape, w2_shape, tokens, recompute=chunk is not None)
            row = {
                "n": n,
                "nblocks": nb,
                "tokens": tokens,
                "dtype": jnp.dtype(dtype).name,
                "flop_ratio": 2 * tokens * n * n / flops["fwd"],
                "timed_flop_ratio": dense_flops / flops["step"],
                "xla_row_chunk": chunk,
            }
            steps = {"dense": (dense_step, dense_args)}
            for name, impl in paths.items():
                layer = lambda x, w1, w2, impl=impl: monarch_matmul(x, w1, w2, implementation=impl)
                got = jax.jit(layer)(x[:256], w1, w2)
                err = _rel_err(got, ref32)
                if not err < tol:
                    raise AssertionError(f"{name} path n={n} nblocks={nb}: rel err {err:.2e}")
                step = training_step(layer, argnums=(0, 1, 2))
                args = (x, w1, w2, cotangent)
                assert program_stats(step, *args).dots >= 6, f"the {name} step lost a product"
                steps[name] = (step, args)
                row[f"{name}_rel_err"] = err
            if not on_gpu and chunk is not None:
                steps["products"] = products_only(w1_shape, w2_shape, tokens, dtype)
            times = interleaved_times(steps, rounds=rounds, warmup=2)
            dense_wall, dense_cpu = (
                statistics.median(times["dense"]),
                statistics.median(times["dense"].cpu),
            )
            row["dense_ms"], row["dense_cpu_ms"] = dense_wall * 1e3, dense_cpu * 1e3
            row["rounds"] = len(times["dense"])
            if "products" in times:
                products_cpu = statistics.median(times["products"].cpu)
                row["products_cpu_ms"] = products_cpu * 1e3
                row["products_bound"] = dense_cpu / products_cpu
            for name in paths:
                wall, cpu = statistics.median(times[name]), statistics.median(times[name].cpu)
                row[f"{name}_ms"], row[f"{name}_cpu_ms"] = wall * 1e3, cpu * 1e3
                row[f"{name}_speedup"] = dense_wall / wall
                row[f"{name}_cpu_speedup"] = dense_cpu / cpu
                row[f"{name}_efficiency"] = dense_cpu / cpu / row["flop_ratio"]
                print(
                    f"n={n} nblocks={nb} {name}: step {wall * 1e3:.1f} ms (cpu {cpu * 1e3:.1f}) vs "
                    f"dense {dense_wall * 1e3:.1f} ms (cpu {dense_cpu * 1e3:.1f}): "
                    f"{dense_wall / wall:.2f}x wall, {dense_cpu / cpu:.2f}x cpu time; FLOP ratio "
                    f"{row['flop_ratio']:.0f} (timed {row['timed_flop_ratio']:.1f}), efficiency "
                    f"{row[f'{name}_efficiency']:.2f}"
                    + (
                        f"; products alone {row['products_cpu_ms']:.1f} ms cpu "
                        f"(bound {row['products_bound']:.2f}x, layout work "
                        f"{1 - row['products_cpu_ms'] / (cpu * 1e3):.0%} of the step)"
                        if name == "xla" and "products_bound" in row
                        else ""
                    ),
                    flush=True,
                )
            rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    paths = [p for p in ("xla", "pallas") if rows and f"{p}_ms" in rows[0]]
    header = ["n", "nblocks", "FLOP ratio", "timed FLOP ratio", "dense step ms (cpu)"]
    for p in paths:
        header += [f"{p} step ms (cpu)", "x wall", "x cpu time", "efficiency"]
    header += ["products alone ms (cpu)", "x bound"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            str(r["n"]),
            str(r["nblocks"]),
            f"{r['flop_ratio']:.0f}",
            f"{r['timed_flop_ratio']:.1f}",
            f"{r['dense_ms']:.1f} ({r['dense_cpu_ms']:.1f})",
        ]
        for p in paths:
            cells += [
                f"{r[f'{p}_ms']:.1f} ({r[f'{p}_cpu_ms']:.1f})",
                f"{r[f'{p}_speedup']:.2f}",
                f"{r[f'{p}_cpu_speedup']:.2f}",
                f"{r[f'{p}_efficiency']:.2f}",
            ]
        if "products_bound" in r:
            cells += [f"{r['products_cpu_ms']:.1f}", f"{r['products_bound']:.2f}"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {1024, 4096}, fewer rounds")
    args = parser.parse_args(argv)
    if args.quick:
        rows = bench(sizes=(1024, 4096), rounds=5)
    else:
        rows = bench(sizes=(1024, 4096, 8192), rounds=15)
    device = jax.devices()[0]
    print()
    print(f"device: {device.device_kind} ({jax.default_backend()}), {platform.processor() or ''}")
    print(f"jax {jax.__version__}, dtype {rows[0]['dtype']}, tokens {rows[0]['tokens']}")
    if not is_gpu():
        print("pallas path not timed on CPU: interpret mode is an emulator, not a timing")
    print(f"xla path row chunks: {sorted({str(r['xla_row_chunk']) for r in rows})}")
    print("x = dense step time / Monarch step time, medians of interleaved rounds in one process")
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
