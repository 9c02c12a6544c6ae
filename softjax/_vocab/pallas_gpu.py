"""Triton kernels of ``linear_cross_entropy`` for GPUs: logits blocks accumulated over D.

GPU programs run concurrently, so nothing accumulates across the grid; each program loops
instead:

* ``softjax_lce_fwd``: one program per token block; it loops over the class blocks, and for
  each over D steps (``acc += x[r, k] @ w[c, k].T`` in float32 registers, operands staged
  in shared memory by Triton's software pipeline), then folds the logits block into the
  per-row online statistics (``chunked.merge_block``, the code of the chunked path).
* ``softjax_lce_grad``: one program per ``(token block, class block)``; the same D loop,
  then the gradient block ``dz`` (``chunked.block_grads``), written in the operands' dtype.

Shared memory per pipeline stage is ``(bn + bv) * bd`` operand elements and registers hold
one ``[bn, bv]`` float32 block, whatever ``D`` is. Triton blocks are powers of two: ragged
edges use clamped starts (the last block of an axis starts at ``size - block`` and masks
what the previous block covered, as the chunked path), so no load is out of bounds and ``w`` is
never padded or copied; only an axis shorter than the 16 that Triton's matmul needs is
padded (a copy of fewer than 16 rows).

Triton, not Mosaic GPU: Mosaic GPU kernels are written against warpgroup matmuls and TMA
copies with explicit shared-memory staging, while these block programs are the plain
``jnp`` code that also runs on TPU and in interpret mode. A Mosaic GPU form is the natural
next step on Hopper (wgmma); the Triton lowering is what ``jax`` compiles for CUDA and ROCm
here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .. import _losses
from .. import _numerics as nx
from . import chunked
from .blocks import BlockSizes

MIN_BLOCK = 16  # Triton's matmul needs at least 16 along every axis

# The custom call a Pallas Triton kernel lowers to (what an executable holding these
# kernels contains, and what jax.export must be told to accept).
CUSTOM_CALL = "__gpu$xla.gpu.triton"


def _pow2_at_most(n: int, cap: int) -> int:
    b = MIN_BLOCK
    while b * 2 <= min(n, cap):
        b *= 2
    return b


def _pad_rows(a, rows: int):
    """``a`` with zero rows appended up to ``rows`` (only ever fewer than 16 of them)."""
    return a if a.shape[0] >= rows else jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _pad_small(x, w, class_weight):
    """Axes shorter than :data:`MIN_BLOCK` padded with zeros (tiny arrays only)."""
    if x.shape[1] < MIN_BLOCK:
        extra = ((0, 0), (0, MIN_BLOCK - x.shape[1]))
        x, w = jnp.pad(x, extra), jnp.pad(w, extra)
    cw = jnp.ones((w.shape[0],), jnp.float32) if class_weight is None else class_weight
    w = _pad_rows(w, MIN_BLOCK)
    cw = jnp.pad(cw.astype(jnp.float32), (0, w.shape[0] - cw.shape[0])).reshape(1, -1)
    return _pad_rows(x, MIN_BLOCK), w, cw


def _call(kernel, grid, out_shape, name, args, interpret):
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=3)
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(*args)


def _map_operands(cap):
    """The soft-cap and the scale of a :class:`chunked.LogitMap` (or a soft-cap alone) as
    ``[1, 1]`` operands, each present only when set, and ``(has_cap, has_scale)``."""
    parts = chunked.map_parts(cap)
    ops = [jnp.reshape(jnp.asarray(a, jnp.float32), (1, 1)) for a in parts if a is not None]
    return ops, tuple(a is not None for a in parts)


def _read_map(refs, has):
    """The kernel's logit map from the refs of :func:`_map_operands` (popped from ``refs``)."""
    cap, scale = (refs.pop(0)[...] if h else None for h in has)
    return chunked.join_map(cap, scale)


def _clamped(k, b, total):
    """Start of block ``k`` clamped to ``total - b``, and the mask of its own (new) part."""
    start = jnp.minimum(k * b, total - b)
    return start, start + lax.broadcasted_iota(jnp.int32, (1, b), 1) >= k * b


def _logits(x_ref, w_ref, r0, s, *, bn, bv, bd, dim):
    """``x[r0:r0+bn] @ w[s:s+bv].T`` in float32, accumulated over D steps of ``bd``."""

    def step(k, acc):
        c, new = _clamped(k, bd, dim)
        x = x_ref[pl.ds(r0, bn), pl.ds(c, bd)]
        x = jnp.where(new, x, jnp.zeros_like(x))  # lanes the previous step covered
        return acc + nx.dot(x, w_ref[pl.ds(s, bv), pl.ds(c, bd)], (1, 1), jnp.float32)

    return lax.fori_loop(0, pl.cdiv(dim, bd), step, jnp.zeros((bn, bv), jnp.float32))


def _fwd_kernel(*refs, n, dim, num_classes, bn, bv, bd, smoothing, has_map, moments):
    x_ref, w_ref, cw_ref, *refs = refs
    lmap = _read_map(refs, has_map)
    r0 = jnp.minimum(pl.program_id(0) * bn, n - bn)
    v = w_ref.shape[0]

    def body(j, carry):
        st, mo, ws = carry
        s, new = _clamped(j, bv, v)
        col_ok = new & (s + lax.broadcasted_iota(jnp.int32, (1, bv), 1) < num_classes)
        cw = cw_ref[:, pl.ds(s, bv)]
        raw = _logits(x_ref, w_ref, r0, s, bn=bn, bv=bv, bd=bd, dim=dim)
        z = chunked.map_logits(raw, lmap)
        new_st = chunked.merge_block(st, z, col_ok, cw, ws, smoothing)
        if moments:
            mo = chunked.merge_moments(mo, st.m, new_st.m, 1 + st.rest + st.rest_c, z, col_ok)
        return new_st, mo, ws + jnp.sum(jnp.where(col_ok, cw, 0.0), axis=-1, keepdims=True)

    zeros = jnp.zeros((bn, 1), jnp.float32)
    mo = chunked.Moments(zeros, zeros) if moments else ()
    st, mo, _ = lax.fori_loop(
        0, pl.cdiv(v, bv), body, (chunked.init_stats(bn, jnp.float32), mo, zeros)
    )
    for ref, a in zip(refs, (*st, *mo), strict=True):
        ref[pl.ds(r0, bn), :] = a


def forward_stats(
    x, w, class_weight, cap, *, blocks: BlockSizes, smoothing: bool, interpret, moments=False
):
    """Per-row :class:`chunked.Stats` (``[N]`` each) of ``softcap(x @ w.T)`` (``cap`` a
    soft-cap or a :class:`chunked.LogitMap`), and with ``moments`` the
    :class:`chunked.Moments` too."""
    n, v = x.shape[0], w.shape[0]
    x, w, cw = _pad_small(x, w, class_weight)
    (np_, dim), vp = x.shape, w.shape[0]
    bn, bv = _pow2_at_most(np_, blocks.block_n), _pow2_at_most(vp, blocks.block_v)
    bd = _pow2_at_most(dim, blocks.block_d)
    map_ops, has_map = _map_operands(cap)
    kernel = functools.partial(
        _fwd_kernel,
        n=np_,
        dim=dim,
        num_classes=v,
        bn=bn,
        bv=bv,
        bd=bd,
        smoothing=smoothing,
        has_map=has_map,
        moments=moments,
    )
    outs = _call(
        kernel,
        (pl.cdiv(np_, bn),),
        [jax.ShapeDtypeStruct((np_, 1), jnp.float32)] * (6 if moments else 4),
        "softjax_lce_fwd",
        [x, w, cw, *map_ops],
        interpret,
    )
    outs = [a[:n, 0] for a in outs]
    st = chunked.Stats(*outs[:4])
    return (st, chunked.Moments(*outs[4:])) if moments else st


def _grad_kernel(*refs, n, dim, bn, bv, bd, has_map, spread):
    x_ref, w_ref, cw_ref, keep_ref, rows_ref, *refs = refs
    lmap = _read_map(refs, has_map)
    (dz_ref,) = refs
    r0 = jnp.minimum(pl.program_id(0) * bn, n - bn)
    s = jnp.minimum(pl.program_id(1) * bv, w_ref.shape[0] - bv)
    raw = _logits(x_ref, w_ref, r0, s, bn=bn, bv=bv, bd=bd, dim=dim)
    ok, prob, target, smooth, shift, log_norm, label, spr = (
        rows_ref[pl.ds(r0, bn), pl.ds(c, 1)] for c in range(8)
    )
    cols = s + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    stats = _losses.RowStats(shift, log_norm)
    coefs = _losses.GradCoefs(prob, target, smooth, spr if spread else None)
    cw = cw_ref[:, pl.ds(s, bv)]
    dz = chunked.block_grads(raw, lmap, cols == label.astype(jnp.int32), stats, coefs, cw)
    # Blocks that overlap (clamped starts) write identical values there.
    keep = (ok > 0) & (keep_ref[:, pl.ds(s, bv)] > 0)
    dz_ref[pl.ds(r0, bn), pl.ds(s, bv)] = jnp.where(keep, dz, 0.0).astype(dz_ref.dtype)


def logit_grads(
    x, w, class_weight, keep, rows, cap, *, blocks: BlockSizes, interpret, spread=False
):
    """``dz = d loss / d (x @ w.T)`` ``[N, V]`` in ``x.dtype`` (see ``pallas_tpu``)."""
    n, v = x.shape[0], w.shape[0]
    x, w, cw = _pad_small(x, w, class_weight)
    keep = jnp.pad(keep, (0, w.shape[0] - v)).reshape(1, -1)
    rows = _pad_rows(rows.T, x.shape[0])  # [N, 8]: GPU memory is not lane-padded
    (np_, dim), vp = x.shape, w.shape[0]
    bn, bv = _pow2_at_most(np_, blocks.block_n), _pow2_at_most(vp, blocks.block_v)
    bd = _pow2_at_most(dim, blocks.block_d)
    map_ops, has_map = _map_operands(cap)
    kernel = functools.partial(
        _grad_kernel, n=np_, dim=dim, bn=bn, bv=bv, bd=bd, has_map=has_map, spread=spread
    )
    args = [x, w, cw, keep, rows, *map_ops]
    dz = _call(
        kernel,
        (pl.cdiv(np_, bn), pl.cdiv(vp, bv)),
        jax.ShapeDtypeStruct((np_, vp), x.dtype),
        "softjax_lce_grad",
        args,
        interpret,
    )
    return dz[:n, :v]
