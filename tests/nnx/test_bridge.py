"""efflax from Flax NNX: every module through efflax.nnx.to_nnx, plain and sharded on a mesh."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import efflax

X = jax.random.normal(jax.random.key(1), (8, 8, 16))
TOKENS = jax.random.randint(jax.random.key(2), (2, 8), 0, 256)

MODULES = {
    "MultiHeadAttention": (
        lambda: efflax.nn.MultiHeadAttention(num_heads=4, num_kv_heads=2, causal=True, rope=True),
        X,
    ),
    "MonarchDense": (lambda: efflax.nn.MonarchDense(16, nblocks=4), X),
    "MoEFeedForward": (lambda: efflax.nn.MoEFeedForward(num_experts=4, hidden=32), X),
    "GatedAttentionUnit": (lambda: efflax.nn.GatedAttentionUnit(qk_dim=8), X),
    "FLASHQuad": (lambda: efflax.nn.FLASHQuad(qk_dim=8), X),
    "FLASH": (lambda: efflax.nn.FLASH(qk_dim=8, chunk_size=4), X),
    "LearnedTokenMerger": (lambda: efflax.nn.LearnedTokenMerger(num_tokens=4), X),
    "TokenLearner": (lambda: efflax.nn.TokenLearner(num_tokens=4, bottleneck_dim=8), X),
    "Encoder": (
        lambda: efflax.nn.Encoder(num_layers=1, d_model=16, num_heads=2, mlp_hidden=32),
        X,
    ),
    "TransformerLM": (
        lambda: efflax.models.TransformerLM(num_layers=1, d_model=16, num_heads=2),
        TOKENS,
    ),
    "ViT": (
        lambda: efflax.models.ViT(
            patch_size=2,
            num_layers=2,
            d_model=16,
            num_heads=2,
            mlp_hidden=32,
            num_classes=10,
            merger=functools.partial(efflax.nn.LearnedTokenMerger, num_tokens=4),
        ),
        jnp.ones((2, 8, 8)),
    ),
    "CNN1D": (lambda: efflax.models.CNN1D(), jnp.ones((2, 40))),
    "MLP": (lambda: efflax.models.MLP(), jnp.ones((2, 40))),
}


def _linen_params(model):
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_runs_from_nnx_like_linen(name):
    make, x = MODULES[name]
    module = make()
    model = efflax.nnx.to_nnx(module, x, rngs=nnx.Rngs(0))
    out = model(x)
    chex.assert_trees_all_close(out, module.apply(_linen_params(model), x), atol=1e-5)
    # The logical names stay as metadata on every parameter that has them.
    names = [
        v.get_metadata().get("out_sharding")
        for v in jax.tree.leaves(
            nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)
        )
    ]
    assert any(n is not None for n in names)


def test_decode_cache_matches_the_full_forward():
    lm = efflax.models.TransformerLM(num_layers=1, d_model=16, num_heads=2, num_kv_heads=1)
    full = efflax.nnx.to_nnx(lm, TOKENS, rngs=nnx.Rngs(0))
    want = full(TOKENS)
    decoder = efflax.nnx.to_nnx(lm, TOKENS, rngs=nnx.Rngs(0), decode=True)
    nnx.update(decoder, nnx.state(full, nnx.Param))
    step = nnx.jit(lambda m, t: m(t, decode=True, mutable=["cache"]))
    got = [step(decoder, TOKENS[:, i : i + 1]) for i in range(TOKENS.shape[1])]
    chex.assert_trees_all_close(jnp.concatenate(got, axis=1), want, atol=1e-4)


def test_moe_expert_parallel_on_a_mesh_places_params_like_linen():
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    layer = efflax.nn.MoEFeedForward(num_experts=8, hidden=16, capacity_factor=2.0, mesh=mesh)
    model = efflax.nnx.to_nnx(layer, X, rngs=nnx.Rngs(0), mesh=mesh)
    boxed = jax.eval_shape(layer.init, jax.random.key(0), X)["params"]
    want = efflax.sharding.params_shardings(boxed, mesh)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for path, leaf in jax.tree_util.tree_leaves_with_path(got):
        spec = functools.reduce(lambda t, k: t[k.key], path, want).spec
        assert leaf.sharding.spec == spec, path
    assert model.wi.sharding.spec[0] == "expert"  # type: ignore[attr-defined]
    plain = efflax.nn.MoEFeedForward(num_experts=8, hidden=16, capacity_factor=2.0)
    chex.assert_trees_all_close(
        nnx.jit(lambda m, x: m(x))(model, X), plain.apply(_linen_params(model), X), atol=1e-5
    )


def test_attention_heads_shard_over_model_axis_and_missing_axes_replicate():
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    attn = efflax.nn.MultiHeadAttention(num_heads=4, num_kv_heads=4)
    model = efflax.nnx.to_nnx(attn, X, rngs=nnx.Rngs(0), mesh=mesh)
    assert model.query["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    shardings = efflax.nnx.logical_shardings(model, jax.make_mesh((8,), ("data",)))
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert specs and all(all(a is None for a in spec) for spec in specs)
    out = nnx.jit(lambda m, x: m(x))(model, X)
    chex.assert_trees_all_close(out, attn.apply(_linen_params(model), X), atol=1e-5)


def test_dropout_stream_is_kept_and_params_stream_dropped():
    attn = efflax.nn.MultiHeadAttention(num_heads=2, dropout_rate=0.5)
    model = efflax.nnx.to_nnx(attn, X, rngs=nnx.Rngs(0, dropout=1), deterministic=True)
    a, b = model(X, deterministic=False), model(X, deterministic=False)
    assert not np.allclose(a, b)
    chex.assert_trees_all_close(model(X, deterministic=True), model(X, deterministic=True))
    plain = efflax.nnx.to_nnx(efflax.nn.MonarchDense(16), X, rngs=7)
    assert plain.to_nnx__rngs is None


def test_sam_training_step_and_sharpness_probe():
    x = jax.random.normal(jax.random.key(0), (64, 40))
    y = jnp.arange(64) % 10
    model = efflax.nnx.to_nnx(efflax.models.MLP(features=(32,)), x[:1], rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, efflax.optim.sam(optax.adam(1e-2)), wrt=nnx.Param)

    def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def grad_fn(params, _):
            return nnx.as_pure(nnx.grad(loss_fn)(nnx.merge(graphdef, params, rest), x, y))

        optimizer.update(model, grads, grad_fn=grad_fn)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(20)]
    assert losses[-1] < losses[0]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    probe = efflax.optim.SharpnessProbe(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest), x, y),
        every=1,
        learning_rate=1e-2,
        b1=0.9,
        eps=1e-8,
        num_steps=5,
    )
    out = probe.measure(nnx.as_pure(params), nnx.as_pure(optimizer.opt_state))
    assert np.isfinite(out["sharpness"]) and out["preconditioned_sharpness"] > 0


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="flax.linen Module"):
        efflax.nnx.to_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), X, rngs=0)
    with pytest.raises(TypeError, match="rngs must be"):
        efflax.nnx.to_nnx(efflax.nn.MonarchDense(16), X, rngs=True)
    with pytest.raises(ValueError, match="not in the logical-axis table"):
        efflax.nnx.to_nnx(
            efflax.nn.MonarchDense(16),
            X,
            rngs=0,
            mesh=jax.make_mesh((8,), ("data",)),
            rules=(("batch", "data"),),
        )
    with pytest.raises(TypeError, match="nnx.Module"):
        efflax.nnx.logical_shardings({"a": 1}, jax.make_mesh((8,), ("data",)))


def test_public_names():
    assert "nnx" in dir(efflax)
    for name in ("to_nnx", "shard", "logical_shardings"):
        assert hasattr(efflax.nnx, name)


def test_importing_efflax_nnx_starts_no_backend():
    import subprocess
    import sys

    script = (
        "from jax._src import xla_bridge\n"
        "def refuse(*a, **k):\n"
        "    raise SystemExit('a JAX backend was initialised at import time')\n"
        "xla_bridge.backends = refuse\n"
        "import efflax.nnx\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
