"""`make gpu-check`: compile every Pallas kernel for H100 (sm_90a) and A100 (sm_80) without a GPU.

XLA's deviceless path (shared/GPU-WITHOUT-GPU.md): with the CUDA plugin of the installed JAX's
version importable (installed ``--no-deps``) and ``JAX_PLATFORMS=cpu``, a compile-only device
built from a ``GpuTargetConfig`` (``shared/gpu_specs/`` or ``tools/gpu_specs/``) runs the real
Triton -> LLVM -> PTX -> ptxas pipeline on a CPU host. Over a fixed matrix (FlashAttention
head_dim 64/128/256, causal and not, GQA, segment ids, a block-sparse mask, bf16 and f16 at the
default GPU block sizes; Monarch n 1024/4096/8192 with nblocks 4, 16, ~sqrt(n), square and
rectangular, bf16; FLASH's mixed-chunk attention causal and not, bf16), forward and backward,
it asserts that every kernel compiles, fits in the target's shared memory and spills zero
bytes, and writes registers, shared memory, warps / stages and the tensor-core instruction mix
(``wgmma`` / ``mma.sync`` in the PTX) into the ``gpu-check`` section of BENCHMARKS.md.

How the figures are read: ptxas is wrapped by a shim (first on PATH) that keeps each PTX input
and runs the real ptxas with ``-v`` (registers, spill bytes); ``--xla_dump_to`` gives shared
memory and threads per kernel (``*thunk_sequence.txt``) and warps / stages (the Triton custom
calls in the optimized HLO). Each cell compiles in its own process (XLA caches PTX compiles
within a process), ``--jobs`` at a time.

    python tools/gpu_check.py               # the whole matrix; exit 1 on a violation
    python tools/gpu_check.py --only monarch --no-write

Without ptxas or the plugin it prints why and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SPEC_DIRS = (ROOT / "tools" / "gpu_specs", ROOT.parent / "shared" / "gpu_specs")
TARGETS = {
    # name: (spec file, arch, shared memory limit per block in bytes (opt-in))
    "H100": ("h100_sxm.txtpb", "sm_90a", 232448),
    "A100": ("a100_sxm_80.txtpb", "sm_80", 166912),
}
SECTION = "gpu-check"
TOKENS = 8192  # Monarch rows
ATTENTION = dict(batch=2, seq=2048, heads=8)

_PTXAS_SHIM = """#!/bin/sh
# ptxas shim of tools/gpu_check.py: keeps each PTX input and the -v report, runs the real ptxas.
real="$EFFLAX_REAL_PTXAS"
src=""
prev=""
for arg in "$@"; do
  if [ -z "$src" ] && [ "$prev" != "-o" ] && [ -f "$arg" ]; then src="$arg"; fi
  prev="$arg"
done
if [ -n "$EFFLAX_PTX_DUMP" ] && [ -n "$src" ]; then
  f=$(mktemp "$EFFLAX_PTX_DUMP/kernel.XXXXXX")
  cp "$src" "$f.ptx"
  rm -f "$f"
  "$real" "$@" -v 2> "$f.log"
  rc=$?
  cat "$f.log" >&2
  exit $rc
fi
exec "$real" "$@"
"""


# Violations measured in kernels this check does not own, kept visible in the table and the
# output but not failing CI until their owner fixes them: (cell, kernel, target) -> owner/why.
# An entry that no longer occurs is reported so it can be removed.
KNOWN_VIOLATIONS: dict[tuple[str, str, str], str] = {}


def monarch_cells() -> list[dict]:
    cells = []
    for n in (1024, 4096, 8192):
        sqrt_blocks = 1 << (int(n**0.5).bit_length() - 1)  # sqrt(n), or the power of 2 below
        for nblocks in (4, 16, sqrt_blocks):
            for out in (n, 4 * n):
                cells.append(
                    dict(kind="monarch", n_in=n, n_out=out, nblocks=nblocks, dtype="bfloat16")
                )
    return cells


def attention_cells() -> list[dict]:
    base = dict(kind="flash", **ATTENTION)
    return [
        dict(base, head_dim=64, dtype="bfloat16", causal=False),
        dict(base, head_dim=64, dtype="float16", causal=True, kv_heads=2),
        dict(base, head_dim=128, dtype="bfloat16", causal=True, segment_ids=True),
        dict(base, head_dim=128, dtype="float16", causal=False, block_sparse=True),
        dict(base, head_dim=256, dtype="bfloat16", causal=False, kv_heads=2, segment_ids=True),
        dict(base, head_dim=256, dtype="float16", causal=True, block_sparse=True),
    ]


def mixed_chunk_cells() -> list[dict]:
    # mixed_chunk_cases: FLASH's sizes (s 128, e 512, C 256, T 2048,
    # batch 2, relative-position bias), bf16, forward + backward.
    return [dict(kind="mixed_chunk", causal=causal, dtype="bfloat16") for causal in (True, False)]


def describe(cell: dict) -> str:
    if cell["kind"] == "mixed_chunk":
        mode = "causal" if cell["causal"] else "full"
        return f"mixed-chunk s128 e512 C256 {cell['dtype'][:4]} {mode} bias"
    if cell["kind"] == "monarch":
        shape = "square" if cell["n_in"] == cell["n_out"] else "rect"
        return f"monarch {cell['n_in']}->{cell['n_out']} nb={cell['nblocks']} ({shape})"
    short = {"bfloat16": "bf16", "float16": "f16"}.get(cell["dtype"], cell["dtype"])
    parts = [f"flash d{cell['head_dim']} {short}"]
    parts.append("causal" if cell["causal"] else "full")
    if cell.get("kv_heads"):
        parts.append(f"GQA {cell['heads']}/{cell['kv_heads']}")
    if cell.get("segment_ids"):
        parts.append("segments")
    if cell.get("block_sparse"):
        parts.append("block-sparse")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# Worker: one cell on one target, in its own process
# --------------------------------------------------------------------------------------------


def _monarch_fn(cell, jnp):
    from pallas_kernels import PallasTritonMonarch
    from pallas_kernels import monarch_matmul

    # MonarchDense's factor shapes (efflax.nn.monarch_shapes; this venv has no flax)
    nblocks = cell["nblocks"]
    p, s = cell["n_in"] // nblocks, cell["n_out"] // nblocks
    w1_shape, w2_shape = (nblocks, min(p, s), p), (nblocks, s, min(p, s))
    dtype = jnp.dtype(cell["dtype"])
    shapes = [(TOKENS, cell["n_in"]), w1_shape, w2_shape, (TOKENS, cell["n_out"])]
    impl = PallasTritonMonarch(interpret=False)

    def fwd_bwd(x, w1, w2, dy):
        import jax

        y, vjp = jax.vjp(lambda *a: monarch_matmul(*a, implementation=impl), x, w1, w2)
        return y, vjp(dy)

    return fwd_bwd, [(s, dtype) for s in shapes]


def _flash_fn(cell, jnp):
    import pallas_kernels

    b, s, h, d = cell["batch"], cell["seq"], cell["heads"], cell["head_dim"]
    kv_heads = cell.get("kv_heads") or h
    dtype = jnp.dtype(cell["dtype"])
    block_sizes = pallas_kernels.BlockSizes.get_default("gpu", head_dim=d)
    if cell.get("block_sparse"):
        # a block mask fixes one tile for all three kernels: the default forward tile
        block_sizes = dataclasses.replace(
            block_sizes, block_q_dkv=None, block_k_dkv=None, block_q_dq=None, block_k_dq=None
        )
    inputs = [((b, s, h, d), dtype), ((b, s, kv_heads, d), dtype), ((b, s, kv_heads, d), dtype)]
    inputs.append(((b, s, h, d), dtype))  # cotangent
    if cell.get("segment_ids"):
        inputs += [((b, s), jnp.int32), ((b, s), jnp.int32)]
    mask = None
    if cell.get("block_sparse"):
        mask = pallas_kernels.local_block_mask(
            s, s, block_sizes, window_left=s // 4, window_right=0
        )

    def fwd_bwd(q, k, v, do, *segments):
        import jax

        kwargs = dict(causal=cell["causal"], interpret=False, block_sizes=block_sizes)
        if segments:
            kwargs["segment_ids"] = tuple(segments)
        if mask is not None:
            kwargs["block_mask"] = mask

        o, vjp = jax.vjp(lambda *a: pallas_kernels.flash_attention(*a, **kwargs), q, k, v)
        return o, vjp(do)

    return fwd_bwd, inputs


def mixed_chunk_cases(block_sizes=None) -> list[dict]:
    """Compile cases of the mixed-chunk kernels: forward and backward at FLASH's paper sizes.

    Each case names a function of abstract inputs (``fn``, ``args`` as ShapeDtypeStructs) that
    runs the forward kernel or the forward and all backward kernels (causal and non-causal,
    with a relative-position bias) in bfloat16: s = 128, e = 512 (model width 256, expansion 2),
    C = 256, T = 2048, batch 2.
    """
    import jax
    import jax.numpy as jnp

    from pallas_kernels.mixed_chunk import PallasTritonMixedChunk
    from pallas_kernels.mixed_chunk import mixed_chunk_attention

    batch, seq, s, e, chunk = 2, 2048, 128, 512, 256
    dtype = jnp.bfloat16
    impl = PallasTritonMixedChunk(block_sizes=block_sizes, interpret=False)
    z = jax.ShapeDtypeStruct((batch, seq, s), dtype)
    v = jax.ShapeDtypeStruct((batch, seq, e), dtype)
    b = jax.ShapeDtypeStruct((chunk, chunk), jnp.float32)

    def call(causal):
        def fn(qq, kq, ql, kl, v, bias):
            return mixed_chunk_attention(
                qq,
                kq,
                v,
                ql,
                kl,
                bias=bias,
                chunk_size=chunk,
                causal=causal,
                quad_scale=1.0 / chunk,
                lin_scale=1.0 / chunk,
                implementation=impl,
            )

        return fn

    cases = []
    for causal in (True, False):
        fwd = call(causal)

        def fwd_bwd(*args, fwd=fwd):
            out, vjp = jax.vjp(fwd, *args)
            return out, vjp(jnp.ones_like(out))

        tag = "causal" if causal else "full"
        args = (z, z, z, z, v, b)
        cases.append({"name": f"mixed_chunk_fwd_{tag}", "fn": fwd, "args": args})
        cases.append({"name": f"mixed_chunk_fwd_bwd_{tag}", "fn": fwd_bwd, "args": args})
    return cases


def _mixed_chunk_fn(cell, jnp):
    name = f"mixed_chunk_fwd_bwd_{'causal' if cell['causal'] else 'full'}"
    case = next(c for c in mixed_chunk_cases() if c["name"] == name)
    if any(jnp.dtype(a.dtype) not in (jnp.dtype(cell["dtype"]), jnp.float32) for a in case["args"]):
        raise ValueError(f"{name} does not run in {cell['dtype']}")
    return case["fn"], [(a.shape, a.dtype) for a in case["args"]]


def _parse_ptx_dumps(dump: pathlib.Path) -> dict[str, dict]:
    kernels = {}
    for ptx in sorted(dump.glob("kernel.*.ptx")):
        text = ptx.read_text(errors="replace")
        log = ptx.with_suffix("").with_suffix(ptx.suffixes[0] + ".log")
        log_text = log.read_text(errors="replace") if log.exists() else ""
        for name in re.findall(r"\.entry\s+([\w$]+)\s*\(", text):
            kernels[name] = {
                "wgmma": len(re.findall(r"^\s*wgmma\.mma_async", text, re.M)),
                "mma_sync": len(re.findall(r"^\s*mma\.sync", text, re.M)),
                "cp_async": len(re.findall(r"^\s*cp\.async\.(?:ca|cg)", text, re.M)),
                "fma": len(re.findall(r"^\s*fma\.rn\.f32", text, re.M)),
            }
        entry = None
        for line in log_text.splitlines():
            m = re.search(r"Compiling entry function '([\w$]+)'", line)
            if m:
                entry = m.group(1)
                continue
            m = re.search(r"Function properties for ([\w$]+)", line)
            if m:
                entry = m.group(1)
                continue
            info = kernels.setdefault(entry, {}) if entry else None
            m = re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
            )
            if m and info is not None:
                info["stack"], info["spill_stores"], info["spill_loads"] = map(int, m.groups())
            m = re.search(r"Used (\d+) registers", line)
            if m and info is not None:
                info["registers"] = int(m.group(1))
    return kernels


def _parse_xla_dumps(dump: pathlib.Path) -> tuple[dict, dict]:
    launches, configs = {}, {}
    for path in dump.glob("*thunk_sequence.txt"):
        for m in re.finditer(
            r"kCustomKernel.*?\]\s+([\w$.]+) grid: \[([^\]]*)\] threads: \[([^\]]*)\]\s+"
            r"shared_memory: (\d+) bytes",
            path.read_text(errors="replace"),
        ):
            name, grid, threads, smem = m.groups()
            launches[name] = {
                "grid": grid.replace(" ", ""),
                "threads": int(threads.split(",")[0]),
                "shared_memory": int(smem),
            }
    for path in dump.glob("*after_optimizations.txt"):
        for line in path.read_text(errors="replace").splitlines():
            if "xla.gpu.triton" not in line:
                continue
            fields = dict(re.findall(r"\b(name|num_stages|num_warps) = (\"[^\"]*\"|\d+)", line))
            if "name" in fields:
                configs[fields["name"].strip('"')] = {
                    "num_warps": int(fields.get("num_warps", 0)),
                    "num_stages": int(fields.get("num_stages", 0)),
                }
    return launches, configs


def _is_pallas_kernel(name: str) -> bool:
    return name.startswith(("monarch_", "flash_", "mha_", "attention_", "mixed_chunk_"))


def run_cell(cell: dict, target: str, work: pathlib.Path) -> dict:
    """Compiles one cell for one target (called in a fresh process) and returns its figures."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    from pallas_kernels._compat import use_mesh

    spec_name, _, _ = TARGETS[target]
    spec = next(d / spec_name for d in SPEC_DIRS if (d / spec_name).exists()).read_text()
    topology = topologies.get_topology_desc("aot", "cuda", target_config=spec, topology="1x1x1")
    mesh = Mesh(topology.devices[:1], ("x",))
    replicated = NamedSharding(mesh, PartitionSpec())
    make = {"monarch": _monarch_fn, "flash": _flash_fn, "mixed_chunk": _mixed_chunk_fn}
    fn, inputs = make[cell["kind"]](cell, jnp)
    args = [jax.ShapeDtypeStruct(s, d, sharding=replicated) for s, d in inputs]
    start = time.perf_counter()
    with use_mesh(mesh):
        jax.jit(fn).trace(*args).lower().compile()
    seconds = time.perf_counter() - start
    ptx = _parse_ptx_dumps(work)
    launches, configs = _parse_xla_dumps(work / "xla")
    kernels = []
    for name in sorted(set(ptx) | set(launches)):
        if not _is_pallas_kernel(name):
            continue
        info = {"name": name, **ptx.get(name, {}), **launches.get(name, {})}
        info.update(configs.get(name, configs.get(re.sub(r"_+\d+$", "", name), {})))
        kernels.append(info)
    return {"cell": cell, "target": target, "compile_s": seconds, "kernels": kernels}


def _worker_main(payload: str) -> None:
    job = json.loads(payload)
    result = run_cell(job["cell"], job["target"], pathlib.Path(job["work"]))
    print("RESULT " + json.dumps(result))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _find_ptxas() -> str | None:
    found = shutil.which("ptxas")
    if found:
        return found
    candidates = [pathlib.Path("/usr/local/cuda/bin/ptxas")]
    try:  # the nvidia-cuda-nvcc wheel, where installed
        import nvidia.cuda_nvcc  # type: ignore[import-not-found]

        candidates.append(pathlib.Path(list(nvidia.cuda_nvcc.__path__)[0]) / "bin" / "ptxas")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


def prerequisites() -> str | None:
    """None when the deviceless compile can run here, else why not."""
    if importlib.util.find_spec("jax") is None:
        return "jax is not installed in this interpreter"
    cuda_plugins = [
        name
        for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12", "jax_cuda13_plugin")
        if _spec_exists(name)
    ]
    if not cuda_plugins:
        return "no JAX CUDA plugin is importable (pip install --no-deps jax-cuda13-plugin==<jax version> jax-cuda13-pjrt==<jax version>)"
    if _find_ptxas() is None:
        return "ptxas (CUDA 12.8+/13) was not found on PATH or in /usr/local/cuda/bin"
    if not any((d / TARGETS["H100"][0]).exists() for d in SPEC_DIRS):
        return f"no GPU target descriptions in {' or '.join(map(str, SPEC_DIRS))}"
    return None


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _run_job(cell, target, root: pathlib.Path, shim_dir: pathlib.Path, real_ptxas: str, index):
    work = root / f"{index:03d}-{target}"
    (work / "xla").mkdir(parents=True)
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        EFFLAX_REAL_PTXAS=real_ptxas,
        EFFLAX_PTX_DUMP=str(work),
        PATH=f"{shim_dir}{os.pathsep}{env.get('PATH', '')}",
        XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_dump_to={work / 'xla'}".strip(),
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    payload = json.dumps({"cell": cell, "target": target, "work": str(work)})
    proc = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", payload],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    return {"cell": cell, "target": target, "error": tail, "kernels": []}


def check(results: list[dict], known: dict | None = None) -> list[str]:
    """Every violation not in ``known``: a failed compile, shared memory over the limit, any
    spilled byte. Known ones are printed with their owner."""
    known = KNOWN_VIOLATIONS if known is None else known
    problems = []
    seen = set()
    for res in results:
        where = f"{describe(res['cell'])} [{res['target']}]"
        if "error" in res:
            problems.append(f"{where}: did not compile:\n{res['error']}")
            continue
        if not res["kernels"]:
            problems.append(f"{where}: no Pallas kernel was found in the compiled program")
        limit = TARGETS[res["target"]][2]
        for k in res["kernels"]:
            if "registers" not in k:
                problems.append(f"{where} {k['name']}: no ptxas report (kernel not compiled?)")
            if k.get("shared_memory", 0) > limit:
                problems.append(
                    f"{where} {k['name']}: shared memory {k['shared_memory']} B > {limit} B"
                )
            spilled = k.get("spill_stores", 0) + k.get("spill_loads", 0)
            key = (describe(res["cell"]), k["name"], res["target"])
            if spilled and key in known:
                seen.add(key)
                print(f"KNOWN: {where} {k['name']}: spills {spilled} B ({known[key]}); not failing")
            elif spilled:
                problems.append(
                    f"{where} {k['name']}: spills {k.get('spill_stores')} B stored / "
                    f"{k.get('spill_loads')} B loaded ({k.get('registers')} registers)"
                )
    checked = {(describe(r["cell"]), r["target"]) for r in results}
    for key in sorted(set(known) - seen):
        if (key[0], key[2]) in checked:
            print(f"FIXED: {key} no longer spills: remove it from KNOWN_VIOLATIONS")
    return problems


def table(results: list[dict], *, jax_version: str, seconds: float, jobs: int) -> str:
    by_key: dict[tuple, dict] = {}
    order = []
    for res in results:
        for k in res["kernels"]:
            key = (describe(res["cell"]), k["name"])
            if key not in by_key:
                by_key[key] = {}
                order.append(key)
            by_key[key][res["target"]] = k

    def figures(k: dict | None, tensor: str) -> list[str]:
        if k is None:
            return ["-"] * 5
        spill = k.get("spill_stores", 0) + k.get("spill_loads", 0)
        mix = (
            f"{k.get('wgmma', 0)} / {k.get('mma_sync', 0)}"
            if tensor == "both"
            else str(k.get("mma_sync", 0))
        )
        return [
            str(k.get("registers", "?")),
            str(spill),
            f"{k.get('shared_memory', 0)}",
            f"{k.get('threads', 0) // 32 or k.get('num_warps', '?')}/{k.get('num_stages', '?')}",
            mix,
        ]

    header = (
        "| cell | kernel | H100 regs | spill B | smem B | warps/stages | wgmma / mma.sync "
        "| A100 regs | spill B | smem B | warps/stages | mma.sync |"
    )
    lines = [header, "|" + "---|" * 12]
    for key in order:
        row = by_key[key]
        cells = [key[0], f"`{key[1]}`"]
        cells += figures(row.get("H100"), "both") + figures(row.get("A100"), "mma")
        lines.append("| " + " | ".join(cells) + " |")
    n_kernels = sum(len(r["kernels"]) for r in results)
    compile_s = sum(r.get("compile_s", 0) for r in results)
    from experiments._benchmarks_md import today

    intro = [
        f"## GPU compile check (`make gpu-check`, {today()}, jax {jax_version}, no GPU)",
        "",
        f"`python tools/gpu_check.py`: {len(results)} compiles (forward + backward, each cell for"
        f" H100 sm_90a and A100 sm_80), {n_kernels} Pallas kernels, {compile_s:.0f} s of"
        f" compiling in {seconds:.0f} s wall ({jobs} processes) through XLA's deviceless path.",
        "Asserted: every kernel compiles, shared memory <= the target's limit (232,448 B H100,"
        " 166,912 B A100), zero spill bytes. `regs`: registers per thread (ptxas);"
        " `smem`: dynamic shared memory per block; `wgmma / mma.sync`: tensor-core"
        " instructions in the PTX (0 / 0: the CUDA-core path, inner rank < 4).",
        f"Monarch: {TOKENS} rows, bf16, MonarchDense factor shapes, 'rect' = n -> 4n;"
        f" FlashAttention: batch {ATTENTION['batch']}, seq {ATTENTION['seq']},"
        f" {ATTENTION['heads']} heads, default GPU block sizes; mixed-chunk (FLASH): batch 2,"
        " seq 2048, s 128, e 512, chunk 256, a relative-position bias, default GPU blocks.",
        "Known violations, listed with their owner and not failing the check: "
        + (
            "; ".join(f"{c} `{k}` [{t}] ({o})" for (c, k, t), o in KNOWN_VIOLATIONS.items())
            or "none"
        )
        + ".",
        "",
    ]
    return "\n".join(intro + lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--only", choices=("monarch", "flash", "mixed_chunk"), default=None)
    parser.add_argument("--targets", default="H100,A100")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--match", default="", help="only cells whose description contains this")
    parser.add_argument("--keep", help="keep the PTX and XLA dumps in this directory")
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker)
        return 0
    why_not = prerequisites()
    if why_not:
        print(f"gpu-check SKIPPED: {why_not}")
        return 0
    import jax  # noqa: F401 - only for the version; the compiles run in child processes

    cells = []
    if args.only in (None, "flash"):
        cells += attention_cells()
    if args.only in (None, "monarch"):
        cells += monarch_cells()
    if args.only in (None, "mixed_chunk"):
        cells += mixed_chunk_cells()
    cells = [c for c in cells if args.match in describe(c)]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    jobs = [(cell, target) for cell in cells for target in targets]
    # Longest first (attention backward, large Monarch) so the pool drains evenly.
    jobs.sort(key=lambda j: (j[0]["kind"] != "flash", -j[0].get("n_in", 0)))
    real_ptxas = _find_ptxas()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        root = pathlib.Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        shim_dir = root / "bin"
        shim_dir.mkdir()
        shim = shim_dir / "ptxas"
        shim.write_text(_PTXAS_SHIM)
        shim.chmod(0o755)
        results = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(_run_job, cell, target, root, shim_dir, real_ptxas, i)
                for i, (cell, target) in enumerate(jobs)
            ]
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                res = future.result()
                status = "ERROR" if "error" in res else f"{res['compile_s']:.1f} s"
                print(
                    f"[{done}/{len(jobs)}] {describe(res['cell'])} [{res['target']}]: "
                    f"{len(res['kernels'])} kernels, {status}",
                    flush=True,
                )
                results.append(res)
    seconds = time.perf_counter() - start
    order = {(json.dumps(c, sort_keys=True), t): i for i, (c, t) in enumerate(jobs)}
    results.sort(
        key=lambda r: (
            cells.index(r["cell"]),
            targets.index(r["target"]),
            order[(json.dumps(r["cell"], sort_keys=True), r["target"])],
        )
    )
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    text = table(results, jax_version=jax.__version__, seconds=seconds, jobs=args.jobs)
    print()
    print(text)
    problems = check(results)
    if not args.no_write and not problems and args.only is None and not args.match:
        from experiments._benchmarks_md import write_section

        write_section(SECTION, text)
        print(f"\nwrote the '{SECTION}' section of BENCHMARKS.md")
    if problems:
        print(f"\ngpu-check FAILED ({len(problems)} problems):")
        for p in problems:
            print(" -", p)
        return 1
    print(f"\ngpu-check passed: {len(results)} compiles in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
