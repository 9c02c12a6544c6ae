"""Mosaic TPU kernels of ``dot_product_attention`` that read every head of a block at once.

A TPU tiles an array's two minor dimensions, so a block of one head out of ``[B, T, N, H]``
(``[bq, 1, H]``) is not a legal block, and giving each head its own blocks (``pallas_tpu``)
costs a relayout of every operand (``[B, N, T, H]`` or ``[B, T, N * H]``): a copy of ``q``,
``k``, ``v`` and ``dO`` in HBM, 2 % of the float32 scores at T = 8192 on top of the kernels'
own memory. These kernels take ``[bq, N, H]`` blocks of queries and ``[bk, K, H]`` blocks of
keys and values straight from the API's layout (the two minor dimensions whole) and walk
the heads inside each grid step, each head's rows read from VMEM with a strided load:

* ``softjax_attn_fwd``, grid ``(B, query blocks, key blocks)``: the online softmax of every
  head, ``[bq, N]`` running maxima and sums and ``[N, bq, H]`` accumulators in VMEM.
* ``softjax_attn_dq``, same grid: ``dQ`` of every head; with a bias that has no head axis,
  the score gradient summed over heads (the bias's gradient, ``[B, T, S]``, not
  ``[B, N, T, S]``).
* ``softjax_attn_dkv``, grid ``(B, key blocks, query blocks)``: ``dK`` and ``dV`` of every
  key/value head, each summed over its ``G`` query heads.

Every head of a block shares its masks (causal, window, lengths, segments and a bias without
a head axis), so they are computed once per block, not once per head. A bias with a head
axis is served by ``pallas_tpu`` (a ``[N, bq, bk]`` bias block would not fit VMEM beside the
rest). The heads are unrolled in the kernel: there are ``N`` copies of the block maths, and
``N * bq * H`` float32 accumulators, so ``bq`` shrinks as ``N`` grows (:func:`blocks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import tiles
from .pallas_tpu import (
    Refs,
    _clip,
    _columns,
    _grid_spec,
    _params,
    _vmem,
    live_block,
    tile_context,
    zero_skipped_tile,
)
from .tiles import Config

# float32 accumulator bytes per grid step ([N, bq, H]) the query block is sized for.
ACC_BYTES = 4 * 2**20


def block_q(n_heads: int, h: int, cap: int) -> int:
    """Queries per block: ``cap``, halved (down to 128) while ``N * bq * H`` float32
    accumulators (``H`` padded to 128 lanes, as VMEM holds them) exceed :data:`ACC_BYTES`."""
    lanes = -(-h // 128) * 128
    bq = cap
    while bq > 128 and n_heads * bq * lanes * 4 > ACC_BYTES:
        bq //= 2
    return bq


def _token_specs(cfg: Config, q_shape, kv_shape, q_block, kv_block):
    """BlockSpecs of ``[bq, N, H]`` query-side and ``[bk, K, H]`` key-side blocks;
    ``q_block(*ids)``/``kv_block(*ids)`` give ``(batch, block)``."""
    n, h = q_shape[2:]
    k = kv_shape[2]
    q_spec = pl.BlockSpec((None, cfg.bq, n, h), lambda *a: (*q_block(*a), 0, 0))
    kv_spec = pl.BlockSpec((None, cfg.bk, k, h), lambda *a: (*kv_block(*a), 0, 0))
    return q_spec, kv_spec


def _bias_spec(cfg: Config, blocks):
    """A ``[bq|1, bk|1]`` tile of a bias without a head axis; ``blocks(*ids)`` gives
    ``(batch, query block, key block)``."""
    has_b, _, has_t, has_s = cfg.bias_axes
    shape = (None, None, cfg.bq if has_t else 1, cfg.bk if has_s else 1)

    def index(*a):
        b, i, j = blocks(*a)
        return (b if has_b else 0, 0, i if has_t else 0, j if has_s else 0)

    return pl.BlockSpec(shape, index)


def _dynamic(cfg: Config, info, blocks):
    """Specs and arrays of the segment-and-valid rows (empty unless ``cfg.dynamic``)."""
    if not cfg.dynamic:
        return [], []

    def q_index(*a):
        b, i, _ = blocks(*a)
        return (b, 0, i)

    def kv_index(*a):
        b, _, j = blocks(*a)
        return (b, 0, j)

    specs = [pl.BlockSpec((None, 8, cfg.bq), q_index), pl.BlockSpec((None, 8, cfg.bk), kv_index)]
    return specs, list(info)


def _gather_heads(dst, src, count: int):
    """``dst[n] = src[:, n, :]`` for every head: a block's heads moved to the leading axis
    of VMEM scratch (strided loads, one per head), where a loop can index them."""
    for n in range(count):
        dst[n] = src[:, n, :]


def _scatter_heads(dst, src, count: int):
    """``dst[:, n, :] = src[n]`` for every head (cast to ``dst``'s dtype)."""
    for n in range(count):
        dst[:, n, :] = src[n].astype(dst.dtype)


# ---------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(*refs, cfg: Config, nq: int, nk: int, n_heads: int, num_kv: int):
    refs = Refs(refs, cfg, 4)
    q_ref, k_ref, v_ref, consts_ref = refs.inputs
    o_ref, lse_ref, qt, kt, vt, m_ref, l_ref, acc_ref = refs.rest
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        _gather_heads(qt, q_ref, n_heads)

    lo, hi = tiles.key_blocks(cfg, i, nk)

    @pl.when(live_block(refs, cfg, b, i, j, nq, nk, lo, hi, j))
    def _():
        _gather_heads(kt, k_ref, num_kv)
        _gather_heads(vt, v_ref, num_kv)
        scale, cap, bias, ok = tile_context(refs, consts_ref, cfg, i, j)

        def head(n, carry):
            kh = tiles.div(n, cfg.group)
            _, s = tiles.scores(qt[n], kt[kh], scale, cap, bias)
            state = (m_ref[n], l_ref[n], acc_ref[n])
            m_ref[n], l_ref[n], acc_ref[n] = tiles.online_step(state, s, vt[kh], ok)
            return carry

        lax.fori_loop(0, n_heads, head, 0)

    @pl.when(j == nk - 1)
    def _():
        def head(n, carry):
            o, lse = tiles.finish((m_ref[n], l_ref[n], acc_ref[n]))
            acc_ref[n] = o
            lse_ref[n] = jnp.broadcast_to(lse, (cfg.bq, 8)).T
            return carry

        lax.fori_loop(0, n_heads, head, 0)
        _scatter_heads(o_ref, acc_ref, n_heads)


def forward(q, k, v, consts, bias, info, ranges, *, cfg: Config, interpret: bool):
    """``(o [B, T, N, H] float32, lse [B, N, T] float32)``; arguments as
    ``pallas_tpu.forward`` (a bias without a head axis)."""
    bsz, t_pad, n_heads, h = q.shape
    num_kv = k.shape[2]
    nq, nk = t_pad // cfg.bq, k.shape[1] // cfg.bk

    def blocks(b, i, j, *_):
        lo, hi = tiles.key_blocks(cfg, i, nk)
        return b, i, _clip(j, lo, hi)

    q_spec, kv_spec = _token_specs(
        cfg, q.shape, k.shape, lambda b, i, j, *_: (b, i), lambda *a: blocks(*a)[::2]
    )
    in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec((1, 2), lambda *_: (0, 0))]
    args = [q, k, v, consts]
    if bias is not None:
        in_specs.append(_bias_spec(cfg, blocks))
        args.append(bias)
    specs, dyn = _dynamic(cfg, info, blocks)
    prefetch = list(ranges) if cfg.dynamic else []
    out_specs = [
        q_spec,
        pl.BlockSpec((None, n_heads, 8, cfg.bq), lambda b, i, j, *_: (b, 0, 0, i)),
    ]
    scratch = [
        _vmem((n_heads, cfg.bq, h), q.dtype),
        _vmem((num_kv, cfg.bk, h), k.dtype),
        _vmem((num_kv, cfg.bk, h), k.dtype),
        _vmem((n_heads, cfg.bq, 1)),
        _vmem((n_heads, cfg.bq, 1)),
        _vmem((n_heads, cfg.bq, h)),
    ]
    o, lse_rows = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk, n_heads=n_heads, num_kv=num_kv),
        grid_spec=_grid_spec((bsz, nq, nk), in_specs + specs, out_specs, scratch, len(prefetch)),
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct((bsz, n_heads, 8, t_pad), jnp.float32),
        ],
        compiler_params=_params(interpret, "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_attn_fwd",
    )(*prefetch, *args, *dyn)
    return o, lse_rows[:, :, 0]


# ---------------------------------------------------------------------------------------
# Backward


def _dq_kernel(*refs, cfg: Config, nq: int, nk: int, n_heads: int, num_kv: int):
    refs = Refs(refs, cfg, 6)
    q_ref, k_ref, v_ref, do_ref, rows_ref, consts_ref = refs.inputs
    dq_ref, *rest = refs.rest
    ds_ref = rest.pop(0) if cfg.bias_grad else None
    qt, dot_, kt, vt, acc_ref = rest
    b, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        _gather_heads(qt, q_ref, n_heads)
        _gather_heads(dot_, do_ref, n_heads)

    lo, hi = tiles.key_blocks(cfg, i, nk)
    run = live_block(refs, cfg, b, i, j, nq, nk, lo, hi, j)

    @pl.when(run)
    def _():
        _gather_heads(kt, k_ref, num_kv)
        _gather_heads(vt, v_ref, num_kv)
        scale, cap, bias, ok = tile_context(refs, consts_ref, cfg, i, j)

        def head(n, ds_sum):
            kh = tiles.div(n, cfg.group)
            k = kt[kh]
            lse, delta = _columns(rows_ref.at[n], 2)
            _, ds, dz = tiles.tile_grads(
                qt[n], k, vt[kh], dot_[n], lse, delta, scale, cap, bias, ok
            )
            acc_ref[n] += tiles.dot(dz, k, (1, 0))
            return ds_sum + ds

        ds_sum = lax.fori_loop(0, n_heads, head, jnp.zeros((cfg.bq, cfg.bk), jnp.float32))
        if ds_ref is not None:
            ds_ref[...] = ds_sum

    zero_skipped_tile(ds_ref, run)

    @pl.when(j == nk - 1)
    def _():
        _scatter_heads(dq_ref, acc_ref, n_heads)


def _dkv_kernel(*refs, cfg: Config, nq: int, nk: int, n_heads: int, num_kv: int):
    refs = Refs(refs, cfg, 6)
    q_ref, k_ref, v_ref, do_ref, rows_ref, consts_ref = refs.inputs
    dk_ref, dv_ref, qt, dot_, kt, vt, dk_acc, dv_acc = refs.rest
    b, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(i == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
        _gather_heads(kt, k_ref, num_kv)
        _gather_heads(vt, v_ref, num_kv)

    lo, hi = tiles.query_blocks(cfg, j, nq)

    @pl.when(live_block(refs, cfg, b, i, j, nq, nk, lo, hi, i))
    def _():
        _gather_heads(qt, q_ref, n_heads)
        _gather_heads(dot_, do_ref, n_heads)
        scale, cap, bias, ok = tile_context(refs, consts_ref, cfg, i, j)

        def head(n, carry):
            kh = tiles.div(n, cfg.group)
            q, do = qt[n], dot_[n]
            lse, delta = _columns(rows_ref.at[n], 2)
            p, _, dz = tiles.tile_grads(q, kt[kh], vt[kh], do, lse, delta, scale, cap, bias, ok)
            dv_acc[kh] += tiles.dot(p.T, do, (1, 0))
            dk_acc[kh] += tiles.dot(dz.T, q, (1, 0))
            return carry

        lax.fori_loop(0, n_heads, head, 0)

    @pl.when(i == nq - 1)
    def _():
        _scatter_heads(dk_ref, dk_acc, num_kv)
        _scatter_heads(dv_ref, dv_acc, num_kv)


def backward(q, k, v, do, rows, consts, bias, info, ranges, *, cfg: Config, interpret: bool):
    """``(dq, dk, dv, ds)``: ``ds`` ``[B, 1, T, S]`` float32 (summed over heads) when
    ``cfg.bias_grad``; arguments as ``pallas_tpu.backward`` (a bias without a head axis)."""
    bsz, t_pad, n_heads, h = q.shape
    s_pad, num_kv = k.shape[1], k.shape[2]
    nq, nk = t_pad // cfg.bq, s_pad // cfg.bk
    prefetch = list(ranges) if cfg.dynamic else []
    consts_spec = pl.BlockSpec((1, 2), lambda *_: (0, 0))
    kernel_args = dict(cfg=cfg, nq=nq, nk=nk, n_heads=n_heads, num_kv=num_kv)
    token_scratch = [
        _vmem((n_heads, cfg.bq, h), q.dtype),
        _vmem((n_heads, cfg.bq, h), q.dtype),
        _vmem((num_kv, cfg.bk, h), k.dtype),
        _vmem((num_kv, cfg.bk, h), k.dtype),
    ]

    # dQ: grid (B, query blocks, key blocks).
    def dq_blocks(b, i, j, *_):
        lo, hi = tiles.key_blocks(cfg, i, nk)
        return b, i, _clip(j, lo, hi)

    q_spec, kv_spec = _token_specs(
        cfg, q.shape, k.shape, lambda b, i, j, *_: (b, i), lambda *a: dq_blocks(*a)[::2]
    )
    rows_spec = pl.BlockSpec((None, n_heads, 8, cfg.bq), lambda b, i, j, *_: (b, 0, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, rows_spec, consts_spec]
    args = [q, k, v, do, rows, consts]
    if bias is not None:
        in_specs.append(_bias_spec(cfg, dq_blocks))
        args.append(bias)
    specs, dyn = _dynamic(cfg, info, dq_blocks)
    out_specs = [q_spec]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if cfg.bias_grad:
        out_specs.append(
            pl.BlockSpec((None, None, cfg.bq, cfg.bk), lambda b, i, j, *_: (b, 0, i, j))
        )
        out_shape.append(jax.ShapeDtypeStruct((bsz, 1, t_pad, s_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_dq_kernel, **kernel_args),
        grid_spec=_grid_spec(
            (bsz, nq, nk),
            in_specs + specs,
            out_specs,
            [*token_scratch, _vmem((n_heads, cfg.bq, h))],
            len(prefetch),
        ),
        out_shape=out_shape,
        compiler_params=_params(interpret, "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_attn_dq",
    )(*prefetch, *args, *dyn)
    dq, ds = outs[0], (outs[1] if cfg.bias_grad else None)

    # dK, dV: grid (B, key blocks, query blocks).
    def dkv_blocks(b, j, i, *_):
        lo, hi = tiles.query_blocks(cfg, j, nq)
        return b, _clip(i, lo, hi), j

    q_spec, kv_spec = _token_specs(
        cfg, q.shape, k.shape, lambda *a: dkv_blocks(*a)[:2], lambda b, j, i, *_: (b, j)
    )
    rows_spec = pl.BlockSpec(
        (None, n_heads, 8, cfg.bq), lambda *a: (dkv_blocks(*a)[0], 0, 0, dkv_blocks(*a)[1])
    )
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, rows_spec, consts_spec]
    args = [q, k, v, do, rows, consts]
    if bias is not None:
        in_specs.append(_bias_spec(cfg, dkv_blocks))
        args.append(bias)
    specs, dyn = _dynamic(cfg, info, dkv_blocks)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kernel_args),
        grid_spec=_grid_spec(
            (bsz, nk, nq),
            in_specs + specs,
            [kv_spec, kv_spec],
            [*token_scratch, _vmem((num_kv, cfg.bk, h)), _vmem((num_kv, cfg.bk, h))],
            len(prefetch),
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype)] * 2,
        compiler_params=_params(interpret, "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_attn_dkv",
    )(*prefetch, *args, *dyn)
    return dq, dk, dv, ds
