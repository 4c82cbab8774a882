"""efflax.plan: compile a step for TPU / GPU targets without them, and read what it needs.

The compile tests need the compile-only toolchain (libtpu, JAX's CUDA plugin: ``make
plan-env``) and skip without it (``make test``); ``make plan-check`` runs them with
``EFFLAX_REQUIRE_PLAN_TARGETS=1``, which turns such a skip into a failure.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import Mesh

from efflax import plan
from efflax._src.plan import core

REQUIRE = os.environ.get("EFFLAX_REQUIRE_PLAN_TARGETS") == "1"


def _toolchain(platform: str) -> None:
    """Skips (or, under ``make plan-check``, fails) when ``platform`` cannot be compiled for."""
    target = {"tpu": "v5e-8", "gpu": "h100x8"}[platform]
    try:
        core._check_toolchain(core.TARGETS[target])
    except plan.PlanError as e:
        if REQUIRE:
            pytest.fail(f"EFFLAX_REQUIRE_PLAN_TARGETS=1 but {platform} targets are missing: {e}")
        pytest.skip(f"no {platform} compile-only toolchain here (make plan-env)")


# The tiny configuration: 2 layers, d_model 128, 4 heads (head_dim 32), GLU hidden 512,
# vocabulary 256; batch 16 x 256 tokens on data 4 x model 2.
TINY = plan.LMConfig(size="tiny", batch=16, seq=256, model=2)


def _tiny_bytes_by_hand() -> tuple[int, int, int]:
    """Per-device bytes of the tiny model's float32 parameters, AdamW state and other args."""
    model_ways = 2
    attention = 4 * (128 * 4 * 32) // model_ways  # query, key, value, out: heads split
    mlp = 3 * (128 * 512) // model_ways  # gate, up, down: the 512 'mlp' axis split
    norms = 2 * 128  # replicated
    per_layer = attention + mlp + norms
    embedding_and_logits = 2 * (256 * 128) // model_ways  # 'vocab' split
    params = 4 * (2 * per_layer + embedding_and_logits + 128)  # + final norm
    opt_state = 2 * params + 4  # Adam's mu and nu, and its int32 count
    batch = 2 * (16 // 4) * 256 * 4  # x and y: int32 rows split over data 4
    other = batch + 4 + 8  # + int32 step + uint32[2] rng
    return params, opt_state, other


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(plan.PlanError, match=r"target='v5e-9' is not a known target.*v5e-8"):
        plan.get_target("v5e-9")
    with pytest.raises(plan.PlanError, match="not a known target"):
        plan.compile_for(lambda x: x, target="tpu-v99")


def test_v5p_names_count_tensorcores():
    assert plan.get_target("v5p-8").chips == 4
    assert plan.get_target("v5e-256").chips == 256
    assert plan.get_target("h100x16").chips == 16


def test_missing_libtpu_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(plan.PlanError, match=r"needs libtpu.*make plan-env.*efflax\[tpu\]"):
        plan.target_mesh("v5e-8")
    with pytest.raises(plan.PlanError, match="make plan-env"):
        plan.compile_for(lambda x: x, jax.ShapeDtypeStruct((2,), jnp.float32), target="v5e-8")


def test_sharding_that_does_not_divide_names_array_and_axis():
    devices = np.asarray(jax.devices("cpu")[:8]).reshape(2, 1, 4)
    mesh = Mesh(devices, ("data", "expert", "model"))
    tree = {
        "dense": {
            "kernel": nn.LogicallyPartitioned(
                jax.ShapeDtypeStruct((16, 6), jnp.float32), names=("embed", "mlp")
            )
        }
    }
    with pytest.raises(
        plan.PlanError,
        match=r"state\['dense'\]\['kernel'\]: dimension 1 of shape \(16, 6\) \(logical axis "
        r"'mlp'\) is split over mesh axes \('model',\) \(4 ways\)",
    ):
        plan.shard_abstract(tree, mesh)
    with pytest.raises(plan.PlanError, match=r"batch\['x'\].*does not divide 5"):
        plan.abstract_batch({"x": ((5, 3), jnp.int32)}, mesh)


def test_collectives_are_read_from_hlo_text():
    hlo = """
  %all-reduce.1 = f32[1024]{0} all-reduce(%p), replica_groups={}
  %ag-start = (bf16[8]{0}, bf16[64]{0}) all-gather-start(%q)
  %ag-done = bf16[64]{0} all-gather-done(%ag-start)
  ROOT %a2a = (bf16[4,8]{1,0}, bf16[4,8]{1,0}) all-to-all(%r, %s)
  %fusion = f32[1024]{0} fusion(%all-reduce.1), kind=kLoop
"""
    assert plan.collectives_of(hlo) == {
        "all-gather": (1, 128),
        "all-reduce": (1, 4096),
        "all-to-all": (1, 128),
    }


def test_matmul_flops_counts_dots_and_scans():
    def f(x, w):
        def body(c, _):
            return c @ w, None

        return jax.lax.scan(body, x, None, length=3)[0]

    jaxpr = jax.make_jaxpr(f)(jnp.zeros((4, 8)), jnp.zeros((8, 8)))
    flops, caveats = plan.matmul_flops(jaxpr)
    assert flops == 3 * 2 * 4 * 8 * 8
    assert caveats == []


def test_cli_unknown_target_is_a_message_not_a_trace():
    out = subprocess.run(
        [sys.executable, "-m", "efflax.cli", "plan", "--target", "v5e-7", "--size", "tiny"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "efflax plan: target='v5e-7' is not a known target" in out.stderr
    assert "Traceback" not in out.stderr


def _check_tiny(p: plan.Plan) -> None:
    params, opt_state, other = _tiny_bytes_by_hand()
    assert p.mesh_shape == {"data": 4, "expert": 1, "model": 2}
    assert (p.params_bytes, p.opt_state_bytes, p.other_argument_bytes) == (
        params,
        opt_state,
        other,
    )
    assert p.fits and p.total_bytes < 2**28
    assert "all-reduce" in p.collectives  # gradients over data, activations over model
    assert p.flops > 6 * (params / 4 * 2) * 16 * 256 * 0.5  # ~6 N T at least


def test_tiny_lm_planned_for_v5e_8():
    _toolchain("tpu")
    p = plan.plan_lm(TINY, "v5e-8", progress=lambda line: None)
    _check_tiny(p)
    # libtpu pads small buffers; the parameters and optimizer state are the arguments.
    params, opt_state, other = _tiny_bytes_by_hand()
    assert abs(p.argument_bytes - (params + opt_state + other)) < 0.01 * p.argument_bytes
    assert p.estimated_seconds is None or 0 < p.estimated_seconds < 1
    text = str(p)
    assert "v5e-8" in text and "FITS" in text and "XLA's estimate, not a measurement" in text


def test_tiny_lm_planned_for_h100x8():
    _toolchain("gpu")
    p = plan.plan_lm(TINY, "h100x8", progress=lambda line: None)
    _check_tiny(p)
    params, opt_state, other = _tiny_bytes_by_hand()
    assert p.argument_bytes == params + opt_state + other  # exactly, on GPU
    assert p.estimated_seconds is None
    assert any("no step-time estimate for GPU" in n for n in p.notes)


def test_bad_mesh_and_heads_split_on_a_target():
    _toolchain("tpu")
    with pytest.raises(plan.PlanError, match=r"model=3 does not divide the 8 chips of v5e-8"):
        plan.target_mesh("v5e-8", model=3)
    heads_over_8 = plan.LMConfig(size="tiny", batch=8, seq=128, model=8)
    with pytest.raises(plan.PlanError, match=r"logical axis '(kv_)?heads'.*8 ways"):
        plan.plan_lm(heads_over_8, "v5e-8", progress=lambda line: None)


def test_step_on_other_devices_is_refused():
    _toolchain("tpu")
    cpu = jax.sharding.NamedSharding(
        Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",)), jax.sharding.PartitionSpec()
    )
    x = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=cpu)
    with pytest.raises(plan.PlanError, match=r"args\[0\] is placed on devices that are not v5e-8"):
        plan.compile_for(lambda x: x * 2, x, target="v5e-8")


def test_every_public_name_imports():
    import efflax

    assert efflax.plan is plan
    for name in plan.__all__:
        assert hasattr(plan, name), name


def _fake_plan(layers: int) -> plan.Plan:
    return plan.Plan(
        target=plan.get_target("v5e-8"),
        mesh_shape={"data": 8, "expert": 1, "model": 1},
        params_bytes=100 * layers,
        opt_state_bytes=200 * layers,
        other_argument_bytes=8,
        argument_bytes=300 * layers + 8,
        output_bytes=300 * layers,
        alias_bytes=300 * layers,
        temp_bytes=1000 + 50 * layers,
        code_bytes=0,
        collectives={"all-reduce": (2 * layers, 64 * layers)},
        flops=1e9 * layers,
        device_flops=None,
        estimated_seconds=0.001 * layers,
        compile_seconds=1.0,
        versions={},
    )


def test_extrapolation_is_linear_in_depth_and_says_so():
    deep = plan.extrapolate(_fake_plan(1), _fake_plan(2), (1, 2), 12)
    expected = _fake_plan(12)
    assert deep.temp_bytes == expected.temp_bytes and deep.total_bytes == expected.total_bytes
    assert deep.collectives == {"all-reduce": (24, 768)}
    assert deep.estimated_seconds == pytest.approx(0.012)
    assert any(n.startswith("EXTRAPOLATED: compiled at 1 and 2 layers") for n in deep.notes)
    with pytest.raises(plan.PlanError, match="two increasing layer counts"):
        plan.extrapolate(_fake_plan(1), _fake_plan(2), (2, 1), 12)


def test_libtpu_out_of_memory_message_is_read():
    message = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 17.13G of 15.75G hbm. Exceeded hbm capacity by 1.38G."
    )
    assert core._out_of_memory(message) == ("used", int(17.13 * 2**30))
    newer = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
        "memory required for HLO temporaries (36.00G) exceeds available HBM (15.75G)."
    )
    assert core._out_of_memory(newer) == ("temp", 36 * 2**30)
    assert core._out_of_memory("INTERNAL: something else") is None


def test_a_step_that_cannot_fit_is_a_plan_that_says_so():
    _toolchain("tpu")
    mesh = plan.target_mesh("v5e-8")
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((9 * 2**30,), jnp.bfloat16, sharding=replicated)  # 18 GiB a chip
    p = plan.compile_for(lambda x: x * 2, x, target="v5e-8", progress=lambda line: None)
    assert not p.fits and p.headroom_bytes < -2 * 2**30
    assert "DOES NOT FIT" in str(p)
