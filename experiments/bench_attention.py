"""Benchmark: efflax's Pallas FlashAttention vs XLA, cuDNN and JAX's own Pallas `mha`.

Implementations: `efflax_pallas` and `efflax_xla` (efflax's attention op, explicit
implementation), `xla` and `cudnn` (`jax.nn.dot_product_attention`), `jax_pallas_mha`.

FlashAttention (Dao et al., arXiv:2205.14135, 2022; FlashAttention-2, arXiv:2307.08691, 2023).
Every implementation is first checked against `flash_attention_reference` (output and
gradients); then forward and a training step (forward + backward of `sum(out * do)`, loss value
returned so the forward is kept: `efflax.curves.training_step`) are timed round-robin over the
implementations in one process (`efflax.curves.interleaved_times`, warm-up, medians) for
bfloat16, head_dim 64/128, seq 1k..16k, causal and not, with batch = 16k / seq and heads =
2048 / head_dim as in the FlashAttention-2 paper. FLOPs: forward
4*B*H*S*S*D (halved for causal), backward 2.5x forward. On a machine without a GPU only the
correctness check runs (interpret mode, small size).

Run: `python -m experiments.bench_attention [--seq 1024 4096] [--head-dim 128] [--json out.json]`
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import warnings

import jax
import jax.numpy as jnp

from efflax import curves
from pallas_kernels import PallasTritonAttention
from pallas_kernels import dot_product_attention
from pallas_kernels import flash_attention_reference
from pallas_kernels._compat import is_gpu

IMPLEMENTATIONS = ("efflax_pallas", "efflax_xla", "xla", "cudnn", "jax_pallas_mha")
TOKENS_PER_BATCH = 16 * 1024
HIDDEN = 2048
CHECK_TOL = {"out": 2e-2, "grad": 3e-2}  # bfloat16, relative to the largest reference entry
# `(q, k, v, do) -> (loss, (dq, dk, dv))`: forward and backward of `sum(fn(q, k, v) * do)`
forward_backward = functools.partial(curves.training_step, argnums=(0, 1, 2))


def make_attention(name: str, *, causal: bool, head_dim: int, interpret: bool):
    """The attention function `(q, k, v) -> out` of one implementation, for one setting."""
    sm_scale = 1.0 / math.sqrt(head_dim)
    if name in ("efflax_pallas", "efflax_xla"):
        impl = PallasTritonAttention(interpret=interpret) if name == "efflax_pallas" else "xla"
        return functools.partial(
            dot_product_attention, causal=causal, sm_scale=sm_scale, implementation=impl
        )
    if name in ("xla", "cudnn"):
        return functools.partial(
            jax.nn.dot_product_attention, is_causal=causal, scale=sm_scale, implementation=name
        )
    if name == "jax_pallas_mha":
        with warnings.catch_warnings():  # Pallas's Triton backend: deprecated in JAX 0.11, works
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu.attention import mha
        # mha's arguments after v are positional (custom_vjp nondiff_argnums).
        return lambda q, k, v: mha(q, k, v, None, sm_scale, causal, interpret=interpret)
    raise ValueError(f"unknown implementation {name=}; expected one of {IMPLEMENTATIONS}")


def random_qkv(key: jax.Array, batch: int, seq: int, heads: int, head_dim: int, dtype):
    shape = (batch, seq, heads, head_dim)
    return tuple(jax.random.normal(k, shape).astype(dtype) for k in jax.random.split(key, 4))


def check_against_reference(
    name: str, *, causal: bool, head_dim: int, seq: int, batch: int, heads: int, interpret: bool
) -> dict:
    """Output and gradient errors (relative to max |reference|) in bfloat16."""
    q, k, v, do = random_qkv(jax.random.key(0), batch, seq, heads, head_dim, jnp.bfloat16)
    fn = make_attention(name, causal=causal, head_dim=head_dim, interpret=interpret)
    reference = functools.partial(flash_attention_reference, causal=causal)
    error = functools.partial(curves.relative_error, norm="max")
    out_error = error(jax.jit(fn)(q, k, v), jax.jit(reference)(q, k, v))
    grads, grads_ref = (forward_backward(f)(q, k, v, do)[1] for f in (fn, reference))
    grad_error = max(map(error, grads, grads_ref))
    passed = out_error <= CHECK_TOL["out"] and grad_error <= CHECK_TOL["grad"]
    return {"out_error": out_error, "grad_error": grad_error, "passed": passed}


def run_checks(implementations, *, on_gpu: bool) -> dict[str, dict]:
    """Checks every implementation against the reference; returns results per setting."""
    size = dict(seq=512, batch=2, heads=4) if on_gpu else dict(seq=128, batch=1, heads=2)
    results = {}
    for name, head_dim, causal in itertools.product(implementations, (64, 128), (False, True)):
        key = f"{name} D={head_dim} causal={causal}"
        try:
            result = check_against_reference(
                name, causal=causal, head_dim=head_dim, interpret=not on_gpu, **size
            )
        # A boundary: the failure is reported (an efflax implementation that fails its
        # check stops the benchmark below; a baseline is skipped).
        except Exception as e:  # noqa: BLE001
            result = {"passed": False, "error": f"{type(e).__name__}: {e}"[:300]}
        results[key] = result
        detail = result.get("error") or (
            f"out err {result['out_error']:.1e}, grad err {result['grad_error']:.1e}"
        )
        print(f"check {key}: {'ok' if result['passed'] else 'FAILED'} ({detail})", flush=True)
    return results


def benchmark(seqs, head_dims, causals, implementations) -> list[dict]:
    """One row per setting: seconds (or 'OOM' / 'error') per implementation, fwd and fwd_bwd."""
    rows = []
    for head_dim, seq, causal in itertools.product(head_dims, seqs, causals):
        heads, batch = HIDDEN // head_dim, max(1, TOKENS_PER_BATCH // seq)
        q, k, v, do = random_qkv(jax.random.key(seq), batch, seq, heads, head_dim, jnp.bfloat16)
        row = dict(head_dim=head_dim, seq=seq, causal=causal, batch=batch, heads=heads)
        for label in ("fwd", "fwd_bwd"):
            seconds, runnable = row.setdefault(f"{label}_s", {}), {}
            for name in implementations:
                fn = make_attention(name, causal=causal, head_dim=head_dim, interpret=False)
                step, args = (jax.jit(fn), (q, k, v))
                if label == "fwd_bwd":
                    step, args = forward_backward(fn), (q, k, v, do)
                try:
                    jax.block_until_ready(step(*args))
                    runnable[name] = (step, args)
                # A boundary: a baseline that cannot run this shape (or runs out of memory) is a
                # result for the table. efflax's own implementations passed the reference check
                # first; for them only OOM is a result, any other failure is a bug.
                except Exception as e:  # noqa: BLE001
                    text = f"{type(e).__name__}: {e}"
                    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
                    if name.startswith("efflax_") and not oom:
                        raise
                    print(f"  {name} {label} D={head_dim} S={seq}: {e!s:.300}", flush=True)
                    seconds[name] = "OOM" if oom else "error"
            if runnable:
                times = curves.interleaved_times(runnable, rounds=20, warmup=2)
                seconds.update({name: t.median() for name, t in times.items()})
        shown = " ".join(
            f"{name}/{label}={_shown(_tflops(row, label, name))}"
            for label in ("fwd", "fwd_bwd")
            for name in row[f"{label}_s"]
        )
        print(f"D={head_dim} S={seq} causal={causal}: {shown} TFLOP/s", flush=True)
        rows.append(row)
    return rows


def _tflops(row: dict, label: str, name: str) -> float | str | None:
    """TFLOP/s of one timing, or what stood in for it ('OOM', 'error'; None: not run)."""
    seconds = row[f"{label}_s"].get(name)
    if not isinstance(seconds, float):
        return seconds
    # forward: two matmuls of 2*S*S*D per head, halved for causal; backward 2.5x forward
    flops = 4.0 * row["batch"] * row["heads"] * row["seq"] ** 2 * row["head_dim"]
    flops *= (0.5 if row["causal"] else 1.0) * (3.5 if label == "fwd_bwd" else 1.0)
    return flops / seconds / 1e12


def _shown(value: float | str | None) -> str:
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def table(rows: list[dict], label: str, implementations) -> str:
    """TFLOP/s per implementation and the speed ratio efflax / baseline (> 1: efflax faster)."""
    baselines = [n for n in implementations if n != "efflax_pallas"]
    header = ["head_dim", "seq", "causal", "batch x heads"]
    header += [f"{n} TFLOP/s" for n in implementations] + [f"efflax / {n}" for n in baselines]
    formats = [None] * 4 + ["{:.0f}"] * len(implementations) + ["{:.2f}x"] * len(baselines)
    cells = []
    for row in rows:
        tflops = {name: _tflops(row, label, name) for name in implementations}
        ours = tflops["efflax_pallas"]
        timed = isinstance(ours, float)
        ratios = [
            ours / tflops[n] if timed and isinstance(tflops[n], float) else None for n in baselines
        ]
        setting = [row["head_dim"], row["seq"], "yes" if row["causal"] else "no"]
        cells.append([*setting, f"{row['batch']} x {row['heads']}", *tflops.values(), *ratios])
    return curves.markdown_table(header, cells, formats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    args = parser.parse_args(argv)
    on_gpu = is_gpu()
    print(f"JAX {jax.__version__}, devices: {jax.devices()}", flush=True)

    implementations = list(args.impl)
    if "efflax_pallas" not in implementations:
        implementations.insert(0, "efflax_pallas")
    checked = implementations if on_gpu else [n for n in implementations if n != "cudnn"]
    checks = run_checks(checked, on_gpu=on_gpu)
    failed = {key.split()[0] for key, result in checks.items() if not result["passed"]}
    if "efflax_pallas" in failed:
        print("efflax_pallas does not match the reference: not timing it.")
        raise SystemExit(1)
    if not on_gpu:
        print(
            f"Correctness checked on {jax.default_backend()} (interpret mode, small size): "
            f"{', '.join(n for n in checked if n not in failed)} match the reference"
            + (f"; failed: {sorted(failed)}" if failed else "")
            + ". Timings need a GPU; skipping them."
        )
        return
    timed = [n for n in implementations if n not in failed]
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    rows = benchmark(args.seq, args.head_dim, causals, timed)
    device = jax.devices()[0].device_kind
    for title, label in (("Forward", "fwd"), ("Forward + backward", "fwd_bwd")):
        print(f"\n### {title}, bf16, {device}, JAX {jax.__version__}\n")
        print(table(rows, label, timed))
    print(
        "\nTFLOP/s: forward 4*B*H*S*S*D (halved for causal), backward 2.5x forward; medians of "
        "20 interleaved rounds after warm-up; fwd+bwd = loss value and gradients (forward kept). "
        "efflax / X > 1 means efflax is faster."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checks": checks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
