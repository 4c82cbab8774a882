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
import os
import platform
import statistics
from collections.abc import Callable

import jax
import numpy as np
import optax

from efflax.curves import interleaved_times
from efflax.optim import hvp
from efflax.optim import preconditioned_sharpness
from efflax.optim import sharpness
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import seed_state
from experiments.adam_eos import B1
from experiments.adam_eos import B2
from experiments.adam_eos import EPS
from experiments.adam_eos import full_batch_loader
from experiments.adam_eos import load_data
from experiments.adam_eos import make_model
from experiments.adam_eos import mse

LANCZOS_STEPS = 20
REFERENCE_STEPS = 80


def _interleaved_seconds(fns: dict[str, tuple[Callable, tuple]], *, runs: int) -> dict:
    """Median and minimum wall time of each ``fn(*args)``, timed round-robin after a warm-up."""
    times = interleaved_times(fns, rounds=runs)
    return {
        name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "runs": len(t)}
        for name, t in times.items()
    }


def bench(*, runs: int = 30, train_steps: int = 200) -> dict:
    arrays = load_data()
    batch = jax.tree.map(jax.numpy.asarray, arrays)
    model = make_model()
    loss = lambda params: mse(model.apply, params, batch)
    tx = optax.adam(1e-3, b1=B1, b2=B2, eps=EPS)
    state = seed_state(model, tx, seed=0, example=np.zeros((1, 40), np.float32))
    step = make_train_step(lambda params, state, batch, rng: mse(state.apply_fn, params, batch))
    state, _ = fit(
        state, step, full_batch_loader(arrays), num_steps=train_steps, log_every=train_steps,
        progress=False,
    )  # fmt: skip
    params, opt_state = state.params, state.opt_state
    key = jax.random.key(1)

    grad_fn = jax.jit(jax.value_and_grad(loss))  # a training step's work: loss and gradient
    hvp_fn = jax.jit(lambda p, v: hvp(loss, p, v))

    def precond_probe(steps):
        return jax.jit(
            lambda p, s, k: preconditioned_sharpness(
                loss, p, s, eps=EPS, num_steps=steps, key=k, b2=B2
            )
        )

    probe_fn = precond_probe(LANCZOS_STEPS)

    @jax.jit
    def full_probe(p, s, k):
        raw_key, pre_key = jax.random.split(k)
        raw = sharpness(loss, p, num_steps=LANCZOS_STEPS, key=raw_key)
        pre = preconditioned_sharpness(
            loss, p, s, eps=EPS, num_steps=LANCZOS_STEPS, key=pre_key, b2=B2
        )
        return raw, pre

    # Correctness before timing: 20 steps against an 80-step reference.
    estimate = float(probe_fn(params, opt_state, key))
    reference = float(precond_probe(REFERENCE_STEPS)(params, opt_state, jax.random.key(2)))
    rel_err = abs(estimate - reference) / abs(reference)
    print(f"preconditioned sharpness: 20 steps {estimate:.6g}, 80 steps {reference:.6g}")
    assert rel_err < 1e-3, f"20-step Lanczos off by {rel_err:.2e} relative"

    timings = _interleaved_seconds(
        {
            "grad": (grad_fn, (params,)),
            "hvp": (hvp_fn, (params, params)),
            "precond_probe": (probe_fn, (params, opt_state, key)),
            "full_probe": (full_probe, (params, opt_state, key)),
        },
        runs=runs,
    )
    result = {
        "backend": jax.default_backend(),
        "machine": platform.processor() or platform.machine(),
        "num_params": sum(p.size for p in jax.tree_util.tree_leaves(params)),
        "lanczos_steps": LANCZOS_STEPS,
        "preconditioned_sharpness": estimate,
        "reference_80_steps": reference,
        "timings": timings,
    }
    for name in ("hvp", "precond_probe", "full_probe"):
        for stat in ("median", "min"):
            result[f"{name}_over_grad_{stat}"] = (
                timings[name][f"{stat}_ms"] / timings["grad"][f"{stat}_ms"]
            )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    result = bench(runs=10 if args.quick else 40)
    t = result["timings"]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for name in t:
        ratio = (
            ""
            if name == "grad"
            else (
                f" = {result[name + '_over_grad_median']:.1f} grads (min: "
                f"{result[name + '_over_grad_min']:.1f})"
            )
        )
        print(
            f"{name}: median {t[name]['median_ms']:.2f} ms, min {t[name]['min_ms']:.2f} ms "
            f"over {t[name]['runs']} runs{ratio}"
        )
    print(
        f"preconditioned sharpness probe, {LANCZOS_STEPS} Lanczos steps: "
        f"{result['precond_probe_over_grad_median']:.1f} gradient evaluations (target <= ~40)"
    )


if __name__ == "__main__":
    main()
