"""The block maths of the attention kernels, on one ``[bq, bk]`` tile of one head.

Both kernel families (``pallas_tpu``: Mosaic, ``pallas_gpu``: Triton) run these functions on
2-d tiles: a query block ``q`` ``[bq, H]``, a key and value block ``k``, ``v`` ``[bk, H]`` in
the inputs' dtype, per-query data as columns ``[bq, 1]`` and per-key data as rows ``[1, bk]``.
The semantics are those of :mod:`softjax._attention.chunked` (and its oracle, ``reference``):
the same masks, the same empty-row rule, the same gradients.

Precision. Scores are ``q . k`` with float32 accumulation: for bfloat16 and float16 inputs the
products are exact in float32 (8 + 8 and 11 + 11 significand bits fit in 24), so the matmul
unit's native pass *is* the float32 computation; the scale is applied to the float32 scores.
A product of a float32 tile (probabilities, score gradients) with a bfloat16 one (``v``,
``dO``, ``q``, ``k``) splits the float32 tile into two bfloat16 terms, ``a = hi + lo``: two
native passes whose error, ``2**-17`` of each term, is far below the half ulp of bfloat16
(``2**-9``) that the result is rounded to once. float16 and float32 tiles are multiplied in
float32 at ``Precision.HIGHEST`` (``nx.dot``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import _numerics as nx
from ._masks import both, structural_mask


class Config(NamedTuple):
    """What a kernel needs to know statically (hashable).

    ``t_len``/``s_len`` are the real lengths (the arrays may be padded to whole blocks);
    ``window`` is ``(left, right)``; ``bias_axes`` says which of ``(B, N, T, S)`` the bias
    has (False: broadcast, size 1), None without a bias; ``dynamic``: segment ids or
    lengths are given (per-element masks from data); ``softcap``: a cap is given;
    ``bias_grad``: the bias is differentiated (False for a boolean mask folded into it), so
    the backward writes the score gradient.
    """

    causal: bool
    window: tuple[int, int] | None
    t_len: int
    s_len: int
    group: int
    bq: int
    bk: int
    bias_axes: tuple[bool, bool, bool, bool] | None
    dynamic: bool
    softcap: bool
    bias_grad: bool = False


def dot(a: jax.Array, b: jax.Array, contract) -> jax.Array:
    """``a . b`` contracting axis ``contract[0]`` of ``a`` with ``contract[1]`` of ``b``, in
    float32 (see the module docstring for how mixed float32 and bfloat16 tiles multiply)."""
    f32 = jnp.float32
    if a.dtype == b.dtype:
        return nx.dot(a, b, contract, f32)
    narrow = b.dtype if a.dtype == f32 else a.dtype
    if narrow != jnp.bfloat16:
        return nx.dot(a.astype(f32), b.astype(f32), contract, f32)

    def split(x):
        if x.dtype != f32:
            return (x,)
        hi = x.astype(jnp.bfloat16)
        return hi, (x - hi.astype(f32)).astype(jnp.bfloat16)

    total = None
    for a_part in split(a):
        for b_part in split(b):
            term = nx.dot(a_part, b_part, contract, f32)
            total = term if total is None else total + term
    return total


def scores(q, k, scale, cap, bias=None):
    """``(raw, s)``: the scaled scores ``scale q.k`` and ``softcap(raw) + bias``, float32
    ``[bq, bk]``. ``scale`` and ``cap`` (None: no cap) are float32 scalars or ``[1, 1]``."""
    raw = dot(q, k, (1, 1)) * scale
    s = nx.softcap(raw, cap)
    if bias is not None:
        s = s + bias.astype(jnp.float32)
    return raw, s


def visible(cfg: Config, t0, s0, q_data=None, kv_data=None) -> jax.Array | None:
    """Boolean ``[bq, bk]``: which pairs of the tile at ``(t0, s0)`` may attend (None: all).

    ``q_data`` is ``(segment, valid)`` columns ``[bq, 1]`` and ``kv_data`` the same as rows
    ``[1, bk]`` (int32), given when ``cfg.dynamic``.
    """
    t = t0 + lax.broadcasted_iota(jnp.int32, (cfg.bq, 1), 0)
    s = s0 + lax.broadcasted_iota(jnp.int32, (1, cfg.bk), 1)
    s_valid = cfg.s_len if cfg.s_len % cfg.bk else None
    ok = structural_mask(t, s, cfg.causal, cfg.window, s_valid)
    if cfg.dynamic:
        (q_seg, q_valid), (kv_seg, kv_valid) = q_data, kv_data
        ok = both(ok, (q_seg == kv_seg) & (q_valid > 0) & (kv_valid > 0))
    if ok is not None and ok.shape != (cfg.bq, cfg.bk):
        ok = jnp.broadcast_to(ok, (cfg.bq, cfg.bk))
    return ok


def div(a, b: int):
    """``a // b`` for ``a >= 0`` (traced int32 or int): truncating division, which Mosaic
    lowers on every TPU generation (``jnp.floor_divide`` needs the sign of ``a``)."""
    return lax.div(jnp.asarray(a, jnp.int32), jnp.int32(b))


def rem(a, b: int):
    """``a % b`` for ``a >= 0`` (see :func:`div`)."""
    return lax.rem(jnp.asarray(a, jnp.int32), jnp.int32(b))


def key_blocks(cfg: Config, i, num_k: int):
    """``(lo, hi)``: the key blocks ``[lo, hi)`` that query block ``i`` may see under the
    causal mask, the window and the key padding (ints or traced int32)."""
    lo, hi = 0, num_k
    t_first, t_last = i * cfg.bq, (i + 1) * cfg.bq - 1
    right = None if cfg.window is None else cfg.window[1]
    if cfg.causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:
        # Blocks holding a key s <= t_last + right: ceil((t_last + right + 1) / bk).
        hi = jnp.minimum(hi, div(jnp.maximum(t_last + right + cfg.bk, 0), cfg.bk))
    if cfg.window is not None:
        lo = div(jnp.maximum(t_first - cfg.window[0], 0), cfg.bk)
    hi = jnp.minimum(hi, -(-cfg.s_len // cfg.bk))
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def query_blocks(cfg: Config, j, num_q: int):
    """``(lo, hi)``: the query blocks ``[lo, hi)`` that may see key block ``j``."""
    lo, hi = 0, num_q
    s_first, s_last = j * cfg.bk, (j + 1) * cfg.bk - 1
    right = None if cfg.window is None else cfg.window[1]
    if cfg.causal:
        right = 0 if right is None else min(right, 0)
    if right is not None:  # t >= s - right
        lo = div(jnp.maximum(s_first - right, 0), cfg.bq)
    if cfg.window is not None:  # t <= s + left
        hi = jnp.minimum(hi, div(s_last + cfg.window[0], cfg.bq) + 1)
    # Key blocks past the real keys are seen by nobody.
    if cfg.s_len % cfg.bk:
        hi = jnp.where(s_first < cfg.s_len, jnp.asarray(hi, jnp.int32), jnp.int32(0))
    return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def live(q_range, kv_range):
    """Whether some valid query and key of two blocks may share a segment: their ``[min, max]``
    segment ranges over valid tokens overlap (an all-invalid block has an empty range)."""
    return (q_range[0] <= kv_range[1]) & (kv_range[0] <= q_range[1])


def online_step(state, s, v, ok):
    """One key block into the online softmax ``(m, l, acc)`` (``[bq, 1]``, ``[bq, 1]``,
    ``[bq, H]`` float32), with ``s`` the block's scores and ``ok`` its visibility."""
    m, total, acc = state
    if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    # Rows with nothing seen yet keep m = -inf; shift them by 0, never -inf - -inf.
    shift = nx.empty_row_shift(m_new)
    p = jnp.exp(s - shift)
    alpha = jnp.exp(m - shift)
    total = total * alpha + jnp.sum(p, axis=1, keepdims=True)
    return m_new, total, acc * alpha + dot(p, v, (1, 0))


def finish(state):
    """``(o, lse)`` from the online softmax state: 0 and ``-inf`` for rows that saw nothing."""
    m, total, acc = state
    empty = total == 0
    safe = jnp.where(empty, 1.0, total)
    o = jnp.where(empty, 0.0, acc / safe)
    return o, jnp.where(empty, -jnp.inf, m + jnp.log(safe))


def tile_grads(q, k, v, do, lse, delta, scale, cap, bias, ok):
    """``(p, ds, dz)`` of one tile: probabilities, the score gradient (what a bias gets) and
    the gradient of ``q . k`` (through the soft-cap and the scale).

    ``lse`` and ``delta = rowsum(dO * O) - dlse`` are float32 columns; ``lse`` is ``+inf``
    on rows that attend to nothing (so that ``p = 0`` there).
    """
    raw, s = scores(q, k, scale, cap, bias)
    if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
    p = jnp.exp(s - lse)
    dp = dot(do, v, (1, 1))
    ds = p * (dp - delta)
    dz = nx.softcap_grad(raw, cap, ds) * scale
    return p, ds, dz
