"""The ``"chunked"`` implementation of ``linear_cross_entropy``: a loop over vocabulary blocks.

The logits ``z = x @ w.T`` (``[N, V]``) are never materialised. The forward pass visits
``w`` block by block (``[Bv, D]``) and keeps, per row, an online logsumexp (running max
``m`` and ``rest = sum_c exp(z_c - m) - 1``, merged across blocks) and the smoothing sum
``d = sum_c w_c (m - z_c)``. The backward pass visits the blocks again, recomputes each
block of logits and turns it straight into its gradient block, so the only arrays that grow
with the vocabulary are ``w`` and ``dw`` themselves.

Per block the work is one ``[N, D] x [D, Bv]`` matmul forward and three backward
(recompute, ``dx``, ``dw``), against one forward and two backward for the materialising
path: the price of flat memory is one extra matmul.

A vocabulary that is not a multiple of ``Bv`` needs no padding in memory: the last block
starts at ``V - Bv`` (``dynamic_slice`` clamps there anyway) and masks the columns that the
previous block already covered.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import _losses
from .. import _numerics as nx
from .._lowering import platform_dependent
from .._sharding import match_vma
from . import blocks as _blocks

# The chunked path holds a few [N, Bv] float32 blocks at a time: Bv is the largest power of two
# with N * Bv <= this many elements (32 MiB of float32), clamped to [128, 4096].
BLOCK_ELEMENTS = 2**23
MIN_BLOCK_V, MAX_BLOCK_V = 128, 4096
BLOCK_N = 1024


def default_block_n(num_rows: int) -> int:
    """Token block of the chunked backward pass: ``[Bn, D]`` float32 pieces of ``dx``."""
    return min(num_rows, BLOCK_N)


def default_block_v(num_rows: int, num_classes: int) -> int:
    """The vocabulary block size of the chunked path for ``num_rows`` tokens (see above)."""
    b = MAX_BLOCK_V
    while b > MIN_BLOCK_V and num_rows * b > BLOCK_ELEMENTS:
        b //= 2
    return max(1, min(b, num_classes))


class Stats(NamedTuple):
    """Per-row running statistics of the (capped) logits seen so far, all ``[N]``.

    ``lse = m + log1p(rest)``; ``rest`` is kept apart from the 1 contributed by the maximum
    so that a dominant class keeps a tiny loss accurate (as ``softjax._numerics``).
    ``rest_c`` is the TwoSum compensation of ``rest`` across blocks. ``d`` is
    ``sum_c w_c (m - z_c) >= 0`` over the classes seen: the smoothing term
    ``sum_c w_c (-log p_c) = d + sum(w) * log1p(rest)`` then adds two non-negative numbers
    instead of cancelling ``sum(w) * lse - sum_c w_c z_c``.
    """

    m: jax.Array
    rest: jax.Array
    rest_c: jax.Array
    d: jax.Array


def init_stats(n: int, dtype) -> Stats:
    """Nothing seen yet, as ``[n, 1]`` columns (the layout :func:`merge_block` works in)."""
    zeros = jnp.zeros((n, 1), dtype)
    return Stats(jnp.full((n, 1), -jnp.inf, dtype), zeros, zeros, zeros)


class LogitMap(NamedTuple):
    """``z = scale · softcap(raw, cap)``: the soft-cap, then a temperature ``1 / scale``.

    Where this module takes ``cap`` it takes a :class:`LogitMap` too (the streaming paths of
    ``softjax._vocab.log_probs``); the Pallas kernels take the soft-cap alone.
    """

    cap: jax.Array | None
    scale: jax.Array | None


def map_parts(cap):
    """``(softcap, scale)`` of a soft-cap or a :class:`LogitMap` (either may be None)."""
    return (cap.cap, cap.scale) if isinstance(cap, LogitMap) else (cap, None)


def join_map(cap, scale):
    """The map of :func:`map_parts`' parts: the soft-cap alone when there is no scale."""
    return cap if scale is None else LogitMap(cap, scale)


def map_logits(raw, cap):
    """The logits ``z`` of raw logits ``x @ w.T``: soft-capped, then a :class:`LogitMap`'s scale."""
    if not isinstance(cap, LogitMap):
        return nx.softcap(raw, cap)
    z = nx.softcap(raw, cap.cap)
    return z if cap.scale is None else z * cap.scale


def map_grad(raw, cap, grad):
    """Chains ``grad`` (with respect to ``z``) through :func:`map_logits`."""
    if not isinstance(cap, LogitMap):
        return nx.softcap_grad(raw, cap, grad)
    return nx.softcap_grad(raw, cap.cap, grad if cap.scale is None else grad * cap.scale)


def block_logits(x, w_blk, cap, dtype):
    """Raw logits ``x @ w_blk.T`` (accumulated in ``dtype``) and their mapped values."""
    raw = nx.dot(x, w_blk, (1, 1), dtype)
    return raw, map_logits(raw, cap)


def block_grads(raw, cap, is_target, stats: _losses.RowStats, coefs: _losses.GradCoefs, cw_blk):
    """``d loss / d raw`` on a block of raw logits ``[n, Bv]`` (``stats``/``coefs``: ``[n, 1]``).

    The loss gradient with respect to the capped logits, chained through the softcap; the
    same code runs in the chunked loop and inside the Pallas kernels.
    """
    z = map_logits(raw, cap)
    p = _losses.probs(z, stats)
    grad = _losses.logit_grads(p, is_target, coefs, cw_blk)
    if coefs.spread is not None:
        spread = coefs.spread if coefs.spread.ndim == p.ndim else coefs.spread[..., None]
        grad = grad + spread * nx.zero_where_prob_zero(p, stats.shift - z)
    return map_grad(raw, cap, grad)


def merge_block(st: Stats, z, col_ok, cw_blk, w_seen, smoothing: bool) -> Stats:
    """Folds a block of capped logits ``z`` [n, Bv] into the running statistics ``[n, 1]``.

    ``col_ok`` [1, Bv] marks the columns that belong to this block; ``cw_blk`` [1, Bv] their
    class weights (None: all 1) and ``w_seen`` the total weight of the classes already
    merged. Everything stays 2-D, so the same code runs inside the Pallas kernels.
    """
    z = jnp.where(col_ok, z, -jnp.inf)
    m_blk = jnp.max(z, axis=-1, keepdims=True)
    m_new = jnp.maximum(st.m, m_blk)
    shift = nx.empty_row_shift(m_new)
    # The maximal entries by comparison, not by hi == 0: XLA may fuse a soft-capped (or
    # scaled) z into each reader and contract ``c * tanh(.) - shift`` into a fused
    # multiply-add there, leaving hi a rounding error away from 0 in one reduction and not
    # in another (seen on XLA:CPU at 13 tokens x 150 classes: the normaliser lost its
    # maximal entry, -log p off by 0.08). A comparison is never contracted.
    at_max = z == shift
    hi, lo = nx.two_sum(z, -shift)
    hi, lo = jnp.where(at_max, 0.0, hi), jnp.where(at_max, 0.0, lo)
    e = nx.exp_compensated(hi, lo)
    count = jnp.sum(at_max.astype(z.dtype), axis=-1, keepdims=True)
    # Entries at the maximum contribute exactly 1 each; e - 1 there keeps `rest` free of it.
    blk_rest = jnp.sum(jnp.where(at_max, e - 1, e), axis=-1, keepdims=True)
    up = m_blk > st.m
    alpha = jnp.exp(st.m - shift)  # 0 while nothing has been seen (m = -inf)
    base = jnp.where(up, (1 + st.rest + st.rest_c) * alpha + (count - 1), st.rest)
    add = jnp.where(up, blk_rest, count + blk_rest)
    rest, err = nx.two_sum(base, add)
    rest_c = jnp.where(up, 0.0, st.rest_c) + err
    d = st.d
    if smoothing:
        # Re-anchor the classes seen so far at the new maximum, then add this block's.
        moved = jnp.where(jnp.isfinite(st.m), (m_new - st.m) * w_seen, 0.0)
        w = _block_weights(col_ok, cw_blk, z.dtype)
        d = d + moved + jnp.sum(jnp.where(w == 0, 0.0, w * -(hi + lo)), axis=-1, keepdims=True)
    return Stats(m_new, rest, rest_c, d)


class Moments(NamedTuple):
    """Per-row moments of the logits below the running maximum ``m``, ``[n, 1]`` each:
    ``s1 = sum_c e^(z_c - m) (m - z_c)`` and ``s2 = sum_c e^(z_c - m) (m - z_c)^2``.

    With ``S0 = 1 + rest`` (:class:`Stats`) and ``p_c = e^(z_c - m) / S0``, the entropy is
    ``log S0 + s1 / S0`` and the variance of ``z`` under ``p`` is
    ``s2 / S0 - (s1 / S0)^2``: sums of non-negative terms, no cancellation in the entropy.
    """

    s1: jax.Array
    s2: jax.Array


def reanchor_moments(mo: Moments, m_old, m_new, total_old) -> Moments:
    """:class:`Moments` taken below ``m_old`` re-anchored at ``m_new >= m_old``.

    With ``d = m_new - m_old``, ``a = e^(-d)`` and ``S0 = total_old`` (relative to
    ``m_old``): ``s1 <- a (s1 + d S0)``, ``s2 <- a (s2 + 2 d s1 + d^2 S0)``; nothing where
    ``m_old = -inf`` (nothing seen). Used across blocks and across vocabulary shards.
    """
    seen = jnp.isfinite(m_old)
    d = jnp.where(seen, m_new - m_old, 0.0)
    a = jnp.where(seen, jnp.exp(-d), 0.0)
    return Moments(a * (mo.s1 + d * total_old), a * (mo.s2 + 2 * d * mo.s1 + d * d * total_old))


def merge_moments(mo: Moments, m_old, m_new, total_old, z, col_ok) -> Moments:
    """Folds a block of logits ``z`` ``[n, Bv]`` into the :class:`Moments` ``mo``.

    ``m_old``/``m_new`` are the running maxima before and after the block (``[n, 1]``),
    ``total_old`` the ``S0`` seen before it (relative to ``m_old``).
    """
    shift = nx.empty_row_shift(m_new)
    s1, s2 = reanchor_moments(mo, m_old, shift, total_old)
    z = jnp.where(col_ok, z, -jnp.inf)
    e = jnp.exp(z - shift)
    u = jnp.where(e == 0, 0.0, shift - z)  # m - z, 0 where e is (-inf logits: inf)
    s1 = s1 + jnp.sum(e * u, axis=-1, keepdims=True)
    s2 = s2 + jnp.sum(e * u * u, axis=-1, keepdims=True)
    return Moments(s1, s2)


def _block_weights(col_ok, cw_blk, dtype):
    """Class weights of a block (1 without ``weight``), 0 on columns outside it."""
    ones = jnp.ones(col_ok.shape, dtype)
    return jnp.where(col_ok, ones if cw_blk is None else cw_blk.astype(dtype), 0)


def _block_start(i, bv, num_classes):
    """Start of block ``i`` in memory and a mask of the columns that belong to it."""
    start = i * bv
    s = jnp.minimum(start, num_classes - bv)
    cols = s + lax.iota(jnp.int32, bv)
    return s, cols, cols >= start


def forward_stats(x, w, class_weight, cap, *, block_v: int, smoothing: bool, moments=False):
    """Per-row :class:`Stats` of ``softcap(x @ w.T)`` over all of ``w``'s rows.

    Args:
      x: ``[N, D]``; w: ``[V, D]`` of the same dtype; class_weight: ``[V]`` or None.
      cap: the soft-cap, None, or a :class:`LogitMap`.
      block_v: the vocabulary block ``Bv``; smoothing: whether to accumulate ``d``.
      moments: also return the :class:`Moments` (``[N]`` each) after the stats.
    """
    n = x.shape[0]
    v = w.shape[0]
    dtype = nx.compute_dtype(x.dtype)
    bv = min(block_v, v)
    nb = -(-v // bv)

    def body(i, carry):
        st, mo, w_seen, x, w_c = carry
        x, w_c = _opaque((x, w_c))
        s, cols, col_ok = _block_start(i, bv, v)
        w_blk = _rows(w_c, s, bv)
        cw_blk = None if class_weight is None else lax.dynamic_slice_in_dim(class_weight, s, bv)
        _, z = block_logits(x, w_blk, cap, dtype)
        new = merge_block(st, z, col_ok, cw_blk, w_seen, smoothing)
        if mo is not None:
            mo = merge_moments(mo, st.m, new.m, 1 + st.rest + st.rest_c, z, col_ok)
        return new, mo, w_seen + jnp.sum(_block_weights(col_ok, cw_blk, dtype)), x, w_c

    zeros = jnp.zeros((n, 1), dtype)
    mo = Moments(zeros, zeros) if moments else None
    init = (init_stats(n, dtype), mo, jnp.zeros((), dtype), x, w)
    st, mo, _, _, _ = lax.fori_loop(0, nb, body, match_vma(init, x, w, class_weight))
    st = Stats(*(a[:, 0] for a in st))
    return (st, Moments(*(a[:, 0] for a in mo))) if moments else st


def target_dots(x, w, labels):
    """``x_i . w[y_i]`` [N] (compute dtype) with the rows of ``w`` gathered at once.

    Labels outside ``[0, V)`` read a clamped row: the callers mask or NaN those rows.
    """
    w_y = w[jnp.clip(labels, 0, w.shape[0] - 1)]
    return jnp.einsum("nd,nd->n", x, w_y, preferred_element_type=nx.compute_dtype(x.dtype))


def target_dots_chunked(x, w, labels, rows: int):
    """:func:`target_dots` gathering ``rows`` tokens' rows of ``w`` at a time."""
    n = x.shape[0]

    def body(k, raw):
        # Rows shared with the previous (clamped) chunk get the same value again.
        start, _ = _blocks.clamped(k, rows, n)
        x_c, labels_c = _blocks.chunk(x, start, rows), _blocks.chunk(labels, start, rows)
        return lax.dynamic_update_slice_in_dim(raw, target_dots(x_c, w, labels_c), start, 0)

    raw = match_vma(jnp.zeros((n,), nx.compute_dtype(x.dtype)), x, w, labels)
    return lax.fori_loop(0, -(-n // rows), body, raw)


def target_logits(x, w, labels, cap):
    """``softcap(x_i . w[y_i])`` [N] by a direct dot product with the gathered rows (no one-hot).

    Gathered at once the rows of ``w`` are an ``[N, D]`` temporary, as large as ``x``, so on
    accelerators they are gathered a token chunk at a time (``blocks.token_chunk`` rows). Not
    on XLA:CPU, which gathers bf16 through a float32 copy of all of ``w`` and hoists that copy
    out of the loop (twice ``w``'s bytes): there one gather is the smaller. The choice is
    made when lowering, per platform.
    """
    n, dim = x.shape
    rows = _blocks.token_chunk(n, dim)
    if rows == n:
        return map_logits(target_dots(x, w, labels), cap)
    in_chunks = functools.partial(target_dots_chunked, rows=rows)
    raw = platform_dependent(x, w, labels, default=in_chunks, cpu=target_dots)
    return map_logits(match_vma(raw, x, w, labels), cap)


def backward(
    x,
    w,
    labels,
    row_ok,
    coefs,
    shift,
    log_norm,
    class_weight,
    cap,
    *,
    block_v: int,
    block_n: int | None = None,
):
    """``dx`` (float32 partial sum over this ``w``) and ``dw`` (``w.dtype``) of the loss.

    ``labels`` index ``w``'s rows (callers shift them by the shard offset); ``coefs`` are
    :class:`softjax._losses.GradCoefs` already multiplied by the upstream cotangent;
    ``shift``/``log_norm`` give ``lse = shift + log_norm`` per row. The loops are
    :func:`backward_blocks`'s; this is the cross-entropy's gradient block.
    """

    def grad_block(raw, cols, rows, side, tok):
        del tok
        lab, ok, cf, sh, ln = rows
        (cw_blk,) = side
        stats = _losses.RowStats(sh[:, None], ln[:, None])
        dz = block_grads(raw, cap, cols[None, :] == lab[:, None], stats, cf, cw_blk)
        return jnp.where(ok[:, None], dz, 0.0)  # excluded rows contribute exactly zero

    rows = (labels, row_ok, coefs, shift, log_norm)
    return backward_blocks(
        x, w, grad_block, rows, (class_weight,), block_v=block_v, block_n=block_n
    )


def backward_blocks(
    x,
    w,
    grad_block,
    rows,
    vocab_side=(),
    token_side=(),
    *,
    block_v: int,
    block_n: int | None = None,
):
    """``dx = dz @ w`` (float32 ``[N, D]``) and ``dw = dz.T @ x`` (``w.dtype``), block by block.

    ``dz = grad_block(raw, cols, rows_blk, vocab_blk, token_blk)`` is the gradient with respect
    to a block of raw logits ``raw = x_blk @ w_blk.T`` (``[bn, bv]``, compute dtype) whose
    columns are the classes ``cols`` (``[bv]``); ``rows`` is a pytree of per-token arrays
    (``[N, ...]``) and ``token_side`` of further ``[N, ...]`` operands (a teacher's hidden
    states), both given sliced to the token block; ``vocab_side`` a pytree of ``[V, ...]``
    operands (class weights, a teacher's embedding; None leaves allowed) given sliced to the
    vocabulary block.

    The outer loop runs over vocabulary blocks, the inner one over token blocks of
    ``block_n`` rows: each ``dw`` block is accumulated over all tokens in float32 and cast
    once, ``dx`` is accumulated over the vocabulary in float32, and nothing but ``dx``
    itself has a size of the order of ``N x D``.
    """
    n, dim = x.shape
    v = w.shape[0]
    dtype = nx.compute_dtype(x.dtype)
    bv = min(block_v, v)
    bn = min(block_n or default_block_n(n), n)
    nb, nt = -(-v // bv), -(-n // bn)

    def token_body(j, carry, cols, col_ok, w_blk, side_blk):
        dx, dw_blk, x, tok = carry
        x, tok = _opaque((x, tok))
        r, _, r_ok = _block_start(j, bn, n)
        x_blk = lax.dynamic_slice_in_dim(x, r, bn, 0)
        rows_blk, tok_blk = jax.tree.map(
            lambda a: lax.dynamic_slice_in_dim(a, r, bn, 0), (rows, tok)
        )
        raw = nx.dot(x_blk, w_blk, (1, 1), dtype)
        dz = grad_block(raw, cols, rows_blk, side_blk, tok_blk)
        # Rows of the previous token block contribute exactly zero.
        dz = jnp.where(r_ok[:, None], dz, 0.0)
        # The last vocabulary block may overlap the previous one: its dw rows there are
        # recomputed identically and overwritten (reading them back would cost a copy of
        # dw), but those columns must not reach dx twice.
        dz_x = jnp.where(col_ok[None, :], dz, 0.0).astype(x.dtype)
        dx_blk = lax.dynamic_slice_in_dim(dx, r, bn, 0) + nx.dot(dz_x, w_blk, (1, 0), dtype)
        dw_blk = dw_blk + nx.dot(dz.astype(x.dtype), x_blk, (0, 0), dtype)
        return lax.dynamic_update_slice_in_dim(dx, dx_blk, r, 0), dw_blk, x, tok

    def body(i, carry):
        dx, dw, x, w_c, side, tok = carry
        w_c, side = _opaque((w_c, side))
        s, cols, col_ok = _block_start(i, bv, v)
        w_blk = _rows(w_c, s, bv)
        side_blk = jax.tree.map(lambda a: _rows(a, s, bv), side)
        inner = functools.partial(
            token_body, cols=cols, col_ok=col_ok, w_blk=w_blk, side_blk=side_blk
        )
        dw_blk = match_vma(jnp.zeros((bv, dim), dtype), w_blk, x, rows)
        dx, dw_blk, x, tok = lax.fori_loop(0, nt, inner, (dx, dw_blk, x, tok))
        return (
            dx,
            lax.dynamic_update_slice_in_dim(dw, dw_blk.astype(w.dtype), s, 0),
            x,
            w_c,
            side,
            tok,
        )

    init = (jnp.zeros((n, dim), dtype), jnp.zeros_like(w), x, w, vocab_side, token_side)
    init = match_vma(init, x, w, vocab_side, token_side, rows)
    dx, dw, *_ = lax.fori_loop(0, nb, body, init)
    return dx, dw


def _rows(w, start, size: int):
    """``w[start:start + size]``."""
    return lax.dynamic_slice_in_dim(w, start, size, 0)


def _opaque(operands):
    """``operands`` themselves, but not provably loop-invariant (threaded through the carry).

    XLA's CPU backend has no bfloat16 dynamic-slice or matmul: it converts the operands to
    float32, and loop-invariant code motion would hoist ``convert(w)`` and ``convert(x)`` out
    of the vocabulary loop, float32 copies of all of ``w`` and ``x``. Behind the barrier the
    conversion stays per block (fused into the slice). It costs nothing at run time.
    """
    return lax.optimization_barrier(operands)


# ---------------------------------------------------------------------------------------
# Single pass (float32 weights, scalar reductions): loss and gradients together


def default_single_pass_block(num_rows: int, num_classes: int) -> int:
    """Tokens per chunk of the single pass: ``[Bn, V]`` float32 logits within the budget."""
    b = max(8, BLOCK_ELEMENTS // max(num_classes, 1))
    return max(1, min(num_rows, b))


def single_pass(x, w, labels, row_ok, terms, class_weight, cap, *, block_n: int, smoothing: bool):
    """Per-row losses ``[N]``, ``dx`` ``[N, D]`` and ``dw`` ``[V, D]`` (float32) for ``g = 1``.

    Token chunks of ``Bn`` rows see the whole vocabulary at once (``[Bn, V]`` logits, with
    ``Bn`` chosen so that this stays within a fixed budget: flat in ``V``), so the row maths
    is exactly that of :func:`softjax.cross_entropy` (``row_stats``, ``row_losses``,
    ``row_loss_grads``) and each logit is computed once: three matmuls in all, as the
    materialising path, instead of four. ``dw`` accumulates across chunks in the carry,
    which is why this path serves float32 (and float64) weights only: for them the float32
    accumulator is the gradient itself. ``smoothing=False`` (label smoothing a literal 0)
    skips the pass over all classes that only the smoothing term needs.
    """

    def chunk(raw, rows, tok, whole):
        del tok, whole
        lab, ok, tm = rows
        z = map_logits(raw, cap)
        stats = _losses.row_stats(z, cap)
        loss = _losses.row_losses(z, lab, tm, class_weight, stats, smoothing)
        dz = _losses.row_loss_grads(z, lab, tm, class_weight, stats, jnp.ones_like(loss))
        return loss, jnp.where(ok[:, None], nx.softcap_grad(raw, cap, dz), 0.0)

    return single_pass_chunks(x, w, chunk, (labels, row_ok, terms), block_n=block_n)


def single_pass_chunks(x, w, chunk, rows, token_side=(), whole_side=(), *, block_n: int):
    """Per-row values ``[N]``, ``dx = dz @ w`` ``[N, D]`` and ``dw = dz.T @ x`` ``[V, D]``
    (float32), a chunk of ``Bn`` tokens against the whole vocabulary at a time.

    ``(value, dz) = chunk(raw, rows_blk, token_blk, whole)``: from the raw logits ``[Bn, V]``
    of a token chunk (compute dtype) the rows' values ``[Bn]`` and the gradient with respect
    to ``raw``. ``rows`` and ``token_side`` are pytrees of ``[N, ...]`` arrays given sliced
    to the chunk, ``whole_side`` a pytree of further operands given whole (a teacher's
    embedding), threaded through the loop as ``x`` and ``w`` are (see :func:`_opaque`).
    """
    n, dim = x.shape
    v = w.shape[0]
    dtype = nx.compute_dtype(x.dtype)
    bn = min(block_n, n)
    nt = -(-n // bn)

    def body(j, carry):
        value, dx, dw, x, w, tok, whole = carry
        x, w, tok, whole = _opaque((x, w, tok, whole))
        r, _, r_ok = _block_start(j, bn, n)
        x_blk = lax.dynamic_slice_in_dim(x, r, bn, 0)
        rows_blk, tok_blk = jax.tree.map(
            lambda a: lax.dynamic_slice_in_dim(a, r, bn, 0), (rows, tok)
        )
        raw = nx.dot(x_blk, w, (1, 1), dtype)
        blk_value, dz = chunk(raw, rows_blk, tok_blk, whole)
        # Rows of the previous chunk (ragged last chunk) are recomputed but contribute nothing.
        dz = jnp.where(r_ok[:, None], dz, 0.0).astype(x.dtype)
        old = lax.dynamic_slice_in_dim(value, r, bn, 0)
        value = lax.dynamic_update_slice_in_dim(value, jnp.where(r_ok, blk_value, old), r, 0)
        dx_blk = nx.dot(dz, w, (1, 0), dtype)
        dx_old = lax.dynamic_slice_in_dim(dx, r, bn, 0)
        dx = lax.dynamic_update_slice_in_dim(dx, jnp.where(r_ok[:, None], dx_blk, dx_old), r, 0)
        dw = dw + nx.dot(dz, x_blk, (0, 0), dtype)
        return value, dx, dw, x, w, tok, whole

    zeros = (jnp.zeros((n,), dtype), jnp.zeros((n, dim), dtype), jnp.zeros((v, dim), dtype))
    value, dx, dw, *_ = lax.fori_loop(0, nt, body, (*zeros, x, w, token_side, whole_side))
    return value, dx, dw
