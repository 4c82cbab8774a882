"""The fast XLA path of the Monarch op: block-major einsums over row chunks that stay in cache.

Monarch products (Dao et al., "Monarch: Expressive Structured Matrices for Efficient and
Accurate Training", arXiv 2204.00595, 2022) as XLA compiles them: the two block-diagonal
products with the transpose permutation between them.

Where the time goes on CPU, and why this layout (measured 2026-12-07, 2 cores, float32, a
training step = forward + backward of a scalar loss, 2,048 tokens): with small blocks
(nblocks ~ sqrt(n)) every product is a batch of small GEMMs and the step is bound by memory
traffic, not FLOPs. XLA's CPU dot (YNNPACK) wants the block index as the leading batch axis, so
the token-major einsums of the paper's code (``'bjp,jqp->bjq'``) make XLA copy the whole
activation into that layout and back around *every* product, and the permutation between the
two stages is one more full copy. Here each chunk of rows is moved once into block-major layout
(``[blocks, rows, width]``), both products and the permutation run there, and the result is moved
back once; the chunk (``default_row_chunk``: about 1 MiB of activations) keeps all of it in
cache (blocks up to 256 wide; measured at 2,048 tokens, training step, CPU time vs a dense
layer: n = 1024, nblocks = 4: 0.94x -> 1.21x; nblocks = 32: 3.2x -> 4.0x; n = 4096,
nblocks = 64: 7.7x -> 8.4-9.4x under load ~18). In reverse mode a hand-written VJP recomputes each chunk's intermediate instead of
writing ``[rows, k*q]`` to memory and accumulates the weight gradients chunk by chunk. Inside
:func:`pallas_kernels.op.forward_mode_autodiff` the same chunks run through a plain ``lax.map``
that ``jax.jvp`` differentiates (same numbers). Large blocks are compute-bound and run
unchunked (the paper's two einsums).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _checks
from pallas_kernels._compat import backend_kind
from pallas_kernels._compat import cdiv
from pallas_kernels.monarch.base import MonarchCall
from pallas_kernels.monarch.base import MonarchImplementation
from pallas_kernels.monarch.reference import einsum
from pallas_kernels.monarch.reference import einsum32
from pallas_kernels.monarch.reference import two_einsums
from pallas_kernels.op import forward_mode_required

__all__ = ["XlaMonarch", "default_row_chunk"]

_CHUNK_BYTES = 1 << 20  # activations of one chunk of rows: about a core's L2 cache
_MIN_ROW_CHUNK = 128  # fewer rows make the per-block GEMMs too small to run near peak
_MAX_CHUNKED_WIDTH = 256  # wider blocks: unchunked


def default_row_chunk(
    w1_shape: tuple[int, ...], w2_shape: tuple[int, ...], backend: str | None = None
) -> int | None:
    """Rows per chunk of the XLA path: ~1 MiB of float32 activations (at least 128 rows) on CPU
    for blocks <= 256 wide, else unchunked (wider blocks are compute-bound: measured equal or
    slower chunked at n = 4096, nblocks = 4)."""
    if backend_kind(backend) != "cpu":
        return None
    if max(*w1_shape[1:], *w2_shape[1:]) > _MAX_CHUNKED_WIDTH:
        return None
    k, _, p = w1_shape
    l, s, _ = w2_shape
    return max(_MIN_ROW_CHUNK, _CHUNK_BYTES // (4 * max(k * p, l * s)))


def _block_major(xc: jax.Array, blocks: int) -> jax.Array:
    """``[rows, blocks * width] -> [blocks, rows, width]``."""
    return xc.reshape(xc.shape[0], blocks, -1).transpose(1, 0, 2)


def _token_major(y: jax.Array) -> jax.Array:
    """``[blocks, rows, width] -> [rows, blocks * width]``."""
    return y.transpose(1, 0, 2).reshape(y.shape[1], -1)


def _permute(h: jax.Array, l: int, r: int) -> jax.Array:
    """The transpose permutation in block-major layout: ``[k, rows, q] -> [l, rows, r]``."""
    rows = h.shape[1]
    return h.transpose(1, 2, 0).reshape(rows, l, r).transpose(1, 0, 2)


def _unpermute(z: jax.Array, k: int, q: int) -> jax.Array:
    """The inverse of :func:`_permute`: ``[l, rows, r] -> [k, rows, q]``."""
    rows = z.shape[1]
    return z.transpose(1, 0, 2).reshape(rows, q, k).transpose(2, 0, 1)


def _chunk_forward(xc, w1, w2):
    """One chunk's output ``[rows, l*s]`` and what its backward needs (``xt``, ``z``)."""
    k, q, _ = w1.shape
    l, _, r = w2.shape
    xt = _block_major(xc, k)  # [k, rows, p]
    z = _permute(einsum("jcp,jqp->jcq", xt, w1), l, r)  # [l, rows, r]
    return _token_major(einsum("lcr,lsr->lcs", z, w2)), (xt, z)


def _map_chunks(x2d, w1, w2, row_chunk: int):
    chunks = x2d.reshape(-1, row_chunk, x2d.shape[1])
    y = lax.map(lambda xc: _chunk_forward(xc, w1, w2)[0], chunks)
    return y.reshape(x2d.shape[0], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(x2d, w1, w2, row_chunk: int):
    return _map_chunks(x2d, w1, w2, row_chunk)


def _chunked_fwd(x2d, w1, w2, row_chunk):
    # Only the inputs are saved: the backward recomputes each chunk's intermediate in cache.
    return _map_chunks(x2d, w1, w2, row_chunk), (x2d, w1, w2)


def _chunked_bwd(row_chunk, residuals, dy):
    x2d, w1, w2 = residuals
    k, q, _ = w1.shape
    l, _, _ = w2.shape

    def one_chunk(grads, chunk):
        dw1, dw2 = grads
        xc, dyc = chunk
        _, (xt, z) = _chunk_forward(xc, w1, w2)
        dyt = _block_major(dyc, l)  # [l, rows, s]
        dw2 = dw2 + einsum32("lcs,lcr->lsr", dyt, z)
        dh = _unpermute(einsum("lcs,lsr->lcr", dyt, w2), k, q)  # [k, rows, q]
        dw1 = dw1 + einsum32("jcq,jcp->jqp", dh, xt)
        dx = _token_major(einsum("jcq,jqp->jcp", dh, w1))
        return (dw1, dw2), dx

    zeros = (jnp.zeros(w1.shape, jnp.float32), jnp.zeros(w2.shape, jnp.float32))
    chunks = (
        x2d.reshape(-1, row_chunk, x2d.shape[1]),
        dy.astype(x2d.dtype).reshape(-1, row_chunk, dy.shape[1]),
    )
    (dw1, dw2), dx = lax.scan(one_chunk, zeros, chunks)
    return dx.reshape(x2d.shape), dw1.astype(w1.dtype), dw2.astype(w2.dtype)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


@dataclasses.dataclass(frozen=True)
class XlaMonarch(MonarchImplementation):
    """Two block-diagonal products compiled by XLA; on CPU, block-major row chunks in cache.

    Attributes:
      row_chunk: rows per chunk; ``'auto'`` (:func:`default_row_chunk`: ~1 MiB of activations,
        at least 128 rows, on CPU for blocks <= 256 wide; unchunked otherwise), an int, or None
        (never chunk).

    Differentiable in every mode inside :func:`pallas_kernels.op.forward_mode_autodiff`; outside
    it, a chunked call has a reverse-mode-only custom VJP (``jax.jvp`` raises there).
    """

    name = "xla"
    row_chunk: int | str | None = "auto"

    def __post_init__(self):
        if self.row_chunk is not None and self.row_chunk != "auto":
            _checks.int_at_least("row_chunk", self.row_chunk)

    def resolved_row_chunk(self, w1_shape, w2_shape, backend: str | None = None) -> int | None:
        """The chunk this configuration uses for these factor shapes (None: unchunked)."""
        if self.row_chunk == "auto":
            return default_row_chunk(w1_shape, w2_shape, backend)
        return self.row_chunk

    def __call__(self, call: MonarchCall) -> jax.Array:
        x2d, w1, w2 = call.x2d, call.w1, call.w2
        row_chunk = self.resolved_row_chunk(w1.shape, w2.shape)
        rows = x2d.shape[0]
        if row_chunk is None or rows <= row_chunk:
            return two_einsums(x2d, w1, w2)
        padded = cdiv(rows, row_chunk) * row_chunk
        x2d = jnp.pad(x2d, ((0, padded - rows), (0, 0)))
        if forward_mode_required():
            return _map_chunks(x2d, w1, w2, row_chunk)[:rows]
        return _chunked(x2d, w1, w2, row_chunk)[:rows]
