"""Mixed-chunk attention (FLASH) as Pallas Mosaic TPU kernels: forward and backward.

Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022, arXiv:2202.10447.

One grid step holds one chunk of one batch element in VMEM (its ``C`` rows of every input; the
``[C, C]`` ``relu^2`` weights live only in vregs/VMEM). The chunk axis runs sequentially and
carries the linear term's state in a float32 VMEM scratch, so nothing of size ``[T, T]`` or
``[G, s_lin, e]`` reaches HBM:

- forward (``mixed_chunk_tpu_fwd``): causal, ``out_c = relu^2(Q_c K_c^T) V_c + Q_lin,c S`` with
  ``S`` the running sum of ``K_lin^T V`` over earlier chunks, updated after the chunk (an
  exclusive prefix sum by construction). Non-causal, a first pass over the chunks sums ``S``
  over all of them, a second writes the outputs (grid ``(batch, pass, chunk)``).
- backward (``mixed_chunk_tpu_bwd``), grid ``(batch, pass, chunk)``: pass 0 walks the chunks
  forward with ``S`` (causal: ``dQ_lin``; non-causal: it also sums ``R = sum Q_lin^T dO``), pass 1
  walks them backward with ``R`` over later chunks and writes the chunk's ``dQ``, ``dK``,
  ``dV`` (both terms), ``dK_lin`` (and non-causal ``dQ_lin``); ``dbias`` is a per-batch
  ``[C, C]`` float32 accumulator summed outside. Blocks a pass does not use keep the index of
  the neighbouring pass, so they are neither fetched twice nor written back unwritten.

Masking: masked and padded keys have their ``K``, ``K_lin`` and ``V`` rows replaced by zeros
(``jnp.where``, before the kernel), so they carry no weight in either term, their gradients are
zero, and a NaN or inf stored there cannot reach any output or gradient. Lengths: the sequence
is padded to whole chunks and each chunk at its end to a multiple of 16 rows (the ``bias`` with
it); compiled for a TPU, feature widths are zero-padded to multiples of 128 lanes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._compat import cdiv
from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.op import Unsupported

__all__ = ["BlockSizes", "mixed_chunk_attention_tpu"]

_LANES = 128
_ROW_MULTIPLE = 16  # chunk rows: a whole number of (packed 16-bit) sublane tiles
_VMEM_LIMIT = 64 * 2**20
_VMEM_BUDGET = 48 * 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the mixed-chunk TPU kernels.

    The kernels tile by chunk (one chunk per grid step), so the only choice is how far a chunk
    is padded.

    Attributes:
      chunk_multiple: each chunk is zero-padded at its end to a multiple of this many rows: a
        positive multiple of 16 (128 keeps the ``[C, C]`` weights lane-dense on the MXU).
    """

    chunk_multiple: int = _ROW_MULTIPLE

    def __post_init__(self):
        m = self.chunk_multiple
        if not isinstance(m, int) or isinstance(m, bool) or m < 1 or m % _ROW_MULTIPLE:
            raise ValueError(f"chunk_multiple={m!r} must be a positive multiple of 16")


@dataclasses.dataclass(frozen=True)
class _Config:
    num_chunks: int
    chunk: int  # padded chunk rows
    causal: bool
    quad_scale: float
    lin_scale: float
    has_lin: bool
    has_bias: bool
    weight_dtype: Any  # dtype of the relu^2 weights fed to the MXU (float32 for float16)
    interpret: bool

    @property
    def fwd_passes(self) -> int:
        return 2 if self.has_lin and not self.causal else 1

    @property
    def bwd_passes(self) -> int:
        return 2 if self.has_lin else 1


def _dot(a, b, contract=(1, 0), *, interpret: bool):
    """``a . b`` contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``, float32
    accumulation (full precision for float32 operands)."""
    if interpret and (a.dtype != jnp.float32 or b.dtype != jnp.float32):
        # XLA:CPU of JAX 0.12 cannot run a 16-bit dot with a float32 result inside a loop
        # (interpret mode runs the grid as one); widening is exact.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _relu_scores(cfg: _Config, q, k, bias_ref):
    """``relu(quad_scale q k^T + bias)`` of one chunk, zero above the diagonal when causal."""
    scores = _dot(q, k, (1, 1), interpret=cfg.interpret) * cfg.quad_scale
    if cfg.has_bias:
        scores = scores + bias_ref[...].astype(jnp.float32)
    r = jnp.maximum(scores, 0.0)
    if cfg.causal:
        rows = lax.broadcasted_iota(jnp.int32, r.shape, 0)
        cols = lax.broadcasted_iota(jnp.int32, r.shape, 1)
        r = jnp.where(rows >= cols, r, 0.0)
    return r


class _Refs(dict):
    """The kernel's refs by name; an input or output the call does not have is None."""

    def __missing__(self, name):
        return None


def _unpack(refs, names) -> _Refs:
    return _Refs(zip(names, refs, strict=True))


def _fwd_kernel(*refs, cfg: _Config, names):
    r = _unpack(refs, names)
    phase = pl.program_id(1) + (2 - cfg.fwd_passes)  # the output pass is always pass 1
    chunk = pl.program_id(2)
    wdt = cfg.weight_dtype

    if cfg.has_lin:

        @pl.when((pl.program_id(1) == 0) & (chunk == 0))
        def _():
            r["state"][...] = jnp.zeros_like(r["state"])

        def add_chunk_state():
            r["state"][...] += _dot(
                r["kl"][...].astype(wdt), r["v"][...].astype(wdt), (0, 0), interpret=cfg.interpret
            )

        if not cfg.causal:
            pl.when(phase == 0)(add_chunk_state)

    @pl.when(phase == 1)
    def _():
        w = _relu_scores(cfg, r["qq"][...], r["kq"][...], r["bias"])
        w = w * w
        out = _dot(w.astype(wdt), r["v"][...].astype(wdt), interpret=cfg.interpret)
        if cfg.has_lin:
            linear = _dot(
                r["ql"][...].astype(wdt), r["state"][...].astype(wdt), interpret=cfg.interpret
            )
            out = out + linear * cfg.lin_scale
        r["out"][...] = out.astype(r["out"].dtype)
        if cfg.has_lin and cfg.causal:
            add_chunk_state()  # after the chunk's rows: the state stays exclusive of it


def _bwd_kernel(*refs, cfg: _Config, names):
    r = _unpack(refs, names)
    phase = pl.program_id(1) + (2 - cfg.bwd_passes)
    step = pl.program_id(2)
    wdt = cfg.weight_dtype
    first_step = (pl.program_id(1) == 0) & (step == 0)

    def dot(a, b, contract=(1, 0)):
        return _dot(a.astype(wdt), b.astype(wdt), contract, interpret=cfg.interpret)

    if cfg.has_bias:

        @pl.when(first_step)
        def _():
            r["dbias"][...] = jnp.zeros_like(r["dbias"])

    if cfg.has_lin:

        @pl.when(first_step)
        def _():
            r["state"][...] = jnp.zeros_like(r["state"])
            r["reverse"][...] = jnp.zeros_like(r["reverse"])

        @pl.when(phase == 0)  # chunks in order
        def _():
            if cfg.causal:  # dQ_lin with the state of the earlier chunks
                dql = dot(r["do"][...], r["state"][...], (1, 1)) * cfg.lin_scale
                r["dql"][...] = dql.astype(r["dql"].dtype)
            else:
                r["reverse"][...] += dot(r["ql"][...], r["do"][...], (0, 0))
            r["state"][...] += dot(r["kl"][...], r["v"][...], (0, 0))

    @pl.when(phase == 1)  # chunks in reverse order
    def _():
        q, k, v, do = r["qq"][...], r["kq"][...], r["v"][...], r["do"][...]
        relu = _relu_scores(cfg, q, k, r["bias"])
        d_weights = _dot(do, v, (1, 1), interpret=cfg.interpret)
        d_scores = 2.0 * relu * d_weights
        dv = dot(relu * relu, do, (0, 0))
        dq = dot(d_scores, k) * cfg.quad_scale
        dk = dot(d_scores, q, (0, 0)) * cfg.quad_scale
        if cfg.has_bias:
            r["dbias"][...] += d_scores
        if cfg.has_lin:
            reverse = r["reverse"][...]
            dv = dv + dot(r["kl"][...], reverse) * cfg.lin_scale
            r["dkl"][...] = (dot(v, reverse, (1, 1)) * cfg.lin_scale).astype(r["dkl"].dtype)
            if cfg.causal:  # R becomes the sum over this chunk and the later ones
                r["reverse"][...] += dot(r["ql"][...], do, (0, 0))
            else:
                dql = dot(do, r["state"][...], (1, 1)) * cfg.lin_scale
                r["dql"][...] = dql.astype(r["dql"].dtype)
        r["dq"][...] = dq.astype(r["dq"].dtype)
        r["dk"][...] = dk.astype(r["dk"].dtype)
        r["dv"][...] = dv.astype(r["dv"].dtype)


def _params(cfg: _Config):
    if cfg.interpret:
        return {"interpret": pltpu.InterpretParams()}
    return {
        "compiler_params": pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"),
            vmem_limit_bytes=_VMEM_LIMIT,
        )
    }


def _chunk_spec(cfg: _Config, width: int, chunk_of):
    """One chunk's rows of a ``[batch, T, width]`` array; ``chunk_of(phase, step)``."""
    return pl.BlockSpec((None, cfg.chunk, width), lambda b, ph, st: (b, chunk_of(ph, st), 0))


def _cost(cfg: _Config, arrays, out_bytes: int, *, backward: bool) -> pl.CostEstimate:
    batch, seq, s = arrays["qq"].shape
    e = arrays["v"].shape[-1]
    s_lin = arrays["ql"].shape[-1] if cfg.has_lin else 0
    quad = 2 * batch * seq * cfg.chunk * (s + e)  # scores and weights @ V of every chunk
    lin = 2 * batch * seq * s_lin * e * 2  # state updates and Q_lin @ S
    flops = (2.5 * quad + 2 * lin) if backward else (quad + lin)
    moved = sum(x.size * x.dtype.itemsize for x in arrays.values() if x is not None)
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=moved + out_bytes)


def _forward(arrays, cfg: _Config):
    qq, v = arrays["qq"], arrays["v"]
    batch, seq, e = v.shape
    passes = cfg.fwd_passes
    offset = 2 - passes

    def in_output_pass(ph, st):  # first chunk while the state is summed (no second fetch)
        return jnp.where(ph + offset == 1, st, 0)

    def always(ph, st):
        return st

    specs = {
        "qq": _chunk_spec(cfg, qq.shape[-1], in_output_pass),
        "kq": _chunk_spec(cfg, qq.shape[-1], in_output_pass),
        "ql": _chunk_spec(cfg, arrays["ql"].shape[-1], in_output_pass) if cfg.has_lin else None,
        "kl": _chunk_spec(cfg, arrays["kl"].shape[-1], always) if cfg.has_lin else None,
        "v": _chunk_spec(cfg, e, always),
        "bias": pl.BlockSpec((cfg.chunk, cfg.chunk), lambda b, ph, st: (0, 0))
        if cfg.has_bias
        else None,
    }
    inputs = [n for n in specs if specs[n] is not None]
    names = [*inputs, "out"] + (["state"] if cfg.has_lin else [])
    scratch = [pltpu.VMEM((arrays["kl"].shape[-1], e), jnp.float32)] if cfg.has_lin else []
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, names=names),
        grid=(batch, passes, cfg.num_chunks),
        in_specs=[specs[n] for n in inputs],
        out_specs=_chunk_spec(cfg, e, in_output_pass),
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
        scratch_shapes=scratch,
        cost_estimate=_cost(cfg, arrays, v.size * v.dtype.itemsize, backward=False),
        name="mixed_chunk_tpu_fwd",
        **_params(cfg),
    )(*[arrays[n] for n in inputs])


def _backward(cfg: _Config, residuals, do):
    arrays = dict(residuals)
    v = arrays["v"]
    batch, seq, e = v.shape
    last = cfg.num_chunks - 1
    passes = cfg.bwd_passes
    offset = 2 - passes
    do = do.astype(v.dtype)

    def both(ph, st):  # pass 0 in order, pass 1 in reverse
        return jnp.where(ph + offset == 0, st, last - st)

    def reverse_pass(ph, st):  # parked on the first chunk of pass 1 during pass 0
        return jnp.where(ph + offset == 0, last, last - st)

    def forward_pass(ph, st):  # parked on the last chunk of pass 0 during pass 1
        return jnp.where(ph + offset == 0, st, last)

    s = arrays["qq"].shape[-1]
    s_lin = arrays["ql"].shape[-1] if cfg.has_lin else 0
    specs = {
        "qq": _chunk_spec(cfg, s, reverse_pass),
        "kq": _chunk_spec(cfg, s, reverse_pass),
        "ql": _chunk_spec(cfg, s_lin, both) if cfg.has_lin else None,
        "kl": _chunk_spec(cfg, s_lin, both) if cfg.has_lin else None,
        "v": _chunk_spec(cfg, e, both),
        "bias": pl.BlockSpec((cfg.chunk, cfg.chunk), lambda b, ph, st: (0, 0))
        if cfg.has_bias
        else None,
        "do": _chunk_spec(cfg, e, both),
    }
    arrays["do"] = do
    inputs = [n for n in specs if specs[n] is not None]
    dql_chunk = forward_pass if cfg.causal else reverse_pass
    out_specs = {
        "dq": _chunk_spec(cfg, s, reverse_pass),
        "dk": _chunk_spec(cfg, s, reverse_pass),
        "dv": _chunk_spec(cfg, e, reverse_pass),
    }
    out_shapes = {
        "dq": jax.ShapeDtypeStruct(arrays["qq"].shape, arrays["qq"].dtype),
        "dk": jax.ShapeDtypeStruct(arrays["kq"].shape, arrays["kq"].dtype),
        "dv": jax.ShapeDtypeStruct(v.shape, v.dtype),
    }
    if cfg.has_lin:
        out_specs["dql"] = _chunk_spec(cfg, s_lin, dql_chunk)
        out_specs["dkl"] = _chunk_spec(cfg, s_lin, reverse_pass)
        out_shapes["dql"] = jax.ShapeDtypeStruct(arrays["ql"].shape, arrays["ql"].dtype)
        out_shapes["dkl"] = jax.ShapeDtypeStruct(arrays["kl"].shape, arrays["kl"].dtype)
    if cfg.has_bias:
        out_specs["dbias"] = pl.BlockSpec((None, cfg.chunk, cfg.chunk), lambda b, ph, st: (b, 0, 0))
        out_shapes["dbias"] = jax.ShapeDtypeStruct((batch, cfg.chunk, cfg.chunk), jnp.float32)
    outputs = list(out_specs)
    scratch = [pltpu.VMEM((s_lin, e), jnp.float32)] * 2 if cfg.has_lin else []
    names = [*inputs, *outputs] + (["state", "reverse"] if cfg.has_lin else [])
    out_bytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in out_shapes.values())
    results = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg, names=names),
        grid=(batch, passes, cfg.num_chunks),
        in_specs=[specs[n] for n in inputs],
        out_specs=[out_specs[n] for n in outputs],
        out_shape=[out_shapes[n] for n in outputs],
        scratch_shapes=scratch,
        cost_estimate=_cost(cfg, arrays, out_bytes, backward=True),
        name="mixed_chunk_tpu_bwd",
        **_params(cfg),
    )(*[arrays[n] for n in inputs])
    grads = dict(zip(outputs, results, strict=True))
    dbias = None
    if cfg.has_bias:
        dbias = grads["dbias"].sum(axis=0).astype(residuals["bias"].dtype)
    return {
        "qq": grads["dq"],
        "kq": grads["dk"],
        "ql": grads.get("dql"),
        "kl": grads.get("dkl"),
        "v": grads["dv"],
        "bias": dbias,
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _mixed_chunk(arrays, cfg: _Config):
    return _forward(arrays, cfg)


def _mixed_chunk_fwd(arrays, cfg):
    return _forward(arrays, cfg), arrays


def _mixed_chunk_bwd(cfg, arrays, do):
    return (_backward(cfg, arrays, do),)


_mixed_chunk.defvjp(_mixed_chunk_fwd, _mixed_chunk_bwd)


def _round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


def vmem_bytes(chunk: int, widths: dict[str, int], dtype) -> int:
    """Estimated VMEM working set of the backward kernel (the larger one) at one chunk."""
    size = jnp.dtype(dtype).itemsize
    s, s_lin, e = widths["s"], widths.get("s_lin", 0), widths["e"]
    blocks = 2 * chunk * (2 * s + 2 * s_lin + 2 * e) * size  # inputs, double-buffered
    blocks += 2 * chunk * (2 * s + 2 * s_lin + e) * size  # gradient outputs
    blocks += 2 * chunk * chunk * 4  # dbias accumulator
    scratch = 2 * s_lin * e * 4
    temporaries = 6 * chunk * chunk * 4 + 4 * chunk * e * 4
    return blocks + scratch + temporaries


def mixed_chunk_attention_tpu(
    call: MixedChunkCall,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The TPU kernels on a checked call (``mixed_chunk.base.check_arguments``).

    Returns:
      ``[batch, seq, e]`` in the inputs' dtype; reverse-mode differentiable (custom VJP).

    Raises:
      Unsupported: compiled, a chunk whose working set does not fit VMEM (use
        ``implementation='xla'``).
    """
    quad_q, quad_k, value, lin_q, lin_k = call.inputs
    bias, key_mask, chunk_size = call.bias, call.key_mask, call.chunk_size
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    batch, seq_len, e = value.shape
    num_chunks = cdiv(seq_len, chunk_size)
    chunk = _round_up(chunk_size, block_sizes.chunk_multiple)
    lanes = 1 if interpret else _LANES

    def padded_width(x):
        return _round_up(x.shape[-1], lanes)

    widths = {"s": padded_width(quad_q), "e": padded_width(value)}
    if lin_q is not None:
        widths["s_lin"] = padded_width(lin_q)
    if not interpret and vmem_bytes(chunk, widths, value.dtype) > _VMEM_BUDGET:
        raise Unsupported(
            f"chunk_size={chunk_size} with widths {widths} needs about "
            f"{vmem_bytes(chunk, widths, value.dtype) / 2**20:.0f} MiB of VMEM per chunk "
            f"(budget {_VMEM_BUDGET / 2**20:.0f} MiB): use implementation='xla'"
        )

    # Masked keys and the padding: zero K, K_lin and V rows (a select, so NaN/inf there cannot
    # leak through 0 * x), hence no weight in either term and zero gradients.
    valid = jnp.ones((batch, seq_len), bool) if key_mask is None else key_mask

    def hide(x):
        return None if x is None else jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))

    def pad(x):
        """``[b, T, d]`` -> ``[b, G * chunk, d_pad]``: each chunk padded at its end."""
        if x is None:
            return None
        d = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - seq_len), (0, 0)))
        x = x.reshape(batch, num_chunks, chunk_size, d)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, chunk - chunk_size), (0, padded_width(x) - d)))
        return x.reshape(batch, num_chunks * chunk, -1)

    arrays = {
        "qq": pad(quad_q),
        "kq": pad(hide(quad_k)),
        "ql": pad(lin_q),
        "kl": pad(hide(lin_k)),
        "v": pad(hide(value)),
        "bias": None
        if bias is None
        else jnp.pad(bias, ((0, chunk - chunk_size), (0, chunk - chunk_size))),
    }
    cfg = _Config(
        num_chunks=num_chunks,
        chunk=chunk,
        causal=call.causal,
        quad_scale=call.quad_scale,
        lin_scale=call.lin_scale,
        has_lin=lin_q is not None,
        has_bias=bias is not None,
        weight_dtype=jnp.float32 if value.dtype == jnp.float16 else value.dtype,
        interpret=interpret,
    )
    out = _mixed_chunk(arrays, cfg)
    out = out.reshape(batch, num_chunks, chunk, -1)[:, :, :chunk_size, :e]
    return out.reshape(batch, num_chunks * chunk_size, e)[:, :seq_len]
