"""Triton kernels of ``dot_product_attention`` for GPUs: each program loops over blocks.

GPU programs run concurrently, so nothing accumulates across the grid; each program keeps
its accumulators in registers and loops over the blocks it needs (FlashAttention-2):

* ``softjax_attn_fwd``, grid ``(B, N, query blocks)``: the online softmax
  (``tiles.online_step``) over the key blocks the query block may see; writes the float32
  output and the logsumexp.
* ``softjax_attn_dq``, same grid: ``dQ`` over the same key blocks (and, with a bias, the
  score gradient ``dS`` of each tile, which is the bias's gradient).
* ``softjax_attn_dkv``, grid ``(B, K, key blocks)``: ``dK`` and ``dV`` of one key block of
  key/value head ``k``, looping over its ``G`` query heads and the query blocks that see it.

The loops' bounds come from the causal mask, the window and the key padding, so hidden
blocks are never visited; blocks whose tokens share no segment or lie past the lengths
(``dynamic`` masks) are skipped by a branch on their segment ranges.

Operands are whole arrays in global memory, sliced by the programs. Lengths are padded to
whole blocks by the caller (``pallas.py``) and the head dim to a power of two here (Triton
blocks have power-of-two sizes; zero lanes change no product).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import tiles
from .tiles import Config

# The custom call a Pallas Triton kernel lowers to.
CUSTOM_CALL = "__gpu$xla.gpu.triton"


def _params(interpret: bool, num_warps: int):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _pad_heads(*xs):
    """Arrays ``[..., H]`` zero-padded to a power-of-two ``H`` (a copy only when it is not)."""
    h = xs[0].shape[-1]
    if h == _pow2(h):
        return xs
    pad = [(0, 0)] * (xs[0].ndim - 1) + [(0, _pow2(h) - h)]
    return tuple(jnp.pad(x, pad) for x in xs)


class _Refs:
    """The optional operands of a kernel, popped in the order the wrapper passed them."""

    def __init__(self, refs, cfg: Config):
        refs = list(refs)
        self.bias = refs.pop(0) if cfg.bias_axes is not None else None
        self.info = (refs.pop(0), refs.pop(0)) if cfg.dynamic else None
        self.ranges = (refs.pop(0), refs.pop(0)) if cfg.dynamic else None
        self.rest = refs


def _scale_cap(consts_ref, cfg: Config):
    return consts_ref[0, 0], (consts_ref[0, 1] if cfg.softcap else None)


def _bias(ref, cfg: Config, b, n, t0, s0):
    """The ``[bq|1, bk|1]`` bias tile (broadcast axes read at 0)."""
    if ref is None:
        return None
    has_b, has_n, has_t, has_s = cfg.bias_axes
    return ref[
        b if has_b else 0,
        n if has_n else 0,
        pl.ds(t0, cfg.bq) if has_t else pl.ds(0, 1),
        pl.ds(s0, cfg.bk) if has_s else pl.ds(0, 1),
    ]


def _visible(refs: _Refs, cfg: Config, b, t0, s0):
    q_data = kv_data = None
    if cfg.dynamic:
        qi, ki = refs.info
        q_data = tuple(qi[b, r, pl.ds(t0, cfg.bq)][:, None] for r in (0, 1))
        kv_data = tuple(ki[b, r, pl.ds(s0, cfg.bk)][None, :] for r in (0, 1))
    return tiles.visible(cfg, t0, s0, q_data, kv_data)


def _when_live(refs: _Refs, cfg: Config, b, i, j, nq, nk, step):
    """``step`` as a loop body, skipped (the carry passed through) where the blocks' segment
    ranges do not overlap."""
    if not cfg.dynamic:
        return step
    q_rng, kv_rng = refs.ranges

    def guarded(idx, carry):
        qi, kj = (idx, j) if i is None else (i, idx)
        at_q, at_k = 2 * (b * nq + qi), 2 * (b * nk + kj)
        live = tiles.live((q_rng[at_q], q_rng[at_q + 1]), (kv_rng[at_k], kv_rng[at_k + 1]))
        return lax.cond(live, lambda c: step(idx, c), lambda c: c, carry)

    return guarded


# ---------------------------------------------------------------------------------------
# Forward


def _fwd_kernel(q_ref, k_ref, v_ref, consts_ref, *refs, cfg: Config, nq: int, nk: int):
    refs = _Refs(refs, cfg)
    o_ref, lse_ref = refs.rest
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = i * cfg.bq
    q = q_ref[b, pl.ds(t0, cfg.bq), n, :]
    scale, cap = _scale_cap(consts_ref, cfg)
    h = q.shape[-1]

    def step(j, state):
        s0 = j * cfg.bk
        k = k_ref[b, pl.ds(s0, cfg.bk), tiles.div(n, cfg.group), :]
        v = v_ref[b, pl.ds(s0, cfg.bk), tiles.div(n, cfg.group), :]
        _, s = tiles.scores(q, k, scale, cap, _bias(refs.bias, cfg, b, n, t0, s0))
        return tiles.online_step(state, s, v, _visible(refs, cfg, b, t0, s0))

    lo, hi = tiles.key_blocks(cfg, i, nk)
    m0 = jnp.full((cfg.bq, 1), -jnp.inf, jnp.float32)
    init = (m0, jnp.zeros_like(m0), jnp.zeros((cfg.bq, h), jnp.float32))
    state = lax.fori_loop(lo, hi, _when_live(refs, cfg, b, i, None, nq, nk, step), init)
    o, lse = tiles.finish(state)
    o_ref[b, pl.ds(t0, cfg.bq), n, :] = o
    lse_ref[b, n, pl.ds(t0, cfg.bq)] = lse[:, 0]


def _call(kernel, grid, out_shape, name, args, interpret, num_warps=4, aliases=None):
    return pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=out_shape,
        compiler_params=_params(interpret, num_warps),
        input_output_aliases=aliases or {},
        interpret=interpret,
        name=name,
    )(*args)


def _optional_args(cfg: Config, bias, info, ranges):
    args = [] if bias is None else [bias]
    if cfg.dynamic:
        args += [*info, *ranges]
    return args


def forward(q, k, v, consts, bias, info, ranges, *, cfg: Config, interpret: bool):
    """``(o [B, T, N, H] float32, lse [B, N, T] float32)``; arguments as
    ``pallas_tpu.forward``."""
    bsz, t_pad, n_heads, h = q.shape
    nq, nk = t_pad // cfg.bq, k.shape[1] // cfg.bk
    q, k, v = _pad_heads(q, k, v)
    o, lse = _call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk),
        (bsz, n_heads, nq),
        [
            jax.ShapeDtypeStruct(q.shape, jnp.float32),
            jax.ShapeDtypeStruct((bsz, n_heads, t_pad), jnp.float32),
        ],
        "softjax_attn_fwd",
        [q, k, v, consts, *_optional_args(cfg, bias, info, ranges)],
        interpret,
    )
    return o[..., :h], lse


# ---------------------------------------------------------------------------------------
# Backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, rows_ref, consts_ref, *refs, cfg, nq, nk):
    refs = _Refs(refs, cfg)
    dq_ref, *ds_ref = refs.rest[1:] if cfg.bias_grad else refs.rest
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = i * cfg.bq
    rows = pl.ds(t0, cfg.bq)
    q, do = q_ref[b, rows, n, :], do_ref[b, rows, n, :]
    lse, delta = rows_ref[b, n, 0, rows][:, None], rows_ref[b, n, 1, rows][:, None]
    scale, cap = _scale_cap(consts_ref, cfg)

    def step(j, acc):
        s0 = j * cfg.bk
        k = k_ref[b, pl.ds(s0, cfg.bk), tiles.div(n, cfg.group), :]
        v = v_ref[b, pl.ds(s0, cfg.bk), tiles.div(n, cfg.group), :]
        bias = _bias(refs.bias, cfg, b, n, t0, s0)
        ok = _visible(refs, cfg, b, t0, s0)
        _, ds, dz = tiles.tile_grads(q, k, v, do, lse, delta, scale, cap, bias, ok)
        if ds_ref:
            ds_ref[0][b, n, rows, pl.ds(s0, cfg.bk)] = ds
        return acc + tiles.dot(dz, k, (1, 0))

    lo, hi = tiles.key_blocks(cfg, i, nk)
    init = jnp.zeros(q.shape, jnp.float32)
    acc = lax.fori_loop(lo, hi, _when_live(refs, cfg, b, i, None, nq, nk, step), init)
    dq_ref[b, rows, n, :] = acc.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, rows_ref, consts_ref, *refs, cfg, nq, nk):
    refs = _Refs(refs, cfg)
    dk_ref, dv_ref = refs.rest
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    s0 = j * cfg.bk
    cols = pl.ds(s0, cfg.bk)
    k, v = k_ref[b, cols, kh, :], v_ref[b, cols, kh, :]
    scale, cap = _scale_cap(consts_ref, cfg)
    lo, hi = tiles.query_blocks(cfg, j, nq)

    def head(g, carry):
        n = kh * cfg.group + g

        def step(i, carry):
            dk, dv = carry
            t0 = i * cfg.bq
            rows = pl.ds(t0, cfg.bq)
            q, do = q_ref[b, rows, n, :], do_ref[b, rows, n, :]
            lse, delta = rows_ref[b, n, 0, rows][:, None], rows_ref[b, n, 1, rows][:, None]
            bias = _bias(refs.bias, cfg, b, n, t0, s0)
            ok = _visible(refs, cfg, b, t0, s0)
            p, _, dz = tiles.tile_grads(q, k, v, do, lse, delta, scale, cap, bias, ok)
            return dk + tiles.dot(dz.T, q, (1, 0)), dv + tiles.dot(p.T, do, (1, 0))

        return lax.fori_loop(lo, hi, _when_live(refs, cfg, b, None, j, nq, nk, step), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.group, head, (zeros, zeros))
    dk_ref[b, cols, kh, :] = dk.astype(dk_ref.dtype)
    dv_ref[b, cols, kh, :] = dv.astype(dv_ref.dtype)


def backward(q, k, v, do, rows, consts, bias, info, ranges, *, cfg: Config, interpret: bool):
    """``(dq, dk, dv, ds)``; arguments and results as ``pallas_tpu.backward``."""
    bsz, t_pad, n_heads, h = q.shape
    s_pad, kv_heads = k.shape[1], k.shape[2]
    nq, nk = t_pad // cfg.bq, s_pad // cfg.bk
    dtype = q.dtype
    q, k, v, do = _pad_heads(q, k, v, do)
    common = [q, k, v, do, rows, consts, *_optional_args(cfg, bias, info, ranges)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, dtype)]
    args, aliases = common, None
    if cfg.bias_grad:
        # Tiles no program visits keep the zeros they start with.
        ds0 = jnp.zeros((bsz, n_heads, t_pad, s_pad), jnp.float32)
        args, aliases = [*common, ds0], {len(common): 1}
        out_shape.append(jax.ShapeDtypeStruct(ds0.shape, jnp.float32))
    outs = _call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk),
        (bsz, n_heads, nq),
        out_shape,
        "softjax_attn_dq",
        args,
        interpret,
        aliases=aliases,
    )
    dq, ds = outs[0], (outs[1] if cfg.bias_grad else None)
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk),
        (bsz, kv_heads, nk),
        [jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
        "softjax_attn_dkv",
        common,
        interpret,
    )
    return dq[..., :h], dk[..., :h], dv[..., :h], ds
