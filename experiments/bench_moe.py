"""Benchmark: expert-choice MoE vs top-1 / top-2 token choice vs a dense FFN of equal FLOPs.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368 (2022). Times one
training step (forward + backward to the parameters and the input) of an FFN layer on
`[batch, tokens, d]`. Every variant does the same expert FLOPs: the dense FFN has hidden `2h`;
expert choice (capacity factor 2), top-2 (capacity factor 1) and the `2h`-wide top-1 (capacity
factor 1) fill exactly `2 * tokens` slots of width `h` (or `tokens` slots of width `2h`).
Dispatch by gather + scatter-add and by the dense one-hot einsum, on one device and on every
device of the host (experts over a mesh axis `'expert'`, tokens exchanged by all-to-all). Before
timing, the gather and einsum layers are checked against each other. Median of repeated runs
(round-robin over the variants) after a warm-up; ratios against the dense FFN run beside them.
The MoE rows time the layer alone (aux loss coefficients 0, statistics not collected, so XLA
drops them); `expert_choice/gather+aux` is the training configuration: default router z-loss
added to the loss and every routing statistic collected.

    python -m experiments.bench_moe            # batch 32 x 128 tokens, d 256, 8 experts
    python -m experiments.bench_moe --quick    # batch 16 x 64 tokens, d 128

Run as its own process it asks XLA for 8 host devices (when JAX is not yet initialised);
otherwise it uses the devices that exist and says how many.
"""

from __future__ import annotations

import os
import sys

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in _FLAGS:
    os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_force_host_platform_device_count=8".strip()

import argparse  # noqa: E402
import platform  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from efflax import curves  # noqa: E402
from efflax.nn import DenseFeedForward  # noqa: E402
from efflax.nn import MoEFeedForward  # noqa: E402
from efflax.nn import moe_aux_loss  # noqa: E402

_WITH_AUX = "+aux"  # name suffix: the step adds the z-loss and collects routing statistics
# router: (expert width in units of h, capacity factor): the expert FLOPs of a dense FFN of 2h
_ROUTERS = {"expert_choice": (1, 2.0), "top1": (2, 1.0), "top2": (1, 1.0)}


def _layers(hidden: int, num_experts: int, mesh: Mesh | None) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = {"dense": DenseFeedForward(2 * hidden)}
    for dispatch in ("gather", "einsum"):
        for router, (width, capacity) in _ROUTERS.items():
            moe = dict(num_experts=num_experts, mesh=mesh, dispatch=dispatch)
            layer = MoEFeedForward(
                hidden=width * hidden, router=router, capacity_factor=capacity, **moe
            )
            layers[f"{router}/{dispatch}"] = layer.clone(z_loss_coef=0.0, load_balancing_coef=0.0)
            if router == "expert_choice" and dispatch == "gather":
                layers[f"{router}/{dispatch}{_WITH_AUX}"] = layer  # as in training
    return layers


def _train_step(layer: nn.Module, *, with_aux: bool = False):
    """Loss and gradients; `with_aux` adds the sown losses and returns the routing statistics.

    Without it the sown values are dead code, which XLA removes: the step times the layer alone.
    """

    def loss(params, x):
        collections = ["losses", "intermediates"] if with_aux else ["losses"]
        y, state = layer.apply({"params": params}, x, deterministic=False, mutable=collections)
        value = jnp.mean(jnp.square(y))
        if with_aux:
            return value + moe_aux_loss(state["losses"]), state["intermediates"]
        return value, {}

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def bench(*, batch: int, tokens: int, d: int, hidden: int, num_experts: int, rounds: int):
    """Rows ``(devices, name, median ms, vs dense (median), vs dense (min), FLOPs vs dense)``."""
    devices = jax.devices()
    meshes = {1: None}
    if len(devices) > 1 and num_experts % len(devices) == 0:
        meshes[len(devices)] = Mesh(np.asarray(devices).reshape(1, -1), ("data", "expert"))
    x = jax.random.normal(jax.random.key(0), (batch, tokens, d), jnp.float32)
    rows = []
    for num_devices, mesh in meshes.items():
        x_in = x
        if mesh is not None:
            x_in = jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "expert"))))
        steps, outputs, flops = {}, {}, {}
        for name, layer in _layers(hidden, num_experts, mesh).items():
            params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(1), x)["params"])
            steps[name] = (_train_step(layer, with_aux=name.endswith(_WITH_AUX)), (params, x_in))
            apply = jax.jit(lambda p, x, layer=layer: layer.apply({"params": p}, x))
            outputs[name] = apply(params, x_in)
            if name.endswith(_WITH_AUX):
                err = float(jnp.max(jnp.abs(outputs[name] - outputs[name[: -len(_WITH_AUX)]])))
                if err > 0:
                    raise AssertionError(f"{name}: the aux losses changed the output by {err}")
            if name.endswith("/einsum"):
                gathered = outputs[name.replace("/einsum", "/gather")]
                err = float(jnp.max(jnp.abs(gathered - outputs[name])))
                if err > 1e-4:
                    raise AssertionError(f"{name}: gather differs from einsum by {err}")
                print(f"  {num_devices} device(s) {name}: |gather - einsum| = {err:.1e}")
            # The compared programs do the work they claim: every step keeps the FFN's two
            # forward products and its four backward products (XLA's FLOPs reported beside).
            stats = curves.program_stats(steps[name][0], *steps[name][1])
            if stats.dots < 6:
                raise AssertionError(f"{name}: the step has {stats.dots} products, expected >= 6")
            flops[name] = stats.flops
        times = curves.interleaved_times(steps, rounds=rounds)
        dense = times["dense"]
        for name, t in times.items():
            print(
                f"  {num_devices} device(s) {name:22s} median {t.median() * 1e3:8.2f} ms, "
                f"min {t.min() * 1e3:8.2f} ms ({len(t)} runs)"
            )
            flop_ratio = flops[name] / flops["dense"] if flops[name] and flops["dense"] else None
            ratios = (t.median() / dense.median(), t.min() / dense.min())
            rows.append((num_devices, name, t.median() * 1e3, *ratios, flop_ratio))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    if parser.parse_args(argv).quick:
        shape = dict(batch=16, tokens=64, d=128, hidden=128, num_experts=8, rounds=10)
    else:
        shape = dict(batch=32, tokens=128, d=256, hidden=256, num_experts=8, rounds=25)
    devices = f"{len(jax.devices())} devices, {platform.processor() or platform.machine()}"
    print(f"bench_moe on {jax.devices()[0].platform} ({devices}), float32, {shape}")
    header = ["devices", "layer / dispatch", "step, median (ms)", "vs dense (median)",
              "vs dense (min)", "step FLOPs vs dense (XLA's count)"]  # fmt: skip
    formats = [None, None, "{:.2f}", "{:.2f}x", "{:.2f}x", "{:.2f}"]
    print("\n" + curves.markdown_table(header, bench(**shape), formats))


if __name__ == "__main__":
    main()
