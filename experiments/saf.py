"""SAF and MESA (Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv 2205.14083)
against SGD and SAM on the MNIST-1D CNN.

Claims checked, with the paper's own metric: SAF and MESA end in flatter minima than SGD, where
flatness is the SAM objective's sharpness ``max_{||e|| <= rho} L(w + e) - L(w)`` (the standard
one-step approximation ``L(w + rho g / ||g||) - L(w)``, rho = 0.05 as in SAM, on training data),
at no loss of accuracy, and at less cost than SAM (the paper: SAF ~SGD's cost, MESA 1.15x, SAM
~2x; the overheads over SGD are reported, not decided: a few percent is below the timing noise of
a shared CPU). The top Hessian eigenvalue is reported beside the SAM sharpness (not part of the
verdict).

Official-code semantics (PAPERS.md): the trajectory term is on while
``start_epoch < epoch < end_epoch`` (strict, 0-based; start = 30% of the epochs, no end within
these runs), lag 3, temperature 5, lambda 0.3 (SAF) / 0.8 (MESA) as in the README and run.sh.
Evaluation uses an EMA of the weights for every method alike (the official ImageNet commands run
``--model-ema`` and report the EMA model); MESA's teacher is that same EMA (timm ModelEmaV2:
started from the initial weights, updated after every step). Sharpness is measured on the
evaluated (EMA) weights. Several seeds train at once (a vmapped step); differences are paired by
seed (same initial weights and data order for every method).

Step times: one process, single-seed steps timed round-robin (``efflax.curves.interleaved_times``) at a
batch large enough that compute dominates (as in the paper's ImageNet setting); SAF's own work
(buffer read, KL term and its gradient, buffer write) is also timed alone, because the difference
of two whole steps is below the noise of a shared machine.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax import data
from efflax.curves import decisive_clock
from efflax.curves import interleaved_times
from efflax.experiment import Claims
from efflax.experiment import Panel
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import plot_panels
from efflax.experiment import register
from efflax.models import CNN1D
from efflax.optim import MESA
from efflax.optim import SAF
from efflax.optim import logits_buffer_bytes
from efflax.optim import sam
from efflax.optim import sharpness
from efflax.stats import mean_interval
from efflax.stats import paired_difference
from efflax.stats import ratio_interval
from efflax.training import LossOutput
from efflax.training import SeedLoader
from efflax.training import SeedRun
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import repeated_step
from efflax.training import seed_state
from efflax.training import seeds_eval_fn
from efflax.training import seeds_step
from efflax.training import stack_states

METHODS = ("sgd", "sam", "saf", "mesa")
PAPER_OVERHEAD = {"sgd": 1.0, "sam": 2.0, "saf": 1.007, "mesa": 1.15}  # ImageNet, RN-50
ACCURACY_TOLERANCE = 0.5  # points below SGD that still count as "no loss of accuracy"


@dataclasses.dataclass(frozen=True)
class Config:
    epochs: int
    seeds: tuple[int, ...]
    batch_size: int = 100
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sam_rho: float = 0.05
    temperature: float = 5.0
    lag: int = 3
    saf_lam: float = 0.3
    mesa_lam: float = 0.8
    start_fraction: float = 0.3  # the term is on for epochs > 30% of the epochs (PAPERS.md)
    ema_epochs: float = 2.0  # EMA time constant in epochs (0.9998 on ImageNet is ~4 epochs)
    sharpness_examples: int = 1000
    timing_batch_size: int = 1000
    timing_rounds: int = 10
    timing_repeat: int = 5

    @property
    def start_epoch(self) -> int:
        """The term is on for epochs strictly above this one (official semantics)."""
        return max(self.lag - 1, round(self.start_fraction * self.epochs))


QUICK = Config(epochs=15, seeds=tuple(range(5)), timing_rounds=8, timing_repeat=3)
FULL = Config(epochs=60, seeds=tuple(range(10)), timing_rounds=40)


def _task_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def _saf(cfg: Config, num_examples: int, steps_per_epoch: int) -> SAF:
    return SAF(
        num_examples,
        10,
        steps_per_epoch=steps_per_epoch,
        lag=cfg.lag,
        lam=cfg.saf_lam,
        temperature=cfg.temperature,
        start_epoch=cfg.start_epoch,
    )


def _ema(cfg: Config, steps_per_epoch: int) -> MESA:
    """MESA: its EMA is also every method's evaluation model."""
    return MESA(
        steps_per_epoch=steps_per_epoch,
        decay=1.0 - 1.0 / (cfg.ema_epochs * steps_per_epoch),
        lam=cfg.mesa_lam,
        temperature=cfg.temperature,
        start_epoch=cfg.start_epoch,
    )


def _loss_fn(method: str, cfg: Config, num_examples: int, steps_per_epoch: int):
    """The loss of SGD (and SAM), SAF or MESA; every method keeps the evaluation EMA in
    ``extra['ema']`` (an ``optax.EmaState``)."""
    saf = _saf(cfg, num_examples, steps_per_epoch)
    mesa = _ema(cfg, steps_per_epoch)

    def loss_fn(params, state, batch, rng):
        del rng
        # The EMA after the previous step (timm ModelEmaV2 timing): the teacher of this step.
        ema = mesa.update_ema(state.extra["ema"], {"params": params})
        logits = state.apply_fn({"params": params}, batch["x"])
        loss = _task_loss(logits, batch["y"])
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}
        extra = {"ema": ema}
        if method == "saf":
            loss, buffer, saf_metrics = saf.loss(
                loss, logits, state.extra["saf"], batch["index"], state.step
            )
            extra["saf"] = buffer
            metrics = {**metrics, **saf_metrics}
        elif method == "mesa":
            teacher = state.apply_fn(ema.ema, batch["x"])
            loss, mesa_metrics = mesa.loss(loss, logits, teacher, state.step)
            metrics = {**metrics, **mesa_metrics}
        return loss, LossOutput(metrics=metrics, extra=extra)

    return loss_fn


def _optimizer(method: str, cfg: Config, schedule: optax.Schedule) -> optax.GradientTransformation:
    sgd = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(schedule, momentum=cfg.momentum),
    )
    return sam(sgd, rho=cfg.sam_rho) if method == "sam" else sgd


MODEL = CNN1D()  # one object: programs keyed by the model are shared by the methods


def make_method(
    method: str, cfg: Config, num_examples: int, steps_per_epoch: int
) -> tuple[Callable[[int, optax.Schedule], Any], Callable[[], Callable]]:
    """``(make_state(seed, schedule), make_step())`` of one method (the step unjitted)."""
    txs: dict[int, optax.GradientTransformation] = {}

    def make_state(seed: int, schedule: optax.Schedule):
        tx = txs.setdefault(id(schedule), _optimizer(method, cfg, schedule))

        def extra(params):
            out = {"ema": _ema(cfg, steps_per_epoch).init({"params": params})}
            if method == "saf":
                out["saf"] = _saf(cfg, num_examples, steps_per_epoch).init()
            return out

        return seed_state(MODEL, tx, seed=seed, extra=extra, example=np.zeros((1, 40), np.float32))

    def make_step():
        # SAM: the SGD loss; the optimizer takes the gradient at the perturbed point itself.
        loss_fn = _loss_fn("sgd" if method == "sam" else method, cfg, num_examples, steps_per_epoch)
        return make_train_step(loss_fn, pass_grad_fn=method == "sam", jit=False)

    return make_state, make_step


def ema_params(state) -> Any:
    """The evaluated parameters of a state from :func:`make_method`: its EMA's."""
    return state.extra["ema"].ema["params"]


def _sam_sharpness(apply_fn, params, x, y, rho: float) -> jax.Array:
    """``L(w + rho g / ||g||) - L(w)``: the SAM objective's sharpness, one-step approximation."""
    loss = lambda p: _task_loss(apply_fn({"params": p}, x), y)
    value, grads = jax.value_and_grad(loss)(params)
    norm = optax.tree.norm(grads)
    perturbed = jax.tree.map(lambda p, g: p + rho * g / (norm + 1e-12), params, grads)
    return loss(perturbed) - value


def measure_sharpness(state, train: dict, cfg: Config) -> dict[str, np.ndarray]:
    """Per seed, on the EMA weights and ``sharpness_examples`` training examples: the SAM
    sharpness and the top Hessian eigenvalue (20 Lanczos steps)."""
    x = jnp.asarray(train["x"][: cfg.sharpness_examples])
    y = jnp.asarray(train["y"][: cfg.sharpness_examples])
    sam_, eig = _sharpness_per_seed(MODEL, ema_params(state), x, y, cfg.sam_rho)
    return {"sam_sharpness": np.asarray(sam_), "top_eigenvalue": np.asarray(eig)}


@functools.partial(jax.jit, static_argnums=(0, 4))  # one program for every method's states
def _sharpness_per_seed(model, params, x, y, rho: float):
    apply_fn = model.apply

    def one(params):
        loss = lambda p: _task_loss(apply_fn({"params": p}, x), y)
        return (
            _sam_sharpness(apply_fn, params, x, y, rho),
            sharpness(loss, params, num_steps=20, key=jax.random.key(0)),
        )

    return jax.vmap(one)(params)


def train_method(method: str, cfg: Config, train: dict, test: dict) -> dict[str, Any]:
    loaders = [data.Loader(train, cfg.batch_size, seed=s, epochs=cfg.epochs) for s in cfg.seeds]
    loader = SeedLoader(loaders)
    make_state, make_step = make_method(method, cfg, loader.num_examples, loader.steps_per_epoch)
    total = cfg.epochs * loader.steps_per_epoch
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, total)
    state = stack_states([make_state(s, schedule) for s in cfg.seeds])
    ema_eval = seeds_eval_fn(test, params_of=ema_params)
    raw_eval = seeds_eval_fn(test, prefix="raw")
    state, history = fit(
        state,
        seeds_step(make_step()),
        loader,
        eval_fn=lambda state: {**ema_eval(state), **raw_eval(state)},
        eval_every=loader.steps_per_epoch * max(cfg.epochs // 5, 1),
        log_every=loader.steps_per_epoch,
        progress=False,
    )
    run = SeedRun(state, history, cfg.seeds)
    return {
        "test_accuracy": 100 * run.per_seed("test/accuracy"),
        "raw_test_accuracy": 100 * run.per_seed("raw/accuracy"),
        **measure_sharpness(state, train, cfg),
    }


def step_times(cfg: Config, train: dict) -> dict[str, Any]:
    """Per-step seconds of every method (single seed) and of SAF's own work alone, round-robin,
    at the timing batch."""
    batch_size = cfg.timing_batch_size
    loader = data.Loader(train, batch_size, seed=0, epochs=None)
    batch = jax.tree.map(jnp.asarray, loader.batch_at(0))
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, 10_000)
    fns = {}
    for method in METHODS:
        make_state, make_step = make_method(
            method, cfg, loader.num_examples, loader.steps_per_epoch
        )
        # Past the switch-on epoch, so the SAF/MESA terms are live (they are computed either
        # way: the switch is a jnp.where, not a branch).
        state = make_state(0, schedule)
        state = state.replace(step=jnp.asarray(5_000, jnp.int32))
        fns[method] = (repeated_step(jax.jit(make_step(), donate_argnums=(0,)), state, batch), ())

    # SAF's own work: buffer read, KL term and its gradient w.r.t. the logits, buffer write.
    # One step per epoch, from epoch lag on: the term is on.
    saf = dataclasses.replace(_saf(cfg, loader.num_examples, 1), start_epoch=cfg.lag - 1)
    buffer = {"b": saf.init()}
    saf_step = jnp.asarray(cfg.lag + 1)
    logits = jax.random.normal(jax.random.key(0), (batch_size, 10))

    def saf_work(buffer, logits):
        def loss(z):
            total, new_buffer, _ = saf.loss(0.0, z, buffer, batch["index"], saf_step)
            return total, new_buffer

        (_, new_buffer), grad = jax.value_and_grad(loss, has_aux=True)(logits)
        return new_buffer, grad

    saf_work = jax.jit(saf_work, donate_argnums=(0,))

    def call_saf_work():
        buffer["b"], grad = saf_work(buffer["b"], logits)
        return grad

    fns["saf_work"] = (call_saf_work, ())
    return interleaved_times(fns, rounds=cfg.timing_rounds, warmup=2, repeat=cfg.timing_repeat)


def _plot(results: dict, estimates: dict, png: pathlib.Path) -> None:
    def bars(key, methods=METHODS):  # one point per method: mean over seeds
        return {m.upper(): ([i], [np.mean(results[m][key])]) for i, m in enumerate(methods)}

    style = dict.fromkeys((m.upper() for m in METHODS), "o")
    overhead = {
        m.upper(): ([i], [estimates[f"{m}_step_time_over_sgd"].value])
        for i, m in enumerate(METHODS[1:], start=1)
    }
    overhead["paper"] = (range(1, len(METHODS)), [PAPER_OVERHEAD[m] for m in METHODS[1:]])
    plot_panels(
        png,
        [
            Panel("test accuracy of the EMA model (%)", bars("test_accuracy"), style=style),
            Panel("SAM sharpness L(w + rho g/|g|) - L(w)", bars("sam_sharpness"), style=style),
            Panel("top Hessian eigenvalue", bars("top_eigenvalue"), style=style),
            Panel("step time / SGD", overhead, hlines=(1.0,), style={**style, "paper": "r_"}),
        ],
        title="MNIST-1D CNN: SGD vs SAM vs SAF vs MESA (means over seeds)",
    )


@register(
    "saf",
    description="SAF/MESA vs SGD and SAM on MNIST-1D: sharpness, accuracy, cost",
    timing_sensitive="sections",  # times only through efflax.curves.interleaved_times
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    cfg = QUICK if quick else FULL
    train, test = data.load_arrays("mnist1d", "train"), data.load_arrays("mnist1d", "test")
    results: dict[str, dict] = {}
    for method in METHODS:
        results[method] = r = train_method(method, cfg, train, test)
        print(
            f"{method:4s}: EMA test acc {mean_interval(r['test_accuracy']).format('.2f')}%, SAM "
            f"sharpness {mean_interval(r['sam_sharpness']).format('.4f')}, top eigenvalue "
            f"{mean_interval(r['top_eigenvalue']).format('.3f')}",
            flush=True,
        )
    times = step_times(cfg, train)
    clock = decisive_clock()
    seconds = {k: t.on(clock) for k, t in times.items()}
    claims, e = Claims(), {}
    for method in ("saf", "mesa", "sam"):
        for key in ("sam_sharpness", "top_eigenvalue"):
            e[f"{method}_minus_sgd_{key}"] = paired_difference(
                results[method][key], results["sgd"][key]
            )
        e[f"{method}_minus_sgd_accuracy_points"] = paired_difference(
            results[method]["test_accuracy"], results["sgd"]["test_accuracy"]
        )
        e[f"{method}_step_time_over_sgd"] = ratio_interval(seconds[method], seconds["sgd"])
    e["saf_work_fraction_of_sgd_step"] = ratio_interval(seconds["saf_work"], seconds["sgd"])
    for method in ("saf", "mesa"):
        e[f"{method}_step_time_over_sam"] = ratio_interval(seconds[method], seconds["sam"])
    e["sgd_test_accuracy"] = mean_interval(results["sgd"]["test_accuracy"])
    status = {}
    for method in ("saf", "mesa"):
        name = method.upper()
        status[f"{name} flatter"] = claims.check(
            f"{method}_minus_sgd_sam_sharpness", e[f"{method}_minus_sgd_sam_sharpness"], 0.0, "<="
        )
        status[f"{name} accuracy"] = claims.check(
            f"{method}_minus_sgd_accuracy_points",
            e[f"{method}_minus_sgd_accuracy_points"],
            -ACCURACY_TOLERANCE,
        )
        status[f"{name} cheaper than SAM"] = claims.check(
            f"{method}_step_time_over_sam", e[f"{method}_step_time_over_sam"], 1.0, "<="
        )
    _plot(results, e, pathlib.Path(out_dir) / "saf_mesa.png")
    measured = (
        f"SAM sharpness - SGD's (paired by seed): SAF {e['saf_minus_sgd_sam_sharpness'].format('+.4f')} "
        f"({status['SAF flatter']}), MESA {e['mesa_minus_sgd_sam_sharpness'].format('+.4f')} "
        f"({status['MESA flatter']}), SAM {e['sam_minus_sgd_sam_sharpness'].format('+.4f')}; top "
        f"Hessian eigenvalue - SGD's (not in the verdict): SAF "
        f"{e['saf_minus_sgd_top_eigenvalue'].format('+.3f')}, MESA "
        f"{e['mesa_minus_sgd_top_eigenvalue'].format('+.3f')}, SAM "
        f"{e['sam_minus_sgd_top_eigenvalue'].format('+.3f')}; EMA test accuracy - SGD's "
        f"({e['sgd_test_accuracy'].format('.1f')}%): SAF "
        f"{e['saf_minus_sgd_accuracy_points'].format('+.2f')} ({status['SAF accuracy']} at "
        f">= -{ACCURACY_TOLERANCE}), MESA {e['mesa_minus_sgd_accuracy_points'].format('+.2f')} "
        f"({status['MESA accuracy']}), SAM {e['sam_minus_sgd_accuracy_points'].format('+.2f')}; "
        f"step time / SGD at batch {cfg.timing_batch_size} ({clock} time; reported, not "
        f"decided: overheads of a few percent are below a shared CPU's timing noise): SAF "
        f"{e['saf_step_time_over_sgd'].format('.3f')} (paper 1.007; its own work alone "
        f"{e['saf_work_fraction_of_sgd_step'].format('.3f')} of an SGD step), MESA "
        f"{e['mesa_step_time_over_sgd'].format('.2f')} (paper 1.15), SAM "
        f"{e['sam_step_time_over_sgd'].format('.2f')} (paper ~2); decided: SAF / SAM "
        f"{e['saf_step_time_over_sam'].format('.2f')} ({status['SAF cheaper than SAM']}), "
        f"MESA / SAM {e['mesa_step_time_over_sam'].format('.2f')} "
        f"({status['MESA cheaper than SAM']}); "
        f"{cfg.epochs} epochs, {len(cfg.seeds)} seeds, term on for epochs > {cfg.start_epoch}"
    )
    return claims.verdict(
        out_dir,
        claim=(
            "SAF and MESA end flatter than SGD by the paper's metric (SAM sharpness, rho 0.05) "
            f"with no loss of accuracy (>= SGD - {ACCURACY_TOLERANCE} points), at less cost than "
            "SAM (paper: SAF ~SGD's cost, MESA 1.15x, SAM ~2x)"
        ),
        measured=measured,
        metrics={
            "config": cfg,
            "start_epoch_strict": cfg.start_epoch,
            "device": str(jax.devices()[0].device_kind),
            "results": results,
            "all_estimates": e,
            "step_seconds": {k: {"wall": list(t), "cpu": t.cpu} for k, t in times.items()},
            "paper_step_time_vs_sgd": PAPER_OVERHEAD,
            "saf_buffer_bytes": logits_buffer_bytes(len(train["y"]), 10, cfg.lag),
        },
    )


if __name__ == "__main__":
    cli_main("saf")
