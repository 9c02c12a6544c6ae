"""Mosaic TPU kernels of ``linear_cross_entropy``: logits blocks accumulated over D in VMEM.

Both kernels run the grid ``(token blocks, class blocks, D steps)`` with the D axis innermost
and sequential: step ``k`` adds ``x[i, k] @ w[j, k].T`` (``[bn, bd] x [bd, bv]``) to a float32
``[bn, bv]`` VMEM accumulator, and the last step hands the finished logits block to an
epilogue:

* ``softjax_lce_fwd`` folds it into the per-row online logsumexp and smoothing statistics
  (``chunked.merge_block``, the code of the chunked path). The class axis is sequential too, so the
  ``[bn, 1]`` statistics stay in VMEM scratch while they accumulate; the last class block
  writes them as the rows of one ``[8, bn]`` output block.

Per-row data crosses HBM as ``[8, N]`` (rows of statistics, tokens along lanes) and is
transposed inside the kernels: a TPU pads an array's minor dimension to 128 lanes, so an
``[N, 8]`` or ``[N, 1]`` array would cost ``N * 512`` bytes of HBM, ``[8, N]`` costs ``N * 32``.
* ``softjax_lce_grad`` turns it into the gradient block ``dz`` (``chunked.block_grads``) and
  writes it, in the operands' dtype, for the backward pass's matmuls.

Ragged edges are masked, never padded in memory: columns past ``V`` get ``-inf`` logits and a
zero gradient, rows past ``N`` are dropped when written, and the last D step zeroes the lanes
past ``D`` of both operands (they hold whatever the VMEM buffer held).

float32 operands are multiplied at ``Precision.HIGHEST`` (``nx.dot``): the MXU's default pass
for float32 rounds both operands to bfloat16. bfloat16 operands are multiplied as they are and
accumulated in float32.
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


def _compiler_params(interpret: bool, *semantics):
    if interpret:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=48 * 2**20)


def _vmem(shape, dtype):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, dtype)


def _tiles(n, v, dim, blocks: BlockSizes, interpret: bool):
    """Block sizes clipped to the problem (lane-aligned when compiled)."""
    lane = 8 if interpret else 128
    # Tokens are the lanes of the [8, bn] row-data blocks.
    bn = min(blocks.block_n, _round_up(n, lane))
    bv = min(blocks.block_v, _round_up(v, lane))
    bd = min(blocks.block_d, _round_up(dim, lane))
    return bn, bv, bd


def _round_up(n, m):
    return -(-n // m) * m


def _accumulate(x_ref, w_ref, acc_ref, k, *, dim, bd):
    """``acc += x_blk @ w_blk.T`` for D step ``k``; lanes past ``D`` of the last step zeroed."""

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    x, w = x_ref[...], w_ref[...]
    if dim % bd:
        lanes = k * bd + lax.broadcasted_iota(jnp.int32, (1, bd), 1)
        x = jnp.where(lanes < dim, x, jnp.zeros_like(x))
        w = jnp.where(lanes < dim, w, jnp.zeros_like(w))
    acc_ref[...] += nx.dot(x, w, (1, 1), acc_ref.dtype)


def _operand_specs(bn, bv, bd):
    return [
        pl.BlockSpec((bn, bd), lambda i, j, k: (i, k)),
        pl.BlockSpec((bv, bd), lambda i, j, k: (j, k)),
        pl.BlockSpec((1, bv), lambda i, j, k: (0, j)),
    ]


def _class_weights(class_weight, v):
    if class_weight is None:
        return jnp.ones((1, v), jnp.float32)
    return class_weight.astype(jnp.float32).reshape(1, v)


def _map_operands(cap):
    """The soft-cap and the scale of a :class:`chunked.LogitMap` (or a soft-cap alone) as
    ``[1, 1]`` operands (they may be traced), each present only when set; their specs;
    ``(has_cap, has_scale)``."""
    parts = chunked.map_parts(cap)
    ops = [jnp.reshape(jnp.asarray(a, jnp.float32), (1, 1)) for a in parts if a is not None]
    specs = [pl.BlockSpec((1, 1), lambda i, j, k: (0, 0))] * len(ops)
    return ops, specs, tuple(a is not None for a in parts)


def _read_map(refs, has):
    """The kernel's logit map from the refs of :func:`_map_operands` (popped from ``refs``)."""
    cap, scale = (refs.pop(0)[...] if h else None for h in has)
    return chunked.join_map(cap, scale)


def _columns(j, bv, num_classes):
    cols = j * bv + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    return cols, cols < num_classes


# ---------------------------------------------------------------------------------------
# Forward: per-row statistics


def _fwd_kernel(*refs, dim, num_classes, bv, bd, smoothing, has_map, moments):
    x_ref, w_ref, cw_ref, *refs = refs
    lmap = _read_map(refs, has_map)
    out_ref, acc_ref, *stat_refs = refs
    j, nj = pl.program_id(1), pl.num_programs(1)
    k, nk = pl.program_id(2), pl.num_programs(2)

    @pl.when((j == 0) & (k == 0))
    def _():
        stat_refs[0][...] = jnp.full(stat_refs[0].shape, -jnp.inf, jnp.float32)
        for ref in stat_refs[1:]:
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    _accumulate(x_ref, w_ref, acc_ref, k, dim=dim, bd=bd)

    @pl.when(k == nk - 1)
    def _():
        m_ref, r_ref, rc_ref, d_ref, ws_ref, *mo_refs = stat_refs
        _, col_ok = _columns(j, bv, num_classes)
        cw = cw_ref[...]
        old = chunked.Stats(m_ref[...], r_ref[...], rc_ref[...], d_ref[...])
        z = chunked.map_logits(acc_ref[...], lmap)
        st = chunked.merge_block(old, z, col_ok, cw, ws_ref[...], smoothing)
        m_ref[...], r_ref[...], rc_ref[...], d_ref[...] = st
        if moments:
            mo = chunked.Moments(mo_refs[0][...], mo_refs[1][...])
            total = 1 + old.rest + old.rest_c
            mo = chunked.merge_moments(mo, old.m, st.m, total, z, col_ok)
            mo_refs[0][...], mo_refs[1][...] = mo
        ws_ref[...] += jnp.sum(jnp.where(col_ok, cw, 0.0), axis=-1, keepdims=True)

    @pl.when((k == nk - 1) & (j == nj - 1))
    def _():
        bn = acc_ref.shape[0]
        lanes = lax.broadcasted_iota(jnp.int32, (bn, 8), 1)
        cols = jnp.zeros((bn, 8), jnp.float32)
        for c, ref in enumerate(stat_refs):
            cols = jnp.where(lanes == c, ref[...], cols)
        out_ref[...] = cols.T


def forward_stats(
    x, w, class_weight, cap, *, blocks: BlockSizes, smoothing: bool, interpret, moments=False
):
    """Per-row :class:`chunked.Stats` (``[N]`` each) of ``softcap(x @ w.T)`` (``cap`` a
    soft-cap or a :class:`chunked.LogitMap`), and with ``moments`` the
    :class:`chunked.Moments` too (rows 5 and 6 of the kernel's ``[8, N]`` output).

    x ``[N, D]``, w ``[V, D]`` (same dtype), class_weight ``[V]`` or None.
    """
    n, dim = x.shape
    v = w.shape[0]
    bn, bv, bd = _tiles(n, v, dim, blocks, interpret)
    grid = (pl.cdiv(n, bn), pl.cdiv(v, bv), pl.cdiv(dim, bd))
    map_ops, map_specs, has_map = _map_operands(cap)
    in_specs = _operand_specs(bn, bv, bd) + map_specs
    kernel = functools.partial(
        _fwd_kernel, dim=dim, num_classes=v, bv=bv, bd=bd, smoothing=smoothing,
        has_map=has_map, moments=moments,
    )  # fmt: skip
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((8, bn), lambda i, j, k: (0, i)),
        out_shape=jax.ShapeDtypeStruct((8, n), jnp.float32),
        scratch_shapes=[_vmem((bn, bv), jnp.float32)]
        + [_vmem((bn, 1), jnp.float32)] * (7 if moments else 5),
        compiler_params=_compiler_params(interpret, "parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="softjax_lce_fwd",
    )(x, w, _class_weights(class_weight, v), *map_ops)
    st = chunked.Stats(*out[:4])
    return (st, chunked.Moments(out[5], out[6])) if moments else st


# ---------------------------------------------------------------------------------------
# Backward: gradient blocks of the logits


def _grad_kernel(*refs, dim, n, num_classes, bn, bv, bd, has_map, spread):
    x_ref, w_ref, cw_ref, keep_ref, rows_ref, *refs = refs
    lmap = _read_map(refs, has_map)
    dz_ref, acc_ref = refs
    # Program ids are read here, outside `pl.when` (interpret mode substitutes them only at
    # the top level of the kernel).
    i, j, k, nk = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.num_programs(2)
    _accumulate(x_ref, w_ref, acc_ref, k, dim=dim, bd=bd)

    @pl.when(k == nk - 1)
    def _():
        cols, col_ok = _columns(j, bv, num_classes)
        rows = i * bn + lax.broadcasted_iota(jnp.int32, (bn, 1), 0)
        cols_of_rows = rows_ref[...].T  # [bn, 8]
        ok, prob, target, smooth, shift, log_norm, label, spr = (
            cols_of_rows[:, c : c + 1] for c in range(8)
        )
        stats = _losses.RowStats(shift, log_norm)
        coefs = _losses.GradCoefs(prob, target, smooth, spr if spread else None)
        is_target = cols == label.astype(jnp.int32)
        dz = chunked.block_grads(acc_ref[...], lmap, is_target, stats, coefs, cw_ref[...])
        keep = col_ok & (keep_ref[...] > 0) & (rows < n) & (ok > 0)
        dz_ref[...] = jnp.where(keep, dz, 0.0).astype(dz_ref.dtype)


def logit_grads(
    x, w, class_weight, keep, rows, cap, *, blocks: BlockSizes, interpret, spread=False
):
    """``dz = d loss / d (x @ w.T)`` ``[N, V]`` in ``x.dtype``, zero on excluded rows.

    ``keep`` ``[V]`` float32: columns where it is 0 get a zero gradient (the classes a
    previous chunk covered). ``rows`` ``[8, N]`` float32 are the per-row
    ``(ok, prob, target, smooth, shift, log_norm, label, spread)`` of ``pallas.row_data``,
    the label indexing ``w``'s rows; the spread coefficient is read only with ``spread``.
    ``cap`` is a soft-cap or a :class:`chunked.LogitMap`.
    """
    n, dim = x.shape
    v = w.shape[0]
    bn, bv, bd = _tiles(n, v, dim, blocks, interpret)
    map_ops, map_specs, has_map = _map_operands(cap)
    in_specs = _operand_specs(bn, bv, bd) + [
        pl.BlockSpec((1, bv), lambda i, j, k: (0, j)),
        pl.BlockSpec((8, bn), lambda i, j, k: (0, i)),
    ]
    in_specs += map_specs
    kernel = functools.partial(
        _grad_kernel, dim=dim, n=n, num_classes=v, bn=bn, bv=bv, bd=bd, has_map=has_map,
        spread=spread,
    )  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, bn), pl.cdiv(v, bv), pl.cdiv(dim, bd)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bn, bv), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((n, v), x.dtype),
        scratch_shapes=[_vmem((bn, bv), jnp.float32)],
        compiler_params=_compiler_params(interpret, "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_lce_grad",
    )(x, w, _class_weights(class_weight, v), keep.reshape(1, v), rows, *map_ops)
