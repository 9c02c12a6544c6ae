"""Next-token sampling with Hugging Face's logit processors, exact and traced.

The logits ``x`` go through these steps, in the order of Hugging Face transformers'
``GenerationMixin._get_logits_processor`` (verified on transformers 5.25.0), each step on
what the previous one left:

1. **penalties**, on the raw logits, for the tokens in ``prev_tokens``:
   ``repetition_penalty`` ``r`` (Hugging Face's ``RepetitionPenaltyLogitsProcessor``):
   ``x_i / r`` where ``x_i > 0``, ``x_i * r`` otherwise, once per token seen; then
   ``frequency_penalty`` and ``presence_penalty`` (OpenAI's definition, as vLLM applies it):
   ``x_i - frequency_penalty * c_i - presence_penalty * [c_i > 0]``, ``c_i`` the number of
   times token ``i`` occurs. They apply to greedy rows too (Hugging Face applies its
   processors whether it samples or not).
2. **temperature** ``T``: ``z = x / T``; ``T = 0`` is greedy decoding (the first maximal
   index, never NaN).
3. **top-k**: keep the ``max(k, m)`` largest ``z`` (and every token tied with the last).
4. **top-p**: with ``p`` the softmax of ``z`` over the tokens still kept, keep the smallest
   set of most likely tokens whose probability reaches ``top_p`` (and every token tied with
   the last one of that set).
5. **min-p**: keep the tokens with ``p_i >= min_p * max_j p_j``.
6. **typical-p** (locally typical sampling, Meister et al. 2022): with ``H`` the entropy of
   ``p``, keep the smallest set of tokens of least ``|-log p_i - H|`` whose probability
   reaches ``typical_p`` (ties kept). It may drop the most likely token.
7. **epsilon**: keep the tokens with ``p_i >= epsilon_cutoff``.
8. **eta** (Hewitt et al. 2022): keep the tokens with ``p_i >= eta``,
   ``eta = min(eta_cutoff, sqrt(eta_cutoff) * exp(-H))``.

and a token is then drawn from the softmax of ``z`` over what survived (Gumbel-max). Steps
4-8 recompute ``p`` (and ``H``) over what the previous step kept, as Hugging Face does. No
step removes the ``m = min_tokens_to_keep`` most likely tokens it is given (the ``m`` most
typical ones for typical-p), ties kept, so at least one token always survives.

Where Hugging Face breaks a tie at a cut by its sort order, every tied token is kept here;
otherwise the kept sets are those of transformers' processors, and the kept values agree to
an ulp. Its ``top_h`` (transformers 5, between temperature and top-k) is not provided.

Every knob is a scalar or an array of the batch shape (one value per row) and may be traced:
rows are selected with ``jnp.where``, never with Python branches, so one compiled function
serves any mix of settings; a knob left at None costs nothing. Only ``top_k`` and
``min_tokens_to_keep`` given as Python ints are static; a static ``top_k`` takes the
``lax.top_k`` path, which never sorts the vocabulary.

Thresholds are found without sorting: a float32 value's order is the order of its bit
pattern read as a (sign-folded) integer, so "the largest threshold whose kept count (or kept
probability) reaches the target" is a bisection over 32 bits: 32 fused passes over the row,
each a compare and a sum. That is exact (the kept set of a sort with ties kept) and, on CPU at
vocabulary 262144, several times cheaper than sorting the row (``python -m bench``). Top-p
bisects on the logits' keys, typical-p on the keys of ``-|log p_i + H|``.

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
from ._softmax import log_softmax

__all__ = ["filter_logits", "filter_logits_reference", "sample"]

# Search bits of a float32 key: the bisection narrows an interval of < 2**32 keys.
_KEY_BITS = 32
_SIGN = np.uint32(0x80000000)

# The floating knobs besides temperature: name -> the kind of value it takes (_RULES).
_FLOAT_KNOBS = {
    "top_p": "unit",
    "min_p": "unit",
    "typical_p": "unit",
    "epsilon_cutoff": "unit",
    "eta_cutoff": "unit",
    "repetition_penalty": "positive",
    "presence_penalty": "finite",
    "frequency_penalty": "finite",
}
_PENALTIES = ("repetition_penalty", "presence_penalty", "frequency_penalty")

# kind -> (the test a concrete value must pass, what the message says it must be)
_RULES = {
    "int": (lambda v: v >= 0, ">= 0"),
    "int1": (lambda v: v >= 1, ">= 1"),
    "nonneg": (lambda v: v >= 0, ">= 0"),
    "unit": (lambda v: (v >= 0) & (v <= 1), "in [0, 1]"),
    "positive": (lambda v: (v > 0) & np.isfinite(v), "> 0 and finite"),
    "finite": (np.isfinite, "finite"),
}


# ---------------------------------------------------------------------------------------
# validation


def _is_static(n) -> bool:
    """A Python (or NumPy) int, which is a static setting; arrays are traced."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool)


def _check(arr, name: str, kind: str) -> None:
    ok, what = _RULES[kind]
    v = _checks.concrete_value(arr)
    if v is not None and not np.all(ok(v)):
        shown = repr(v.item()) if v.size == 1 else f"an array with min {np.min(v)!r}"
        raise ValueError(f"{name} must be {what}, got {shown}")


def _knob(value, name: str, batch_shape: tuple, kind: str):
    """``value`` (None, scalar or per-row array) checked and broadcast to ``batch_shape``.

    Returns None for None, else an array of ``batch_shape``: int32 for the integer kinds,
    float32 otherwise. Concrete values are checked (:data:`_RULES`); traced ones pass.
    """
    if value is None:
        return None
    if kind in ("int", "int1"):
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
    _check(arr, name, kind)
    return arr.astype(jnp.int32 if kind in ("int", "int1") else jnp.float32)


def _static_count(value, name: str, least: int) -> int:
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


def _prev_tokens(prev, batch_shape: tuple):
    """``prev_tokens`` as int32 ``batch_shape + (L,)`` (ids outside the vocabulary kept as
    they are: they are ignored later)."""
    prev = _checks.integer(prev, "prev_tokens")
    if prev.ndim == 0:
        raise ValueError(
            "prev_tokens must have at least one axis (the previous token ids, [..., L]), "
            "got a scalar"
        )
    what = f"the batch shape {batch_shape} (the logits' shape without the sampled axis)"
    _checks.broadcasts_to(prev.shape[:-1], batch_shape, "prev_tokens's leading axes", what)
    prev = _checks.class_labels(prev, "prev_tokens")
    return jnp.broadcast_to(prev, batch_shape + prev.shape[-1:])


def _prepare(logits, axis, options: dict):
    """``logits`` as float32 with the vocabulary last, and the knobs checked (a dict).

    ``top_k`` and ``min_tokens_to_keep`` stay Python ints where given so (static); top-k's
    ``k`` is raised to ``min_tokens_to_keep`` here (as Hugging Face does), so the filters
    see the effective ``k``. Every other knob is None or a per-row array.
    """
    logits = _checks.floating(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis (the vocabulary), got a scalar")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    (ax,) = _checks.normalize_axes(int(axis), logits.ndim)
    # The vocabulary goes last: every reduction below is then over axis -1.
    x = jnp.moveaxis(nx.upcast(logits), ax, -1).astype(jnp.float32)
    batch = x.shape[:-1]
    if options["temperature"] is None:
        raise TypeError("temperature must be a float or a floating array, got None")
    knobs = dict(temperature=_knob(options["temperature"], "temperature", batch, "nonneg"))
    m = 1 if options["min_tokens_to_keep"] is None else options["min_tokens_to_keep"]
    if _is_static(m):
        m = _static_count(m, "min_tokens_to_keep", 1)
    else:
        # A traced value below 1 counts as 1: the kept set is never empty.
        m = jnp.maximum(_knob(m, "min_tokens_to_keep", batch, "int1"), 1)
    k = options["top_k"]
    if _is_static(k):
        k = _static_count(k, "top_k", 0)
        if k > 0 and not (_is_static(m) and m == 1):
            k = max(k, m) if _is_static(m) else jnp.maximum(jnp.int32(k), m)
    else:
        k = _knob(k, "top_k", batch, "int")
        if k is not None and not (_is_static(m) and m == 1):
            k = jnp.where(k > 0, jnp.maximum(k, m), 0)
    knobs.update(top_k=k, min_tokens_to_keep=m)
    for name, kind in _FLOAT_KNOBS.items():
        knobs[name] = _knob(options[name], name, batch, kind)
    prev = options["prev_tokens"]
    if any(knobs[p] is not None for p in _PENALTIES):
        if prev is None:
            given = [p for p in _PENALTIES if knobs[p] is not None]
            raise ValueError(
                f"{given[0]} needs prev_tokens, the ids of the tokens seen so far ([..., L])"
            )
        knobs["prev_tokens"] = _prev_tokens(prev, batch)
    else:
        knobs["prev_tokens"] = None  # not needed: never read
    return x, knobs


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
# the penalties, on the raw float32 logits x [..., V]


def _token_counts(prev: jax.Array, v: int) -> jax.Array:
    """int32 ``[..., V]``: how often each token occurs in ``prev`` ``[..., L]``.

    Ids outside ``[0, V)`` are padding (a scatter-add drops them), never wrapped onto a
    token: ``-1`` does not count for token ``V - 1``.
    """
    lead = prev.shape[:-1]
    flat = prev.reshape(-1, prev.shape[-1])
    ids = jnp.where((flat >= 0) & (flat < v), flat, v)
    rows = jnp.arange(flat.shape[0])[:, None]
    counts = jnp.zeros((flat.shape[0], v), jnp.int32).at[rows, ids].add(1, mode="drop")
    return counts.reshape(lead + (v,))


def _penalised(x, knobs):
    """The repetition, frequency and presence penalties applied to ``x`` (float32)."""
    r, f, pr = knobs["repetition_penalty"], knobs["frequency_penalty"], knobs["presence_penalty"]
    if r is None and f is None and pr is None:
        return x
    counts = _token_counts(knobs["prev_tokens"], x.shape[-1])
    seen = counts > 0
    if r is not None:
        r = r[..., None]
        x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
    if f is not None:
        x = x - f[..., None] * counts.astype(jnp.float32)
    if pr is not None:
        x = x - pr[..., None] * seen.astype(jnp.float32)
    return x


# ---------------------------------------------------------------------------------------
# the filters, on float32 rows [..., V] of tempered logits z


def _unnormalised(z: jax.Array, keep: jax.Array) -> jax.Array:
    """``exp(z - max z)`` over the kept tokens (0 elsewhere), compensated, float32."""
    s = nx.shift_rows(z, (z.ndim - 1,), keep)
    return jnp.where(keep, nx.exp_compensated(s.hi, s.lo), 0.0)


def _probs_entropy(z, keep):
    """``(p, log p, H)`` of the softmax of ``z`` over the kept tokens (``H`` dims kept)."""
    logp = log_softmax(z, axis=-1, where=keep)
    p = jnp.exp(logp)
    h = -nx.compensated_sum(jnp.where(keep, p * logp, 0.0), (z.ndim - 1,))
    return p, logp, h


def _top_m(keys, vals, keep, m):
    """The kept tokens among the ``m`` largest ``vals`` of the kept ones (ties kept).

    ``keys`` are the order keys of ``vals``. A static ``m`` takes the ``m``-th largest value
    from ``lax.top_k`` (a max for ``m == 1``); a traced one (per row) bisects on the keys.
    Where fewer than ``m`` tokens are kept, all of them are.
    """
    if _is_static(m):
        masked = jnp.where(keep, vals, -jnp.inf)
        mm = min(m, vals.shape[-1])
        if mm == 1:
            cut = jnp.max(masked, axis=-1, keepdims=True)
        else:  # (the barrier: see _static_top_k_cuts)
            cut = lax.optimization_barrier(lax.top_k(masked, mm))[0][..., -1:]
        return keep & (vals >= cut)
    m = m[..., None]

    def reaches(mask):
        return jnp.sum(mask & keep, axis=-1, keepdims=True, dtype=jnp.int32) >= m

    return keep & (keys >= _largest_key(keys, reaches))


def _keeps_top(m) -> bool:
    """True where top-p, min-p and typical-p keep enough by themselves (``m == 1``)."""
    return _is_static(m) and m == 1


def _protected(keep, protect):
    return keep if protect is None else keep | protect


def _top_k_traced(z, keys, keep, k):
    """Keeps the ``k`` largest (ties kept) where ``k > 0``; ``k`` int32 per row."""
    k = k[..., None]

    def reaches(mask):
        return jnp.sum(mask & keep, axis=-1, keepdims=True, dtype=jnp.int32) >= k

    cut = _largest_key(keys, reaches)
    return keep & ((k <= 0) | (keys >= cut))


def _top_p_bisect(e, keys, keep, p, protect=None):
    """Keeps the smallest set of largest ``keys`` with mass ``>= p`` (ties kept) where
    ``p < 1``, and the ``protect`` ones; ``e`` is proportional to the probabilities."""
    p = p[..., None]
    target = p * jnp.sum(e, axis=-1, keepdims=True)

    def reaches(mask):
        return jnp.sum(jnp.where(mask, e, 0.0), axis=-1, keepdims=True) >= target

    cut = _largest_key(keys, reaches)
    return _protected(keep & ((p >= 1) | (keys >= cut)), protect)


def _min_p(e, keep, min_p, protect=None):
    """Keeps ``p_i >= min_p * max p``; ``e`` is 1 at the maximum, so that is ``e >= min_p``."""
    m = min_p[..., None]
    return _protected(keep & ((m <= 0) | (e >= m)), protect)


def _typical(z, keep, mass, m):
    """Locally typical sampling: a top-p on the keys of ``-|log p_i + H|``."""
    p, logp, h = _probs_entropy(z, keep)
    typicality = jnp.where(keep, -jnp.abs(logp + h), -jnp.inf)
    keys = _order_key(typicality)
    protect = None if _keeps_top(m) else _top_m(keys, typicality, keep, m)
    return _top_p_bisect(p, keys, keep, mass, protect)


def _cutoff(z, keep, cutoff, protect, eta: bool):
    """Epsilon (``p_i >= cutoff``) or eta sampling, keeping the ``protect`` tokens."""
    p, _, h = _probs_entropy(z, keep)
    c = cutoff[..., None]
    if eta:
        c = jnp.minimum(c, jnp.sqrt(c) * jnp.exp(-h))
    return keep & ((p >= c) | protect)


def _tail_filters(z, keys, keep, knobs, protect):
    """Min-p, typical-p, epsilon and eta, in that order, on what top-k and top-p kept.

    ``protect`` is the set of the ``m`` most likely kept tokens where already known (None
    otherwise). Top-k, top-p, min-p, epsilon and eta all keep it, so it is found once and
    reused; typical-p may drop it, so after typical-p it is found again.
    """
    m = knobs["min_tokens_to_keep"]
    if knobs["min_p"] is not None:
        if protect is None and not _keeps_top(m):
            protect = _top_m(keys, z, keep, m)
        keep = _min_p(_unnormalised(z, keep), keep, knobs["min_p"], protect)
    if knobs["typical_p"] is not None:
        keep = _typical(z, keep, knobs["typical_p"], m)
        protect = None
    for name in ("epsilon_cutoff", "eta_cutoff"):
        if knobs[name] is not None:
            if protect is None:
                protect = _top_m(keys, z, keep, m)
            keep = _cutoff(z, keep, knobs[name], protect, eta=name == "eta_cutoff")
    return keep


class _Candidates(NamedTuple):
    """The ``k`` largest tempered logits of each row and the cuts found from them alone."""

    vals: jax.Array  # [..., k], descending
    idx: jax.Array  # [..., k], their token indices
    kth: jax.Array  # [..., 1], the top-k cut
    cut_p: jax.Array | None  # [..., 1], the top-p cut (-inf where top_p >= 1), or None
    n_extra: jax.Array  # [..., 1], tokens outside the candidates tied with the k-th value


def _static_top_k_cuts(z, keep, k: int, top_p, m: int) -> _Candidates:
    """Top-k and top-p cut values from the ``k`` largest logits only (no vocabulary sort).

    ``lax.top_k`` gives the candidates sorted. Tokens outside them that tie with the ``k``-th
    value are kept too (as by the traced path), so they are counted and their mass added to
    the total; top-p then runs on the candidates' cumulative mass: the cut is the first
    candidate whose inclusive cumulative mass reaches ``top_p`` of the total (or the ``k``-th
    value, which the extra ties complete), lowered to the ``m``-th candidate (``m <= k``).
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
    if m > 1:
        cut_p = jnp.minimum(cut_p, vals[..., m - 1 : m])
    return _Candidates(vals, idx, kth, jnp.where(p >= 1, -jnp.inf, cut_p), n_extra)


def _keep_mask(z, knobs):
    """The boolean mask of the tokens that survive all filters; ``z`` float32 [..., V]."""
    top_k, top_p, m = knobs["top_k"], knobs["top_p"], knobs["min_tokens_to_keep"]
    keep = z > -jnp.inf
    keys = _order_key(z)  # (dropped by XLA where no filter reads it)
    protect = None  # the m most likely kept tokens, where found
    if _is_static(top_k) and 0 < top_k < z.shape[-1]:
        c = _static_top_k_cuts(z, keep, int(top_k), top_p, m)
        keep = keep & (z >= c.kth)
        if c.cut_p is not None:
            keep = keep & (z >= c.cut_p)
        if m > 1:
            protect = keep & (z >= c.vals[..., m - 1 : m])
    else:
        if top_k is not None and not _is_static(top_k):
            keep = _top_k_traced(z, keys, keep, top_k)
        if top_p is not None:
            if not _keeps_top(m):
                protect = _top_m(keys, z, keep, m)
            keep = _top_p_bisect(_unnormalised(z, keep), keys, keep, top_p, protect)
    return _tail_filters(z, keys, keep, knobs, protect)


def _tempered(x, t):
    """``x / T`` with rows at ``T == 0`` left untempered (they are greedy)."""
    greedy = (t == 0)[..., None]
    safe_t = jnp.where(greedy, 1.0, t[..., None])
    return x / safe_t, greedy


def _split_static(knobs):
    """The traced knobs (a dict of arrays and Nones) and the static ``top_k`` and ``m``."""
    traced = dict(knobs)
    static = {}
    for name in ("top_k", "min_tokens_to_keep"):
        if _is_static(knobs[name]):
            static[name] = int(knobs[name])
            traced[name] = None
    return traced, static.get("top_k"), static.get("min_tokens_to_keep")


@partial(jax.jit, static_argnames=("static_k", "static_m"))
def _filter_jit(x, knobs, static_k, static_m):
    # Jitted whole (also when called eagerly): the bisection is a loop of small ops.
    knobs = dict(knobs)
    if static_k is not None:
        knobs["top_k"] = static_k
    if static_m is not None:
        knobs["min_tokens_to_keep"] = static_m
    return _filter_impl(x, knobs)


def _filter(x, knobs):
    traced, static_k, static_m = _split_static(knobs)
    return _filter_jit(x, traced, static_k, static_m)


def _filter_impl(x, knobs):
    return _filter_penalised(_penalised(x, knobs), knobs)


def _filter_penalised(x, knobs):
    z, greedy = _tempered(x, knobs["temperature"])
    keep = _keep_mask(z, knobs)
    # Greedy rows keep only the first maximal logit, so a draw returns it exactly.
    first_max = jnp.arange(x.shape[-1]) == jnp.argmax(x, axis=-1, keepdims=True)
    keep = jnp.where(greedy, first_max & (x > -jnp.inf), keep)
    z = jnp.where(greedy, 0.0, z)
    nan_row = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
    return jnp.where(nan_row, jnp.nan, jnp.where(keep, z, -jnp.inf))


def filter_logits(
    logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    typical_p=None,
    epsilon_cutoff=None,
    eta_cutoff=None,
    min_tokens_to_keep=1,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    prev_tokens=None,
    axis: int = -1,
) -> jax.Array:
    r"""The penalised, tempered logits with the filtered-out tokens set to ``-inf`` (float32).

    ``sample`` draws from ``softmax`` of this array; it is exposed for inspecting what the
    filters keep. See :func:`sample` for the arguments and the order of the steps. Rows at
    ``temperature == 0`` come back as ``0`` at their first maximal (penalised) logit and
    ``-inf`` elsewhere; a row holding a NaN comes back all NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.sampling.filter_logits(jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05])), top_p=0.8)
      Array([-0.6931472, -1.2039728,       -inf,       -inf], dtype=float32)
    """
    x, knobs = _prepare(logits, axis, locals())  # locals(): the arguments, by name
    out = _filter(x, knobs) if x.shape[-1] else x  # an empty vocabulary stays empty
    return jnp.moveaxis(out, -1, _checks.normalize_axes(axis, x.ndim)[0])


def sample(
    key,
    logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    typical_p=None,
    epsilon_cutoff=None,
    eta_cutoff=None,
    min_tokens_to_keep=1,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    prev_tokens=None,
    axis: int = -1,
) -> jax.Array:
    """Draws one token per row after the penalties, temperature and Hugging Face's filters.

    With ``x`` the penalised logits, ``z = x / T`` and ``S`` the tokens surviving top-k,
    top-p, min-p, typical-p, epsilon and eta, in this order, each on the softmax of ``z``
    over what the previous one kept (see :mod:`softjax.sampling` for each rule)::

           P(i) = exp(z_i) / Σ_{j ∈ S} exp(z_j)    (i ∈ S),
        S_top-p = { i : z_i ≥ z_(m) },
              m = min { m : Σ_{r ≤ m} p_(r) ≥ top_p }

    where ``p_(1) ≥ p_(2) ≥ …`` are the sorted probabilities. Typical-p is the same cut with
    the tokens ordered by ``|-log p_i - H|`` (increasing), ``H = -Σ p_i log p_i``.

    Args:
      key: a JAX PRNG key.
      logits: floating array ``[..., V, ...]``, any dtype (computed in float32).
      temperature: ``>= 0``; ``0`` is greedy (the lowest index among the maxima of the
        penalised logits, no randomness, filters irrelevant). Scalar or array of the batch
        shape (``logits`` without ``axis``), traced, as are all the knobs below.
      top_k: ``>= 0``; ``0`` or None keeps all. A Python int is static and takes the
        sort-free ``lax.top_k`` path; an integer array (batch shape) is traced per row.
      top_p: in ``[0, 1]``; ``1`` or None keeps all, ``0`` keeps the top token (and its ties).
        The cumulative mass is float32 for any dtype.
      min_p: in ``[0, 1]``; ``0`` or None keeps all.
      typical_p: in ``[0, 1]``; ``1`` or None keeps all, ``0`` the most typical token.
      epsilon_cutoff: in ``[0, 1]``; ``0`` or None keeps all. Paper values: 3e-4 to 9e-4.
      eta_cutoff: in ``[0, 1]``; ``0`` or None keeps all. Paper values: 3e-4 to 4e-3.
      min_tokens_to_keep: ``>= 1`` (Hugging Face's default 1): top-k keeps at least this
        many, and top-p, min-p, epsilon and eta never drop the ``min_tokens_to_keep`` most
        likely tokens they are given (typical-p: the most typical), ties kept. A Python int
        is static; an integer array (batch shape) is traced per row (and makes ``top_k``
        traced too).
      repetition_penalty: ``> 0``; ``1`` or None is none. Divides the positive logits of the
        tokens in ``prev_tokens`` by it and multiplies their other logits by it, once per
        token however often it occurs (Hugging Face).
      presence_penalty: any finite float; ``0`` or None is none. Subtracted once from the
        logits of the tokens in ``prev_tokens`` (OpenAI, vLLM; they use ``[-2, 2]``).
      frequency_penalty: any finite float; ``0`` or None is none. Subtracted from each
        token's logit once per occurrence in ``prev_tokens`` (OpenAI, vLLM).
      prev_tokens: integer array ``[..., L]`` of the token ids the penalties count (the
        prompt and what was generated, as Hugging Face's ``input_ids``), its leading axes
        broadcasting to the batch shape. Ids outside ``[0, V)`` are padding and ignored:
        a fixed-size buffer padded with ``-1`` works under ``jit``. Needed by the
        penalties, ignored without them.
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
      >>> softjax.sample(jax.random.key(0), jnp.array([2.0, 1.9, 0.0]), temperature=0.0,
      ...                repetition_penalty=1.3, prev_tokens=jnp.array([0, 0, -1]))
      Array(1, dtype=int32)
    """
    x, knobs = _prepare(logits, axis, locals())  # locals(): the arguments, by name
    if x.shape[-1] == 0:
        return jnp.zeros(x.shape[:-1], jnp.int32)  # an empty vocabulary: V = 0, nothing drawn
    top_k = knobs["top_k"]
    if _is_static(top_k) and 0 < top_k < x.shape[-1]:
        traced, k, m = _split_static(knobs)
        return _sample_candidates(key, x, traced, k, m)
    return _draw(key, _filter(x, knobs))


def _draw(key, z):
    """Gumbel-max draw from ``softmax(z)`` over the last axis; ``V`` where nothing is finite."""
    tokens = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    undrawable = ~jnp.any(z > -jnp.inf, axis=-1)  # NaN rows compare False too
    return jnp.where(undrawable, z.shape[-1], tokens)


@partial(jax.jit, static_argnames=("k", "m"))
def _sample_candidates(key, x, knobs, k: int, m: int):
    """:func:`sample` with a static ``top_k``: draws among the ``k`` candidates only.

    Every surviving token is among the candidates unless the top-k and top-p cut sits at
    the ``k``-th value and tokens outside the candidates tie with it; only rows in that
    (rare) case need the whole vocabulary, and ``lax.cond`` computes it only when some row
    does. Otherwise the later filters run on the ``k`` candidates and the draw costs ``k``
    Gumbel variates a row instead of ``V``.
    """
    key_c, key_full = jax.random.split(key)
    knobs = dict(knobs, top_k=k, min_tokens_to_keep=m)
    x = _penalised(x, knobs)
    z, greedy = _tempered(x, knobs["temperature"])
    keep = z > -jnp.inf
    c = _static_top_k_cuts(z, keep, k, knobs["top_p"], m)
    cut = c.kth if c.cut_p is None else jnp.maximum(c.kth, c.cut_p)
    keep_c = (c.vals >= cut) & (c.vals > -jnp.inf)
    protect = keep_c & (c.vals >= c.vals[..., m - 1 : m]) if m > 1 else None
    # The same filters as the full path, on the candidates: the other tokens are not kept,
    # and they would only add zeros to the sums.
    keep_c = _tail_filters(c.vals, _order_key(c.vals), keep_c, knobs, protect)
    g = jax.random.gumbel(key_c, c.vals.shape, jnp.float32)
    pick = jnp.argmax(jnp.where(keep_c, c.vals + g, -jnp.inf), axis=-1, keepdims=True)
    tokens = jnp.take_along_axis(c.idx, pick, axis=-1)[..., 0].astype(jnp.int32)
    needs_full = ((cut == c.kth) & (c.n_extra > 0))[..., 0]

    def full(operands):
        # The barrier pins the whole-vocabulary work inside the branch: without it XLA's
        # conditional code motion hoists the V random draws out and runs them every time.
        x, key_full = lax.optimization_barrier(operands)
        return jnp.where(needs_full, _draw(key_full, _filter_penalised(x, knobs)), tokens)

    tokens = lax.cond(jnp.any(needs_full), full, lambda _: tokens, (x, key_full))
    tokens = jnp.where(greedy[..., 0], jnp.argmax(x, axis=-1).astype(jnp.int32), tokens)
    drawable = jnp.any(x > -jnp.inf, axis=-1) & ~jnp.any(jnp.isnan(x), axis=-1)
    return jnp.where(drawable, tokens, x.shape[-1])


# ---------------------------------------------------------------------------------------
# the oracle: a plain sort-based implementation of the same semantics


def filter_logits_reference(
    logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    typical_p=None,
    epsilon_cutoff=None,
    eta_cutoff=None,
    min_tokens_to_keep=1,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    prev_tokens=None,
    axis: int = -1,
) -> jax.Array:
    """:func:`filter_logits` by sorting each row (the textbook way; tests and benchmarks).

    Counts the previous tokens with a one-hot sum (``[..., L, V]``). Sorts the tempered
    logits descending, cuts top-k at the ``k``-th value, top-p at the first position whose
    cumulative renormalised probability reaches ``top_p``, min-p against the top
    probability; then, on the kept set as a mask, typical-p by sorting ``-|log p + H|``
    and cutting its cumulative probability the same way, epsilon and eta elementwise. Each
    cut keeps its ties and the ``min_tokens_to_keep`` largest (most typical) values.
    """
    x, knobs = _prepare(logits, axis, locals())  # locals(): the arguments, by name
    v, batch = x.shape[-1], x.shape[:-1]
    k, m = knobs["top_k"], knobs["min_tokens_to_keep"]
    knobs["top_k"] = None if k is None else jnp.broadcast_to(jnp.asarray(k, jnp.int32), batch)
    knobs["min_tokens_to_keep"] = jnp.broadcast_to(jnp.asarray(m, jnp.int32), batch)
    out = _reference_jit(x, knobs) if v else x
    return jnp.moveaxis(out, -1, _checks.normalize_axes(axis, x.ndim)[0])


def _nth_largest(vals, keep, n):
    """The ``n``-th largest (``n [..., 1]``) of the kept ``vals`` (``-inf`` where fewer are
    kept), by sorting."""
    srt = -jnp.sort(-jnp.where(keep, vals, -jnp.inf), axis=-1)
    return jnp.take_along_axis(srt, jnp.clip(n - 1, 0, vals.shape[-1] - 1), axis=-1)


def _cumulative_cut(order_vals, p, keep, target):
    """The value of ``order_vals`` at the first position, in decreasing order, where the
    cumulative probability ``p`` (over ``keep``) reaches ``target`` of the total."""
    order = jnp.argsort(-jnp.where(keep, order_vals, -jnp.inf), axis=-1, stable=True)
    srt = jnp.take_along_axis(order_vals, order, axis=-1)
    mass = jnp.cumsum(jnp.take_along_axis(jnp.where(keep, p, 0.0), order, axis=-1), axis=-1)
    first = jnp.argmax(mass >= target[..., None] * mass[..., -1:], axis=-1, keepdims=True)
    return jnp.take_along_axis(srt, first, axis=-1)


@jax.jit
def _reference_jit(x, knobs):
    v = x.shape[-1]
    if any(knobs[p] is not None for p in _PENALTIES):
        one_hot = knobs["prev_tokens"][..., None] == jnp.arange(v)
        counts = jnp.sum(one_hot, axis=-2, dtype=jnp.int32)
        seen = counts > 0
        if knobs["repetition_penalty"] is not None:
            r = knobs["repetition_penalty"][..., None]
            x = jnp.where(seen, jnp.where(x > 0, x / r, x * r), x)
        if knobs["frequency_penalty"] is not None:
            x = x - knobs["frequency_penalty"][..., None] * counts.astype(jnp.float32)
        if knobs["presence_penalty"] is not None:
            x = x - knobs["presence_penalty"][..., None] * seen.astype(jnp.float32)
    z, greedy = _tempered(x, knobs["temperature"])
    m = knobs["min_tokens_to_keep"][..., None]
    # Top-k, top-p and min-p keep a prefix of the sorted row, and the m largest in it.
    srt = -jnp.sort(-z, axis=-1)
    keep_s = srt > -jnp.inf
    top_m = srt >= jnp.take_along_axis(srt, jnp.clip(m - 1, 0, v - 1), axis=-1)
    if knobs["top_k"] is not None:
        k = knobs["top_k"][..., None]
        kth = jnp.take_along_axis(srt, jnp.clip(k - 1, 0, v - 1), axis=-1)
        keep_s = keep_s & ((k <= 0) | (srt >= kth))
    if knobs["top_p"] is not None:
        p = knobs["top_p"][..., None]
        e = jnp.where(keep_s, jnp.exp(srt - srt[..., :1]), 0.0)
        mass = jnp.cumsum(e, axis=-1)
        first = jnp.argmax(mass >= p * mass[..., -1:], axis=-1, keepdims=True)
        cut = jnp.take_along_axis(srt, first, axis=-1)
        keep_s = keep_s & ((p >= 1) | (srt >= cut) | top_m)
    if knobs["min_p"] is not None:
        mp = knobs["min_p"][..., None]
        e = jnp.where(keep_s, jnp.exp(srt - srt[..., :1]), 0.0)
        keep_s = keep_s & ((mp <= 0) | (e >= mp) | top_m)
    last = jnp.sum(keep_s, axis=-1, keepdims=True) - 1
    keep = (z >= jnp.take_along_axis(srt, jnp.clip(last, 0, v - 1), axis=-1)) & (last >= 0)

    # Typical-p, epsilon and eta on the kept set as a mask.
    def protect(vals, keep):
        return keep & (vals >= _nth_largest(vals, keep, m))

    if knobs["typical_p"] is not None:
        logp = jax.nn.log_softmax(z, axis=-1, where=keep)
        p = jnp.exp(logp)
        h = -jnp.sum(jnp.where(keep, p * logp, 0.0), axis=-1, keepdims=True)
        typicality = jnp.where(keep, -jnp.abs(logp + h), -jnp.inf)
        mass = knobs["typical_p"]
        cut = _cumulative_cut(typicality, p, keep, mass)
        keep = keep & ((mass[..., None] >= 1) | (typicality >= cut) | protect(typicality, keep))
    for name in ("epsilon_cutoff", "eta_cutoff"):
        if knobs[name] is not None:
            logp = jax.nn.log_softmax(z, axis=-1, where=keep)
            p = jnp.exp(logp)
            c = knobs[name][..., None]
            if name == "eta_cutoff":
                h = -jnp.sum(jnp.where(keep, p * logp, 0.0), axis=-1, keepdims=True)
                c = jnp.minimum(c, jnp.sqrt(c) * jnp.exp(-h))
            keep = keep & ((p >= c) | protect(z, keep))
    first_max = jnp.arange(v) == jnp.argmax(x, axis=-1, keepdims=True)
    keep = jnp.where(greedy, first_max & (x > -jnp.inf), keep)
    z = jnp.where(greedy, 0.0, z)
    nan_row = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
    return jnp.where(nan_row, jnp.nan, jnp.where(keep, z, -jnp.inf))


def sample_reference(
    key,
    logits,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    min_p=None,
    typical_p=None,
    epsilon_cutoff=None,
    eta_cutoff=None,
    min_tokens_to_keep=1,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    prev_tokens=None,
    axis: int = -1,
) -> jax.Array:
    """:func:`sample` on top of :func:`filter_logits_reference` (same key, same draw)."""
    options = dict(locals())  # the arguments, by name
    del options["key"], options["logits"]
    z = filter_logits_reference(logits, **options)
    return _draw(key, jnp.moveaxis(z, axis, -1))
