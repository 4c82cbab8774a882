"""Plans of efflax's ``TransformerLM`` and its variants, by size and target (``efflax plan``).

The variants are the swaps efflax offers for a transformer block: the attention kernel
(XLA attention or efflax's FlashAttention kernel), a Monarch MLP (Dao et al., arXiv:2204.00595),
a mixture-of-experts FFN with expert choice or top-2 routing and expert parallelism (Zhou et
al., arXiv:2202.09368), and FLASH blocks in place of attention + MLP (Hua et al.,
arXiv:2202.10447).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from efflax._src.plan import core

__all__ = ["LMConfig", "SIZES", "plan_lm"]

# GPT-2 small (Radford et al. 2019): 12 x 768, 12 heads, vocabulary 50257 padded to 50304;
# "1b": 24 x 2048, 16 heads (1.3B parameters with the GLU MLP at 4 x d_model... see param
# counts in BENCHMARKS.md). Sizes are those of the trunk; the MLP is efflax's SwiGLU.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, d_model=128, num_heads=4, vocab_size=256),
    "gpt2-small": dict(num_layers=12, d_model=768, num_heads=12, vocab_size=50304),
    "1b": dict(num_layers=24, d_model=2048, num_heads=16, vocab_size=50304),
}
ATTENTION = ("xla", "pallas")
MLP = ("dense", "monarch", "moe-ec", "moe-top2")
BLOCKS = ("transformer", "flash")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """One ``TransformerLM`` training step to plan.

    Attributes:
      size: a key of :data:`SIZES`.
      batch: global batch (sequences per step).
      seq: tokens per sequence.
      attention: ``'xla'`` or ``'pallas'`` (efflax's FlashAttention kernel; GPU targets).
      mlp: ``'dense'`` (SwiGLU), ``'monarch'`` (its three matrices as Monarch layers),
        ``'moe-ec'`` (expert choice) or ``'moe-top2'`` (GShard top-2), experts split over the
        mesh's ``expert`` axis.
      block: ``'transformer'`` or ``'flash'`` (FLASH blocks: two GAUs with mixed-chunk
        attention per block).
      data / expert / model: mesh ways (``data=None``: the chips left).
      nblocks: Monarch blocks.
      num_experts: MoE experts.
      chunk_size: FLASH chunk.
      dtype: compute dtype (parameters and optimizer state stay float32).
      num_layers: overrides the size's depth.
    """

    size: str = "gpt2-small"
    batch: int = 16
    seq: int = 1024
    attention: str = "xla"
    mlp: str = "dense"
    block: str = "transformer"
    data: int | None = None
    expert: int = 1
    model: int = 1
    nblocks: int = 4
    num_experts: int = 8
    chunk_size: int = 256
    dtype: str = "bfloat16"
    num_layers: int | None = None

    def check(self) -> None:
        for name, value, allowed in (
            ("size", self.size, tuple(SIZES)),
            ("attention", self.attention, ATTENTION),
            ("mlp", self.mlp, MLP),
            ("block", self.block, BLOCKS),
        ):
            if value not in allowed:
                raise core.PlanError(f"{name}={value!r} must be one of {', '.join(allowed)}")
        if self.block == "flash" and (self.mlp != "dense" or self.attention != "xla"):
            raise core.PlanError(
                "block='flash' replaces attention and MLP: leave mlp='dense' and attention='xla'"
            )
        if self.mlp.startswith("moe") and self.expert > 1 and self.num_experts % self.expert:
            raise core.PlanError(
                f"num_experts={self.num_experts} does not divide over the mesh's expert axis "
                f"({self.expert} ways)"
            )

    @property
    def label(self) -> str:
        parts = [self.size, f"b{self.batch}", f"s{self.seq}"]
        if self.num_layers is not None:
            parts.insert(1, f"L{self.num_layers}")
        if self.block == "flash":
            parts.append(f"flash-c{self.chunk_size}")
        else:
            parts += [f"attn-{self.attention}", f"mlp-{self.mlp}"]
        return " ".join(parts)


class _MoEBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + moe(norm(x))`` (TransformerLM contract)."""

    num_heads: int
    hidden: int
    num_experts: int
    router: str
    mesh: Any
    implementation: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, *, deterministic: bool = True, decode: bool = False):
        from efflax._src.models.lm import _rms_norm
        from efflax._src.nn.attention import MultiHeadAttention
        from efflax._src.nn.moe import MoEFeedForward

        args = (self.dtype, jnp.float32)
        h = MultiHeadAttention(
            self.num_heads,
            causal=True,
            rope=True,
            implementation=self.implementation,
            decode=decode,
            dtype=self.dtype,
            name="attention",
        )(_rms_norm(*args, "attention_norm")(x), deterministic=deterministic)
        x = x + h
        h = MoEFeedForward(
            self.num_experts,
            self.hidden,
            router=self.router,
            # Expert choice ranks a whole group, future tokens included, so MoEFeedForward
            # refuses it in a causal block; the plan compiles the same computation non-causally.
            causal=self.router != "expert_choice",
            mesh=self.mesh,
            dtype=self.dtype,
            name="moe",
        )(_rms_norm(*args, "mlp_norm")(x), deterministic=deterministic)
        return x + h


def _attention_implementation(config: LMConfig, target: core.Target) -> Any:
    if config.attention == "xla":
        return "xla"
    if target.platform != "gpu":
        raise core.PlanError(
            f"attention='pallas' on {target.name}: efflax's FlashAttention kernel is a Pallas "
            "Triton (GPU) kernel; plan TPU targets with attention='xla'"
        )
    from pallas_kernels.attention import PallasTritonAttention

    # Compiled, not interpreted: this host has no GPU, so the default (None) would interpret.
    return PallasTritonAttention(interpret=False)


def build_model(config: LMConfig, target: core.Target, mesh: Any) -> nn.Module:
    """The ``TransformerLM`` of ``config`` for ``target`` (abstract: nothing is initialised)."""
    from efflax._src.models.lm import TransformerBlock
    from efflax._src.models.lm import TransformerLM
    from efflax._src.nn.gau import FLASH
    from efflax._src.nn.monarch import monarchify

    config.check()
    dims = SIZES[config.size]
    dtype = jnp.dtype(config.dtype)
    attention = _attention_implementation(config, target)
    block: Callable[..., nn.Module] | None = None
    hidden = 4 * dims["d_model"]
    if config.block == "flash":

        def block(**kwargs):
            return FLASH(
                causal=True,
                chunk_size=config.chunk_size,
                implementation="xla",
                dtype=dtype,
                **kwargs,
            )

    elif config.mlp == "monarch":

        def block(name: str):
            inner = TransformerBlock(
                num_heads=dims["num_heads"],
                mlp_hidden=hidden,
                implementation=attention,
                dtype=dtype,
            )
            return monarchify(
                inner,
                nblocks=config.nblocks,
                implementation="xla",
                include=lambda dense, _: dense.name in ("gate", "up", "down"),
            ).clone(name=name)

    elif config.mlp.startswith("moe"):
        router = "expert_choice" if config.mlp == "moe-ec" else "top2"

        def block(name: str):
            return _MoEBlock(
                num_heads=dims["num_heads"],
                # Each expert a quarter of the dense MLP: about the compute of one dense MLP
                # per token at capacity factor 2 (expert choice) or top-2.
                hidden=hidden // 4,
                num_experts=config.num_experts,
                router=router,
                mesh=mesh if config.expert > 1 else None,
                implementation=attention,
                dtype=dtype,
                name=name,
            )

    return TransformerLM(
        vocab_size=dims["vocab_size"],
        num_layers=dims["num_layers"] if config.num_layers is None else config.num_layers,
        d_model=dims["d_model"],
        num_heads=dims["num_heads"],
        mlp_hidden=hidden,
        implementation=attention,
        block=block,
        dtype=dtype,
    )


def _loss_fn(params, state, batch, rng):
    del rng
    logits, aux = state.apply_fn({"params": params}, batch["x"], mutable=["losses"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss + sum((jnp.sum(v) for v in jax.tree.leaves(aux)), jnp.zeros((), jnp.float32))


def plan_lm(
    config: LMConfig,
    target: str | core.Target,
    *,
    depths: tuple[int, int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> core.Plan:
    """Compiles one AdamW training step of ``config`` for ``target`` and returns its plan.

    Args:
      config: the model, batch and mesh.
      target: a name from ``efflax.plan.TARGETS``.
      depths: compile at these two layer counts only and extrapolate the compiled figures
        linearly to the full depth (compile time grows with depth: minutes per layer on a
        small CPU). Parameter and optimizer bytes and FLOPs stay exact; the plan says so.
      progress: called with a line before and after each compile.

    Example:
      >>> print(plan_lm(LMConfig("gpt2-small", batch=16, seq=1024, model=1), "v5e-8"))
    """
    target = core.get_target(target)
    config.check()
    if depths is None:
        return _plan_lm(config, target, progress)
    depth = SIZES[config.size]["num_layers"] if config.num_layers is None else config.num_layers
    low, high = depths
    plans = [
        _plan_lm(dataclasses.replace(config, num_layers=n), target, progress) for n in (low, high)
    ]
    plan = core.extrapolate(plans[0], plans[1], (low, high), depth)
    # Exact at full depth without compiling: the abstract state's shards and the traced FLOPs.
    exact = _plan_lm(dataclasses.replace(config, num_layers=depth), target, progress, trace=True)
    plan.params_bytes = exact["params"]
    plan.opt_state_bytes = exact["opt_state"]
    plan.other_argument_bytes = exact["other"]
    plan.flops = exact["flops"]
    return plan


def _plan_lm(
    config: LMConfig,
    target: core.Target,
    progress: Callable[[str], None] | None,
    trace: bool = False,
) -> Any:
    from efflax._src.training.state import make_train_step

    mesh = core.target_mesh(target, data=config.data, expert=config.expert, model=config.model)
    model = build_model(config, target, mesh)
    tokens = jax.ShapeDtypeStruct((config.batch, config.seq), jnp.int32)
    try:
        state = core.abstract_train_state(model, optax.adamw(3e-4), tokens, mesh=mesh)
    except core.PlanError:
        raise
    except ValueError as e:  # efflax's own checks (sizes, divisibility) name the value
        raise core.PlanError(f"{config.label} on {target.name}: {e}") from None
    shapes = {
        "x": ((config.batch, config.seq), jnp.int32),
        "y": ((config.batch, config.seq), jnp.int32),
    }
    batch = core.abstract_batch(shapes, mesh)
    step = make_train_step(_loss_fn)
    if trace:
        args = (state, batch)
        core._check_on_target(args, target)
        with core._lowering_context(target, args):
            flops, _ = core.matmul_flops(jax.make_jaxpr(step)(*args))
        return {**core._categorise(args), "flops": flops}
    return core.compile_for(
        step, state, batch, target=target, progress=progress, label=config.label
    )
