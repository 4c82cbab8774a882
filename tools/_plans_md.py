"""The ``plans`` section of BENCHMARKS.md and its plots, from tools/reference_plans.py's records."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLOTS = ROOT / "docs" / "plans"
GiB = 1024**3
SECTION = "plans"
_SHORT = {
    "all-reduce": "AR",
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _collectives(record: dict) -> str:
    parts = []
    for kind, value in sorted(record.get("collectives", {}).items()):
        short = _SHORT.get(kind, kind)
        parts.append(f"{short} {value['count']}x {value['bytes'] / 2**20:.0f}M")
    return ", ".join(parts) or "none"


def _row(record: dict) -> str:
    config = record["config"]
    variant = (
        f"FLASH c{config['chunk_size']}"
        if config["block"] == "flash"
        else f"attn {config['attention']}, mlp {config['mlp']}"
    )
    mesh = record.get("mesh") or {}
    mesh_text = "x".join(str(mesh.get(a, "?")) for a in ("data", "expert", "model"))
    how = "full" if record.get("depths") is None else "extrap."
    if "error" in record:
        return (
            f"| {record['target']} | {config['size']} b{config['batch']} s{config['seq']} | "
            f"{variant} | | {how} | not planned: {record['error'][:160]} | | | | | | | |"
        )
    fits = (
        "yes"
        if record["fits"]
        else f"**no** (+{_gib(-(record['hbm_bytes'] - record['total_bytes']))})"
    )
    time_ms = record.get("estimated_seconds")
    mfu = record.get("mfu")
    return (
        f"| {record['target']} | {config['size']} b{config['batch']} s{config['seq']} | {variant} "
        f"| {mesh_text} | {how} | {_gib(record['params_bytes'] + record['opt_state_bytes'])} "
        f"| {_gib(record['temp_bytes'])} | {_gib(record['total_bytes'])} | {fits} "
        f"| {_collectives(record)} | {record['flops'] / 1e12:.1f} "
        f"| {'-' if time_ms is None else f'{time_ms * 1e3:.0f}'}"
        f"{'' if mfu is None else f' ({100 * mfu:.0f}%)'} | {_roofline(record)} |"
    )


def _roofline(record: dict) -> str:
    seconds = record.get("roofline_seconds")
    if not seconds:
        return "-"
    bound = record["flops"] / record["chips"] / (seconds * _PEAK.get(record["chip"], 1))
    return f"{seconds * 1e3:.0f} (<= {100 * bound:.0f}%)"


_PEAK = {"TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6e": 918e12}


# What the plans of 2026-12-07 showed (read from the table above; rewrite when it changes).
FINDINGS = """
What these plans say (GPT-2-small, batch 16 x 1024, data-parallel over 8 chips):

- **(a) efflax's attention kernel on 8 H100s is not partitioned.** With the Pallas
  FlashAttention kernel the step needs less memory (total 4.59 vs 5.46 GiB per GPU: no
  `[S, S]` scores kept) but the partitioned program gains 60 all-gathers moving 1.46 GiB per GPU
  per step: XLA's SPMD partitioner cannot split a Pallas custom call, so it gathers q, k, v (and
  their gradients) of the whole global batch onto every GPU, and every GPU computes the attention
  of all 16 sequences. The kernel needs a `shard_map` over the batch axes (or a
  `custom_partitioning` rule) before it is used data-parallel. (Its FLOPs are not in the count:
  the kernel declares no cost estimate.)
- **(b) Monarch MLP (4 blocks)**: parameters + Adam state 2.13 -> 1.48 GiB per chip, matmul
  FLOPs 16.8 -> 11.1 TFLOP per step, gradient all-reduce 363 -> 252-303 MiB; temporaries do
  not shrink (activations dominate them).
- **(c) Expert-choice MoE, 8 experts over 8 chips**: 48 all-to-alls (two per layer forward,
  two backward) moving 288 MiB per chip per step, the gradient all-reduce shrinks to 202 MiB
  (expert weights are not replicated). Each expert is a quarter-width GELU MLP, so this MoE has
  fewer parameters than the dense SwiGLU: compare communication, not quality. Top-2 routing
  (causal, GShard) moves more: 360 MiB per chip per step in the same 48 all-to-alls.
- **Weak scaling on v5e (2 sequences of 1024 per chip, data-parallel)**: per-chip memory
  (4.62 GiB) and per-chip collective bytes (one 363 MiB gradient all-reduce result per step)
  are the same on 8, 64 and 256 chips; what grows with the slice is the all-reduce's span
  (its time on ICI is not in any figure here). The roofline bound is 65 ms per step (MFU at
  most 16%): XLA counts 53 GB of memory traffic per chip per step, which bounds it, not FLOPs.
- **(d) Long context, 8 x 8192 tokens on v5e-8 with XLA attention does not fit**: 42.8 GiB per
  chip against 15.75 GiB; its 40.5 GiB of temporaries are about what 12 layers of float32
  `[S, S]` attention scores take (12 x 12 heads x 8192^2 x 4 B = 36 GiB). FLASH blocks (chunk
  256) at the same length fit: 9.5 GiB per v5e chip, 8.8 GiB per H100, at half the matmul FLOPs.
- **1B (24 x 2048), 16 x 2048 tokens**: on v5e-8 with 4-way tensor parallelism it needs 26.9 GiB
  per chip (does not fit); on 8 H100s data-parallel 51.5 GiB per GPU (fits); with efflax's
  attention kernel 42.0 GiB but 168 all-gathers moving 15 GiB per GPU per step (see (a)).
- **XLA's own TPU step-time estimate is unusable here**: `optimal_seconds` came out negative
  (-64 to -92 s) for every GPT-2-width program, even at 1 and 2 layers, so no XLA time or MFU is
  shown; the roofline bound (XLA's FLOPs and bytes per chip) is the usable lower bound.
"""


def _plot(records: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    written = []
    ok = [r for r in records if "error" not in r]
    # Variants beside their baselines: per-device memory, one bar pair per plan.
    if ok:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(ok) + 1.2))
        names = [f"{r['target']}: {_short(r)}" for r in ok]
        state = [(r["params_bytes"] + r["opt_state_bytes"]) / GiB for r in ok]
        temp = [r["temp_bytes"] / GiB for r in ok]
        ys = range(len(ok))
        ax.barh(ys, state, label="params + optimizer")
        ax.barh(ys, temp, left=state, label="temporaries (XLA)")
        for y, r in zip(ys, ok, strict=True):
            total = r["total_bytes"] / GiB
            ax.text(
                total, y, f" {total:.1f} of {r['hbm_bytes'] / GiB:.4g} GiB", va="center", fontsize=6
            )
        ax.set_yticks(list(ys), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.35 * max(r["total_bytes"] / GiB for r in ok))
        ax.set_xlabel("GiB per device (label: total of the chip's memory)")
        ax.legend(fontsize=7)
        ax.set_title("efflax plan: memory per device of one AdamW step", fontsize=9)
        fig.tight_layout()
        path = PLOTS / "memory.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    weak = sorted(
        (r for r in ok if r["group"] == "weak scaling" or _is_weak_baseline(r)),
        key=lambda r: r["chips"],
    )
    weak = [r for r in weak if r["target"].startswith("v5e")]
    if len(weak) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        chips = [r["chips"] for r in weak]
        axes[0].plot(chips, [r["total_bytes"] / GiB for r in weak], "o-")
        axes[0].set_ylabel("GiB per chip")
        comm = [sum(c["bytes"] for c in r["collectives"].values()) / 2**20 for r in weak]
        axes[1].plot(chips, comm, "o-")
        axes[1].set_ylabel("collective MiB per chip per step")
        for ax in axes:
            ax.set_ylim(0, 1.25 * max(max(line.get_ydata()) for line in ax.get_lines()))
            ax.set_xscale("log", base=2)
            ax.set_xlabel("v5e chips (2 sequences of 1024 per chip)")
        fig.suptitle("GPT-2-small weak scaling on v5e slices (XLA's compiled figures)", fontsize=9)
        fig.tight_layout()
        path = PLOTS / "weak_scaling.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def _is_weak_baseline(record: dict) -> bool:
    c = record["config"]
    return (
        record["target"] == "v5e-8"
        and c["size"] == "gpt2-small"
        and c["seq"] == 1024
        and c["mlp"] == "dense"
        and c["attention"] == "xla"
        and c["block"] == "transformer"
        and record.get("depths") is not None
    )


def _short(record: dict) -> str:
    c = record["config"]
    variant = "FLASH" if c["block"] == "flash" else f"{c['attention']}/{c['mlp']}"
    depth = "" if record.get("depths") is not None else " (full)"
    return f"{c['size']} b{c['batch']} s{c['seq']} {variant}{depth}"


def write(records: list[dict], plans: list[tuple[Any, ...]], key_of: Callable[..., str]) -> None:
    from experiments._benchmarks_md import write_section

    by_key = {r["key"]: r for r in records}
    ordered = [by_key[key_of(t, c, d)] for _, t, c, d in plans if key_of(t, c, d) in by_key]
    missing = [(g, t, c, d) for g, t, c, d in plans if key_of(t, c, d) not in by_key]
    plots = _plot(ordered)
    versions = next((r["versions"] for r in ordered if "versions" in r), {})
    dates = sorted(r["date"] for r in ordered if "date" in r)
    lines = [
        f"## Plans: will it fit? (`efflax plan`, 2-core CPU shared with other jobs, "
        f"{dates[0][:10] if dates else '-'})",
        "",
        "One AdamW step (bf16 compute, float32 parameters and Adam state, cross-entropy over the "
        "vocabulary) of efflax's `TransformerLM`, compiled for each target **without the "
        "hardware**: `make plans` (tools/reference_plans.py), versions "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ". Per device: *state* = parameters + optimizer state (exact, from the sharded "
        "abstract state), *temp* = XLA's temporaries, *total* = what XLA allocates (arguments + "
        "outputs not donated + temporaries + code) against the chip's memory; *collectives* = "
        "ops and result MiB per device per step in the partitioned program (AR all-reduce, AG "
        "all-gather, RS reduce-scatter, A2A all-to-all, CP collective-permute); *TFLOPs* = matrix-product FLOPs of the "
        "whole step, all chips (Pallas kernels without a cost estimate are not counted); "
        "*time* = XLA's own cost-model estimate of the step on TPU and the MFU it implies (not a "
        "measurement; XLA gives none for GPU targets, and for every GPT-2-size step here it "
        "came out negative, so it is not shown); *roofline* = a lower bound on the TPU step "
        "time, XLA's per-device FLOPs at peak or its bytes accessed at HBM bandwidth, whichever "
        "is slower, with no communication, and the MFU ceiling it implies.",
        "",
        "**How deep the compiles are**: on these 2 shared cores a 12-layer step takes ~6-30 min "
        "to compile, so most plans (*extrap.*) compile the model at 1 and 2 layers and take every "
        "compiled figure linearly to the full depth (`plan_lm(..., depths=(1, 2))`); state "
        "bytes and FLOPs are exact at full depth. Rows marked *full* compiled all layers; "
        "compare them with the extrapolated row of the same configuration.",
        "",
        "| target | model | variant | mesh d x e x m | depth | state GiB | temp GiB | total "
        "GiB | fits? | collectives | TFLOPs | XLA time ms (MFU) | roofline ms (MFU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    group = None
    for record in ordered:
        if record["group"] != group:
            group = record["group"]
            lines.append(f"| **{group}** | | | | | | | | | | | | |")
        lines.append(_row(record))
    lines += ["", FINDINGS.strip(), ""]
    for name in plots:
        lines.append(f"![{name}](docs/plans/{name})")
    if missing:
        lines += ["", "Not run in this session (compile time on 2 shared cores):", ""]
        lines += [
            f"- {t}: {c.label}{' (full depth)' if d is None else ''} ({g})"
            for g, t, c, d in missing
        ]
    write_section(SECTION, "\n".join(lines))
    print(f"wrote the '{SECTION}' section of BENCHMARKS.md ({len(ordered)} plans, plots {plots})")
