"""The ``"chunked"`` implementation: blocked attention with an online softmax.

Forward (per query block of ``bq`` rows, looping over key blocks of ``bk`` keys)::

    m' = max(m, max_s s),  l' = l e^{m - m'} + sum_s e^{s - m'},
    acc' = acc e^{m - m'} + e^{s - m'} v,      and at the end  o = acc / l,  lse = m + log l

so only ``[bq, bk]`` scores exist at a time and the normalisation happens once. Key blocks
that the causal mask or the local window hide entirely are never visited (the loop bounds
depend on the query block), and blocks that are entirely visible skip the mask arithmetic.

The custom VJP saves only the output and the logsumexp and recomputes the scores block by
block (FlashAttention-2): with ``P = exp(s - lse)``, ``delta = rowsum(dO * O) - dlse``::

    dV += P^T dO,   dS = P * (dO V^T - delta),   dQ += dS K,   dK += dS^T Q,   dbias += dS

looping over key blocks (``dK``/``dV`` carried in registers of the loop) and, inside, over the
query blocks that see them (``dQ`` updated in place). Memory is linear in T and S.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _numerics as nx
from ._masks import (
    Masks,
    Spec,
    block_mask,
    dropout_keep,
    has_dynamic_masks,
    scores,
    structural_bounds,
)


class Plan(NamedTuple):
    """Static block layout: sizes and, per block, the ranges of blocks to visit.

    For query block ``i`` the key blocks ``[lo, flo)`` and ``[fhi, hi)`` need masking and
    ``[flo, fhi)`` are entirely visible; ``q_ranges`` is the same per key block ``j`` over
    query blocks (for the backward pass).
    """

    spec: Spec
    bq: int
    bk: int
    kv_ranges: tuple[tuple[int, int, int, int], ...]
    q_ranges: tuple[tuple[int, int, int, int], ...]


def _nonempty(spec: Spec, t0: int, tq: int, s0: int, sk: int) -> bool:
    """Whether some pair of the block may attend under causal/window/key padding alone."""
    t_last, s_last = t0 + tq - 1, s0 + sk - 1
    ok = spec.s_valid is None or s0 < spec.s_valid
    if spec.causal:
        ok = ok and s0 <= t_last
    if spec.window is not None:
        left, right = spec.window
        ok = ok and s_last >= t0 - left and s0 <= t_last + right
    return bool(ok)


def _ranges(rows: list[list[int]]) -> tuple[tuple[int, int, int, int], ...]:
    """``(lo, flo, fhi, hi)`` per row of a {0: skip, 1: masked, 2: full} table.

    Visited blocks must be contiguous; the full ones must be a contiguous run inside them
    (true for causal/window masks), otherwise they are all treated as masked.
    """
    out = []
    for row in rows:
        visit = [j for j, c in enumerate(row) if c]
        if not visit:
            out.append((0, 0, 0, 0))
            continue
        lo, hi = visit[0], visit[-1] + 1
        assert all(row[lo:hi]), "visited blocks must be contiguous"
        full = [j for j in range(lo, hi) if row[j] == 2]
        if full and full == list(range(full[0], full[-1] + 1)):
            out.append((lo, full[0], full[-1] + 1, hi))
        else:
            out.append((lo, lo, lo, hi))
    return tuple(out)


def make_plan(spec: Spec, t_pad: int, s_pad: int, bq: int, bk: int, dynamic: bool) -> Plan:
    """The static block plan for padded lengths ``t_pad``/``s_pad`` (multiples of bq/bk)."""
    nq, nk = t_pad // bq, s_pad // bk
    table = [[0] * nk for _ in range(nq)]
    for i in range(nq):
        for j in range(nk):
            if _nonempty(spec, i * bq, bq, j * bk, bk):
                full = not dynamic and bool(structural_bounds(spec, i * bq, bq, j * bk, bk))
                table[i][j] = 2 if full else 1
    transposed = [[table[i][j] for i in range(nq)] for j in range(nk)]
    return Plan(spec, bq, bk, _ranges(table), _ranges(transposed))


def _dot(a, b, contract):
    """Batched matmul over the leading axis, accumulated in the operands' (compute) dtype."""
    return nx.dot(a, b, contract, a.dtype, batch=(0, 0))


def _slice(x, start, size: int, axis: int):
    if x is None or x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _block_limits(plan: Plan, masks: Masks, t_len: int, s_len: int):
    """How many query and key blocks can hold anything at all, from the lengths (traced)."""
    nq = -(-t_len // plan.bq)
    nk = -(-s_len // plan.bk)
    if masks.q_length is not None:
        nq = jnp.minimum(nq, (jnp.max(masks.q_length) + plan.bq - 1) // plan.bq)
    if masks.kv_length is not None:
        nk = jnp.minimum(nk, (jnp.max(masks.kv_length) + plan.bk - 1) // plan.bk)
    return nq, nk


def _table(plan_ranges, limit):
    """The four range bounds as int32 arrays, each clipped to ``limit`` blocks."""
    arr = np.asarray(plan_ranges, np.int32).reshape(-1, 4)
    return [jnp.minimum(jnp.asarray(arr[:, c]), limit) for c in range(4)]


def _forward(plan: Plan, q, k, v, bias, masks: Masks):
    spec, bq, bk = plan.spec, plan.bq, plan.bk
    b_, k_, t_len, g_, h = q.shape
    s_len = k.shape[2]
    dtype = q.dtype
    nq_live, nk_live = _block_limits(plan, masks, t_len, s_len)
    lo, flo, fhi, hi = _table(plan.kv_ranges, nk_live)

    def query_block(i, carry):
        out, lse_out = carry
        t0 = i * bq
        qb = lax.dynamic_slice_in_dim(q, t0, bq, axis=2)
        bias_rows = _slice(bias, t0, bq, 2)

        def body(masked):
            def step(j, state):
                m, total, acc = state
                s0 = j * bk
                kb = lax.dynamic_slice_in_dim(k, s0, bk, axis=2)
                vb = lax.dynamic_slice_in_dim(v, s0, bk, axis=2)
                s = scores(qb, kb, _slice(bias_rows, s0, bk, 4), masks.softcap)
                if masked:
                    ok = block_mask(spec, masks, t0, bq, s0, bk)
                    if ok is not None:
                        s = jnp.where(ok, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                # Rows with nothing seen yet keep m = -inf; shift them by 0, never -inf - -inf.
                shift = nx.empty_row_shift(m_new)
                p = jnp.exp(s - shift[..., None])
                alpha = jnp.exp(m - shift)
                total = total * alpha + jnp.sum(p, axis=-1)
                if spec.dropout_rate > 0:
                    keep = dropout_keep(spec, masks.seed, s.shape, t0, s0)
                    p = jnp.where(keep, p, jnp.zeros_like(p))
                pv = _dot(
                    p.reshape(b_ * k_, bq * g_, bk), vb.reshape(b_ * k_, bk, h), ((2,), (1,))
                ).reshape(b_, k_, bq, g_, h)
                return m_new, total, acc * alpha[..., None] + pv

            return step

        m0 = jnp.full((b_, k_, bq, g_), -jnp.inf, dtype)
        state = (m0, jnp.zeros_like(m0), jnp.zeros((b_, k_, bq, g_, h), dtype))
        live = i < nq_live
        a, b, c, d = (jnp.where(live, x[i], 0) for x in (lo, flo, fhi, hi))
        b, c, d = jnp.maximum(b, a), jnp.maximum(c, a), jnp.maximum(d, a)
        state = lax.fori_loop(a, b, body(True), state)
        state = lax.fori_loop(b, c, body(False), state)
        m, total, acc = lax.fori_loop(c, d, body(True), state)
        empty = total == 0
        safe = jnp.where(empty, jnp.ones_like(total), total)
        o = jnp.where(empty[..., None], 0.0, acc / safe[..., None])
        if spec.dropout_rate > 0:
            o = o / (1.0 - spec.dropout_rate)
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))
        out = lax.dynamic_update_slice_in_dim(out, o.astype(out.dtype), t0, axis=2)
        lse_out = lax.dynamic_update_slice_in_dim(lse_out, lse, t0, axis=2)
        return out, lse_out

    init = (jnp.zeros(q.shape[:-1] + v.shape[-1:], dtype), jnp.zeros(q.shape[:-1], dtype))
    return lax.fori_loop(0, t_len // bq, query_block, init)


def _t(x):
    """[B, K, tq, G, sk] -> [B, K, sk, tq, G] (the transposed score layout of the backward)."""
    return jnp.transpose(x, (0, 1, 4, 2, 3))


def _t_back(x):
    """[B, K, sk, tq, G] -> [B, K, tq, G, sk]."""
    return jnp.transpose(x, (0, 1, 3, 4, 2))


def _reduce_to(x, shape):
    """Sums ``x`` over the axes where ``shape`` has size 1 (the broadcast of a bias)."""
    axes = tuple(
        a for a, (n, m) in enumerate(zip(shape, x.shape, strict=True)) if n == 1 and m != 1
    )
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _transposed_scores(spec, masks: Masks, kb, qb, bias_b, t0, s0, masked: bool):
    """The raw and final scores of a block, transposed: ``[B, K, bk, bq, G]``.

    Transposed, dV and dK are plain (NN) matmuls, which run about twice as fast on CPU as
    ones contracting a leading axis.
    """
    b_, k_, bk, h = kb.shape
    bq, g_ = qb.shape[2], qb.shape[3]
    raw = _dot(kb.reshape(b_ * k_, bk, h), qb.reshape(b_ * k_, bq * g_, h), ((2,), (2,)))
    raw = raw.reshape(b_, k_, bk, bq, g_)
    s = nx.softcap(raw, masks.softcap)
    if bias_b is not None:
        s = s + _t(bias_b)
    if masked:
        ok = block_mask(spec, masks, t0, bq, s0, bk)
        if ok is not None:
            s = jnp.where(_t(ok), s, -jnp.inf)
    return raw, s


def _dropped(spec, masks: Masks, p, dp, t0, s0):
    """``p`` and ``dp`` of a transposed block with the dropout mask applied (as the forward)."""
    if spec.dropout_rate == 0:
        return p, dp
    b_, k_, bk, bq, g_ = p.shape
    inv_keep = 1.0 / (1.0 - spec.dropout_rate)
    keep = _t(dropout_keep(spec, masks.seed, (b_, k_, bq, g_, bk), t0, s0))
    return (
        jnp.where(keep, p * inv_keep, jnp.zeros_like(p)),
        jnp.where(keep, dp * inv_keep, jnp.zeros_like(dp)),
    )


def _add_bias_grad(dbias, ds, t0, s0):
    """``dbias`` plus a block's score gradient ``ds`` (transposed), summed where it broadcasts."""
    contrib = _reduce_to(_t_back(ds), dbias.shape)
    zero = jnp.int32(0)
    at = (
        zero,
        zero,
        jnp.int32(t0) if dbias.shape[2] != 1 else zero,
        zero,
        jnp.int32(s0) if dbias.shape[4] != 1 else zero,
    )
    old = lax.dynamic_slice(dbias, at, contrib.shape)
    return lax.dynamic_update_slice(dbias, old + contrib, at)


def _tile_grads(spec, masks: Masks, qb, dob, bias_b, kb, vb, lse_b, delta_b, t0, s0, masked):
    """The gradients of one (query block, key block) tile, recomputing its scores.

    With ``p = exp(s - lse)``, ``dp = dO V^T`` and ``ds = p (dp - delta)`` (the gradient of
    the scores, before the soft-cap: what a bias receives): ``dV = p_drop^T dO``, and with
    ``dz`` = ``ds`` through the soft-cap, ``dK = dz^T Q`` and ``dQ = dz K``. Blocks are
    ``[B, K, rows, G, H]`` (``kb``/``vb`` ``[B, K, bk, H]``); returns ``(dq, dk, dv, ds)``.
    """
    b_, k_, bq, g_, h = qb.shape
    bk, hv = kb.shape[2], vb.shape[-1]
    bkg = b_ * k_
    raw, s = _transposed_scores(spec, masks, kb, qb, bias_b, t0, s0, masked)
    p = jnp.exp(s - lse_b)
    dob2 = dob.reshape(bkg, bq * g_, hv)
    dp = _dot(vb.reshape(bkg, bk, hv), dob2, ((2,), (2,))).reshape(p.shape)
    p_drop, dp = _dropped(spec, masks, p, dp, t0, s0)
    dv = _dot(p_drop.reshape(bkg, bk, bq * g_), dob2, ((2,), (1,))).reshape(vb.shape)
    ds = p * (dp - delta_b)
    dz = nx.softcap_grad(raw, masks.softcap, ds).reshape(bkg, bk, bq * g_)
    dk = _dot(dz, qb.reshape(bkg, bq * g_, h), ((2,), (1,))).reshape(kb.shape)
    dq = _dot(dz, kb.reshape(bkg, bk, h), ((1,), (1,))).reshape(qb.shape)
    return dq, dk, dv, ds


def _backward(plan: Plan, q, k, v, bias, masks: Masks, out, lse, d_out, d_lse):
    spec, bq, bk = plan.spec, plan.bq, plan.bk
    b_, k_, t_len, _, h = q.shape
    s_len = k.shape[2]
    hv = v.shape[-1]
    nq_live, nk_live = _block_limits(plan, masks, t_len, s_len)
    qlo, qflo, qfhi, qhi = _table(plan.q_ranges, nq_live)
    delta = jnp.sum(d_out * out, axis=-1)
    if d_lse is not None:
        delta = delta - d_lse
    # exp(s - lse) with lse = -inf (an empty row) must be 0, not NaN: use +inf there.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)

    def key_block(j, carry):
        dq, dbias = carry
        s0 = j * bk
        kb = lax.dynamic_slice_in_dim(k, s0, bk, axis=2)
        vb = lax.dynamic_slice_in_dim(v, s0, bk, axis=2)
        bias_cols = _slice(bias, s0, bk, 4)

        def body(masked):
            def step(i, state):
                dq, dbias, dk, dv = state
                t0 = i * bq
                qb, dob, lse_b, delta_b = (
                    lax.dynamic_slice_in_dim(a, t0, bq, axis=2) for a in (q, d_out, lse, delta)
                )
                bias_b = _slice(bias_cols, t0, bq, 2)
                # lse and delta [B, K, bq, G] broadcast against the [B, K, bk, bq, G] scores.
                tile = (qb, dob, bias_b, kb, vb, lse_b[:, :, None], delta_b[:, :, None])
                dq_b, dk_b, dv_b, ds = _tile_grads(spec, masks, *tile, t0, s0, masked)
                if dbias is not None:
                    dbias = _add_bias_grad(dbias, ds, t0, s0)
                old = lax.dynamic_slice_in_dim(dq, t0, bq, axis=2)
                dq = lax.dynamic_update_slice_in_dim(dq, old + dq_b, t0, axis=2)
                return dq, dbias, dk + dk_b, dv + dv_b

            return step

        dk0 = jnp.zeros_like(kb)
        state = (dq, dbias, dk0, jnp.zeros_like(vb))
        a, b, c, d = (x[j] for x in (qlo, qflo, qfhi, qhi))
        b, c, d = jnp.maximum(b, a), jnp.maximum(c, a), jnp.maximum(d, a)
        state = lax.fori_loop(a, b, body(True), state)
        state = lax.fori_loop(b, c, body(False), state)
        dq, dbias, dk, dv = lax.fori_loop(c, d, body(True), state)
        return (dq, dbias), (dk, dv)

    # dK/dV of each key block are written once, by a scan over key blocks (stacked outputs).
    nk = s_len // bk

    def scan_step(carry, j):
        carry, (dk, dv) = lax.cond(
            j < nk_live,
            lambda c: key_block(j, c),
            lambda c: (
                c,
                (jnp.zeros((b_, k_, bk, h), q.dtype), jnp.zeros((b_, k_, bk, hv), q.dtype)),
            ),
            carry,
        )
        return carry, (dk, dv)

    dbias0 = None if bias is None else jnp.zeros_like(bias)
    (dq, dbias), (dk, dv) = lax.scan(
        scan_step, (jnp.zeros_like(q), dbias0), jnp.arange(nk, dtype=jnp.int32)
    )
    # [nk, B, K, bk, H] -> [B, K, S, H]
    dk = jnp.moveaxis(dk, 0, 2).reshape(b_, k_, s_len, h)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b_, k_, s_len, hv)
    return dq, dk, dv, dbias


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention_padded(plan: Plan, q, k, v, bias, masks: Masks):
    """Chunked attention on canonical, block-padded arguments (see ``reference.attention``)."""
    return _forward(plan, q, k, v, bias, masks)


def _fwd(plan, q, k, v, bias, masks):
    out, lse = _forward(plan, q, k, v, bias, masks)
    return (out, lse), (q, k, v, bias, masks, out, lse)


def _bwd(plan, res, cts):
    q, k, v, bias, masks, out, lse = res
    d_out, d_lse = cts
    dq, dk, dv, dbias = _backward(plan, q, k, v, bias, masks, out, lse, d_out, d_lse)
    d_masks = jax.tree_util.tree_map(lambda _: None, masks)
    return dq, dk, dv, dbias, d_masks


attention_padded.defvjp(_fwd, _bwd)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_axis(x, axis: int, to: int, value=0, broadcast: bool = False):
    """``x`` zero-padded to length ``to`` along ``axis`` (left alone if size 1 and broadcast)."""
    if x is None or x.shape[axis] == to or (broadcast and x.shape[axis] == 1):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def default_block_q(t_len: int) -> int:
    """512 queries a block where that adds no padding over 256, else 256.

    Measured on two CPU cores (fwd+bwd, causal, 8 heads of 64): 512 x 256 blocks are 1.10x,
    1.26x, 1.35x and 1.43x faster than 256 x 256 at T = 1024, 2048, 4096 and 8192, the loop
    bodies keeping 1.7-1.9 cores busy instead of 1.4.
    """
    return 512 if _round_up(t_len, 512) == _round_up(t_len, 256) else 256


def block_sizes(t_len: int, s_len: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Block sizes: the requested ones, or the whole (8-aligned) length when it is shorter."""
    return min(block_q, _round_up(t_len, 8)), min(block_k, _round_up(s_len, 8))


def attention(
    spec: Spec, q, k, v, bias, masks: Masks, *, block_q: int = 256, block_k: int = 256
) -> tuple[jax.Array, jax.Array]:
    """Chunked attention on canonical arguments: pads to whole blocks, runs, slices back.

    Same contract as :func:`softjax._attention.reference.attention`.
    """
    t_len, s_len = q.shape[2], k.shape[2]
    bq, bk = block_sizes(t_len, s_len, block_q, block_k)
    t_pad, s_pad = _round_up(t_len, bq), _round_up(s_len, bk)
    spec = spec._replace(s_valid=s_len if s_pad != s_len else None)
    masks = masks._replace(
        mask=_pad_axis(_pad_axis(masks.mask, 2, t_pad, False, True), 4, s_pad, False, True),
        q_segment=_pad_axis(masks.q_segment, 1, t_pad),
        kv_segment=_pad_axis(masks.kv_segment, 1, s_pad),
    )
    plan = make_plan(spec, t_pad, s_pad, bq, bk, has_dynamic_masks(masks))
    out, lse = attention_padded(
        plan,
        _pad_axis(q, 2, t_pad),
        _pad_axis(k, 2, s_pad),
        _pad_axis(v, 2, s_pad),
        _pad_axis(_pad_axis(bias, 2, t_pad, 0, True), 4, s_pad, 0, True),
        masks,
    )
    return out[:, :, :t_len], lse[:, :, :t_len]
