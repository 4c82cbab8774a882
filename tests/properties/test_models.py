"""Properties of ``efflax.models``: the MNIST-1D MLP and CNN against float64 numpy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from _hyp import FEW
from _hyp import INVALID
from _hyp import VALID
from _hyp import assert_close
from _hyp import bad_ints
from _hyp import f64
from _hyp import normal
from _hyp import props
from _hyp import random_variables
from _hyp import refused
from _hyp import seeds
from hypothesis import given
from hypothesis import strategies as st

from efflax import models as M

KEY = jax.random.key(0)


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


@FEW
@given(seeds, st.sampled_from([(5,), (6, 4)]))
def test_mlp_matches_numpy(seed, features):
    model = M.MLP(features=features, num_classes=3)
    x = jnp.asarray(normal(seed, (2, 4, 2)))  # flattened to [2, 8]
    params = random_variables(model, x, seed=seed)["params"]
    h = f64(x).reshape(2, -1)
    for i in range(len(features)):
        h = np.maximum(
            h @ f64(params[f"Dense_{i}"]["kernel"]) + f64(params[f"Dense_{i}"]["bias"]), 0
        )
    last = params[f"Dense_{len(features)}"]
    assert_close(
        _jitted_apply(model)({"params": params}, x),
        h @ f64(last["kernel"]) + f64(last["bias"]),
        rtol=1e-4,
        atol=1e-5,
    )


def _conv64(x, kernel, bias):
    """Stride-2 'padding 1' 1-D convolution, [b, length, c_in] -> [b, out, c_out], in float64."""
    width = kernel.shape[0]
    padded = np.pad(f64(x), ((0, 0), (1, 1), (0, 0)))
    out_len = (padded.shape[1] - width) // 2 + 1
    windows = np.stack([padded[:, 2 * i : 2 * i + width] for i in range(out_len)], 1)
    return np.einsum("bowc,wcd->bod", windows, f64(kernel)) + f64(bias)


@FEW
@given(seeds, st.sampled_from([(2, 40), (3, 17, 1), (1, 3)]))
def test_cnn1d_matches_numpy(seed, shape):
    model = M.CNN1D(channels=4, num_classes=3)
    x = jnp.asarray(normal(seed, shape))
    params = random_variables(model, x, seed=seed)["params"]
    h = f64(x)[..., None] if x.ndim == 2 else f64(x)
    for i in range(3):
        h = np.maximum(_conv64(h, params[f"conv{i}"]["kernel"], params[f"conv{i}"]["bias"]), 0)
    h = h.reshape(h.shape[0], -1)
    expected = h @ f64(params["Dense_0"]["kernel"]) + f64(params["Dense_0"]["bias"])
    assert_close(_jitted_apply(model)({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


@INVALID
@given(st.data())
def test_models_refuse(data):
    case = data.draw(
        st.sampled_from(["mlp_x", "features", "mlp_classes", "cnn_x", "channels", "cnn_classes"])
    )
    if case == "mlp_x":
        bad = data.draw(st.sampled_from([jnp.ones(8), jnp.float32(1), jnp.ones((0, 8))]))
        refused(lambda: M.MLP().init(KEY, bad), "x")
    elif case == "features":
        bad = data.draw(st.sampled_from([5, (0,), (4, -1), (2.5,), "16", (True,)]))
        refused(lambda: M.MLP(features=bad).init(KEY, jnp.ones((2, 8))), "features")
    elif case == "mlp_classes":
        refused(
            lambda: M.MLP(num_classes=data.draw(bad_ints().filter(lambda v: v is not None))).init(
                KEY, jnp.ones((2, 8))
            ),
            "num_classes",
        )
    elif case == "cnn_x":
        bad = data.draw(
            st.sampled_from(
                [jnp.ones(40), jnp.ones((2, 40, 1, 1)), jnp.ones((2, 2)), jnp.ones((0, 40))]
            )
        )
        refused(lambda: M.CNN1D().init(KEY, bad), "x")
    elif case == "channels":
        refused(
            lambda: M.CNN1D(channels=data.draw(bad_ints().filter(lambda v: v is not None))).init(
                KEY, jnp.ones((2, 40))
            ),
            "channels",
        )
    else:
        refused(
            lambda: M.CNN1D(num_classes=data.draw(bad_ints().filter(lambda v: v is not None))).init(
                KEY, jnp.ones((2, 40))
            ),
            "num_classes",
        )


# --------------------------------------------------------------------------- language model, ViT

_LM = M.TransformerLM(vocab_size=11, num_layers=1, d_model=8, num_heads=2, mlp_hidden=16)
_LM_APPLY = jax.jit(_LM.apply)


@props(1)
@given(seeds)
def test_transformer_lm_is_causal_and_generate_is_greedy_decoding(seed):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 11, (2, 6)), jnp.int32)
    variables = random_variables(_LM, tokens, seed=seed)
    logits = _LM_APPLY(variables, tokens)
    assert logits.shape == (2, 6, 11) and logits.dtype == jnp.float32
    changed = _LM_APPLY(variables, tokens.at[:, 4:].set((tokens[:, 4:] + 1) % 11))
    np.testing.assert_allclose(
        np.asarray(changed[:, :4]), np.asarray(logits[:, :4]), rtol=1e-5, atol=1e-5
    )
    # Greedy generation with the cache equals argmax decoding with the full forward.
    prompt = tokens[:, :3]
    new = M.generate(_LM, variables["params"], prompt, max_new_tokens=2, temperature=0.0)
    sequence = prompt
    for _ in range(2):
        step = jnp.argmax(_LM_APPLY(variables, sequence)[:, -1], -1).astype(jnp.int32)
        sequence = jnp.concatenate([sequence, step[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(sequence[:, 3:]))


@VALID
@given(seeds, st.sampled_from([(2, 8, 8, 3), (1, 4, 6), (3, 6, 4, 1)]), st.sampled_from([1, 2]))
def test_patchify_matches_numpy(seed, shape, patch):
    images = normal(seed, shape)
    x = images[..., None] if images.ndim == 3 else images
    b, h, w, c = x.shape
    expected = [
        x[i, r * patch : (r + 1) * patch, s * patch : (s + 1) * patch].reshape(-1)
        for i in range(b)
        for r in range(h // patch)
        for s in range(w // patch)
    ]
    got = M.patchify(jnp.asarray(images), patch)
    np.testing.assert_array_equal(
        np.asarray(got).reshape(-1, patch * patch * c), np.stack(expected)
    )


@props(2)
@given(seeds)
def test_vit_examples_are_independent(seed):
    model = M.ViT(patch_size=2, num_layers=1, d_model=8, num_heads=2, mlp_hidden=16, num_classes=3)
    images = jnp.asarray(normal(seed, (3, 4, 4, 1)))
    variables = random_variables(model, images, seed=seed)
    apply = _jitted_apply(model)
    logits = apply(variables, images)
    changed = apply(variables, images.at[1:].set(0.5))
    assert logits.shape == (3, 3) and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(np.asarray(changed[0]), np.asarray(logits[0]), rtol=1e-5, atol=1e-6)


@INVALID
@given(st.data())
def test_language_and_vision_models_refuse(data):
    tokens = jnp.zeros((2, 4), jnp.int32)
    small = dict(vocab_size=11, num_layers=1, d_model=8, num_heads=2)
    case = data.draw(
        st.sampled_from(
            ["lm_size", "tokens", "range", "generate", "rng", "prompt", "vit", "patch", "images"]
        )
    )
    if case == "lm_size":
        arg = data.draw(
            st.sampled_from(["vocab_size", "num_layers", "d_model", "num_heads", "mlp_hidden"])
        )
        refused(
            lambda: M.TransformerLM(
                **{**small, arg: data.draw(st.sampled_from([0, -1, 2.5]))}
            ).init(KEY, tokens),
            arg,
        )
    elif case == "tokens":
        bad = data.draw(st.sampled_from([tokens * 1.0, tokens[0], jnp.zeros((2, 0), jnp.int32)]))
        refused(lambda: M.TransformerLM(**small).init(KEY, bad), "tokens")
    elif case == "range":
        refused(
            lambda: M.TransformerLM(**small).init(
                KEY, tokens + data.draw(st.sampled_from([-1, 11]))
            ),
            "tokens",
        )
    elif case == "generate":
        arg, bad = data.draw(
            st.sampled_from(
                [
                    ("max_new_tokens", 0),
                    ("temperature", -1.0),
                    ("temperature", float("nan")),
                    ("top_k", 0),
                    ("top_k", 12),
                ]
            )
        )
        refused(
            lambda: M.generate(_LM, {}, tokens, **{"max_new_tokens": 2, "rng": KEY, arg: bad}), arg
        )
    elif case == "rng":
        refused(
            lambda: M.generate(
                _LM, {}, tokens, max_new_tokens=2, rng=data.draw(st.sampled_from([0, "key"]))
            ),
            "rng",
        )
    elif case == "prompt":
        bad = data.draw(st.sampled_from([tokens * 1.0, tokens + 11, jnp.zeros((2, 0), jnp.int32)]))
        refused(lambda: M.generate(_LM, {}, bad, max_new_tokens=2, temperature=0.0), "prompt")
    elif case == "vit":
        arg = data.draw(
            st.sampled_from(["d_model", "num_heads", "mlp_hidden", "num_classes", "num_layers"])
        )
        kwargs = dict(
            patch_size=2, num_layers=1, d_model=8, num_heads=2, mlp_hidden=16, num_classes=3
        )
        kwargs[arg] = data.draw(st.sampled_from([0, -1]))
        refused(lambda: M.ViT(**kwargs).init(KEY, jnp.ones((1, 4, 4))), arg)
    elif case == "patch":
        refused(
            lambda: M.patchify(jnp.ones((1, 4, 4)), data.draw(st.sampled_from([0, 3, True, 2.0]))),
            "patch_size",
        )
    else:
        bad = data.draw(
            st.sampled_from(
                [jnp.ones((4, 4)), jnp.ones((1, 2, 4, 4, 1)), "img", jnp.ones((0, 4, 4))]
            )
        )
        refused(lambda: M.patchify(bad, 2), "images")
