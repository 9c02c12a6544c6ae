"""Mosaic TPU kernels of ``dot_product_attention``: the grid walks the key blocks.

Each kernel runs a grid whose last axis is sequential ("arbitrary") and accumulates in VMEM
scratch across it, the blocks being brought in by the pipeline (``BlockSpec`` index maps):

* ``softjax_attn_fwd``, grid ``(B, N, query blocks, key blocks)``: the online softmax
  (``tiles.online_step``) of one query block over the key blocks; the last key block writes
  the float32 output and the logsumexp.
* ``softjax_attn_dq``, same grid: ``dQ`` of one query block, summed over key blocks (and,
  with a bias, the score gradient ``dS`` of each tile, which is the bias's gradient).
* ``softjax_attn_dkv``, grid ``(B, K, key blocks, G x query blocks)``: ``dK`` and ``dV`` of
  one key block of key/value head ``k``, summed over the query blocks of its ``G`` query
  heads (grouped-query attention without repeating K/V).

Key blocks that the causal mask, the window or the key padding hide from a query block are
skipped: no compute (``pl.when``), and no copy either, since their index map repeats the
block before (a pipeline does not fetch a block it holds). Blocks whose tokens share no
segment or are past the sequence lengths (``dynamic`` masks, from data) are skipped by the
compute, from per-block segment ranges read in scalar memory.

Per-query data crosses HBM as rows ``[8, T]`` (tokens along lanes) and is transposed in the
kernels: a TPU pads an array's minor dimension to 128 lanes, so ``[T, 1]`` would cost
``T * 512`` bytes. Lengths are padded to whole blocks by the caller (``pallas.py``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import tiles
from .tiles import Config

VMEM_LIMIT_BYTES = 48 * 2**20


def _params(interpret: bool, *semantics):
    if interpret:
        return None
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _vmem(shape, dtype=jnp.float32):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.VMEM(shape, dtype)


def _grid_spec(grid, in_specs, out_specs, scratch, num_prefetch):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=num_prefetch,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )


class Heads:
    """How the ``[B, T, N, H]`` arrays of the API are blocked: ``H`` a multiple of 128 reads
    head ``n`` as the lane block ``n`` of ``[B, T, N * H]``; otherwise the arrays are
    transposed to ``[B, N, T, H]`` (a block's two minor dimensions must be multiples of
    ``(8, 128)`` or whole axes, so ``[bq, 1, H]`` blocks of ``[B, T, N, H]`` are not allowed).
    Both are relayouts on a TPU, where an array's two minor dimensions are tiled: one copy of
    each operand, linear in T."""

    def __init__(self, shape):
        self.shape = shape
        self.flat = shape[-1] % 128 == 0

    def array(self, x):
        b, t, n, h = x.shape
        return x.reshape(b, t, n * h) if self.flat else x.transpose(0, 2, 1, 3)

    def restore(self, y):
        b, t, n, h = self.shape
        return y.reshape(b, t, n, h) if self.flat else y.transpose(0, 2, 1, 3)

    def spec(self, rows: int, index):
        """``[rows, H]`` blocks; ``index(*grid_ids)`` gives ``(batch, head, row block)``."""
        h = self.shape[-1]
        if self.flat:
            return pl.BlockSpec((None, rows, h), lambda *a: _permute(index(*a), (0, 2, 1)))
        return pl.BlockSpec((None, None, rows, h), lambda *a: (*index(*a), 0))


def _permute(ids, order):
    return tuple(ids[o] for o in order)


def _clip(j, lo, hi):
    """A block index in ``[lo, hi)``: hidden blocks map onto a visible one (no new copy)."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))


def _bias_spec(cfg: Config, shape, rows_cols):
    """The bias's BlockSpec: a ``[bq|1, bk|1]`` tile, broadcast axes pinned at 0."""
    has_b, has_n, has_t, has_s = cfg.bias_axes
    block = (None, None, cfg.bq if has_t else 1, cfg.bk if has_s else 1)

    def index(*ids):
        b, n, i, j = rows_cols(*ids)
        return (b if has_b else 0, n if has_n else 0, i if has_t else 0, j if has_s else 0)

    return pl.BlockSpec(block, index)


def _scale_cap(consts_ref, cfg: Config):
    """``(scale, cap)`` as ``[1, 1]`` float32 (cap None without a soft-cap)."""
    consts = consts_ref[...]
    return consts[:, 0:1], (consts[:, 1:2] if cfg.softcap else None)


def _columns(rows_ref, count):
    """The first ``count`` rows of an ``[8, bq]`` block as ``[bq, 1]`` columns."""
    cols = rows_ref[...].T
    return [cols[:, c : c + 1] for c in range(count)]


def _ranges(ref, b, blk, num):
    """The ``(min, max)`` segment range of block ``blk`` of batch ``b`` (scalar memory)."""
    at = 2 * (b * num + blk)
    return ref[at], ref[at + 1]


class Refs:
    """A kernel's refs in the order the wrappers pass them: the scalar-prefetched segment
    ranges, ``n_inputs`` operands, the bias, the segment-and-valid rows (each optional part
    present per ``cfg``), then the outputs and scratch (``rest``)."""

    def __init__(self, refs, cfg: Config, n_inputs: int):
        refs = list(refs)
        self.ranges = (refs.pop(0), refs.pop(0)) if cfg.dynamic else None
        self.inputs = [refs.pop(0) for _ in range(n_inputs)]
        self.bias = refs.pop(0) if cfg.bias_axes is not None else None
        self.info = (refs.pop(0), refs.pop(0)) if cfg.dynamic else None
        self.rest = refs


def live_block(refs: Refs, cfg: Config, b, i, j, nq: int, nk: int, lo, hi, idx):
    """Whether the tile ``(i, j)`` is computed: block ``idx`` of the walked axis is within
    ``[lo, hi)`` and, with dynamic masks, the two blocks' tokens may share a segment."""
    run = (idx >= lo) & (idx < hi)
    if cfg.dynamic:
        q_rng, kv_rng = refs.ranges
        run = run & tiles.live(_ranges(q_rng, b, i, nq), _ranges(kv_rng, b, j, nk))
    return run


def tile_context(refs: Refs, consts_ref, cfg: Config, i, j):
    """``(scale, cap, bias, ok)`` of the tile ``(i, j)``: the constants, its bias block and
    its visibility mask (None where all pairs may attend)."""
    q_data = kv_data = None
    if cfg.dynamic:
        qi_ref, ki_ref = refs.info
        q_data = _columns(qi_ref, 2)
        kv_data = (ki_ref[0:1, :], ki_ref[1:2, :])
    ok = tiles.visible(cfg, i * cfg.bq, j * cfg.bk, q_data, kv_data)
    bias = None if refs.bias is None else refs.bias[...]
    return (*_scale_cap(consts_ref, cfg), bias, ok)


def zero_skipped_tile(ds_ref, run):
    """Writes zeros to the score-gradient tile ``ds_ref`` (if any) of a step that computes
    nothing: every output block of the grid is written back, visited or not."""
    if ds_ref is None:
        return

    @pl.when(jnp.logical_not(run))
    def _():
        ds_ref[...] = jnp.zeros(ds_ref.shape, ds_ref.dtype)


def _dynamic_args(cfg: Config, info, qb_of, kb_of):
    """Specs for the ``[B, 8, T]`` / ``[B, 8, S]`` segment-and-valid rows, if dynamic."""
    if not cfg.dynamic:
        return [], []
    q_info, kv_info = info
    specs = [
        pl.BlockSpec((None, 8, cfg.bq), lambda *ids: (qb_of(*ids)[0], 0, qb_of(*ids)[1])),
        pl.BlockSpec((None, 8, cfg.bk), lambda *ids: (kb_of(*ids)[0], 0, kb_of(*ids)[1])),
    ]
    return specs, [q_info, kv_info]


# ---------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(*refs, cfg: Config, nq: int, nk: int):
    refs = Refs(refs, cfg, 4)
    q_ref, k_ref, v_ref, consts_ref = refs.inputs
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs.rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = tiles.key_blocks(cfg, i, nk)

    @pl.when(live_block(refs, cfg, b, i, j, nq, nk, lo, hi, j))
    def _():
        scale, cap, bias, ok = tile_context(refs, consts_ref, cfg, i, j)
        _, s = tiles.scores(q_ref[...], k_ref[...], scale, cap, bias)
        state = (m_ref[...], l_ref[...], acc_ref[...])
        m_ref[...], l_ref[...], acc_ref[...] = tiles.online_step(state, s, v_ref[...], ok)

    @pl.when(j == nk - 1)
    def _():
        o, lse = tiles.finish((m_ref[...], l_ref[...], acc_ref[...]))
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = jnp.broadcast_to(lse, (cfg.bq, 8)).T


def forward(q, k, v, consts, bias, info, ranges, *, cfg: Config, interpret: bool):
    """``(o [B, T, N, H] float32, lse [B, N, T] float32)``.

    ``q`` ``[B, T, N, H]``, ``k``/``v`` ``[B, S, K, H]`` (T and S whole blocks), ``consts``
    ``[1, 2]`` float32 ``(scale, cap)``, ``bias`` ``[B|1, N|1, T|1, S|1]`` or None, ``info``
    the ``[B, 8, T]``/``[B, 8, S]`` int32 segment and valid rows and ``ranges`` the flat
    per-block segment ranges (both when ``cfg.dynamic``).
    """
    bsz, t_pad, n_heads, _ = q.shape
    nq, nk = t_pad // cfg.bq, k.shape[1] // cfg.bk
    q_heads, kv_heads = Heads(q.shape), Heads(k.shape)

    def ids(b, n, i, j, *_):
        lo, hi = tiles.key_blocks(cfg, i, nk)
        return b, n, i, _clip(j, lo, hi)

    q_spec = q_heads.spec(cfg.bq, lambda b, n, i, j, *_: (b, n, i))
    kv_spec = kv_heads.spec(cfg.bk, lambda *a: (a[0], tiles.div(a[1], cfg.group), ids(*a)[3]))
    in_specs = [q_spec, kv_spec, kv_spec, pl.BlockSpec((1, 2), lambda *_: (0, 0))]
    args = [q_heads.array(q), kv_heads.array(k), kv_heads.array(v), consts]
    if bias is not None:
        in_specs.append(_bias_spec(cfg, bias.shape, ids))
        args.append(bias)
    specs, dyn = _dynamic_args(cfg, info, lambda b, n, i, j, *_: (b, i), lambda *a: ids(*a)[::3])
    in_specs += specs
    args += dyn
    out_specs = [
        q_spec,
        pl.BlockSpec((None, None, 8, cfg.bq), lambda b, n, i, j, *_: (b, n, 0, i)),
    ]
    scratch = [_vmem((cfg.bq, 1)), _vmem((cfg.bq, 1)), _vmem((cfg.bq, q.shape[-1]))]
    prefetch = list(ranges) if cfg.dynamic else []
    o, lse_rows = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=_grid_spec((bsz, n_heads, nq, nk), in_specs, out_specs, scratch, len(prefetch)),
        out_shape=[
            jax.ShapeDtypeStruct(args[0].shape, jnp.float32),
            jax.ShapeDtypeStruct((bsz, n_heads, 8, t_pad), jnp.float32),
        ],
        compiler_params=_params(interpret, "parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_attn_fwd",
    )(*prefetch, *args)
    return q_heads.restore(o), lse_rows[:, :, 0]


# ---------------------------------------------------------------------------------------
# Backward


def _dq_kernel(*refs, cfg: Config, nq: int, nk: int):
    refs = Refs(refs, cfg, 6)
    q_ref, k_ref, v_ref, do_ref, rows_ref, consts_ref = refs.inputs
    dq_ref, *rest = refs.rest
    ds_ref = rest.pop(0) if cfg.bias_grad else None
    (acc_ref,) = rest
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = tiles.key_blocks(cfg, i, nk)
    run = live_block(refs, cfg, b, i, j, nq, nk, lo, hi, j)

    @pl.when(run)
    def _():
        scale, cap, bias, ok = tile_context(refs, consts_ref, cfg, i, j)
        lse, delta = _columns(rows_ref, 2)
        k = k_ref[...]
        _, ds, dz = tiles.tile_grads(
            q_ref[...], k, v_ref[...], do_ref[...], lse, delta, scale, cap, bias, ok
        )
        acc_ref[...] += tiles.dot(dz, k, (1, 0))
        if ds_ref is not None:
            ds_ref[...] = ds

    zero_skipped_tile(ds_ref, run)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Config, nq: int, nk: int):
    refs = Refs(refs, cfg, 6)
    q_ref, k_ref, v_ref, do_ref, rows_ref, consts_ref = refs.inputs
    dk_ref, dv_ref, dk_acc, dv_acc = refs.rest
    b, j, r, nr = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    i = tiles.rem(r, nq)

    @pl.when(r == 0)
    def _():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    lo, hi = tiles.query_blocks(cfg, j, nq)

    @pl.when(live_block(refs, cfg, b, i, j, nq, nk, lo, hi, i))
    def _():
        scale, cap, bias, ok = tile_context(refs, consts_ref, cfg, i, j)
        lse, delta = _columns(rows_ref, 2)
        q, do = q_ref[...], do_ref[...]
        p, _, dz = tiles.tile_grads(q, k_ref[...], v_ref[...], do, lse, delta, scale, cap, bias, ok)
        dv_acc[...] += tiles.dot(p.T, do, (1, 0))
        dk_acc[...] += tiles.dot(dz.T, q, (1, 0))

    @pl.when(r == nr - 1)
    def _():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, do, rows, consts, bias, info, ranges, *, cfg: Config, interpret: bool):
    """``(dq, dk, dv, ds)``: ``ds`` ``[B, N, T, S]`` float32 when ``cfg.bias_grad`` (else
    None).

    ``do`` ``[B, T, N, H]``; ``rows`` ``[B, N, 8, T]`` float32 with the lse (``+inf`` on
    empty rows) in row 0 and ``delta`` in row 1; the rest as :func:`forward`.
    """
    bsz, t_pad, n_heads, h = q.shape
    s_pad, num_kv = k.shape[1], k.shape[2]
    nq, nk = t_pad // cfg.bq, s_pad // cfg.bk
    g = cfg.group
    q_heads, kv_heads = Heads(q.shape), Heads(k.shape)
    arrays = [q_heads.array(q), kv_heads.array(k), kv_heads.array(v), q_heads.array(do)]
    prefetch = list(ranges) if cfg.dynamic else []
    consts_spec = pl.BlockSpec((1, 2), lambda *_: (0, 0))

    # dQ: grid (B, N, query blocks, key blocks).
    def dq_ids(b, n, i, j, *_):
        lo, hi = tiles.key_blocks(cfg, i, nk)
        return b, n, i, _clip(j, lo, hi)

    q_spec = q_heads.spec(cfg.bq, lambda b, n, i, j, *_: (b, n, i))
    kv_spec = kv_heads.spec(cfg.bk, lambda *a: (a[0], tiles.div(a[1], g), dq_ids(*a)[3]))
    rows_spec = pl.BlockSpec((None, None, 8, cfg.bq), lambda b, n, i, j, *_: (b, n, 0, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, rows_spec, consts_spec]
    args = [*arrays, rows, consts]
    if bias is not None:
        in_specs.append(_bias_spec(cfg, bias.shape, dq_ids))
        args.append(bias)
    specs, dyn = _dynamic_args(cfg, info, lambda b, n, i, j, *_: (b, i), lambda *a: dq_ids(*a)[::3])
    in_specs += specs
    args += dyn
    out_specs = [q_spec]
    out_shape = [jax.ShapeDtypeStruct(arrays[0].shape, q.dtype)]
    if cfg.bias_grad:
        out_specs.append(
            pl.BlockSpec((None, None, cfg.bq, cfg.bk), lambda b, n, i, j, *_: (b, n, i, j))
        )
        out_shape.append(jax.ShapeDtypeStruct((bsz, n_heads, t_pad, s_pad), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=_grid_spec(
            (bsz, n_heads, nq, nk), in_specs, out_specs, [_vmem((cfg.bq, h))], len(prefetch)
        ),
        out_shape=out_shape,
        compiler_params=_params(interpret, "parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_attn_dq",
    )(*prefetch, *args)
    dq, ds = q_heads.restore(outs[0]), (outs[1] if cfg.bias_grad else None)

    # dK, dV: grid (B, K, key blocks, G x query blocks).
    def dkv_ids(b, kh, j, r, *_):
        lo, hi = tiles.query_blocks(cfg, j, nq)
        return b, kh * g + tiles.div(r, nq), _clip(tiles.rem(r, nq), lo, hi), j

    q_spec = q_heads.spec(cfg.bq, lambda *a: dkv_ids(*a)[:3])
    kv_spec = kv_heads.spec(cfg.bk, lambda b, kh, j, r, *_: (b, kh, j))
    rows_spec = pl.BlockSpec(
        (None, None, 8, cfg.bq), lambda *a: (*dkv_ids(*a)[:2], 0, dkv_ids(*a)[2])
    )
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, rows_spec, consts_spec]
    args = [*arrays, rows, consts]
    if bias is not None:
        in_specs.append(_bias_spec(cfg, bias.shape, dkv_ids))
        args.append(bias)
    specs, dyn = _dynamic_args(
        cfg, info, lambda *a: dkv_ids(*a)[::2], lambda b, kh, j, r, *_: (b, j)
    )
    in_specs += specs
    args += dyn
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
        grid_spec=_grid_spec(
            (bsz, num_kv, nk, g * nq),
            in_specs,
            [kv_spec, kv_spec],
            [_vmem((cfg.bk, h)), _vmem((cfg.bk, h))],
            len(prefetch),
        ),
        out_shape=[jax.ShapeDtypeStruct(args[1].shape, k.dtype)] * 2,
        compiler_params=_params(interpret, "parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="softjax_attn_dkv",
    )(*prefetch, *args)
    return dq, kv_heads.restore(dk), kv_heads.restore(dv), ds
