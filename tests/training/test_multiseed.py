"""Many seeds (and arms) as one program: efflax.training.fit_seeds and its pieces."""

import logging
import re

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

from efflax import data
from efflax._src.training.multiseed import _compiled_init
from efflax.models import MLP
from efflax.stats import Estimate
from efflax.training import LossOutput
from efflax.training import SplitLoader
from efflax.training import TrainState
from efflax.training import cross_entropy_loss_fn
from efflax.training import fit
from efflax.training import fit_seeds
from efflax.training import init_params
from efflax.training import make_train_step
from efflax.training import per_seed
from efflax.training import per_seed_curve
from efflax.training import seed_key
from efflax.training import seed_state
from efflax.training import seeds_eval_fn
from efflax.training import stack_states
from efflax.training import unstack_state

MODEL = MLP(features=(16,))
TX = optax.adam(1e-2)
EXAMPLE = np.zeros((1, 40), np.float32)
SEEDS = (3, 5, 8)
STEPS = 12


def _make_state(seed):
    return seed_state(MODEL, TX, seed=seed, example=EXAMPLE)


def _loader(seed):
    return data.load("mnist1d", "train", 16, seed=seed, epochs=None)


def _noisy_loss(params, state, batch, rng):
    """Uses the step's key, so resume and per-seed keys must be exact."""
    logits = state.apply_fn({"params": params}, batch["x"])
    logits = logits + 0.1 * jax.random.normal(rng, logits.shape)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, LossOutput(metrics={"logit_mean": logits.mean()})


@pytest.fixture(scope="module")
def test_arrays():
    arrays = data.load_arrays("mnist1d", "test")
    return {k: v[:200] for k, v in arrays.items()}


def _leaves_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def _run(seeds, test_arrays, **kwargs):
    options = {"num_steps": STEPS, "eval_fn": seeds_eval_fn(test_arrays), "log_every": 4}
    return fit_seeds(_make_state, _noisy_loss, _loader, seeds=seeds, **{**options, **kwargs})


def test_n_seeds_at_once_equal_n_single_seed_runs_bit_exactly(test_arrays):
    together = _run(SEEDS, test_arrays)
    for i, seed in enumerate(SEEDS):
        alone = _run([seed], test_arrays)
        assert _leaves_equal(together.seed(i), alone.seed(0)), f"seed {seed} differs"
        assert together.per_seed("test/accuracy")[i] == alone.per_seed("test/accuracy")[0]
        # The logged loss is a batch mean that XLA may reduce in another order for another
        # number of seeds (JAX 0.12.1 does: one float32 rounding step); the state is bit-exact.
        np.testing.assert_allclose(
            together.per_seed("train/loss")[i], alone.per_seed("train/loss")[0], rtol=1e-6
        )


def test_each_seed_matches_a_plain_unvmapped_fit(test_arrays):
    together = _run(SEEDS, test_arrays)
    for i, seed in enumerate(SEEDS):
        state, _ = fit(
            _make_state(seed),
            make_train_step(_noisy_loss),
            _loader(seed),
            num_steps=STEPS,
            progress=False,
        )
        for a, b in zip(
            jax.tree.leaves(together.seed(i).params), jax.tree.leaves(state.params), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert int(together.seed(i).step) == STEPS


def test_resume_mid_run_is_exact(tmp_path, test_arrays):
    whole = _run(SEEDS, test_arrays)
    ckpt = tmp_path / "ckpt"
    first = _run(SEEDS, test_arrays, checkpoint_dir=ckpt, num_steps=5)
    assert int(first.state.step) == 5
    resumed = _run(SEEDS, test_arrays, checkpoint_dir=ckpt)
    assert int(resumed.state.step) == STEPS
    assert resumed.history[0]["step"] > 5  # it continued, it did not start again
    assert _leaves_equal(whole.state, resumed.state)
    np.testing.assert_array_equal(
        whole.per_seed("test/accuracy"), resumed.per_seed("test/accuracy")
    )


def test_per_seed_metric_keys_and_estimates(tmp_path, test_arrays):
    run = _run(SEEDS, test_arrays, metrics_path=tmp_path / "m.jsonl", eval_every=6)
    last = run.history[-1]
    for name in ("train/loss", "train/logit_mean", "test/accuracy", "test/loss"):
        values = [last[seed_key(name, i)] for i in range(len(SEEDS))]
        assert seed_key(name, len(SEEDS)) not in last
        assert last[name] == pytest.approx(np.mean(values), rel=1e-5)
        np.testing.assert_array_equal(run.per_seed(name), values)
    assert len(set(run.per_seed("test/loss"))) == len(SEEDS)  # the seeds differ
    estimate = run.estimate("test/accuracy", scale=100)
    assert isinstance(estimate, Estimate) and estimate.n == len(SEEDS)
    assert estimate.value == pytest.approx(100 * np.mean(run.per_seed("test/accuracy")))
    both = run.estimates("test/accuracy", "test/loss")
    assert both["test/accuracy"] == run.estimate("test/accuracy") and both["test/loss"].n == 3
    steps, curve = per_seed_curve(run.history, "test/accuracy")
    assert steps.tolist() == [6, 12] and curve.shape == (len(SEEDS), 2)
    with pytest.raises(ValueError, match="no record"):
        per_seed(run.history, "test/nothing")


def test_arms_train_together_and_pair_by_seed(test_arrays):
    arms = {"adam": _make_state, "sgd": lambda s: seed_state(MODEL, SGD, seed=s, example=EXAMPLE)}
    run = fit_seeds(
        arms,
        cross_entropy_loss_fn(),
        _loader,
        seeds=SEEDS,
        num_steps=STEPS,
        eval_fn=seeds_eval_fn(test_arrays),
        log_every=STEPS,
    )
    last = run.history[-1]
    for key in ("train/adam/loss", "train/sgd/accuracy", "test/adam/accuracy", "test/sgd/loss"):
        assert seed_key(key, len(SEEDS) - 1) in last and key in last
    # Each arm equals that arm trained alone (the arms of one step do not mix).
    alone = fit_seeds(
        arms["sgd"], cross_entropy_loss_fn(), _loader, seeds=SEEDS, num_steps=STEPS, log_every=STEPS
    )
    assert _leaves_equal(run.arm("sgd").params, alone.state.params)
    difference = run.paired("test/adam/accuracy", "test/sgd/accuracy")
    assert isinstance(difference, Estimate) and difference.n == len(SEEDS)


SGD = optax.sgd(0.1)


def test_split_loader_gives_each_seed_a_slice():
    loader = data.load("mnist1d", "train", 12, seed=0, epochs=None)
    split = SplitLoader(loader, 3)
    batch = next(split.iter_from(4))
    whole = loader.batch_at(4)
    assert batch["x"].shape == (3, 4, 40)
    np.testing.assert_array_equal(batch["x"][1], whole["x"][4:8])
    with pytest.raises(ValueError, match="divide"):
        SplitLoader(loader, 5)


def test_stack_and_unstack_round_trip():
    states = [_make_state(s) for s in SEEDS]
    stacked = stack_states(states)
    assert int(stacked.step) == 0 and stacked.step.shape == ()
    for i, state in enumerate(states):
        assert _leaves_equal(unstack_state(stacked, i), state)
    with pytest.raises(ValueError, match="one model and one optimizer"):
        stack_states([states[0], seed_state(MODEL, optax.adam(1e-2), seed=1, example=EXAMPLE)])
    with pytest.raises(ValueError, match="at least one"):
        stack_states([])


def test_the_docstring_example_runs(tmp_path):
    lines = fit_seeds.__doc__.split("Example")[1].splitlines()[1:]
    code = "\n".join(line.strip()[4:] for line in lines if line.strip()[:4] in (">>> ", "... "))
    code = code.replace("num_steps=1000", "num_steps=6").replace("/tmp/mlp_seeds", str(tmp_path))
    code = code.replace('run.estimate("test/accuracy")', 'estimate = run.estimate("test/accuracy")')
    scope = {}
    exec(code, scope)  # noqa: S102 - the example is this file's own fixed text
    assert isinstance(scope["estimate"], Estimate) and scope["estimate"].n == 5
    assert (tmp_path / "6").is_dir()  # the checkpoint of the final step


def test_init_params_is_the_models_init_as_one_program():
    model = MLP(features=(32, 16))
    eager = nn.unbox(model.init(jax.random.key(4), EXAMPLE)["params"])
    compiled = init_params(model, 4, EXAMPLE)
    assert jax.tree.structure(compiled) == jax.tree.structure(eager)
    for a, b in zip(jax.tree.leaves(compiled), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # float rounding only
    # A key works like its seed; another seed reuses the one compiled program.
    assert _leaves_equal(init_params(model, jax.random.key(4), EXAMPLE), compiled)
    other = init_params(model, 5, EXAMPLE)
    assert not _leaves_equal(other, compiled)
    assert _compiled_init(model)._cache_size() == 1


class _Unhashable(nn.Module):
    sizes: list  # a list attribute: the module cannot be hashed

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.sizes[0])(x)


def test_init_params_of_an_unhashable_model_runs_eagerly():
    model = _Unhashable(sizes=[3])
    with pytest.raises(TypeError):
        hash(model)
    params = init_params(model, 0, EXAMPLE)
    assert params["Dense_0"]["kernel"].shape == (40, 3)


def _compiled_programs(fn):
    """``fn()`` and the names of the programs XLA compiled meanwhile (``jax.log_compiles``)."""
    names = []

    class Handler(logging.Handler):
        def emit(self, record):
            found = re.match(r"Finished XLA compilation of (\S+)", record.getMessage())
            if found:
                names.append(found.group(1))

    handler, logger = Handler(), logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
    return names


def test_states_are_built_and_stacked_by_one_program_each_not_one_per_leaf():
    # Eagerly, each leaf's copy, zeros_like (adam's moments) and stack compiled on its own: tens
    # of programs per model. Now one optimizer init and one stack, whatever the number of leaves.
    model = MLP(features=(7, 6, 5, 4, 3))  # 10 leaves, each shape different
    tx = optax.adam(1e-3)
    params = [init_params(model, s, EXAMPLE) for s in (0, 1)]

    def build():
        return stack_states(
            [TrainState.create(apply_fn=model.apply, params=p, tx=tx, rng=jax.random.key(0))
             for p in params]
        )  # fmt: skip

    programs = _compiled_programs(build)
    assert "jit(init_fn)" in programs and "jit(_stack_leaves)" in programs, programs
    assert len(programs) <= 4, programs  # not one per leaf
    assert _compiled_programs(build) == []  # built again: nothing new to compile
    stacked = build()
    for i, p in enumerate(params):
        assert _leaves_equal(unstack_state(stacked, i).params, p)
        assert _leaves_equal(unstack_state(stacked, i).opt_state, tx.init(p))
