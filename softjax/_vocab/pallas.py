"""Pallas kernels of ``linear_cross_entropy``: the vocabulary-scale reduction fused per block.

Three kernels, ``softjax_lce_fwd`` (logits block -> online logsumexp and smoothing
statistics per row, by ``xla.merge_block``, the same code as the xla path),
``softjax_lce_dx`` (recomputed logits -> gradient block -> ``dx += dz @ w_blk`` in float32)
and ``softjax_lce_dw`` (``dw_blk += dz.T @ x_blk`` in float32, cast once). Only
``[Bn, Bv]`` logits blocks ever exist, in fast memory.

Two kernel families, because the platforms schedule grids differently:

* TPU (Mosaic, the default lowering): grid (parallel blocks, reduction blocks) with the
  reduction axis innermost and ``"arbitrary"`` (sequential), so an output block stays
  resident in VMEM while it accumulates; ``dw`` accumulates in a float32 VMEM scratch.
  Ragged edges are masked: padded columns get ``-inf`` logits and zero gradient, padded
  rows of ``x`` and ``w`` are zeroed before they reach a matmul.
* GPU (Triton): programs run concurrently, so nothing may accumulate across the grid: each
  program owns a token block (fwd, dx) or a vocabulary block (dw) and loops over the other
  axis inside the kernel, with clamped block starts (as the xla path) so that no load is
  out of bounds. Triton, not Mosaic GPU: in jax 0.10 Mosaic GPU kernels are written against
  warpgroup matmuls and TMA (``plgpu.kernel``), and ``pallas_call`` on Mosaic GPU is
  deprecated; the Triton lowering takes these plain ``jnp`` block programs as they are.

On CPU both families run with ``interpret=True`` (``CPU_DRIVER`` picks which; tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from .. import _losses
from .. import _numerics as nx
from . import xla


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Token and vocabulary block sizes of the Pallas kernels.

    ``block_n`` rows of ``x`` and ``block_v`` rows of ``w`` are in fast memory at a time,
    with a ``[block_n, block_v]`` float32 logits block. On TPU both must be multiples of
    128 (``block_v`` is the lane dimension of the logits, ``block_n`` that of ``dz.T``);
    in interpret mode any multiple of 8 works.
    """

    block_n: int = 256
    block_v: int = 512

    def __post_init__(self):
        for name in ("block_n", "block_v"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")

    @classmethod
    def default(cls, platform: str) -> BlockSizes:
        """Per platform: TPU VMEM holds 2 x [256, D] + 2 x [512, D] bf16 at D <= 8192."""
        if platform == "tpu":
            return cls(256, 512)
        return cls(32, 64) if platform in ("gpu", "cuda") else cls(32, 256)


# Overridable by tests (small blocks exercise ragged edges at small sizes).
DEFAULT_BLOCKS: BlockSizes | None = None
_TARGET: list[str] = []  # set by `target_platform`


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace the kernels for ``platform`` (e.g. "tpu" under ``jax.export`` on a CPU host)."""
    _TARGET.append(platform)
    try:
        yield
    finally:
        _TARGET.pop()


def _platform() -> str:
    return _TARGET[-1] if _TARGET else jax.default_backend()


def check_supported(dim: int, num_classes: int, dtype, platform: str | None = None) -> BlockSizes:
    """The block sizes for this call, or NotImplementedError naming what is missing."""
    platform = platform or _platform()
    if platform not in ("tpu", "cpu", "gpu", "cuda"):
        raise NotImplementedError(
            f"implementation='pallas' has no kernel for platform {platform!r} (kernels exist "
            "for tpu (Mosaic), cuda (Triton) and cpu (interpreted)); use implementation='xla'"
        )
    if platform != "cpu" and np.dtype(dtype) == np.float64:
        raise NotImplementedError(f"implementation='pallas' on {platform} has no float64 kernel")
    blocks = DEFAULT_BLOCKS or BlockSizes.default(platform)
    if platform == "tpu" and (blocks.block_n % 128 or blocks.block_v % 128):
        raise ValueError(f"on TPU block sizes must be multiples of 128, got {blocks}")
    if _driver(platform) == "gpu":
        if dim & (dim - 1) or dim < 16:
            raise NotImplementedError(
                f"implementation='pallas' on GPU needs the hidden size D to be a power of two "
                f">= 16 (Triton blocks), got D={dim}"
            )
        if num_classes < 16:
            raise NotImplementedError(
                f"implementation='pallas' on GPU needs at least 16 classes, got {num_classes}"
            )
    return blocks


# Which kernel family interpret mode on CPU runs: "tpu" (grid accumulation) or "gpu".
CPU_DRIVER = "tpu"


def _driver(platform: str | None = None) -> str:
    platform = platform or _platform()
    if platform == "cpu":
        return CPU_DRIVER
    return "tpu" if platform == "tpu" else "gpu"


def _interpret() -> bool:
    return _platform() == "cpu"


def _tpu_params(*semantics):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def _cap_array(cap, dtype):
    """The softcap as a ``[1, 1]`` operand (it may be traced), or None."""
    return None if cap is None else jnp.reshape(jnp.asarray(cap, dtype), (1, 1))


def _block_cols(j, bv, num_classes):
    cols = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    return cols, cols < num_classes


def _valid_rows(i, b, total):
    return i * b + lax.broadcasted_iota(jnp.int32, (b, 1), 0) < total


# ---------------------------------------------------------------------------------------
# Forward: per-row statistics


def _fwd_kernel(*refs, num_classes, bv, smoothing, has_cap):
    if has_cap:
        x_ref, w_ref, cw_ref, cap_ref, m_ref, r_ref, rc_ref, d_ref, ws_ref = refs
        cap = cap_ref[...]
    else:
        x_ref, w_ref, cw_ref, m_ref, r_ref, rc_ref, d_ref, ws_ref = refs
        cap = None
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, m_ref.dtype)
        for ref in (r_ref, rc_ref, d_ref, ws_ref):
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    _, z = xla.block_logits(x_ref[...], w_ref[...], cap, m_ref.dtype)
    _, col_ok = _block_cols(j, bv, num_classes)
    cw = cw_ref[...]
    st = xla.Stats(m_ref[...], r_ref[...], rc_ref[...], d_ref[...])
    st = xla.merge_block(st, z, col_ok, cw, ws_ref[...], smoothing)
    m_ref[...], r_ref[...], rc_ref[...], d_ref[...] = st
    seen = jnp.sum(jnp.where(col_ok, cw, 0.0), axis=-1, keepdims=True)
    ws_ref[...] = ws_ref[...] + seen


def forward_stats(x, w, class_weight, cap, *, blocks: BlockSizes, smoothing: bool):
    """Per-row :class:`xla.Stats` (``[N]`` each) of ``softcap(x @ w.T)``, by a Pallas kernel."""
    if _driver() == "gpu":
        return _gpu_forward_stats(x, w, class_weight, cap, blocks=blocks, smoothing=smoothing)
    n, dim = x.shape
    v = w.shape[0]
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    bn, bv = min(blocks.block_n, _round8(n)), min(blocks.block_v, _round8(v))
    grid = (pl.cdiv(n, bn), pl.cdiv(v, bv))
    cw = _class_weights(class_weight, v, dtype)
    cap_arr = _cap_array(cap, dtype)
    row_spec = pl.BlockSpec((bn, 1), lambda i, j: (i, 0))
    in_specs = [
        pl.BlockSpec((bn, dim), lambda i, j: (i, 0)),
        pl.BlockSpec((bv, dim), lambda i, j: (j, 0)),
        pl.BlockSpec((1, bv), lambda i, j: (0, j)),
    ]
    args = [x, w, cw]
    if cap_arr is not None:
        in_specs.append(pl.BlockSpec((1, 1), lambda i, j: (0, 0)))
        args.append(cap_arr)
    kernel = functools.partial(
        _fwd_kernel, num_classes=v, bv=bv, smoothing=smoothing, has_cap=cap_arr is not None
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[row_spec] * 5,
        out_shape=[jax.ShapeDtypeStruct((n, 1), dtype)] * 5,
        compiler_params=None if _interpret() else _tpu_params("parallel", "arbitrary"),
        interpret=_interpret(),
        name="softjax_lce_fwd",
    )(*args)
    return xla.Stats(*(a[:, 0] for a in outs[:4]))


def _round8(n):
    return -(-n // 8) * 8


def _class_weights(class_weight, v, dtype):
    if class_weight is None:
        return jnp.ones((1, v), dtype)
    return class_weight.astype(dtype).reshape(1, v)


# ---------------------------------------------------------------------------------------
# Backward: dx and dw


def _row_data(row_ok, coefs, shift, log_norm, dtype):
    """The per-row inputs of the backward kernels as one ``[N, 8]`` array (2 unused columns:
    Triton blocks have power-of-two sizes)."""
    cols = (row_ok.astype(dtype), coefs.prob, coefs.target, coefs.smooth, shift, log_norm)
    cols += (jnp.zeros_like(shift),) * 2
    return jnp.stack([c.astype(dtype) for c in cols], axis=1)


def _grad_block(x, w, cw, cap, labels, rows, cols, col_ok, row_ok):
    """``dz`` [Bn, Bv] of a block: the gradient of the loss with respect to the raw logits.

    ``rows`` are the six ``[Bn, 1]`` columns of :func:`_row_data` (read one by one from the
    ref: Triton has no static slices of loaded values).
    """
    ok, prob, target, smooth, shift, log_norm = rows
    raw, z = xla.block_logits(x, w, cap, shift.dtype)
    z = jnp.where(col_ok, z, -jnp.inf)
    stats = _losses.RowStats(shift, log_norm)
    coefs = _losses.GradCoefs(prob, target, smooth)
    dz = _losses.logit_grads(_losses.probs(z, stats), cols == labels, coefs, cw)
    dz = nx.softcap_grad(raw, cap, dz)
    return jnp.where(col_ok & row_ok & (ok > 0), dz, 0.0)


def _read_rows(rows_ref, start=None, size=None):
    """The six per-row columns of a ``[.., 8]`` row-data ref (all rows, or ``size`` rows)."""
    idx = slice(None) if start is None else pl.ds(start, size)
    return tuple(rows_ref[idx, pl.ds(k, 1)] for k in range(6))


def _unpack(refs, has_cap):
    if has_cap:
        x_ref, w_ref, cw_ref, lab_ref, rows_ref, cap_ref, *out = refs
        return x_ref, w_ref, cw_ref, lab_ref, rows_ref, cap_ref[...], out
    x_ref, w_ref, cw_ref, lab_ref, rows_ref, *out = refs
    return x_ref, w_ref, cw_ref, lab_ref, rows_ref, None, out


def _dx_kernel(*refs, n, num_classes, bn, bv, has_cap):
    x_ref, w_ref, cw_ref, lab_ref, rows_ref, cap, (dx_ref,) = _unpack(refs, has_cap)
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dx_ref[...] = jnp.zeros(dx_ref.shape, dx_ref.dtype)

    cols, col_ok = _block_cols(j, bv, num_classes)
    x = x_ref[...]
    # Padded rows of w (past V) may hold anything: zero them before the matmul.
    w = jnp.where(_valid_rows(j, bv, num_classes), w_ref[...], 0).astype(x.dtype)
    dz = _grad_block(
        x,
        w,
        cw_ref[...],
        cap,
        lab_ref[...],
        _read_rows(rows_ref),
        cols,
        col_ok,
        _valid_rows(i, bn, n),
    )
    dx_ref[...] += lax.dot_general(
        dz.astype(x.dtype), w, (((1,), (0,)), ((), ())), preferred_element_type=dx_ref.dtype
    )


def _dw_kernel(*refs, n, num_classes, bn, bv, has_cap):
    x_ref, w_ref, cw_ref, lab_ref, rows_ref, cap, (dw_ref, acc_ref) = _unpack(refs, has_cap)
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    cols, col_ok = _block_cols(j, bv, num_classes)
    row_ok = _valid_rows(i, bn, n)
    x = jnp.where(row_ok, x_ref[...], 0).astype(x_ref.dtype)  # padded rows past N
    dz = _grad_block(
        x, w_ref[...], cw_ref[...], cap, lab_ref[...], _read_rows(rows_ref), cols, col_ok, row_ok
    )
    acc_ref[...] += lax.dot_general(
        dz.astype(x.dtype), x, (((0,), (0,)), ((), ())), preferred_element_type=acc_ref.dtype
    )

    @pl.when(i == pl.num_programs(1) - 1)
    def _store():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def backward(x, w, labels, row_ok, coefs, shift, log_norm, class_weight, cap, *, blocks):
    """``dx`` (float32, summed over this ``w``) and ``dw`` (``w.dtype``), by two kernels."""
    if _driver() == "gpu":
        return _gpu_backward(
            x, w, labels, row_ok, coefs, shift, log_norm, class_weight, cap, blocks=blocks
        )
    n, dim = x.shape
    v = w.shape[0]
    dtype = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    bn, bv = min(blocks.block_n, _round8(n)), min(blocks.block_v, _round8(v))
    nt, nv = pl.cdiv(n, bn), pl.cdiv(v, bv)
    cw = _class_weights(class_weight, v, dtype)
    cap_arr = _cap_array(cap, dtype)
    has_cap = cap_arr is not None
    args = [
        x,
        w,
        cw,
        labels.astype(jnp.int32).reshape(n, 1),
        _row_data(row_ok, coefs, shift, log_norm, dtype),
    ]
    args += [cap_arr] if has_cap else []
    static = dict(n=n, num_classes=v, bn=bn, bv=bv, has_cap=has_cap)

    def specs(tok, voc):
        """BlockSpecs of the inputs, given how the grid indices map to (token, vocab) block."""
        s = [
            pl.BlockSpec((bn, dim), lambda a, b: (tok(a, b), 0)),
            pl.BlockSpec((bv, dim), lambda a, b: (voc(a, b), 0)),
            pl.BlockSpec((1, bv), lambda a, b: (0, voc(a, b))),
            pl.BlockSpec((bn, 1), lambda a, b: (tok(a, b), 0)),
            pl.BlockSpec((bn, 8), lambda a, b: (tok(a, b), 0)),
        ]
        return s + ([pl.BlockSpec((1, 1), lambda a, b: (0, 0))] if has_cap else [])

    dx = pl.pallas_call(
        functools.partial(_dx_kernel, **static),
        grid=(nt, nv),
        in_specs=specs(lambda a, b: a, lambda a, b: b),
        out_specs=pl.BlockSpec((bn, dim), lambda a, b: (a, 0)),
        out_shape=jax.ShapeDtypeStruct((n, dim), dtype),
        compiler_params=None if _interpret() else _tpu_params("parallel", "arbitrary"),
        interpret=_interpret(),
        name="softjax_lce_dx",
    )(*args)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, **static),
        grid=(nv, nt),
        in_specs=specs(lambda a, b: b, lambda a, b: a),
        out_specs=pl.BlockSpec((bv, dim), lambda a, b: (a, 0)),
        out_shape=jax.ShapeDtypeStruct((v, dim), w.dtype),
        scratch_shapes=[_vmem((bv, dim), dtype)],
        compiler_params=None if _interpret() else _tpu_params("parallel", "arbitrary"),
        interpret=_interpret(),
        name="softjax_lce_dw",
    )(*args)
    return dx, dw


def _vmem(shape, dtype):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, dtype)


# ---------------------------------------------------------------------------------------
# GPU (Triton): one program per parallel block, the reduction as a loop inside it
#
# GPU programs run concurrently, so nothing may accumulate across the grid. Each program
# owns a token block (fwd, dx) or a vocabulary block (dw) and loops over the other axis.
# Ragged edges use clamped starts, as the xla path: the last block starts at ``V - Bv``
# (``N - Bn``) and masks what the previous block covered, so no load is out of bounds;
# rows shared by two programs are computed identically by both.


def _pow2_at_most(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= min(n, cap):
        b *= 2
    return b


def _gpu_blocks(n, v, blocks):
    return _pow2_at_most(n, blocks.block_n), _pow2_at_most(v, blocks.block_v)


def _gpu_call(kernel, grid, out_shape, name, args):
    interpret = _interpret()
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*args)


def _clamped(k, b, total):
    """Start of block ``k`` clamped to ``total - b``, and the row/column mask of its own part."""
    start = jnp.minimum(k * b, total - b)
    return start, start + lax.broadcasted_iota(jnp.int32, (1, b), 1) >= k * b


def _gpu_fwd_kernel(*refs, n, num_classes, bn, bv, smoothing, has_cap):
    if has_cap:
        x_ref, w_ref, cw_ref, cap_ref, *outs = refs
        cap = cap_ref[...]
    else:
        x_ref, w_ref, cw_ref, *outs = refs
        cap = None
    r0 = jnp.minimum(pl.program_id(0) * bn, n - bn)
    x = x_ref[pl.ds(r0, bn), :]
    dtype = outs[0].dtype

    def body(j, carry):
        st, ws = carry
        s, col_ok = _clamped(j, bv, num_classes)
        cw = cw_ref[:, pl.ds(s, bv)]
        _, z = xla.block_logits(x, w_ref[pl.ds(s, bv), :], cap, dtype)
        st = xla.merge_block(st, z, col_ok, cw, ws, smoothing)
        return st, ws + jnp.sum(jnp.where(col_ok, cw, 0.0), axis=-1, keepdims=True)

    init = (xla.init_stats(bn, dtype), jnp.zeros((bn, 1), dtype))
    st, _ = lax.fori_loop(0, pl.cdiv(num_classes, bv), body, init)
    for ref, a in zip(outs, st, strict=True):
        ref[pl.ds(r0, bn), :] = a


def _gpu_forward_stats(x, w, class_weight, cap, *, blocks, smoothing):
    n, _ = x.shape
    v = w.shape[0]
    dtype = jnp.float32
    bn, bv = _gpu_blocks(n, v, blocks)
    cap_arr = _cap_array(cap, dtype)
    args = [x, w, _class_weights(class_weight, v, dtype)]
    args += [cap_arr] if cap_arr is not None else []
    kernel = functools.partial(
        _gpu_fwd_kernel,
        n=n,
        num_classes=v,
        bn=bn,
        bv=bv,
        smoothing=smoothing,
        has_cap=cap_arr is not None,
    )
    outs = _gpu_call(
        kernel,
        (pl.cdiv(n, bn),),
        [jax.ShapeDtypeStruct((n, 1), dtype)] * 4,
        "softjax_lce_fwd",
        args,
    )
    return xla.Stats(*(a[:, 0] for a in outs))


def _gpu_dx_kernel(*refs, n, num_classes, bn, bv, has_cap):
    x_ref, w_ref, cw_ref, lab_ref, rows_ref, cap, (dx_ref,) = _unpack(refs, has_cap)
    r0 = jnp.minimum(pl.program_id(0) * bn, n - bn)
    x = x_ref[pl.ds(r0, bn), :]
    lab, rows = lab_ref[pl.ds(r0, bn), :], _read_rows(rows_ref, r0, bn)
    all_rows = jnp.ones((bn, 1), jnp.bool_)

    def body(j, dx):
        s, col_ok = _clamped(j, bv, num_classes)
        w = w_ref[pl.ds(s, bv), :]
        cols = s + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
        dz = _grad_block(x, w, cw_ref[:, pl.ds(s, bv)], cap, lab, rows, cols, col_ok, all_rows)
        return dx + lax.dot_general(
            dz.astype(x.dtype), w, (((1,), (0,)), ((), ())), preferred_element_type=dx.dtype
        )

    dx = lax.fori_loop(0, pl.cdiv(num_classes, bv), body, jnp.zeros(x.shape, dx_ref.dtype))
    dx_ref[pl.ds(r0, bn), :] = dx


def _gpu_dw_kernel(*refs, n, num_classes, bn, bv, has_cap):
    x_ref, w_ref, cw_ref, lab_ref, rows_ref, cap, (dw_ref,) = _unpack(refs, has_cap)
    s = jnp.minimum(pl.program_id(0) * bv, num_classes - bv)
    w = w_ref[pl.ds(s, bv), :]
    cw = cw_ref[:, pl.ds(s, bv)]
    cols = s + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    # Columns shared with the previous program get their full gradient here too.
    all_cols = jnp.ones((1, bv), jnp.bool_)

    def body(i, acc):
        r0, row_ok = _clamped(i, bn, n)
        x = x_ref[pl.ds(r0, bn), :]
        lab, rows = lab_ref[pl.ds(r0, bn), :], _read_rows(rows_ref, r0, bn)
        dz = _grad_block(x, w, cw, cap, lab, rows, cols, all_cols, row_ok.reshape(bn, 1))
        return acc + lax.dot_general(
            dz.astype(x.dtype), x, (((0,), (0,)), ((), ())), preferred_element_type=acc.dtype
        )

    acc = lax.fori_loop(0, pl.cdiv(n, bn), body, jnp.zeros(w.shape, jnp.float32))
    dw_ref[pl.ds(s, bv), :] = acc.astype(dw_ref.dtype)


def _gpu_backward(x, w, labels, row_ok, coefs, shift, log_norm, class_weight, cap, *, blocks):
    n, dim = x.shape
    v = w.shape[0]
    dtype = jnp.float32
    bn, bv = _gpu_blocks(n, v, blocks)
    cap_arr = _cap_array(cap, dtype)
    has_cap = cap_arr is not None
    args = [
        x,
        w,
        _class_weights(class_weight, v, dtype),
        labels.astype(jnp.int32).reshape(n, 1),
        _row_data(row_ok, coefs, shift, log_norm, dtype),
    ]
    args += [cap_arr] if has_cap else []
    static = dict(n=n, num_classes=v, bn=bn, bv=bv, has_cap=has_cap)
    dx = _gpu_call(
        functools.partial(_gpu_dx_kernel, **static),
        (pl.cdiv(n, bn),),
        jax.ShapeDtypeStruct((n, dim), dtype),
        "softjax_lce_dx",
        args,
    )
    dw = _gpu_call(
        functools.partial(_gpu_dw_kernel, **static),
        (pl.cdiv(v, bv),),
        jax.ShapeDtypeStruct((v, dim), w.dtype),
        "softjax_lce_dw",
        args,
    )
    return dx, dw
