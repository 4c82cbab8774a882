"""Issue 23: a concrete 0-d JAX/NumPy scalar is accepted wherever the same Python number is
(schedules, SAF/MESA), and the SAF/MESA KL term refuses an empty batch instead of giving NaN."""

import jax.numpy as jnp
import numpy as np
import pytest

from efflax.optim import cycle_end_steps
from efflax.optim import cycle_lengths
from efflax.optim import exponential_cyclic_cosine_schedule
from efflax.optim import trajectory_loss


def test_schedules_accept_zero_dim_scalars():
    assert cycle_lengths(10, cycle_multiplier=jnp.float32(2.0), num_cycles=3) == [10, 20, 40]
    assert cycle_lengths(10, cycle_multiplier=np.float64(1.5), num_cycles=jnp.int32(4)) == [
        10,
        15,
        23,
        34,
    ]
    assert cycle_end_steps(
        jnp.int32(10), num_cycles=3, warmup_steps=np.int64(5), cycle_multiplier=jnp.asarray(2.0)
    ) == cycle_end_steps(10, num_cycles=3, warmup_steps=5, cycle_multiplier=2.0)
    a = exponential_cyclic_cosine_schedule(
        jnp.float32(0.1), 10, num_cycles=3, end_value=np.float32(0.0)
    )
    b = exponential_cyclic_cosine_schedule(0.1, 10, num_cycles=3, end_value=0.0)
    for step in (0, 7, 25):
        assert float(a(step)) == float(b(step))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"cycle_multiplier": jnp.float32(0.5)}, r"cycle_multiplier"),
        ({"cycle_multiplier": jnp.ones(2)}, r"cycle_multiplier"),
        ({"cycle_multiplier": jnp.asarray(True)}, r"cycle_multiplier"),
        ({"num_cycles": jnp.float32(2.0)}, r"num_cycles"),
    ],
)
def test_schedules_still_refuse_bad_arrays(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        cycle_lengths(10, **{"cycle_multiplier": 2.0, "num_cycles": 3, **kwargs})


def test_trajectory_loss_accepts_a_jax_temperature_and_refuses_an_empty_batch():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    assert np.isclose(
        trajectory_loss(logits, 2 * logits, temperature=jnp.float32(0.5)),
        trajectory_loss(logits, 2 * logits, temperature=0.5),
    )
    with pytest.raises(ValueError, match=r"logits.shape=\(0, 3\)"):
        trajectory_loss(jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"logits"):
        trajectory_loss("abc", logits)
    with pytest.raises(ValueError, match=r"target_logits"):
        trajectory_loss(logits, jnp.ones((4, 3), int))
