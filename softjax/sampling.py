"""Next-token sampling with temperature, top-k, top-p (nucleus) and min-p, exact and traced.

The filters are applied in Hugging Face's order, each to what the previous one left:

1. **temperature** ``T``: ``z = x / T``; ``T = 0`` is greedy decoding (the first maximal
   index, never NaN).
2. **top-k**: keep the ``k`` largest ``z`` (and every token tied with the ``k``-th).
3. **top-p**: with ``p`` the softmax of ``z`` over the tokens still kept, keep the smallest
   set of most likely tokens whose probability reaches ``top_p`` (and every token tied with
   the last one of that set).
4. **min-p**: keep the tokens with ``p_i >= min_p * max_j p_j``.

and a token is then drawn from the softmax of ``z`` over what survived (Gumbel-max). Every
filter keeps the most likely token, so at least one token always survives.

Every knob is a scalar or an array of the batch shape (one value per row) and may be traced:
rows are selected with ``jnp.where``, never with Python branches, so one compiled function
serves any mix of settings. Only ``top_k`` given as a Python int is static; it takes the
``lax.top_k`` path, which never sorts the vocabulary.

Thresholds are found without sorting: a float32 value's order is the order of its bit
pattern read as a (sign-folded) integer, so "the largest threshold whose kept count (or kept
probability) reaches the target" is a bisection over 32 bits: 32 fused passes over the row,
each a compare and a sum. That is exact (the kept set of a sort with ties kept) and, on CPU at
vocabulary 262144, several times cheaper than sorting the row (``python -m bench``).

With a static ``top_k`` the draw itself is also cheap: only the ``k`` candidates get a Gumbel
variate, instead of the whole vocabulary as in ``jax.random.categorical``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks
from . import _numerics as nx

__all__ = ["filter_logits", "filter_logits_reference", "sample"]

# Search bits of a float32 key: the bisection narrows an interval of < 2**32 keys.
_KEY_BITS = 32
_SIGN = np.uint32(0x80000000)


# ---------------------------------------------------------------------------------------
# validation


def _knob(value, name: str, batch_shape: tuple, kind: str):
    """``value`` (None, scalar or per-row array) checked and broadcast to ``batch_shape``.

    Returns None for None, else an array of ``batch_shape``: int32 for ``kind == "int"``,
    float32 otherwise.
    """
    if value is None:
        return None
    if kind == "int":
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError(f"{name} must be an int or an integer array, got {value!r}")
        arr = _checks.integer(value, name)
    else:
        if isinstance(value, bool):
            raise TypeError(f"{name} must be a float or a floating array, got {value!r}")
        if isinstance(value, (int, float)):
            arr = jnp.asarray(float(value), jnp.float32)
        else:
            arr = _checks.floating(value, name)
    what = (
        f"the batch shape {batch_shape} (the logits' shape without the sampled axis; "
        "one value per row)"
    )
    _checks.broadcasts_to(arr.shape, batch_shape, name, what)
    arr = jnp.broadcast_to(arr, batch_shape)
    if kind == "int":
        _checks.non_negative(arr, name)
        return arr.astype(jnp.int32)
    if kind == "unit":
        _checks.unit_interval(arr, name)
    else:
        _checks.non_negative(arr, name)
    return arr.astype(jnp.float32)


def _prepare(logits, axis, temperature, top_k, top_p, min_p):
    logits = _checks.floating(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis (the vocabulary), got a scalar")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    (ax,) = _checks.normalize_axes(int(axis), logits.ndim)
    # The vocabulary goes last: every reduction below is then over axis -1.
    x = jnp.moveaxis(nx.upcast(logits), ax, -1).astype(jnp.float32)
    batch = x.shape[:-1]
    knobs = dict(
        temperature=_knob(temperature, "temperature", batch, "nonneg"),
        top_k=top_k if _static_k(top_k) else _knob(top_k, "top_k", batch, "int"),
        top_p=_knob(top_p, "top_p", batch, "unit"),
        min_p=_knob(min_p, "min_p", batch, "unit"),
    )
    if knobs["temperature"] is None:
        raise TypeError("temperature must be a float or a floating array, got None")
    if _static_k(top_k) and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    return x, knobs


def _static_k(top_k) -> bool:
    return isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)


# ---------------------------------------------------------------------------------------
# order-preserving keys and the bisection


def _order_key(z: jax.Array) -> jax.Array:
    """A uint32 with the order of the float32 ``z``: ``z_a < z_b  <=>  key_a < key_b``.

    Non-negative floats order as their bit patterns; negative ones in reverse, so their bits
    are flipped; the sign bit is then flipped so that all of them compare as unsigned.
    ``-0.0`` is made ``+0.0`` first so that equal floats get equal keys (ties stay ties).
    """
    z = jnp.where(z == 0, jnp.zeros_like(z), z)
    bits = lax.bitcast_convert_type(z, jnp.uint32)
    negative = (bits & _SIGN) != 0
    return jnp.where(negative, ~bits, bits | _SIGN)


def _largest_key(keys: jax.Array, reaches) -> jax.Array:
    """The largest ``t`` (per row, dims kept) with ``reaches(keys >= t)`` true.

    ``reaches(mask) -> bool[..., 1]`` must be monotone (true for the row minimum, and once
    false for some ``t`` false for every larger one). Invariant: the answer is in
    ``[lo, hi]`` and ``reaches`` holds at ``lo``; each step halves ``hi - lo`` (rounding the
    midpoint up, computed without overflow), so 32 steps pin it exactly.
    """
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def step(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)
        ok = reaches(keys >= mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = lax.fori_loop(0, _KEY_BITS, step, (lo, hi))
    return lo


# ---------------------------------------------------------------------------------------
# the filters, on float32 rows [..., V] of tempered logits z


def _unnormalised(z: jax.Array, keep: jax.Array) -> jax.Array:
    """``exp(z - max z)`` over the kept tokens (0 elsewhere), compensated, float32."""
    s = nx.shift_rows(z, (z.ndim - 1,), keep)
    return jnp.where(keep, nx.exp_compensated(s.hi, s.lo), 0.0)


def _top_k_traced(z, keys, keep, k):
    """Keeps the ``k`` largest (ties kept) where ``k > 0``; ``k`` int32 per row."""
    k = k[..., None]

    def reaches(mask):
        return jnp.sum(mask & keep, axis=-1, keepdims=True, dtype=jnp.int32) >= k

    cut = _largest_key(keys, reaches)
    return keep & ((k <= 0) | (keys >= cut))


def _top_p_bisect(e, keys, keep, p):
    """Keeps the smallest most-likely set with mass ``>= p`` (ties kept) where ``p < 1``."""
    p = p[..., None]
    target = p * jnp.sum(e, axis=-1, keepdims=True)

    def reaches(mask):
        return jnp.sum(jnp.where(mask, e, 0.0), axis=-1, keepdims=True) >= target

    cut = _largest_key(keys, reaches)
    return keep & ((p >= 1) | (keys >= cut))


def _min_p(e, keep, min_p):
    """Keeps ``p_i >= min_p * max p``; ``e`` is 1 at the maximum, so that is ``e >= min_p``."""
    m = min_p[..., None]
    return keep & ((m <= 0) | (e >= m))


class _Candidates(NamedTuple):
    """The ``k`` largest tempered logits of each row and the cuts found from them alone."""

    vals: jax.Array  # [..., k], descending
    idx: jax.Array  # [..., k], their token indices
    kth: jax.Array  # [..., 1], the top-k cut
    cut_p: jax.Array | None  # [..., 1], the top-p cut (-inf where top_p >= 1), or None
    n_extra: jax.Array  # [..., 1], tokens outside the candidates tied with the k-th value


def _static_top_k_cuts(z, keep, k: int, top_p) -> _Candidates:
    """Top-k and top-p cut values from the ``k`` largest logits only (no vocabulary sort).

    ``lax.top_k`` gives the candidates sorted. Tokens outside them that tie with the ``k``-th
    value are kept too (as by the traced path), so they are counted and their mass added to
    the total; top-p then runs on the candidates' cumulative mass: the cut is the first
    candidate whose inclusive cumulative mass reaches ``top_p`` of the total (or the ``k``-th
    value, which the extra ties complete).
    """
    # The barrier keeps XLA from turning top_k into a full sort: on CPU, top_k is lowered as
    # sort + slice and only a plain prefix slice is matched back to the fast TopK kernel.
    vals, idx = lax.optimization_barrier(lax.top_k(z, k))
    kth = vals[..., -1:]
    n_all = jnp.sum(keep & (z == kth), axis=-1, keepdims=True, dtype=jnp.int32)
    n_in = jnp.sum(vals == kth, axis=-1, keepdims=True, dtype=jnp.int32)
    n_extra = n_all - n_in
    if top_p is None:
        return _Candidates(vals, idx, kth, None, n_extra)
    top = vals[..., :1]
    e_vals = jnp.where(vals > -jnp.inf, jnp.exp(vals - top), 0.0)
    extra = n_extra.astype(jnp.float32) * e_vals[..., -1:]
    mass = jnp.cumsum(e_vals, axis=-1)
    total = mass[..., -1:] + extra
    p = top_p[..., None]
    first = jnp.argmax(mass >= p * total, axis=-1, keepdims=True)
    reached = jnp.any(mass >= p * total, axis=-1, keepdims=True)
    cut_p = jnp.where(reached, jnp.take_along_axis(vals, first, axis=-1), kth)
    return _Candidates(vals, idx, kth, jnp.where(p >= 1, -jnp.inf, cut_p), n_extra)


def _keep_mask(z, knobs):
    """The boolean mask of the tokens that survive all filters; ``z`` float32 [..., V]."""
    top_k, top_p, min_p = knobs["top_k"], knobs["top_p"], knobs["min_p"]
    keep = z > -jnp.inf
    if _static_k(top_k):
        if 0 < top_k < z.shape[-1]:
            c = _static_top_k_cuts(z, keep, int(top_k), top_p)
            keep = keep & (z >= c.kth)
            if c.cut_p is not None:
                keep = keep & (z >= c.cut_p)
        elif top_p is not None:
            keep = _top_p_bisect(_unnormalised(z, keep), _order_key(z), keep, top_p)
    else:
        keys = _order_key(z) if top_k is not None or top_p is not None else None
        if top_k is not None:
            keep = _top_k_traced(z, keys, keep, top_k)
        if top_p is not None:
            keep = _top_p_bisect(_unnormalised(z, keep), keys, keep, top_p)
    if min_p is not None:
        keep = _min_p(_unnormalised(z, keep), keep, min_p)
    return keep


def _tempered(x, t):
    """``x / T`` with rows at ``T == 0`` left untempered (they are greedy)."""
    greedy = (t == 0)[..., None]
    safe_t = jnp.where(greedy, 1.0, t[..., None])
    return x / safe_t, greedy


@partial(jax.jit, static_argnames="static_k")
def _filter_jit(x, temperature, top_k, top_p, min_p, static_k):
    # Jitted whole (also when called eagerly): the bisection is a loop of small ops.
    k = static_k if static_k is not None else top_k
    return _filter_impl(x, dict(temperature=temperature, top_k=k, top_p=top_p, min_p=min_p))


def _filter(x, knobs):
    k = knobs["top_k"]
    static_k = int(k) if _static_k(k) else None
    return _filter_jit(
        x,
        knobs["temperature"],
        None if _static_k(k) else k,
        knobs["top_p"],
        knobs["min_p"],
        static_k,
    )


def _filter_impl(x, knobs):
    z, greedy = _tempered(x, knobs["temperature"])
    keep = _keep_mask(z, knobs)
    # Greedy rows keep only the first maximal logit, so a draw returns it exactly.
    first_max = jnp.arange(x.shape[-1]) == jnp.argmax(x, axis=-1, keepdims=True)
    keep = jnp.where(greedy, first_max & (x > -jnp.inf), keep)
    z = jnp.where(greedy, 0.0, z)
    nan_row = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
    return jnp.where(nan_row, jnp.nan, jnp.where(keep, z, -jnp.inf))


def filter_logits(
    logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, axis: int = -1
) -> jax.Array:
    r"""The tempered logits with the filtered-out tokens set to ``-inf`` (float32).

    ``sample`` draws from ``softmax`` of this array; it is exposed for inspecting what the
    filters keep. See :func:`sample` for the arguments and the order of the filters. Rows at
    ``temperature == 0`` come back as ``0`` at their first maximal logit and ``-inf``
    elsewhere; a row holding a NaN comes back all NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.sampling.filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), top_p=0.8)
      Array([-0.6931472, -1.2039728,       -inf,       -inf], dtype=float32)
    """
    x, knobs = _prepare(logits, axis, temperature, top_k, top_p, min_p)
    out = _filter(x, knobs) if x.shape[-1] else x  # an empty vocabulary stays empty
    return jnp.moveaxis(out, -1, _checks.normalize_axes(axis, x.ndim)[0])


def sample(
    key, logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, axis: int = -1
) -> jax.Array:
    """Draws one token per row with temperature, top-k, top-p and min-p filtering.

    With ``z = x / T`` and ``S`` the tokens surviving, in this order, top-k, top-p
    (on the softmax of ``z`` over what top-k kept) and min-p (on what top-p kept)::

           P(i) = exp(z_i) / Σ_{j ∈ S} exp(z_j)    (i ∈ S),
        S_top-p = { i : z_i ≥ z_(m) },
              m = min { m : Σ_{r ≤ m} p_(r) ≥ top_p }

    where ``p_(1) ≥ p_(2) ≥ …`` are the sorted probabilities.

    Args:
      key: a JAX PRNG key.
      logits: floating array ``[..., V, ...]``, any dtype (computed in float32).
      temperature: ``>= 0``; ``0`` is greedy (the lowest index among the maxima, no
        randomness, filters irrelevant). Scalar or array of the batch shape (``logits``
        without ``axis``), traced.
      top_k: ``>= 0``; ``0`` or None keeps all. A Python int is static and takes the
        sort-free ``lax.top_k`` path; an integer array (batch shape) is traced per row.
      top_p: in ``[0, 1]``; ``1`` or None keeps all, ``0`` keeps the top token (and its ties).
        Scalar or batch-shaped array, traced. The cumulative mass is float32 for any dtype.
      min_p: in ``[0, 1]``; ``0`` or None keeps all. Scalar or batch-shaped array, traced.
      axis: the vocabulary axis.

    Returns:
      int32 token indices of the batch shape. A row with no finite logit (nothing can be
      drawn, an empty vocabulary included) or holding a NaN gives ``V``, the vocabulary
      size: one past the last token, so never a token. Looked up with ``jnp.take`` (a Flax
      ``Embed``) it gives NaN embeddings, where ``-1`` would silently wrap to the last token;
      ``tokens == V`` finds those rows.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import softjax
      >>> softjax.sample(jax.random.key(0), jnp.array([[1.0, 3.0, 3.0], [0.0, 0.0, 9.0]]),
      ...                temperature=jnp.array([0.0, 1.0]), top_p=0.9)
      Array([1, 2], dtype=int32)
    """
    x, knobs = _prepare(logits, axis, temperature, top_k, top_p, min_p)
    if x.shape[-1] == 0:
        return jnp.zeros(x.shape[:-1], jnp.int32)  # an empty vocabulary: V = 0, nothing drawn
    if _static_k(top_k) and 0 < top_k < x.shape[-1]:
        return _sample_candidates(
            key, x, knobs["temperature"], knobs["top_p"], knobs["min_p"], int(top_k)
        )
    return _draw(key, _filter(x, knobs))


def _draw(key, z):
    """Gumbel-max draw from ``softmax(z)`` over the last axis; ``V`` where nothing is finite."""
    tokens = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    undrawable = ~jnp.any(z > -jnp.inf, axis=-1)  # NaN rows compare False too
    return jnp.where(undrawable, z.shape[-1], tokens)


@partial(jax.jit, static_argnames="k")
def _sample_candidates(key, x, temperature, top_p, min_p, k: int):
    """:func:`sample` with a static ``top_k``: draws among the ``k`` candidates only.

    Every surviving token is among the candidates unless the final cut sits at the ``k``-th
    value and tokens outside the candidates tie with it; only rows in that (rare) case need
    a draw over the whole vocabulary, and ``lax.cond`` computes it only when some row does.
    Otherwise the draw costs ``k`` Gumbel variates a row instead of ``V``.
    """
    key_c, key_full = jax.random.split(key)
    z, greedy = _tempered(x, temperature)
    keep = z > -jnp.inf
    c = _static_top_k_cuts(z, keep, k, top_p)
    cut = c.kth if c.cut_p is None else jnp.maximum(c.kth, c.cut_p)
    keep_c = (c.vals >= cut) & (c.vals > -jnp.inf)
    if min_p is not None:
        # The same arithmetic as the full path on the same values: the same decisions.
        keep_c = _min_p(_unnormalised(c.vals, keep_c), keep_c, min_p)
    g = jax.random.gumbel(key_c, c.vals.shape, jnp.float32)
    pick = jnp.argmax(jnp.where(keep_c, c.vals + g, -jnp.inf), axis=-1, keepdims=True)
    tokens = jnp.take_along_axis(c.idx, pick, axis=-1)[..., 0].astype(jnp.int32)
    needs_full = ((cut == c.kth) & (c.n_extra > 0))[..., 0]

    def full(operands):
        # The barrier pins the whole-vocabulary work inside the branch: without it XLA's
        # conditional code motion hoists the V random draws out and runs them every time.
        x, key_full = lax.optimization_barrier(operands)
        knobs = dict(temperature=temperature, top_k=k, top_p=top_p, min_p=min_p)
        return jnp.where(needs_full, _draw(key_full, _filter_impl(x, knobs)), tokens)

    tokens = lax.cond(jnp.any(needs_full), full, lambda _: tokens, (x, key_full))
    tokens = jnp.where(greedy[..., 0], jnp.argmax(x, axis=-1).astype(jnp.int32), tokens)
    drawable = jnp.any(x > -jnp.inf, axis=-1) & ~jnp.any(jnp.isnan(x), axis=-1)
    return jnp.where(drawable, tokens, x.shape[-1])


# ---------------------------------------------------------------------------------------
# the oracle: a plain sort-based implementation of the same semantics


def filter_logits_reference(
    logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, axis: int = -1
) -> jax.Array:
    """:func:`filter_logits` by sorting each row (the textbook way; tests and benchmarks).

    Sorts the tempered logits descending, cuts top-k at the ``k``-th value, top-p at the first
    position whose cumulative renormalised probability reaches ``top_p``, min-p against the
    top probability, each cut kept with its ties, and maps the cuts back by value.
    """
    x, knobs = _prepare(logits, axis, temperature, top_k, top_p, min_p)
    k = knobs["top_k"]
    k = None if k is None else jnp.broadcast_to(jnp.asarray(k, jnp.int32), x.shape[:-1])
    out = _reference_jit(x, knobs["temperature"], k, knobs["top_p"], knobs["min_p"])
    return jnp.moveaxis(out, -1, _checks.normalize_axes(axis, x.ndim)[0])


@jax.jit
def _reference_jit(x, temperature, k, top_p, min_p):
    z, greedy = _tempered(x, temperature)
    v = z.shape[-1]
    srt = -jnp.sort(-z, axis=-1)
    keep_s = srt > -jnp.inf
    if k is not None:
        k = k[..., None]
        kth = jnp.take_along_axis(srt, jnp.clip(k - 1, 0, v - 1), axis=-1)
        keep_s = keep_s & ((k <= 0) | (srt >= kth))
    if top_p is not None:
        p = top_p[..., None]
        e = jnp.where(keep_s, jnp.exp(srt - srt[..., :1]), 0.0)
        mass = jnp.cumsum(e, axis=-1)
        first = jnp.argmax(mass >= p * mass[..., -1:], axis=-1, keepdims=True)
        keep_s = keep_s & ((p >= 1) | (srt >= jnp.take_along_axis(srt, first, axis=-1)))
    if min_p is not None:
        m = min_p[..., None]
        e = jnp.where(keep_s, jnp.exp(srt - srt[..., :1]), 0.0)
        keep_s = keep_s & ((m <= 0) | (e >= m))
    # The kept set is a prefix of the sorted row: everything >= its last value.
    last = jnp.sum(keep_s, axis=-1, keepdims=True) - 1
    cut = jnp.take_along_axis(srt, jnp.clip(last, 0, v - 1), axis=-1)
    keep = (z >= cut) & (last >= 0)
    first_max = jnp.arange(v) == jnp.argmax(x, axis=-1, keepdims=True)
    keep = jnp.where(greedy, first_max & (x > -jnp.inf), keep)
    z = jnp.where(greedy, 0.0, z)
    nan_row = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
    return jnp.where(nan_row, jnp.nan, jnp.where(keep, z, -jnp.inf))


def sample_reference(
    key, logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, axis: int = -1
) -> jax.Array:
    """:func:`sample` on top of :func:`filter_logits_reference` (same key, same draw)."""
    z = filter_logits_reference(
        logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, axis=axis
    )
    return _draw(key, jnp.moveaxis(z, axis, -1))
