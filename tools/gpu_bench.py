"""`make gpu-bench`: on a machine with an NVIDIA GPU, the GPU tests and the kernel benchmarks.

Runs ``pytest -m gpu`` (the op tests compiled instead of interpreted, on the CPU tests' shapes),
then ``experiments.bench_attention`` (efflax's Pallas FlashAttention vs cuDNN, JAX's Pallas
``mha`` and XLA) and ``experiments.bench_monarch`` (the Monarch kernels and XLA path vs a dense
matmul), each in its own process, and writes their tables, with the date and the machine, into
the ``gpu-bench`` section of BENCHMARKS.md. Each benchmark checks its results against the
reference before timing (see the benchmark modules).

Without a GPU it says so and measures nothing (exit code 0, BENCHMARKS.md untouched):
``--dry-run`` shows what would run.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTION = "gpu-bench"
STEPS = (
    ("gpu tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-m", "gpu"]),
    ("attention benchmark", [sys.executable, "-m", "experiments.bench_attention"]),
    ("Monarch benchmark", [sys.executable, "-m", "experiments.bench_monarch"]),
)


def gpu_present() -> tuple[bool, str]:
    """Whether JAX sees an NVIDIA/AMD GPU here, and what it sees instead."""
    try:
        import jax

        from pallas_kernels._compat import is_gpu

        if is_gpu():
            return True, f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
        return False, f"JAX's default backend is {jax.default_backend()!r}"
    # A broken CUDA install (JAX raises RuntimeError when the backend cannot start) or no JAX
    # is also 'no GPU'; any other error is a bug and propagates.
    except (ImportError, RuntimeError) as e:
        return False, f"JAX could not start ({type(e).__name__}: {e})"


def tables_of(output: str) -> str:
    """The markdown tables and the summary lines of a step's output (what goes in the file)."""
    keep = []
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("|") or stripped.startswith(("device:", "jax ", "x =", "target")):
            keep.append(stripped)
        elif (
            stripped and stripped[0].isdigit() and (" passed" in stripped or " failed" in stripped)
        ):
            keep.append(stripped)  # pytest's summary line
        elif keep and keep[-1].startswith("|") and not stripped:
            keep.append("")
    return "\n".join(keep).strip()


def render(results: list[dict], machine: str, date: str) -> str:
    lines = [
        f"## GPU tests and kernel benchmarks (`make gpu-bench`, {date})",
        "",
        f"Machine: {machine}.",
        "",
    ]
    for res in results:
        status = "ok" if res["returncode"] == 0 else f"exit code {res['returncode']}"
        lines.append(
            f"### {res['name']} (`{' '.join(res['command'][1:])}`, {res['seconds']:.0f} s, {status})"
        )
        lines.append("")
        lines.append(res["tables"] or "(no table printed)")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    present, what = gpu_present()
    if args.dry_run or not present:
        if not present:
            print(
                f"gpu-bench: NO GPU PRESENT ({what}); nothing was measured and BENCHMARKS.md is unchanged."
            )
        print("On a machine with an NVIDIA GPU, `make gpu-bench` runs:")
        for name, command in STEPS:
            print(f"  {name}: {' '.join(command[1:])}")
        return 0
    from experiments._benchmarks_md import machine_description
    from experiments._benchmarks_md import today
    from experiments._benchmarks_md import write_section

    results = []
    env = dict(
        os.environ,
        MPLBACKEND="Agg",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    for name, command in STEPS:
        print(f"=== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        output = proc.stdout + proc.stderr
        print(output[-6000:], flush=True)
        results.append(
            {
                "name": name,
                "command": command,
                "returncode": proc.returncode,
                "seconds": time.perf_counter() - start,
                "tables": tables_of(proc.stdout),
            }
        )
    text = render(results, machine_description(), today())
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of BENCHMARKS.md")
    print(text)
    return max(r["returncode"] for r in results)


if __name__ == "__main__":
    sys.exit(main())
