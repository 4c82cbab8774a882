"""Gated Attention Unit (GAU), FLASH-Quad and FLASH: one layer in place of attention + FFN.

Weiguo Hua, Zihang Dai, Hanxiao Liu, Quoc V. Le, "Transformer Quality in Linear Time",
ICML 2022, arXiv:2202.10447. A GAU gates a GLU-style value path by single-head ``relu^2``
attention computed from one small shared representation ``Z`` (per-dimension scale and offset
make Q and K); FLASH makes it linear in length with mixed-chunk attention: quadratic inside
chunks, linear attention across them (``pallas_kernels.mixed_chunk``).

One unit, as a pre-norm residual block (``x + GAU(LayerNorm(x))``):

    u, v = split(silu(x W_uv))           # [T, e] each, e = expansion * d
    z = silu(x W_z)                       # [T, s]
    q_r, k_r = gamma_r * z + beta_r       # per-dimension scale/offset, one pair per role r
    a = mixed_chunk_attention(q, k, v)    # relu^2(q.k * scale + rel_pos_bias), RoPE on q and k
    out = (u * a) W_o

The paper's defaults are ``s = 128``, ``e = 2d``, SiLU, ``C = 256``, ``gamma ~ N(0, 0.02)``
centred at 0 and scores divided by the chunk (or sequence) length inside ``relu^2``. With that
initialisation ``relu^2`` of the scores is ~1e-12 at the start, i.e. the attention is dead
until the scales grow (see ``scale_init``); both knobs are attributes.

Example:
  >>> block = FLASH(chunk_size=128, causal=True)           # two GAUs ~ one MHA + FFN block
  >>> variables = block.init(jax.random.key(0), x)         # x: [batch, seq, d]
  >>> y = block.apply(variables, x)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflax._src.nn import _decode
from efflax._src.nn.attention import apply_rotary_embedding
from pallas_kernels import _checks
from pallas_kernels.mixed_chunk import mixed_chunk_attention
from pallas_kernels.op import Implementation

__all__ = [
    "FLASH",
    "FLASHQuad",
    "GatedAttentionUnit",
    "NORMALIZATIONS",
    "SCALE_INITS",
    "relative_position_buckets",
]

Array = jax.Array
Initializer = Callable[..., Array]

NORMALIZATIONS = ("chunk", "length", "none")
SCALE_INITS = ("paper", "one")


def relative_position_buckets(
    relative_position: Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """T5's relative-position buckets (Raffel et al., arXiv:1910.10683) of ``key - query``.

    Distances below ``num_buckets / 2`` (per direction) get their own bucket, longer ones share
    log-spaced buckets up to ``max_distance``. Causal (``bidirectional=False``): future keys
    fall into bucket 0 with the query itself (they are masked anyway).
    """
    _checks.array("relative_position", relative_position, kind="integer")
    bidirectional = _checks.boolean("bidirectional", bidirectional)
    # Each direction needs an exact bucket (num_buckets // 2 per direction when bidirectional)
    # and log-spaced ones beyond it up to max_distance.
    _checks.int_at_least("num_buckets", num_buckets, 4 if bidirectional else 2)
    exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    _checks.int_at_least("max_distance", max_distance, exact + 1)
    distance = -relative_position  # > 0: the key is in the past
    bucket = jnp.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (distance < 0).astype(distance.dtype) * num_buckets
        distance = jnp.abs(distance)
    else:
        distance = jnp.maximum(distance, 0)
    max_exact = num_buckets // 2
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(distance.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class _GAUSettings(nn.Module):
    """Attributes shared by ``GatedAttentionUnit``, ``FLASHQuad`` and ``FLASH``.

    Attributes:
      qk_dim: ``s``, width of the shared representation ``Z`` (paper: 128).
      expansion: ``e / d`` (paper: 2). A GAU has ``~ 3 e d + s d`` parameters (``6 d^2 + s d``
        at expansion 2): two GAUs about match one MHA + 4x FFN block (``12 d^2``).
      causal: autoregressive masking (in-chunk mask, exclusive prefix sum across chunks).
      normalization: ``'chunk'``: scores divided by the chunk length ``C`` inside ``relu^2``,
        the linear term by ``C`` (causal) or ``T`` (non-causal), as in the reference port;
        ``'length'``: both by the sequence length ``T`` (the paper's pseudo-code); ``'none'``.
        For quadratic attention the chunk is the whole sequence, so ``'chunk'`` divides by
        ``T``. In decoding, ``T`` is the length the cache was made for.
      normalization_length: a fixed ``T`` for the normalisation (None: the input's length).
        Dividing by the actual length ties the attention weights to it: a model trained at
        length 512 sees other weights at 128, and a prefix decoded from a cache of another
        length gets other outputs. Set it (e.g. to the training length) to make the weights
        independent of the length, as the reference port had to for fine-tuning.
      scale_init: ``'paper'``: ``gamma ~ N(0, 0.02)`` (attention ~0 at initialisation);
        ``'one'``: ``gamma ~ 1 + N(0, 0.02)``. Offsets start at 0.
      rope: rotary position embeddings on the queries and keys (needs an even ``qk_dim``).
      rope_base: rotary wavelength base.
      relative_position_bias: T5-bucketed relative-position bias inside ``relu^2``.
      num_buckets, max_distance: of the relative-position bias.
      pre_norm_residual: ``x + GAU(LayerNorm(x))``; False returns ``GAU(x)`` (e.g. for a host
        model that adds its own norm and residual).
      dropout_rate: dropout on the unit's output (before the residual).
      implementation: the mixed-chunk kernel (``'auto'``, ``'xla'``, ``'pallas'``,
        ``'reference'`` or a configured ``pallas_kernels.mixed_chunk`` implementation).
      dtype: computation dtype (default: the input's); attention accumulates in float32.
      param_dtype: parameter dtype.
      kernel_init: initializer of the dense kernels (wrapped with logical axis names).
    """

    qk_dim: int = 128
    expansion: float = 2.0
    causal: bool = False
    normalization: str = "chunk"
    normalization_length: int | None = None
    scale_init: str = "paper"
    rope: bool = True
    rope_base: float = 10_000.0
    relative_position_bias: bool = True
    num_buckets: int = 32
    max_distance: int = 128
    pre_norm_residual: bool = True
    dropout_rate: float = 0.0
    implementation: str | Implementation = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()

    def _check_settings(self) -> None:
        _checks.int_at_least("qk_dim", self.qk_dim, 1)
        _checks.positive_float("expansion", self.expansion)
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be a bool")
        _checks.one_of("normalization", self.normalization, NORMALIZATIONS)
        if self.normalization_length is not None:
            _checks.int_at_least("normalization_length", self.normalization_length, 1)
        _checks.one_of("scale_init", self.scale_init, SCALE_INITS)
        if self.rope:
            if self.qk_dim % 2:
                raise ValueError(f"qk_dim={self.qk_dim} must be even when rope=True")
            _checks.positive_float("rope_base", self.rope_base)
        if self.relative_position_bias:
            _checks.int_at_least("num_buckets", self.num_buckets, 2)
            _checks.int_at_least("max_distance", self.max_distance, 1)
        _checks.probability("dropout_rate", self.dropout_rate, allow_one=False)

    def _unit_settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _SETTING_NAMES}


_SETTING_NAMES = tuple(
    name for name in _GAUSettings.__dataclass_fields__ if name not in ("parent", "name")
)


class GatedAttentionUnit(_GAUSettings):
    """One GAU layer (with ``chunk_size``: FLASH's mixed-chunk attention) as a residual block.

    Attributes (besides those documented on the settings above):
      chunk_size: ``None``: quadratic attention over the whole sequence (FLASH-Quad's unit);
        an int: mixed-chunk attention with chunks of that many tokens (FLASH's unit), which
        uses four scale/offset pairs (quadratic and linear queries and keys) instead of two.

    Call arguments: ``x`` ``[batch, seq, d]``; ``padding_mask`` ``[batch, seq]`` bool, True
    for real tokens (padded keys get no weight); ``deterministic`` (dropout); ``decode``
    (autoregressive decoding with the ``'cache'`` collection, causal only: a first call on a
    full-length input creates the cache, later calls feed tokens in order; FLASH caches the
    running linear state and the current chunk's keys and values, FLASH-Quad all keys and
    values). Decoding follows the contract shared with ``MultiHeadAttention``
    (``efflax._src.nn._decode``): a step of another batch than the cache's, or past the cache
    length, is a ValueError; under ``jit`` positions past the cache are not written, their
    attention output is zero and ``efflax.nn.decode_overflowed(cache)`` flags them.
    """

    chunk_size: int | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        padding_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        self._check_settings()
        if self.chunk_size is not None:
            _checks.int_at_least("chunk_size", self.chunk_size, 1)
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"x.shape={getattr(x, 'shape', None)} must be [batch, seq, features]")
        _checks.array("x", x, kind="floating", nonempty=True, layout="[batch, seq, features]")
        batch, seq_len, features = x.shape
        if padding_mask is not None:
            if isinstance(padding_mask, list | tuple):
                padding_mask = jnp.asarray(padding_mask)
            shape = getattr(padding_mask, "shape", None)
            dtype = getattr(padding_mask, "dtype", type(padding_mask).__name__)
            if shape != (batch, seq_len) or dtype != jnp.bool_:
                raise ValueError(
                    f"padding_mask (shape {shape}, dtype {dtype}) "
                    f"must be bool [batch, seq] = {(batch, seq_len)}"
                )
            # Padded tokens become zeros before any arithmetic (select, never multiply: 0 * NaN
            # is NaN), so nothing they hold reaches a real output or a gradient, whatever the
            # kernel does with its key mask. Outputs at padded positions are unspecified.
            x = jnp.where(padding_mask[:, :, None], x, jnp.zeros((), x.dtype))
        _checks.boolean("decode", decode)
        _checks.boolean("deterministic", deterministic)
        if decode and not self.causal:
            raise ValueError("decode=True needs causal=True (a non-causal unit sees the future)")
        if decode and padding_mask is not None:
            raise ValueError("padding_mask is not supported with decode=True")
        if decode and self.has_variable("cache", "index"):
            # The decode contract's checks, before any work (the cache is read, not written).
            cache_length = self.get_variable("cache", "length").shape[0]
            cache_batch = self.get_variable("cache", "keys").shape[0]
            _decode.check_step("x", x.shape, cache_batch=cache_batch, cache_length=cache_length)
            _decode.check_position("x", self.get_variable("cache", "index"), seq_len, cache_length)
        dtype = x.dtype if self.dtype is None else self.dtype
        mixed = self.chunk_size is not None

        h = x
        if self.pre_norm_residual:
            h = nn.LayerNorm(
                dtype=dtype,
                param_dtype=self.param_dtype,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name="norm",
            )(x)

        def dense(width: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                width,
                dtype=dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
                name=name,
            )

        hidden = max(1, round(self.expansion * features))
        u, v = jnp.split(nn.silu(dense(2 * hidden, ("embed", "mlp"), "uv")(h)), 2, axis=-1)
        z = nn.silu(dense(self.qk_dim, ("embed", "kv"), "z")(h))

        roles = 4 if mixed else 2  # (quad q, quad k[, lin q, lin k])
        if self.scale_init == "paper":
            scale_init = nn.initializers.normal(0.02)
        else:
            scale_init = _normal_around_one(0.02)
        gamma = self.param(
            "qk_scale",
            nn.with_logical_partitioning(scale_init, (None, "kv")),
            (roles, self.qk_dim),
            self.param_dtype,
        )
        beta = self.param(
            "qk_offset",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "kv")),
            (roles, self.qk_dim),
            self.param_dtype,
        )
        qk = z[:, :, None, :] * gamma.astype(dtype) + beta.astype(dtype)  # [b, T, roles, s]

        bias_table = None
        if self.relative_position_bias:
            bias_table = self.param(
                "relative_position_bias",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (None,)),
                (self.num_buckets,),
                self.param_dtype,
            )

        attended = self._decode(qk, v, bias_table) if decode else None
        if attended is None:
            if self.rope:
                qk = apply_rotary_embedding(qk, jnp.arange(seq_len), base=self.rope_base)
            chunk = min(self.chunk_size, seq_len) if mixed else seq_len
            quad_scale, lin_scale = self._scales(chunk, seq_len)
            bias = None
            if bias_table is not None:
                positions = jnp.arange(chunk)
                bias = self._bias(bias_table, positions[:, None], positions[None, :])
            attended = mixed_chunk_attention(
                qk[:, :, 0],
                qk[:, :, 1],
                v,
                qk[:, :, 2] if mixed else None,
                qk[:, :, 3] if mixed else None,
                chunk_size=chunk,
                causal=self.causal,
                quad_scale=quad_scale,
                lin_scale=lin_scale,
                bias=bias,
                key_mask=padding_mask,
                implementation=self.implementation,
            )
        out = dense(features, ("mlp", "embed"), "out")(u * attended.astype(dtype))
        out = nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)
        return x + out if self.pre_norm_residual else out

    def _scales(self, chunk: int, length: int) -> tuple[float, float]:
        """(quad_scale, lin_scale) for a chunk length and a sequence length (see the
        ``normalization`` attribute; ``normalization_length`` replaces the length)."""
        length = self.normalization_length or length
        if self.normalization == "none":
            return 1.0, 1.0
        if self.normalization == "length":
            return 1.0 / length, 1.0 / length
        quad = chunk if self.chunk_size is not None else length
        return 1.0 / quad, 1.0 / (chunk if self.causal else length)

    def _bias(self, table: Array, query_positions: Array, key_positions: Array) -> Array:
        buckets = relative_position_buckets(
            key_positions - query_positions,
            bidirectional=not self.causal,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return table.astype(jnp.float32)[buckets]

    def _decode(self, qk: Array, v: Array, bias_table: Array | None) -> Array | None:
        """Autoregressive decoding with the ``'cache'`` collection.

        The first call (on a full-length input) creates the cache and returns None (the caller
        then computes the ordinary forward pass); later calls run their tokens one after the
        other through the cache. FLASH's cache is the linear state of the completed chunks, the
        linear state of the current chunk so far, and the current chunk's quadratic keys and
        values: its size does not grow with the length. FLASH-Quad's holds every key and value.
        The creating call's batch and length are the cache's (the length also fixes
        ``'length'`` normalisation); later calls follow the decode contract of
        ``efflax._src.nn._decode``, shared with ``MultiHeadAttention``. The cache may be
        zero-filled from its shapes: nothing is read from the initial values.
        """
        batch, length, _, qk_dim = qk.shape
        e = v.shape[-1]
        mixed = self.chunk_size is not None
        initialized = self.has_variable("cache", "index")
        window = min(self.chunk_size, length) if mixed else length
        f32 = jnp.float32
        cache = {
            "index": self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32)),
            # Only the shape [length, 0] matters: callers may zero-fill a cache made from
            # shapes (efflax.models.generate does), so no setting may live in its values.
            "length": self.variable("cache", "length", jnp.zeros, (length, 0), f32),
            "keys": self.variable("cache", "keys", jnp.zeros, (batch, window, qk_dim), qk.dtype),
            "values": self.variable("cache", "values", jnp.zeros, (batch, window, e), v.dtype),
        }
        if mixed:
            for name in ("state", "pending"):
                cache[name] = self.variable("cache", name, jnp.zeros, (batch, qk_dim, e), f32)
        if not initialized:
            return None

        window = cache["keys"].value.shape[1]
        cache_length = cache["length"].value.shape[0]
        quad_scale, lin_scale = self._scales(window, cache_length)
        slots = jnp.arange(window)

        def step(carry, token):
            qk_t, v_t = token  # [b, roles, s], [b, e]
            position = carry["index"]
            inside = position < cache_length  # False only under jit (see the decode contract)
            slot = position % window if mixed else jnp.minimum(position, window - 1)
            if self.rope:
                qk_t = apply_rotary_embedding(qk_t[:, None], position[None], base=self.rope_base)
                qk_t = qk_t[:, 0]
            keys = jax.lax.dynamic_update_slice(carry["keys"], qk_t[:, None, 1], (0, slot, 0))
            values = jax.lax.dynamic_update_slice(carry["values"], v_t[:, None], (0, slot, 0))
            scores = jnp.einsum("bs,bjs->bj", qk_t[:, 0].astype(f32), keys.astype(f32))
            scores = scores * quad_scale
            if bias_table is not None:
                scores = scores + self._bias(bias_table, slot, slots)
            weights = jnp.where(slots <= slot, jnp.square(jax.nn.relu(scores)), 0.0)
            out = jnp.einsum("bj,bje->be", weights, values.astype(f32))
            new = dict(carry, index=position + 1, keys=keys, values=values)
            if mixed:
                lin_q, lin_k = qk_t[:, 2].astype(f32), qk_t[:, 3].astype(f32)
                out = out + jnp.einsum("bs,bse->be", lin_q, carry["state"]) * lin_scale
                pending = carry["pending"] + lin_k[:, :, None] * v_t[:, None, :].astype(f32)
                chunk_done = slot == window - 1
                new["state"] = jnp.where(chunk_done, carry["state"] + pending, carry["state"])
                new["pending"] = jnp.where(chunk_done, 0.0, pending)
            # Past the cache: nothing is written, the output is zero, the index keeps counting.
            new = {
                name: value if name == "index" else jnp.where(inside, value, carry[name])
                for name, value in new.items()
            }
            out = jnp.where(inside, out, 0.0)
            return new, out.astype(v.dtype)

        carry = {name: variable.value for name, variable in cache.items() if name != "length"}
        carry, outs = jax.lax.scan(step, carry, (qk.swapaxes(0, 1), v.swapaxes(0, 1)))
        for name, value in carry.items():
            cache[name].value = value
        return outs.swapaxes(0, 1)


def _normal_around_one(stddev: float) -> Initializer:
    def init(key, shape, dtype=jnp.float32):
        return 1.0 + stddev * jax.random.normal(key, shape, dtype)

    return init


class FLASHQuad(_GAUSettings):
    """FLASH-Quad: ``num_units`` GAUs with quadratic attention over the whole sequence.

    With the default ``num_units=2`` one block has about the parameters of a transformer
    block (MHA + 4x FFN), so it can stand in for one (e.g. as a ``block`` factory).
    Call arguments as :class:`GatedAttentionUnit`.
    """

    num_units: int = 2

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        padding_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        _checks.int_at_least("num_units", self.num_units, 1)
        for i in range(self.num_units):
            x = GatedAttentionUnit(**self._unit_settings(), chunk_size=None, name=f"gau_{i}")(
                x, padding_mask=padding_mask, deterministic=deterministic, decode=decode
            )
        return x


class FLASH(_GAUSettings):
    """FLASH: ``num_units`` GAUs with mixed-chunk attention (chunks of ``chunk_size`` tokens).

    Linear in the sequence length for a fixed chunk size. With the default ``num_units=2`` one
    block has about the parameters of a transformer block. Call arguments as
    :class:`GatedAttentionUnit`.
    """

    chunk_size: int = 256
    num_units: int = 2

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        padding_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> Array:
        _checks.int_at_least("num_units", self.num_units, 1)
        _checks.int_at_least("chunk_size", self.chunk_size, 1)
        for i in range(self.num_units):
            x = GatedAttentionUnit(
                **self._unit_settings(), chunk_size=self.chunk_size, name=f"gau_{i}"
            )(x, padding_mask=padding_mask, deterministic=deterministic, decode=decode)
        return x
