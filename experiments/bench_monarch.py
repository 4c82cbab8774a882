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
import itertools
import math
import platform

import jax
import jax.numpy as jnp

from efflax import curves
from efflax.nn import monarch_shapes
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


def monarch_step_flops(w1_shape, w2_shape, rows: int, *, recompute: bool) -> dict[str, int]:
    """FLOPs (a multiply-add is 2) of the forward of ``rows`` rows and of a training step as the
    XLA path runs it: 2 forward products, 4 backward ones (dx and dW of each factor), plus the
    first product again where the backward recomputes it per row chunk (``recompute``)."""
    first = 2 * rows * math.prod(w1_shape)
    forward = first + 2 * rows * math.prod(w2_shape)
    return {"fwd": forward, "step": 3 * forward + (first if recompute else 0)}


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
    shapes = ((k, tokens, p), (l, tokens, s), w1_shape, w2_shape)
    xt, dyt, w1, w2 = (
        jax.random.normal(*ks).astype(dtype) for ks in zip(keys, shapes, strict=True)
    )
    step, args = jax.jit(products), (xt, xt + 0, dyt, w1, w2)
    assert curves.program_stats(step, *args).dots >= 7, "the products-only program lost a product"
    return step, args


def bench(sizes=(1024, 4096), nblocks_options=(4, "sqrt"), tokens: int = 2048, *, rounds=9):
    """One row per (n, nblocks): FLOP ratios, relative errors and median ms (wall and CPU)."""
    on_gpu = is_gpu()
    dtype, tol = (jnp.bfloat16, 2e-2) if on_gpu else (jnp.float32, 1e-4)
    paths = {"xla": XlaMonarch()}
    if on_gpu:
        paths["pallas"] = PallasTritonMonarch(interpret=False)
    rows = []
    for n, option in itertools.product(sizes, nblocks_options):
        nb = nblocks_for(n, option)
        w1_shape, w2_shape = monarch_shapes(n, n, nb)
        keys = jax.random.split(jax.random.key(n), 5)
        x, cotangent = (jax.random.normal(key, (tokens, n)).astype(dtype) for key in keys[:2])
        kernel = (jax.random.normal(keys[2], (n, n)) / math.sqrt(n)).astype(dtype)
        w1 = (jax.random.normal(keys[3], w1_shape) / math.sqrt(w1_shape[2])).astype(dtype)
        w2 = (jax.random.normal(keys[4], w2_shape) / math.sqrt(w2_shape[2])).astype(dtype)
        check, w1_32, w2_32 = (a.astype(jnp.float32) for a in (x[:256], w1, w2))
        reference = monarch_matmul_reference(check, w1_32, w2_32)
        dense_equivalent = check @ monarch_to_dense(w1_32, w2_32)
        assert curves.relative_error(reference, dense_equivalent) < 1e-4, "reference != dense"
        chunk = paths["xla"].resolved_row_chunk(w1_shape, w2_shape)
        flops = monarch_step_flops(w1_shape, w2_shape, tokens, recompute=chunk is not None)
        row = {
            "n": n,
            "nblocks": nb,
            "tokens": tokens,
            "dtype": jnp.dtype(dtype).name,
            "flop_ratio": 2 * tokens * n * n / flops["fwd"],
            "timed_flop_ratio": 6 * tokens * n * n / flops["step"],
            "xla_row_chunk": chunk,
        }
        dense_step = curves.training_step(lambda x, w: x @ w, argnums=(0, 1))
        steps = {"dense": (dense_step, (x, kernel, cotangent))}
        for name, impl in paths.items():
            layer = lambda x, w1, w2, impl=impl: monarch_matmul(x, w1, w2, implementation=impl)
            err = curves.relative_error(jax.jit(layer)(x[:256], w1, w2), reference)
            if not err < tol:
                raise AssertionError(f"{name} path n={n} nblocks={nb}: rel err {err:.2e}")
            row[f"{name}_rel_err"] = err
            steps[name] = (curves.training_step(layer, argnums=(0, 1, 2)), (x, w1, w2, cotangent))
        # Each step keeps its products: dense forward, dx, dW; Monarch 2 forward and 4 backward.
        for name, (step, args) in steps.items():
            dots = curves.program_stats(step, *args).dots
            assert dots >= (3 if name == "dense" else 6), f"the {name} step lost a product"
        if not on_gpu and chunk is not None:
            steps["products"] = products_only(w1_shape, w2_shape, tokens, dtype)
        times = curves.interleaved_times(steps, rounds=rounds, warmup=2)
        row["rounds"] = len(times["dense"])
        for name, t in times.items():
            row[f"{name}_ms"], row[f"{name}_cpu_ms"] = t.median() * 1e3, t.median("cpu") * 1e3
        for name in paths:
            row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]
            row[f"{name}_cpu_speedup"] = row["dense_cpu_ms"] / row[f"{name}_cpu_ms"]
            row[f"{name}_efficiency"] = row[f"{name}_cpu_speedup"] / row["flop_ratio"]
        shown = [
            f"{name} {row[f'{name}_ms']:.1f} ms (cpu {row[f'{name}_cpu_ms']:.1f})" for name in times
        ]
        if "products" in times:  # the rest of the xla step is layout work around the products
            row["products_bound"] = row["dense_cpu_ms"] / row["products_cpu_ms"]
            shown.append(f"layout work {1 - row['products_cpu_ms'] / row['xla_cpu_ms']:.0%} of xla")
        print(f"n={n} nblocks={nb}: {', '.join(shown)}", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    paths = [p for p in ("xla", "pallas") if rows and f"{p}_ms" in rows[0]]
    header = ["n", "nblocks", "FLOP ratio", "timed FLOP ratio", "dense step ms (cpu)"]
    formats = [None, None, "{:.0f}", "{:.1f}", None]
    for p in paths:
        header += [f"{p} step ms (cpu)", "x wall", "x cpu time", "efficiency"]
        formats += [None, "{:.2f}", "{:.2f}", "{:.2f}"]
    header += ["products alone ms (cpu)", "x bound"]
    formats += ["{:.1f}", "{:.2f}"]
    cells = []
    for r in rows:
        ms = lambda name, r=r: f"{r[f'{name}_ms']:.1f} ({r[f'{name}_cpu_ms']:.1f})"
        cell = [r["n"], r["nblocks"], r["flop_ratio"], r["timed_flop_ratio"], ms("dense")]
        for p in paths:
            cell += [ms(p), r[f"{p}_speedup"], r[f"{p}_cpu_speedup"], r[f"{p}_efficiency"]]
        cells.append(cell + [r.get("products_cpu_ms"), r.get("products_bound")])
    return curves.markdown_table(header, cells, formats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n in {1024, 4096}, fewer rounds")
    quick = parser.parse_args(argv).quick
    rows = bench(sizes=(1024, 4096) if quick else (1024, 4096, 8192), rounds=5 if quick else 15)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"\ndevice: {device}, {platform.processor() or ''}")
    print(f"jax {jax.__version__}, dtype {rows[0]['dtype']}, tokens {rows[0]['tokens']}")
    if not is_gpu():
        print("pallas path not timed on CPU: interpret mode is an emulator, not a timing")
    print(f"xla path row chunks: {sorted({str(r['xla_row_chunk']) for r in rows})}")
    print("x = dense step time / Monarch step time, medians of interleaved rounds in one process")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
