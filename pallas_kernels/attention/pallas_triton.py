"""FlashAttention as Pallas (Triton) kernels: exact attention in O(N) memory, forward and backward.

Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Re, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", arXiv:2205.14135 (2022); Tri Dao,
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691 (2023).

Q is cut into row blocks; each block streams the K/V blocks it may see, keeping a running row
max and row sum (online softmax), and writes O and the log-sum-exp, never an S x S array. The
backward pass recomputes the scores tile by tile from Q, K, V, O, lse and dO
(delta = rowsum(dO * O)): one kernel accumulates dQ per Q block, one dK/dV per K/V block.

Layout is `[batch, seq, heads, head_dim]`, as in `jax.nn.dot_product_attention`. Causal masking
is aligned at the top left (query i sees keys j <= i), also as there, optionally shifted by a
traced `q_offset` (decoding with a cache). Tiles that cannot contribute (above the causal
diagonal, or off in a `block_mask`) are skipped through the loop bounds, not computed and zeroed.
In tiles that are partly masked, non-finite inputs are zeroed before they meet a masked (zero)
weight, and the rows that do see them are made NaN, so a masked key never influences an output
or a gradient. Rows that see no key at all give zeros and zero gradients.

This file is the op glue: `BlockSizes` (the tuning), the block-mask helpers, padding, the
custom VJP that ties `pallas_triton_kernel.forward` to `pallas_triton_backward.backward`, and
`PallasTritonAttention`, the implementation the op's table lists (`api.py`). The kernel bodies
live in `pallas_triton_kernel.py` (forward) and `pallas_triton_backward.py` (dQ, dK/dV).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import default_interpret
from pallas_kernels._compat import has_triton_backend
from pallas_kernels._compat import resolve_interpret
from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.pallas_triton_backward import backward
from pallas_kernels.attention.pallas_triton_kernel import Config
from pallas_kernels.attention.pallas_triton_kernel import forward
from pallas_kernels.op import Unsupported

_MAX_HEAD_DIM = 256
_MIN_BLOCK = 16  # Triton's dot needs tiles of at least 16 x 16.
_MAX_BLOCK = 1024


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (and GPU launch parameters) of the three kernels.

    Attributes:
      block_q, block_k: query / key rows per tile in the forward kernel. With a `block_mask`
        they are the mask's granularity; the backward tiles must then divide them (unset ones
        take the backend defaults, capped at the mask tile).
      block_q_dkv, block_k_dkv: tile of the dK/dV kernel (None: block_q, block_k).
      block_q_dq, block_k_dq: tile of the dQ kernel (None: block_q, block_k).
      num_warps: Triton warps per program (None: 4 for head_dim <= 64, else 8). GPU only.
      num_stages: Triton software-pipelining depth. GPU only.

    Every block size is a power of two in [16, 1024]. Without a `block_mask`,
    `flash_attention` shrinks a block that is longer than the (power-of-two rounded) sequence,
    so short sequences are not padded to a full default block.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in (
            "block_q",
            "block_k",
            "block_q_dkv",
            "block_k_dkv",
            "block_q_dq",
            "block_k_dq",
        ):
            value = getattr(self, name)
            if value is None and name not in ("block_q", "block_k"):
                continue
            if (
                not isinstance(value, int | np.integer)
                or isinstance(value, bool)
                or not _MIN_BLOCK <= value <= _MAX_BLOCK
                or not _is_power_of_two(int(value))
            ):
                raise ValueError(
                    f"{name}={value!r} must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}]"
                )
        if self.num_warps is not None and not (
            isinstance(self.num_warps, int) and self.num_warps in (1, 2, 4, 8, 16)
        ):
            raise ValueError(f"num_warps={self.num_warps!r} must be None or one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages!r} must be an int in [1, 8]")

    @classmethod
    def get_default(cls, backend: str | None = None, *, head_dim: int = 128) -> BlockSizes:
        """Defaults per backend: 'gpu' (compiled Triton) or 'cpu' (interpret mode).

        `backend=None` picks 'cpu' when Pallas would run in interpret mode here, else 'gpu'.
        The GPU sizes follow FlashAttention-2's Triton kernels (128 x 64 forward tiles, narrower
        backward tiles), chosen so that no kernel spills registers on sm_80 or sm_90a in the
        deviceless compile check (`make gpu-check`); not yet timed on a GPU. head_dim <= 64 uses
        a 64 x 32 dK/dV tile: 32 x 64 spilled on sm_80 with GQA.
        """
        if backend is None:
            backend = "cpu" if default_interpret() else "gpu"
        if backend == "gpu":
            if head_dim <= 64:
                return cls(128, 64, 64, 32, 64, 32, num_stages=2)
            if head_dim <= 128:
                return cls(128, 64, 32, 64, 64, 32, num_stages=2)
            return cls(64, 32, 16, 32, 32, 16, num_stages=2)
        if backend == "cpu":
            # Interpret mode pays per grid step and per loop iteration: use large tiles.
            return cls(128, 128)
        raise ValueError(f"{backend=} must be 'gpu', 'cpu' or None")

    @property
    def dkv(self) -> tuple[int, int]:
        """(block_q, block_k) of the dK/dV kernel."""
        return (self.block_q_dkv or self.block_q, self.block_k_dkv or self.block_k)

    @property
    def dq(self) -> tuple[int, int]:
        """(block_q, block_k) of the dQ kernel."""
        return (self.block_q_dq or self.block_q, self.block_k_dq or self.block_k)


def _tile_shape(block_sizes: BlockSizes | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_sizes, BlockSizes):
        return block_sizes.block_q, block_sizes.block_k
    try:
        block_q, block_k = block_sizes
    except (TypeError, ValueError):
        raise ValueError(
            f"{block_sizes=} must be a BlockSizes or a (block_q, block_k) pair"
        ) from None
    checked = BlockSizes(block_q, block_k)  # validates both sizes
    return checked.block_q, checked.block_k


# --------------------------------------------------------------------------------------------
# Block-mask helpers
# --------------------------------------------------------------------------------------------


def causal_block_mask(
    q_len: int, kv_len: int, block_sizes: BlockSizes | tuple[int, int]
) -> jax.Array:
    """Block mask `[1, q_blocks, kv_blocks]` of the tiles that causal attention touches.

    A tile is on when some query i in it may see some key j <= i in it (top-left alignment).
    """
    return local_block_mask(q_len, kv_len, block_sizes, window_left=None, window_right=0)


def local_block_mask(
    q_len: int,
    kv_len: int,
    block_sizes: BlockSizes | tuple[int, int],
    *,
    window_left: int | None,
    window_right: int | None = 0,
) -> jax.Array:
    """Block mask `[1, q_blocks, kv_blocks]` for sliding-window (local) attention.

    Query i may see keys j with `i - window_left <= j <= i + window_right` (`None`: unbounded
    on that side). A tile is on when any of its (query, key) pairs is in the window. Pair the
    mask with `causal=True` (and `window_right=0`) for causal sliding-window attention; the
    kernel then masks inside the diagonal tiles, but the window edges are only resolved to
    whole tiles, so the result equals dense attention under the block-expanded mask.

    Example:
      >>> mask = local_block_mask(256, 256, (64, 64), window_left=64, window_right=0)
      >>> mask.shape
      (1, 4, 4)
    """
    block_q, block_k = _tile_shape(block_sizes)
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")
    for name, value in (("window_left", window_left), ("window_right", window_right)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 0):
            raise ValueError(f"{name}={value!r} must be None or a non-negative int")
    q_first = np.arange(0, q_len, block_q)
    q_last = np.minimum(q_first + block_q, q_len) - 1
    k_first = np.arange(0, kv_len, block_k)
    k_last = np.minimum(k_first + block_k, kv_len) - 1
    # Offsets j - i inside a tile span [k_first - q_last, k_last - q_first]; the tile is on
    # when that interval meets [-window_left, window_right].
    on = np.ones((len(q_first), len(k_first)), dtype=bool)
    if window_right is not None:
        on &= (k_first[None, :] - q_last[:, None]) <= window_right
    if window_left is not None:
        on &= (k_last[None, :] - q_first[:, None]) >= -window_left
    return jnp.asarray(on[None])


def block_mask_from_mask(
    element_mask: jax.Array, block_sizes: BlockSizes | tuple[int, int]
) -> jax.Array:
    """Block mask `[heads or 1, q_blocks, kv_blocks]`: a tile is on if any element is on.

    Args:
      element_mask: bool `[q_len, kv_len]` or `[heads or 1, q_len, kv_len]`, True = attend.
      block_sizes: the tiles (BlockSizes or (block_q, block_k)) passed to `flash_attention`.

    Returns:
      The block mask. Attention with it equals dense attention under the block-expanded mask,
      which contains `element_mask`; pass the element mask's structure through `causal=` or
      `segment_ids=` as well when exact element masking is needed.
    """
    block_q, block_k = _tile_shape(block_sizes)
    mask = jnp.asarray(element_mask)
    if mask.dtype != jnp.bool_ or mask.ndim not in (2, 3):
        raise ValueError(
            f"element_mask of shape {mask.shape} and dtype {mask.dtype} must be bool "
            "[q_len, kv_len] or [heads or 1, q_len, kv_len]"
        )
    if mask.ndim == 2:
        mask = mask[None]
    heads, q_len, kv_len = mask.shape
    q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)
    mask = jnp.pad(
        mask, ((0, 0), (0, q_blocks * block_q - q_len), (0, kv_blocks * block_k - kv_len))
    )
    mask = mask.reshape(heads, q_blocks, block_q, kv_blocks, block_k)
    return jnp.any(mask, axis=(2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash_attention_padded(q, k, v, q_seg, kv_seg, offset, flags, lists, cfg):
    kv_lists = None if lists is None else lists[0]
    return forward(q, k, v, q_seg, kv_seg, offset, flags, kv_lists, cfg)[0]


def _flash_attention_padded_fwd(q, k, v, q_seg, kv_seg, offset, flags, lists, cfg):
    kv_lists = None if lists is None else lists[0]
    out, lse = forward(q, k, v, q_seg, kv_seg, offset, flags, kv_lists, cfg)
    return out, (q, k, v, q_seg, kv_seg, offset, lists, out, lse)


_flash_attention_padded.defvjp(_flash_attention_padded_fwd, backward)


def _tile_lists(block_mask: jax.Array) -> jax.Array:
    """`[h, rows, cols]` bool -> int32 `[h, rows, 1 + cols]`: count, then the on columns in order."""
    count = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(jnp.logical_not(block_mask), axis=-1, stable=True).astype(jnp.int32)
    return jnp.concatenate([count[..., None], order], axis=-1)


def _resolve_block_sizes(block_sizes, q_len, kv_len, has_block_mask):
    """Concrete tiles: backward defaults filled in, and (without a block mask) blocks shrunk to
    the sequence so a short sequence is not padded to a long default block."""
    tiles = [
        (block_sizes.block_q, block_sizes.block_k),
        block_sizes.dkv,
        block_sizes.dq,
    ]
    if not has_block_mask:
        q_cap = max(_MIN_BLOCK, _next_power_of_two(q_len))
        kv_cap = max(_MIN_BLOCK, _next_power_of_two(kv_len))
        tiles = [(min(bq, q_cap), min(bk, kv_cap)) for bq, bk in tiles]
    return tiles


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "block_sizes", "interpret"),
)
def _flash_attention_impl(
    q, k, v, segment_ids, q_offset, block_mask, *, causal, sm_scale, block_sizes, interpret
):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len = k.shape[1]
    (bq, bk), (bq_dkv, bk_dkv), (bq_dq, bk_dq) = _resolve_block_sizes(
        block_sizes, q_len, kv_len, block_mask is not None
    )
    q_len_padded = _round_up(q_len, max(bq, bq_dkv, bq_dq))
    kv_len_padded = _round_up(kv_len, max(bk, bk_dkv, bk_dq))
    head_dim_padded = max(_MIN_BLOCK, _next_power_of_two(head_dim))

    def pad(x, length):
        widths = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim_padded - head_dim))
        return jnp.pad(x, widths) if any(w[1] for w in widths) else x

    has_flags = causal or segment_ids is not None
    flags = None
    if has_flags:
        # Element masking: a masked key's non-finite entry must meet no zero weight (0 * NaN).
        k_finite, v_finite = jnp.isfinite(k), jnp.isfinite(v)
        bad = ~(jnp.all(k_finite, axis=-1) & jnp.all(v_finite, axis=-1))  # [b, kv, kv_heads]
        flags = jnp.where(bad, jnp.nan, 0.0).astype(jnp.float32).transpose(0, 2, 1)
        flags = jnp.pad(flags, ((0, 0), (0, 0), (0, kv_len_padded - kv_len)))
        k = jnp.where(k_finite, k, jnp.zeros((), k.dtype))
        v = jnp.where(v_finite, v, jnp.zeros((), v.dtype))
    q_p, k_p, v_p = pad(q, q_len_padded), pad(k, kv_len_padded), pad(v, kv_len_padded)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg = jnp.pad(segment_ids[0], ((0, 0), (0, q_len_padded - q_len)))
        kv_seg = jnp.pad(segment_ids[1], ((0, 0), (0, kv_len_padded - kv_len)))
    offset = None if q_offset is None else jnp.reshape(q_offset.astype(jnp.int32), (1,))
    lists = None
    if block_mask is not None:
        if causal:
            block_mask = block_mask & causal_block_mask(q_len, kv_len, (bq, bk))
        lists = (_tile_lists(block_mask), _tile_lists(jnp.swapaxes(block_mask, 1, 2)))
    cfg = Config(
        q_len=q_len,
        kv_len=kv_len,
        block_q=bq,
        block_k=bk,
        block_q_dkv=bq_dkv,
        block_k_dkv=bk_dkv,
        block_q_dq=bq_dq,
        block_k_dq=bk_dq,
        causal=causal,
        has_offset=offset is not None,
        sm_scale=sm_scale,
        has_segments=segment_ids is not None,
        has_flags=has_flags,
        mask_heads=0 if block_mask is None else block_mask.shape[0],
        interpret=interpret,
        num_warps=block_sizes.num_warps,
        num_stages=block_sizes.num_stages,
    )
    out = _flash_attention_padded(q_p, k_p, v_p, q_seg, kv_seg, offset, flags, lists, cfg)
    return out[:, :q_len, :, :head_dim]


# --------------------------------------------------------------------------------------------
# The implementation of the attention op, and the kernel's own entry points
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PallasTritonAttention(AttentionImplementation):
    """FlashAttention Pallas kernels (``implementation='pallas_triton'``, alias ``'pallas'``).

    Expresses causal masks (with ``q_offset``), segment ids (so padding) and block-sparse masks,
    with GQA; refuses a dense boolean ``mask``, a ``bias`` and dropout, so ``'auto'`` falls
    through. Differentiable by ``jax.grad`` (backward kernels), not by ``jax.jvp``.

    Attributes:
      block_sizes: tiles and GPU launch parameters; default ``BlockSizes.get_default()`` (with
        a block mask: its ``block_shape``). With a block mask, the forward tile must equal the
        mask's ``block_shape`` and the backward tiles must divide it.
      interpret: Pallas interpret mode; ``None``: interpret unless on a GPU.
    """

    name = "pallas_triton"
    supports_forward_mode = False
    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"block_sizes={self.block_sizes!r} must be a BlockSizes or None")
        check_interpret(self.interpret)  # validates without asking JAX for a backend

    def __call__(self, call: AttentionCall) -> jax.Array:
        # float32 dots run at HIGHEST precision, so `precision` needs nothing here
        query, mask = call.query, call.mask
        block_mask, block_shape = mask.block_mask, mask.block_shape
        if not isinstance(call.sm_scale, float):
            raise Unsupported("the kernel needs sm_scale known at trace time (a Python number)")
        if mask.segment_ids is not None and any(
            jnp.dtype(ids.dtype).itemsize > 4 for ids in mask.segment_ids
        ):
            raise Unsupported("the kernel compares int32 segment ids; these are traced 64-bit")
        if mask.dense is not None:
            raise Unsupported(
                "a dense boolean mask cannot be tiled; pass causal=, segment_ids= or a block_mask"
            )
        if call.bias is not None:
            raise Unsupported("an additive bias is not supported by the kernel")
        if call.dropout_rate > 0.0:
            raise Unsupported("dropout is not supported by the kernel")
        head_dim = query.shape[-1]
        if head_dim > _MAX_HEAD_DIM:
            raise Unsupported(f"head_dim={head_dim} > {_MAX_HEAD_DIM}")
        interpret = resolve_interpret(self.interpret)
        if not interpret and not has_triton_backend():
            raise Unsupported("this JAX has no Pallas Triton backend (removed after 0.12?)")
        block_sizes = self.block_sizes
        if block_mask is not None:
            if mask.q_offset is not None:
                raise Unsupported("a block_mask with q_offset is not supported by the kernel")
            block_sizes = _block_mask_tiles(block_sizes, tuple(block_shape), interpret, head_dim)
        if block_sizes is None:
            block_sizes = BlockSizes.get_default("cpu" if interpret else "gpu", head_dim=head_dim)
        return _flash_attention_impl(
            query,
            call.key,
            call.value,
            mask.segment_ids,
            mask.q_offset,
            block_mask,
            causal=mask.causal,
            sm_scale=call.sm_scale,
            block_sizes=block_sizes,
            interpret=interpret,
        )


def _block_mask_tiles(block_sizes, block_shape, interpret, head_dim):
    """The tiles of a block-sparse call: the forward tile is the mask's; backward tiles divide
    it (unset ones: the backend's defaults, capped at the mask tile), so the backward kernels
    keep their register-friendly tiles under a coarse mask."""
    if block_sizes is None:
        block_sizes = BlockSizes(*block_shape)
    tile = (block_sizes.block_q, block_sizes.block_k)
    if tile != block_shape:
        raise Unsupported(
            f"block_shape={block_shape} differs from the kernel's forward tile {tile} (block_sizes)"
        )
    default = BlockSizes.get_default("cpu" if interpret else "gpu", head_dim=head_dim)
    filled = {}
    for name, fallback, mask_side in (
        ("block_q_dkv", default.dkv[0], tile[0]),
        ("block_k_dkv", default.dkv[1], tile[1]),
        ("block_q_dq", default.dq[0], tile[0]),
        ("block_k_dq", default.dq[1], tile[1]),
    ):
        value = getattr(block_sizes, name)
        if value is None:
            value = min(fallback, mask_side)
        if mask_side % value:
            raise Unsupported(
                f"with a block_mask the backward tiles must divide the mask tile {tile}, got "
                f"{name}={value}"
            )
        filled[name] = value
    return dataclasses.replace(block_sizes, **filled)


__all__ = [
    "BlockSizes",
    "PallasTritonAttention",
    "block_mask_from_mask",
    "causal_block_mask",
    "local_block_mask",
]
