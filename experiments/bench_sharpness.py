"""Benchmark: cost of a 20-step Lanczos sharpness probe in gradient evaluations.

Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", arXiv 2207.14484 (2022).
On the ``adam_eos`` problem (tanh MLP 40-200-200-10, MSE, full batch of 1,000 MNIST-1D
examples, 50,410 parameters) after 200 Adam steps, times one jitted gradient, one HVP, the
preconditioned-sharpness probe (20 Lanczos steps = 20 HVPs) and the full probe (raw +
preconditioned, 40 HVPs): median (and minimum) of interleaved runs after a warm-up, as
ratios to the gradient measured in the same process. The 20-step estimate is first checked
against an 80-step Lanczos reference.

    python -m experiments.bench_sharpness            # about a minute on a 2-core CPU
    python -m experiments.bench_sharpness --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import functools
import os
import platform

import jax
import numpy as np
import optax

from efflax import curves
from efflax.optim import hvp
from efflax.optim import preconditioned_sharpness
from efflax.optim import sharpness
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import seed_state
from experiments import adam_eos

LANCZOS_STEPS = 20
REFERENCE_STEPS = 80


def bench(*, runs: int = 30, train_steps: int = 200) -> dict:
    arrays = adam_eos.load_data()
    batch = jax.tree.map(jax.numpy.asarray, arrays)
    model = adam_eos.make_model()
    loss = lambda params: adam_eos.mse(model.apply, params, batch)
    b2, eps = adam_eos.B2, adam_eos.EPS
    tx = optax.adam(1e-3, b1=adam_eos.B1, b2=b2, eps=eps)
    state = seed_state(model, tx, seed=0, example=np.zeros((1, 40), np.float32))
    step = make_train_step(lambda p, state, b, rng: adam_eos.mse(state.apply_fn, p, b))
    loader = adam_eos.full_batch_loader(arrays)
    state, _ = fit(
        state, step, loader, num_steps=train_steps, log_every=train_steps, progress=False
    )
    params, opt_state, key = state.params, state.opt_state, jax.random.key(1)

    def precond_probe(p, s, k, steps=LANCZOS_STEPS):
        return preconditioned_sharpness(loss, p, s, eps=eps, num_steps=steps, key=k, b2=b2)

    def full_probe(p, s, k):
        raw_key, pre_key = jax.random.split(k)
        raw = sharpness(loss, p, num_steps=LANCZOS_STEPS, key=raw_key)
        return raw, precond_probe(p, s, pre_key)

    # Correctness before timing: 20 steps against an 80-step reference.
    probe = jax.jit(precond_probe)
    estimate = float(probe(params, opt_state, key))
    reference_probe = jax.jit(functools.partial(precond_probe, steps=REFERENCE_STEPS))
    reference = float(reference_probe(params, opt_state, jax.random.key(2)))
    print(f"preconditioned sharpness: 20 steps {estimate:.6g}, 80 steps {reference:.6g}")
    rel_err = curves.relative_error(estimate, reference)
    assert rel_err < 1e-3, f"20-step Lanczos off by {rel_err:.2e} relative"

    times = curves.interleaved_times(
        {
            "grad": (jax.jit(jax.value_and_grad(loss)), (params,)),  # a training step's work
            "hvp": (jax.jit(lambda p, v: hvp(loss, p, v)), (params, params)),
            "precond_probe": (probe, (params, opt_state, key)),
            "full_probe": (jax.jit(full_probe), (params, opt_state, key)),
        },
        rounds=runs,
    )
    result = {
        "backend": jax.default_backend(),
        "machine": platform.processor() or platform.machine(),
        "num_params": sum(p.size for p in jax.tree_util.tree_leaves(params)),
        "lanczos_steps": LANCZOS_STEPS,
        "preconditioned_sharpness": estimate,
        "reference_80_steps": reference,
        "timings": {
            name: {"median_ms": 1e3 * t.median(), "min_ms": 1e3 * t.min(), "runs": len(t)}
            for name, t in times.items()
        },
    }
    for name in ("hvp", "precond_probe", "full_probe"):
        result[f"{name}_over_grad_median"] = times[name].median() / times["grad"].median()
        result[f"{name}_over_grad_min"] = times[name].min() / times["grad"].min()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    result = bench(runs=10 if parser.parse_args(argv).quick else 40)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    header = ["timed", "median ms", "min ms", "runs", "gradients (median)", "gradients (min)"]
    rows = []
    for name, t in result["timings"].items():
        ratios = [result.get(f"{name}_over_grad_{stat}") for stat in ("median", "min")]
        rows.append((name, t["median_ms"], t["min_ms"], t["runs"], *ratios))
    print(curves.markdown_table(header, rows, [None, "{:.2f}", "{:.2f}", None, "{:.1f}", "{:.1f}"]))
    print(
        f"preconditioned sharpness probe, {LANCZOS_STEPS} Lanczos steps: "
        f"{result['precond_probe_over_grad_median']:.1f} gradient evaluations (target <= ~40)"
    )


if __name__ == "__main__":
    main()
