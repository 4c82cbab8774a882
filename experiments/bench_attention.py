"""Benchmark: efflax's Pallas FlashAttention vs XLA, cuDNN and JAX's own Pallas `mha`.

Implementations: `efflax_pallas` and `efflax_xla` (efflax's attention op, explicit
implementation), `xla` and `cudnn` (`jax.nn.dot_product_attention`), `jax_pallas_mha`.

FlashAttention (Dao et al., arXiv:2205.14135, 2022; FlashAttention-2, arXiv:2307.08691, 2023).
Every implementation is first checked against `flash_attention_reference` (output and
gradients); then forward and a training step (forward + backward of `sum(out * do)`, loss value
returned so the forward is kept: `efflax.curves.training_step`) are timed round-robin over the
implementations in one process (`efflax.curves.interleaved_times`, warm-up, medians) for bfloat16, head_dim 64/128, seq 1k..16k, causal and not, with
batch = 16k / seq and heads = 2048 / head_dim as in the FlashAttention-2 paper. FLOPs: forward
4*B*H*S*S*D (halved for causal), backward 2.5x forward. On a machine without a GPU only the
correctness check runs (interpret mode, small size).

Run: `python -m experiments.bench_attention [--seq 1024 4096] [--head-dim 128] [--json out.json]`
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from efflax.curves import interleaved_times
from efflax.curves import training_step
from pallas_kernels import PallasTritonAttention
from pallas_kernels import _compat
from pallas_kernels import dot_product_attention
from pallas_kernels import flash_attention_reference

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

IMPLEMENTATIONS = ("efflax_pallas", "efflax_xla", "xla", "cudnn", "jax_pallas_mha")
BASELINES = IMPLEMENTATIONS[1:]
TOKENS_PER_BATCH = 16 * 1024
HIDDEN = 2048
CHECK_TOL = {"out": 2e-2, "grad": 3e-2}  # bfloat16, relative to the largest reference entry


def _has_gpu() -> bool:
    return _compat.is_gpu()


def _jax_pallas_mha() -> Callable:
    # The Triton backend of Pallas is deprecated in JAX 0.11 but still works.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention

    return attention.mha


def make_attention(name: str, *, causal: bool, head_dim: int, interpret: bool) -> AttentionFn:
    """The attention function `(q, k, v) -> out` of one implementation, for one setting."""
    sm_scale = 1.0 / math.sqrt(head_dim)
    if name in ("efflax_pallas", "efflax_xla"):
        implementation = (
            PallasTritonAttention(interpret=interpret) if name == "efflax_pallas" else "xla"
        )
        return functools.partial(
            dot_product_attention, causal=causal, sm_scale=sm_scale, implementation=implementation
        )
    if name in ("xla", "cudnn"):
        return functools.partial(
            jax.nn.dot_product_attention, is_causal=causal, scale=sm_scale, implementation=name
        )
    if name == "jax_pallas_mha":
        mha = _jax_pallas_mha()
        # mha's arguments after v are positional (custom_vjp nondiff_argnums).
        return lambda q, k, v: mha(q, k, v, None, sm_scale, causal, interpret=interpret)
    raise ValueError(f"unknown implementation {name=}; expected one of {IMPLEMENTATIONS}")


def random_qkv(key: jax.Array, batch: int, seq: int, heads: int, head_dim: int, dtype):
    keys = jax.random.split(key, 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v, do = (jax.random.normal(k_, shape, jnp.float32).astype(dtype) for k_ in keys)
    return q, k, v, do


def forward_backward(fn: AttentionFn) -> Callable:
    """`(q, k, v, do) -> (loss, (dq, dk, dv))`: the training step's forward and backward of
    `sum(fn(q, k, v) * do)` (`efflax.curves.training_step`: the forward is kept)."""
    return training_step(fn, argnums=(0, 1, 2))


def _relative_error(x: jax.Array, reference: jax.Array) -> float:
    x, reference = np.asarray(x, np.float32), np.asarray(reference, np.float32)
    return float(np.max(np.abs(x - reference)) / max(np.max(np.abs(reference)), 1e-6))


def check_against_reference(
    name: str, *, causal: bool, head_dim: int, seq: int, batch: int, heads: int, interpret: bool
) -> dict:
    """Output and gradient errors (relative to max |reference|) in bfloat16."""
    q, k, v, do = random_qkv(jax.random.key(0), batch, seq, heads, head_dim, jnp.bfloat16)
    fn = make_attention(name, causal=causal, head_dim=head_dim, interpret=interpret)
    reference = functools.partial(flash_attention_reference, causal=causal)
    out = jax.jit(fn)(q, k, v)
    grads = forward_backward(fn)(q, k, v, do)[1]
    out_ref = jax.jit(reference)(q, k, v)
    grads_ref = forward_backward(reference)(q, k, v, do)[1]
    out_error = _relative_error(out, out_ref)
    grad_error = max(_relative_error(g, r) for g, r in zip(grads, grads_ref, strict=True))
    return {
        "out_error": out_error,
        "grad_error": grad_error,
        "passed": out_error <= CHECK_TOL["out"] and grad_error <= CHECK_TOL["grad"],
    }


def time_fns(fns: dict[str, tuple[Callable, tuple]], *, rounds: int = 20) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin in one process."""
    times = interleaved_times(fns, rounds=rounds, warmup=2)
    return {name: statistics.median(t) for name, t in times.items()}


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs (two matmuls of 2*S*S*D each per head), halved for causal."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


@dataclasses.dataclass
class Row:
    head_dim: int
    seq: int
    causal: bool
    batch: int
    heads: int
    fwd_s: dict[str, float | str] = dataclasses.field(default_factory=dict)
    fwd_bwd_s: dict[str, float | str] = dataclasses.field(default_factory=dict)


def _describe_error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "OOM"
    return "error"


def benchmark(seqs, head_dims, causals, implementations) -> list[Row]:
    rows = []
    for head_dim in head_dims:
        heads = HIDDEN // head_dim
        for seq in seqs:
            batch = max(1, TOKENS_PER_BATCH // seq)
            q, k, v, do = random_qkv(jax.random.key(seq), batch, seq, heads, head_dim, jnp.bfloat16)
            for causal in causals:
                row = Row(head_dim, seq, causal, batch, heads)
                for label in ("fwd", "fwd_bwd"):
                    runnable = {}
                    for name in implementations:
                        fn = make_attention(name, causal=causal, head_dim=head_dim, interpret=False)
                        timed, args = (
                            (jax.jit(fn), (q, k, v))
                            if label == "fwd"
                            else (forward_backward(fn), (q, k, v, do))
                        )
                        try:
                            jax.block_until_ready(timed(*args))
                            runnable[name] = (timed, args)
                        # A boundary: a baseline that cannot run this shape (or runs out of
                        # memory) is a result for the table. efflax's own implementations
                        # passed the reference check first; for them only OOM is a result,
                        # any other failure is a bug and propagates.
                        except Exception as e:  # noqa: BLE001
                            result = _describe_error(e)
                            if name.startswith("efflax_") and result != "OOM":
                                raise
                            print(f"  {name} {label} D={head_dim} S={seq}: {e!s:.300}", flush=True)
                            getattr(row, f"{label}_s")[name] = result
                    getattr(row, f"{label}_s").update(time_fns(runnable))
                print(_progress_line(row), flush=True)
                rows.append(row)
    return rows


def _tflops(row: Row, label: str, name: str) -> float | None:
    seconds = getattr(row, f"{label}_s").get(name)
    if not isinstance(seconds, float):
        return None
    flops = attention_flops(row.batch, row.heads, row.seq, row.head_dim, row.causal)
    if label == "fwd_bwd":
        flops *= 3.5  # forward + backward (2.5x forward)
    return flops / seconds / 1e12


def _progress_line(row: Row) -> str:
    parts = []
    for label in ("fwd", "fwd_bwd"):
        for name in getattr(row, f"{label}_s"):
            value = _tflops(row, label, name)
            shown = f"{value:.0f}" if value is not None else getattr(row, f"{label}_s")[name]
            parts.append(f"{name}/{label}={shown}")
    return f"D={row.head_dim} S={row.seq} causal={row.causal}: " + " ".join(parts) + " TFLOP/s"


def markdown_table(rows: list[Row], label: str, implementations) -> str:
    """TFLOP/s per implementation and the speed ratio efflax / baseline (> 1: efflax faster)."""
    baselines = [n for n in implementations if n != "efflax_pallas"]
    header = ["head_dim", "seq", "causal", "batch x heads"]
    header += [f"{n} TFLOP/s" for n in implementations]
    header += [f"efflax / {n}" for n in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row.head_dim), str(row.seq), "yes" if row.causal else "no"]
        cells.append(f"{row.batch} x {row.heads}")
        for name in implementations:
            value = _tflops(row, label, name)
            cells.append(
                f"{value:.0f}"
                if value is not None
                else str(getattr(row, f"{label}_s").get(name, "-"))
            )
        ours = _tflops(row, label, "efflax_pallas")
        for name in baselines:
            theirs = _tflops(row, label, name)
            cells.append(f"{ours / theirs:.2f}x" if ours and theirs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_checks(implementations, *, on_gpu: bool) -> dict[str, dict]:
    """Checks every implementation against the reference; returns results per setting."""
    size = dict(seq=512, batch=2, heads=4) if on_gpu else dict(seq=128, batch=1, heads=2)
    results = {}
    for name in implementations:
        for head_dim in (64, 128):
            for causal in (False, True):
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
                status = "ok" if result["passed"] else "FAILED"
                detail = result.get("error") or (
                    f"out err {result['out_error']:.1e}, grad err {result['grad_error']:.1e}"
                )
                print(f"check {key}: {status} ({detail})", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--json", default=None, help="also write the raw timings here")
    args = parser.parse_args(argv)
    on_gpu = _has_gpu()
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
    print(f"\n### Forward, bf16, {device}, JAX {jax.__version__}\n")
    print(markdown_table(rows, "fwd", timed))
    print(f"\n### Forward + backward, bf16, {device}, JAX {jax.__version__}\n")
    print(markdown_table(rows, "fwd_bwd", timed))
    print(
        "\nTFLOP/s: forward 4*B*H*S*S*D (halved for causal), backward 2.5x forward; "
        "medians of 20 interleaved rounds after warm-up; fwd+bwd = loss value and gradients (forward kept). efflax / X > 1 means efflax is faster."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"checks": checks, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1
            )


if __name__ == "__main__":
    sys.exit(main())
