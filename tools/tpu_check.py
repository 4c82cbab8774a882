"""`make tpu-check`: compile every Pallas Mosaic TPU kernel for TPU v5e, v5p and v6e without a TPU.

libtpu's compile-only devices (``jax.experimental.topologies.get_topology_desc``, see
``shared/TPU-WITHOUT-TPU.md``) run the real Mosaic and XLA:TPU compilers on a CPU host
(``JAX_PLATFORMS=cpu``). For every case of every family module in ``tools/tpu_cases/`` (``CASES``;
a module that is absent is simply not there) and every chip, it asserts that the program compiles
(Mosaic refuses a kernel whose blocks do not fit VMEM: a violation), that the compiled HLO holds at
least ``Case.min_kernels`` ``tpu_custom_call``s (the kernel ran, not XLA), and that its memory fits
the chip's HBM; it records per-chip memory (``memory_analysis``), compile time and XLA's cost
estimate. Also: attention's temporary memory at S = 4k..32k beside XLA attention (v5e), and one
small sharded training step (efflax attention + MonarchDense + expert-parallel MoE) over a
``v5e:2x4`` slice, with its per-chip memory and collectives. The table goes into the
``tpu-check`` section of BENCHMARKS.md.

    python tools/tpu_check.py                     # everything; exit 1 on a violation
    python tools/tpu_check.py --match d128 --no-write --chips v5e

Without libtpu it prints why and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import importlib.util
import multiprocessing
import os
import pathlib
import pkgutil
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "tpu-check"
GIB = 1024**3
# name: (topology of one chip, HBM per chip in bytes, device kind)
CHIPS = {
    "v5e": ("v5e:1x1", 16 * 10**9, "TPU v5 lite"),
    "v5p": ("v5p:1x1x1", 95 * 10**9, "TPU v5"),
    "v6e": ("v6e:1x1", 32 * 10**9, "TPU v6 lite"),
}
STEP_TOPOLOGY = "v5e:2x4"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ENV = dict(
    JAX_PLATFORMS="cpu",
    TPU_ACCELERATOR_TYPE="v5litepod-8",  # only silences libtpu's start-up warnings
    TPU_WORKER_HOSTNAMES="localhost",
    TF_CPP_MIN_LOG_LEVEL="3",
    # Several processes compile at once (this pool, other checks): libtpu's lockfile is for a
    # real chip, which compile-only devices do not hold.
    ALLOW_MULTIPLE_LIBTPU_LOAD="1",
)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def case_modules() -> list[str]:
    """The family modules present in tools/tpu_cases/ (each with a ``CASES`` list)."""
    folder = ROOT / "tools" / "tpu_cases"
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)]) if not m.name.startswith("_"))


def load_cases(module_name: str, attribute: str = "CASES") -> list:
    module = importlib.import_module(f"tools.tpu_cases.{module_name}")
    return list(getattr(module, attribute, []))


def jobs_to_run(chips: list[str], match: str, step: bool) -> tuple[list[dict], list[str]]:
    """Every (case, chip) job, the memory-table cases on v5e and the sharded step; and the
    modules that could not be imported (reported, not fatal: a family still being written)."""
    jobs, broken = [], []
    for module in case_modules():
        try:
            cases = load_cases(module)
            memory = load_cases(module, "MEMORY_CASES")
        except Exception as e:  # noqa: BLE001 - a broken family module is reported, not fatal
            broken.append(f"{module}: {type(e).__name__}: {e}")
            continue
        for index, case in enumerate(cases):
            if match in case.name or match in case.family:
                jobs += [
                    dict(kind="case", module=module, list="CASES", index=index, chip=chip)
                    for chip in chips
                ]
        if "v5e" in chips:
            for index, case in enumerate(memory):
                if match in case.name or match in "memory":
                    jobs.append(
                        dict(
                            kind="case", module=module, list="MEMORY_CASES", index=index, chip="v5e"
                        )
                    )
    if step and match in "sharded step":
        jobs.append(dict(kind="step", chip=STEP_TOPOLOGY))
    return jobs, broken


# --------------------------------------------------------------------------------------------
# Worker: compiles one job (runs in a pool process that keeps JAX and libtpu loaded)
# --------------------------------------------------------------------------------------------


def _worker_init() -> None:
    os.environ.update(_ENV)


def _memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    out = {
        name: int(getattr(stats, f"{name}_size_in_bytes", 0))
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - an estimate; some programs have none
        return {}
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {
        "flops": float(cost.get("flops", 0.0)),
        "bytes": float(cost.get("bytes accessed", 0.0)),
        "seconds": float(cost.get("optimal_seconds", 0.0)),
    }


def _classify(error: str) -> str:
    text = error.lower()
    if "vmem" in text:
        return "VMEM"
    if "resource_exhausted" in text or "out of memory" in text or "hbm" in text:
        return "HBM"
    return "error"


def _compile_case(job: dict) -> dict:
    import jax
    from jax.experimental import topologies
    from jax.sharding import Mesh
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec

    from pallas_kernels._compat import use_mesh

    case = load_cases(job["module"], job["list"])[job["index"]]
    result = dict(job, family=case.family, name=case.name, min_kernels=case.min_kernels)
    result["baseline"] = case.baseline
    start = time.perf_counter()
    try:
        topology = topologies.get_topology_desc(topology_name=CHIPS[job["chip"]][0], platform="tpu")
        mesh = Mesh(topology.devices[:1], ("x",))
        on_chip = NamedSharding(mesh, PartitionSpec())
        fn, args = case.build()
        args = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip), args
        )
        # The mesh tells Mosaic which TPU generation it compiles for.
        with use_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a compile failure is a result (VMEM, HBM, bug)
        message = f"{type(e).__name__}: {e}"
        result.update(error=message[-2000:], reason=_classify(message))
        result["compile_s"] = time.perf_counter() - start
        return result
    result["compile_s"] = time.perf_counter() - start
    text = compiled.as_text()
    result["kernels"] = text.count('custom_call_target="tpu_custom_call"')
    result["memory"] = _memory(compiled)
    result["cost"] = _cost(compiled)
    return result


def _sharded_step() -> tuple:
    """One training step of a small model over the 8 chips of a v5e:2x4 slice (data 2 x expert
    2 x model 2): attention on the TPU kernels (per shard: batch over data/expert, heads over
    model), a MonarchDense projection and an expert-parallel MoE feed-forward; Adam."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from jax.experimental import topologies
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import efflax.nn
    from efflax import sharding
    from pallas_kernels.attention import dot_product_attention

    topology = topologies.get_topology_desc(topology_name=STEP_TOPOLOGY, platform="tpu")
    mesh = sharding.make_mesh(data=2, expert=2, model=2, devices=topology.devices)
    batch, seq, embed, heads, head_dim = 8, 1024, 256, 8, 64
    spec = P(sharding.BATCH_AXES, None, "model", None)

    def attention(q, k, v):
        def local(q, k, v):  # 'auto' under the TPU mesh: the TPU kernels
            return dot_product_attention(q, k, v, causal=True)

        return sharding.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = lambda name: nn.DenseGeneral(
                (heads, head_dim),
                name=name,
                dtype=jnp.bfloat16,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("embed", "heads", "kv")
                ),
            )
            h = nn.RMSNorm(dtype=jnp.bfloat16)(x)
            out = attention(dense("query")(h), dense("key")(h), dense("value")(h))
            out = out.reshape(*out.shape[:2], heads * head_dim)
            x = x + efflax.nn.MonarchDense(embed, nblocks=4, name="out")(out)
            h = nn.RMSNorm(dtype=jnp.bfloat16)(x)
            moe = efflax.nn.MoEFeedForward(
                num_experts=4, hidden=512, mesh=mesh, dtype=jnp.bfloat16, name="moe"
            )
            return x + moe(h, deterministic=False)

    model = Block()
    x = jax.ShapeDtypeStruct((batch, seq, embed), jnp.bfloat16)
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    param_shardings = sharding.params_shardings(abstract["params"], mesh)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nn.unbox(abstract["params"]),
        param_shardings,
    )
    optimizer = optax.adam(1e-3)
    replicated = NamedSharding(sharding.auto_axes(mesh), P())
    opt_state = optax.tree_map_params(
        optimizer,
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(optimizer.init, params),
        param_shardings,
        transform_non_params=lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
    )
    data = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.data_sharding(mesh, 3))

    def step(params, opt_state, x):
        def loss(params):
            y, aux = model.apply({"params": params}, x, mutable=["losses", "intermediates"])
            return jnp.mean(jnp.square(y.astype(jnp.float32))) + efflax.nn.moe_aux_loss(aux)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, (params, opt_state, data), mesh


def _compile_step(job: dict) -> dict:
    import jax

    result = dict(job, family="step", name="sharded train step", min_kernels=3, baseline=False)
    start = time.perf_counter()
    try:
        step, args, mesh = _sharded_step()
        from pallas_kernels._compat import use_mesh

        with use_mesh(mesh):
            compiled = jax.jit(step).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a compile failure is a result
        message = f"{type(e).__name__}: {e}"
        result.update(error=message[-2000:], reason=_classify(message))
        result["compile_s"] = time.perf_counter() - start
        return result
    result["compile_s"] = time.perf_counter() - start
    text = compiled.as_text()
    result["kernels"] = text.count('custom_call_target="tpu_custom_call"')
    result["memory"] = _memory(compiled)
    result["cost"] = _cost(compiled)
    result["collectives"] = {
        op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", text)) for op in COLLECTIVES
    }
    return result


def run_job(job: dict) -> dict:
    """Compiles one job; never raises (a failure is part of the result)."""
    try:
        return _compile_step(job) if job["kind"] == "step" else _compile_case(job)
    except Exception as e:  # noqa: BLE001 - e.g. a case module that fails to build
        return dict(job, name=str(job), error=f"{type(e).__name__}: {e}", reason="error")


# --------------------------------------------------------------------------------------------
# Checks and the table
# --------------------------------------------------------------------------------------------


def check(results: list[dict]) -> list[str]:
    """Every violation: a kernel case that does not compile (VMEM included), too few kernels in
    the compiled program, memory over the chip's HBM. A baseline that does not fit HBM is a
    result (XLA attention at long lengths), not a violation."""
    problems = []
    for res in results:
        where = f"{res.get('family', '?')}: {res['name']} [{res['chip']}]"
        if "error" in res:
            if res.get("baseline") and res.get("reason") == "HBM":
                continue
            label = {"VMEM": "does not fit VMEM", "HBM": "does not fit HBM"}.get(
                res.get("reason"), "did not compile"
            )
            problems.append(f"{where}: {label}: {res['error'][-600:]}")
            continue
        if res["kernels"] < res["min_kernels"]:
            problems.append(
                f"{where}: {res['kernels']} tpu_custom_call(s) < min_kernels="
                f"{res['min_kernels']} (the kernel fell back to XLA?)"
            )
        hbm = CHIPS.get(res["chip"], (None, 16 * 10**9))[1]
        total = res.get("memory", {}).get("total", 0)
        if total > hbm and not res.get("baseline"):
            problems.append(f"{where}: {total / GIB:.2f} GiB per chip > HBM {hbm / GIB:.1f} GiB")
    return problems


def _gib(n: float) -> str:
    if n >= 0.1 * GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


def _estimate(cost: dict) -> str:
    if not cost or cost.get("flops", 0) <= 0:
        return "-"
    seconds = cost.get("seconds", 0.0)
    time_text = f"{seconds * 1e3:.2f} ms" if seconds > 0 else "n/a"
    return f"{cost['flops'] / 1e9:.0f} GF, {cost['bytes'] / 2**20:.0f} MiB, {time_text}"


def _cell(res: dict | None) -> list[str]:
    if res is None:
        return ["-"] * 4
    if "error" in res:
        return [f"FAILS ({res.get('reason')})", "-", f"{res.get('compile_s', 0):.1f}", "-"]
    mem = res["memory"]
    return [
        f"{res['kernels']}",
        f"{_gib(mem.get('temp', 0))} / {_gib(mem.get('total', 0))}",
        f"{res['compile_s']:.1f}",
        _estimate(res.get("cost", {})),
    ]


def table(results: list[dict], *, jax_version: str, libtpu: str, seconds: float, jobs: int) -> str:
    from experiments._benchmarks_md import today

    cases = [r for r in results if r["kind"] == "case" and r["list"] == "CASES"]
    memory = [r for r in results if r["kind"] == "case" and r["list"] == "MEMORY_CASES"]
    steps = [r for r in results if r["kind"] == "step"]
    chips = [c for c in CHIPS if any(r["chip"] == c for r in cases)]
    compile_s = sum(r.get("compile_s", 0) for r in results)
    lines = [
        f"## TPU compile check (`make tpu-check`, {today()}, jax {jax_version}, libtpu {libtpu},"
        " no TPU)",
        "",
        f"`JAX_PLATFORMS=cpu python tools/tpu_check.py`: {len(results)} compiles,"
        f" {compile_s:.0f} s of compiling in {seconds:.0f} s wall ({jobs} processes), through"
        " libtpu's compile-only devices (one chip each: v5e `v5e:1x1`, v5p `v5p:1x1x1`,"
        " v6e `v6e:1x1`). Asserted: every case compiles (Mosaic refuses blocks that do not fit"
        " VMEM), at least `min_kernels` Pallas kernels (`tpu_custom_call`) in the compiled"
        " HLO, and per-chip memory <= HBM (v5e 16 GB, v5p 95 GB, v6e 32 GB; baselines exempt).",
        "`kernels`: `tpu_custom_call`s in the compiled HLO; `memory`: temporary / total"
        " (arguments + outputs + temporaries) per chip, from `memory_analysis()`;"
        " `estimate`: XLA's `cost_analysis()` (flops, bytes, `optimal_seconds`): an"
        " **estimate**, and for a Pallas kernel the flops/bytes are the kernel's declared"
        " `cost_estimate`, not a measurement. Attention: batch 1, 8 query heads, fwd+bwd ="
        " `jax.grad` of a scalar loss.",
        "",
    ]
    header = "| family | case |"
    rule = "|---|---|"
    for chip in chips:
        header += f" {chip} kernels | {chip} memory | {chip} compile s | {chip} estimate |"
        rule += "---|---|---|---|"
    lines += [header, rule]
    keys = []
    for r in cases:
        key = (r.get("family", "?"), r["name"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        row = [key[0], key[1] + (" (XLA baseline)" if _baseline(cases, key) else "")]
        for chip in chips:
            match = [r for r in cases if (r.get("family"), r["name"]) == key and r["chip"] == chip]
            row += _cell(match[0] if match else None)
        lines.append("| " + " | ".join(row) + " |")
    if memory:
        lines += ["", _memory_table(memory)]
    for res in steps:
        lines += ["", _step_text(res)]
    return "\n".join(lines)


def _baseline(cases, key):
    return any(r.get("baseline") for r in cases if (r.get("family"), r["name"]) == key)


def _memory_table(memory: list[dict]) -> str:
    by_length: dict[int, dict[str, dict]] = {}
    for r in memory:
        found = re.search(r"S=(\d+)", r["name"])
        if found is None:
            continue
        length = int(found.group(1))
        by_length.setdefault(length, {})["xla" if r.get("baseline") else "kernel"] = r

    def temp(r):
        if r is None:
            return "-"
        if "error" in r:
            if r.get("reason") == "HBM":
                return "does not compile: over the 16 GB HBM"
            return f"error ({r.get('reason')})"
        return f"{_gib(r['memory']['temp'])} / {_gib(r['memory']['total'])}"

    lines = [
        "Attention's temporary memory on one v5e chip (forward + backward, batch 1, 8 heads,"
        " head_dim 128, bf16, causal): temporaries / total (arguments + outputs + temporaries)"
        " per chip from `memory_analysis()`, efflax's Mosaic TPU kernels beside XLA attention"
        " (`implementation='xla'`); ratio of the totals. XLA buffer assignment may place the"
        " kernels' scratch in output buffers, so their temporaries alone can read near zero.",
        "",
        "| S | kernels: temp / total | XLA: temp / total | XLA / kernels (total) |",
        "|---|---|---|---|",
    ]
    for length in sorted(by_length):
        kernel, xla = by_length[length].get("kernel"), by_length[length].get("xla")
        ratio = "-"
        if kernel and xla and "error" not in kernel and "error" not in xla:
            ratio = f"{xla['memory']['total'] / max(kernel['memory']['total'], 1):.0f}x"
        lines.append(f"| {length} | {temp(kernel)} | {temp(xla)} | {ratio} |")
    return "\n".join(lines)


def _step_text(res: dict) -> str:
    head = (
        f"Sharded training step over a `{STEP_TOPOLOGY}` slice (8 v5e chips, data 2 x expert 2 x"
        " model 2): one block of RMSNorm, causal attention on the TPU kernels (shard_map:"
        " batch over data/expert, heads over model; 8 heads, d 64), a MonarchDense output"
        " projection (nblocks 4), an expert-parallel MoE (4 experts, expert choice, hidden 512),"
        " Adam; batch 8, seq 1024, embed 256, bf16."
    )
    if "error" in res:
        return head + f"\nDoes not compile ({res.get('reason')}): `{res['error'][-300:]}`"
    mem = res["memory"]
    collectives = ", ".join(f"{op} {n}" for op, n in res["collectives"].items() if n)
    return (
        head + f" Compiled in {res['compile_s']:.0f} s: {res['kernels']} `tpu_custom_call`s;"
        f" per chip: arguments {_gib(mem['argument'])}, outputs {_gib(mem['output'])},"
        f" temporaries {_gib(mem['temp'])}; collectives in the compiled HLO:"
        f" {collectives or 'none'}."
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def prerequisites() -> str | None:
    """None when the compile-only TPU path can run here, else why not."""
    for name in ("jax", "libtpu"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed in this interpreter (use .venv-xla)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--chips", default=",".join(CHIPS))
    parser.add_argument("--match", default="", help="only cases whose name contains this")
    parser.add_argument("--no-step", action="store_true", help="skip the sharded step")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    why_not = prerequisites()
    if why_not:
        print(f"tpu-check SKIPPED: {why_not}")
        return 0
    os.environ.update(_ENV)
    import jax

    chips = [c.strip() for c in args.chips.split(",") if c.strip()]
    unknown = [c for c in chips if c not in CHIPS]
    if unknown:
        parser.error(f"--chips: unknown {unknown}; known: {list(CHIPS)}")
    jobs, broken = jobs_to_run(chips, args.match, not args.no_step)
    for line in broken:
        print(f"could not import tools/tpu_cases/{line}")
    # The sharded step and the long memory cases first, so the pool drains evenly.
    jobs.sort(key=lambda j: (j["kind"] != "step", j.get("list") != "MEMORY_CASES"))
    start = time.perf_counter()
    results = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=_worker_init
    ) as pool:
        futures = {pool.submit(run_job, job): job for job in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                res = future.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker (e.g. a libtpu abort)
                res = dict(futures[future], name=str(futures[future]), error=repr(e))
                res["reason"] = "error"
            status = (
                f"FAILS ({res.get('reason')})"
                if "error" in res
                else f"{res['kernels']} kernels, {res['compile_s']:.1f} s"
            )
            print(f"[{done}/{len(jobs)}] {res.get('name')} [{res['chip']}]: {status}", flush=True)
            if "error" in res:
                print("    " + res["error"][-400:].replace("\n", "\n    "), flush=True)
            results.append(res)
    seconds = time.perf_counter() - start
    results.sort(
        key=lambda r: (
            r["kind"],
            r.get("module", ""),
            r.get("list", ""),
            r.get("index", 0),
            list(CHIPS).index(r["chip"]) if r["chip"] in CHIPS else 9,
        )
    )
    try:
        from importlib.metadata import version

        libtpu = version("libtpu")
    except Exception:  # noqa: BLE001
        libtpu = "?"
    text = table(
        results, jax_version=jax.__version__, libtpu=libtpu, seconds=seconds, jobs=args.jobs
    )
    print()
    print(text)
    problems = check(results) + [f"could not import tools/tpu_cases/{b}" for b in broken]
    full_run = not args.match and chips == list(CHIPS) and not args.no_step
    if not args.no_write and not problems and full_run:
        from experiments._benchmarks_md import write_section

        write_section(SECTION, text)
        print(f"\nwrote the '{SECTION}' section of BENCHMARKS.md")
    if problems:
        print(f"\ntpu-check FAILED ({len(problems)} problems):")
        for p in problems:
            print(" -", p)
        return 1
    print(f"\ntpu-check passed: {len(results)} compiles in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
