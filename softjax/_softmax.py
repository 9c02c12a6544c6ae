"""Stable, exact softmax, log-softmax and logsumexp.

All three share one forward computation (:func:`softjax._numerics.shift_rows`) and have
custom JVP rules that save the smallest residual: ``softmax`` and ``log_softmax`` save their
output, ``logsumexp`` the probabilities it implies. Reverse mode follows from the JVP by
JAX's linearisation, so ``grad``, ``jacfwd``, ``jacrev`` and higher orders all work.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from . import _checks
from . import _numerics as nx

Axis = int | Sequence[int] | None


def _prepare(x, axis: Axis, where):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.integer):
        # As jax.nn: integer inputs are computed in, and returned as, float32 (exact up to
        # 2**24, the float32 integers). Booleans stay a TypeError.
        x = x.astype(jnp.float32)
    x = _checks.floating(x, "x")
    axes = _checks.normalize_axes(axis, x.ndim)
    return x, axes, _checks.mask(where, x.shape)


def _tempered_tangent(t, x_dot, t_dot, shifted):
    """The tangent of the tempered logits ``x / T`` (up to a per-row constant).

    ``d(x / T) = (dx - (x / T) dT) / T``; softmax is shift invariant, so the shifted
    ``(x - max) / T`` stands in for ``x / T`` and the huge ``x * dT`` cancellation of the
    plain formula never happens.
    """
    dz = nx.upcast(x_dot) if not isinstance(x_dot, SymbolicZero) else jnp.zeros_like(shifted.hi)
    if t is None:
        return dz
    if not isinstance(t_dot, SymbolicZero):
        dt = t_dot.astype(dz.dtype)
        dz = dz - jnp.where(jnp.isfinite(shifted.hi), shifted.hi + shifted.lo, 0.0) * dt
    # T = 0 is the limit T -> 0+: piecewise constant in x and T, so its tangent is 0.
    return nx.safe_divide(dz, t)


# ---------------------------------------------------------------------------------------
# softmax


def _softmax_value(x, where, t, axes):
    s = nx.shift_rows(nx.upcast(x), axes, where, _compute_t(t, x.dtype))
    e = nx.exp_compensated(s.hi, s.lo)
    return nx.safe_divide(e, nx.compensated_sum(e, axes)), s


def _compute_t(t, dtype):
    """The temperature in the compute dtype; below the normal range it is 0 (``T -> 0+``)."""
    if t is None:
        return None
    return nx.flush_temperature(jnp.asarray(t).astype(nx.compute_dtype(dtype)))


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _softmax(x, where, t, axes):
    return _softmax_value(x, where, t, axes)[0].astype(x.dtype)


@partial(_softmax.defjvp, symbolic_zeros=True)
def _softmax_jvp(axes, primals, tangents):
    x, where, t = primals
    x_dot, _, t_dot = tangents
    p, shifted = _softmax_value(x, where, t, axes)
    dz = _tempered_tangent(_compute_t(t, x.dtype), x_dot, t_dot, shifted)
    # dz is finite everywhere (masked and -inf entries included, and T = 0), so p * dz is
    # exactly 0 where p is; the only residual is p itself.
    dp = p * (dz - jnp.sum(p * dz, axis=axes, keepdims=True))
    return p.astype(x.dtype), dp.astype(x.dtype)


def softmax(
    x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None, *, temperature: ArrayLike = 1.0
) -> jax.Array:
    r"""Softmax, ``exp(x / T) / sum(exp(x / T))`` along ``axis``.

    .. math::
        \mathrm{softmax}(x)_i = \frac{\exp(x_i / T)}{\sum_{j \in \mathrm{where}} \exp(x_j / T)}

    Args:
      x: floating array of any shape ``[..., V, ...]``.
      axis: the axis or axes to normalise over (int, tuple of ints, or None for all).
      where: optional boolean array broadcastable to ``x``; False entries are excluded and
        get probability exactly 0.
      temperature: positive float, or a positive array broadcastable to ``x`` with size 1
        along the reduced axes (one temperature per row). Traced and differentiable.

    Returns:
      An array of the shape and dtype of ``x`` whose entries along ``axis`` sum to 1.

    Numerics: computed in float32 (float64 for float64 input) with a compensated max
    shift, so float32 results are within a few ulp of a float64 reference at any logit
    scale and bf16/f16 results are rounded once. A row with no valid entry (all masked or
    all ``-inf``) gives zeros and zero gradients, never NaN. A NaN in a row gives NaN in
    that row only.

    Example:
      >>> import softjax
      >>> softjax.softmax(jnp.array([1000.0, 999.0, 998.0]))
      Array([0.66524094, 0.24472848, 0.09003057], dtype=float32)
    """
    x, axes, where = _prepare(x, axis, where)
    t = _checks.temperature(temperature, x.shape, axes)
    return _softmax(x, where, t, axes)


# ---------------------------------------------------------------------------------------
# log_softmax


def _log_softmax_value(x, where, t, axes):
    s = nx.shift_rows(nx.upcast(x), axes, where, _compute_t(t, x.dtype))
    if t is None:
        log_norm = nx.log_normalizer(s.x, s.shift, axes)
    else:
        log_norm = nx.log_normalizer(s.hi, jnp.zeros_like(s.shift), axes, s.lo)
    if t is None:
        # x - (max + L) with max + L kept as an exact pair: one rounding.
        logp = nx.minus_compensated(s.x, *nx.two_sum(s.shift, log_norm))
    else:
        # (hi - L) + lo: hi <= 0 and L >= 0 never cancel.
        logp = (s.hi - log_norm) + s.lo
    # The clamp only removes the sign of a rounding residue at the maximum, so no
    # log-probability is ever positive.
    logp = jnp.minimum(logp, 0.0)
    # Rule 5 of softjax._numerics: in a row holding +inf, those entries share the mass
    # (-log k) and the finite ones get -inf. Excluded entries are the constant -inf (no
    # derivative through log_norm).
    infinite = s.offset == jnp.inf
    logp = jnp.where(infinite & (s.x == jnp.inf), -log_norm, logp)
    minus_inf = (s.x == -jnp.inf) | (infinite & (s.x < s.shift))
    return jnp.where(minus_inf, -jnp.inf, logp), s


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _log_softmax(x, where, t, axes):
    return _log_softmax_value(x, where, t, axes)[0].astype(x.dtype)


@partial(_log_softmax.defjvp, symbolic_zeros=True)
def _log_softmax_jvp(axes, primals, tangents):
    x, where, t = primals
    x_dot, _, t_dot = tangents
    logp, shifted = _log_softmax_value(x, where, t, axes)
    dz = _tempered_tangent(_compute_t(t, x.dtype), x_dot, t_dot, shifted)
    p = jnp.exp(logp)
    # Entries at -inf (masked, or -inf logits) are constant: their tangent is 0.
    dz = jnp.where(logp == -jnp.inf, 0.0, dz)
    dlogp = dz - jnp.sum(nx.zero_where_prob_zero(p, dz), axis=axes, keepdims=True)
    dlogp = jnp.where(logp == -jnp.inf, 0.0, dlogp)
    return logp.astype(x.dtype), dlogp.astype(x.dtype)


def log_softmax(
    x: ArrayLike, axis: Axis = -1, where: ArrayLike | None = None, *, temperature: ArrayLike = 1.0
) -> jax.Array:
    r"""Log-softmax, ``x / T - logsumexp(x / T)`` along ``axis``.

    .. math::
        \log\mathrm{softmax}(x)_i = \frac{x_i}{T} - \log \sum_{j \in \mathrm{where}}
        \exp\frac{x_j}{T}

    Args:
      x: floating array of any shape.
      axis: the axis or axes to normalise over (int, tuple of ints, or None for all).
      where: optional boolean array broadcastable to ``x``; False entries get ``-inf``.
      temperature: as in :func:`softmax`.

    Returns:
      An array of the shape and dtype of ``x``; every entry is ``<= 0``.

    Numerics: the normaliser is ``log1p`` of the sum of the non-maximal terms, so the
    log-probability of a dominant class keeps its full relative accuracy (``-1e-30``
    rather than exactly ``0``). Rows with no valid entry give ``-inf`` with zero gradient.

    Example:
      >>> softjax.log_softmax(jnp.array([0.0, -80.0]))
      Array([-1.8048513e-35, -8.0000000e+01], dtype=float32)
    """
    x, axes, where = _prepare(x, axis, where)
    t = _checks.temperature(temperature, x.shape, axes)
    return _log_softmax(x, where, t, axes)


# ---------------------------------------------------------------------------------------
# logsumexp


def logsumexp_with_probs(x, axes, where):
    """``(logsumexp(x), softmax(x))`` over ``axes`` (dims kept), in the compute dtype.

    Shared with the losses, which need both. Empty rows give ``(-inf, 0)``.
    """
    s = nx.shift_rows(nx.upcast(x), axes, where)
    e = nx.exp_compensated(s.hi, s.lo)
    log_norm = nx.log_normalizer(s.x, s.shift, axes)
    lse = jnp.where(s.empty, -jnp.inf, s.shift + log_norm) + s.offset
    p = nx.safe_divide(e, nx.compensated_sum(e, axes))
    return lse, p


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _logsumexp(x, where, axes):
    return logsumexp_with_probs(x, axes, where)[0].astype(x.dtype)


@partial(_logsumexp.defjvp, symbolic_zeros=True)
def _logsumexp_jvp(axes, primals, tangents):
    x, where = primals
    x_dot, _ = tangents
    lse, p = logsumexp_with_probs(x, axes, where)
    if isinstance(x_dot, SymbolicZero):
        return lse.astype(x.dtype), jnp.zeros_like(lse, dtype=x.dtype)
    dlse = jnp.sum(nx.zero_where_prob_zero(p, nx.upcast(x_dot)), axis=axes, keepdims=True)
    return lse.astype(x.dtype), dlse.astype(x.dtype)


def logsumexp(
    x: ArrayLike, axis: Axis = -1, *, where: ArrayLike | None = None, keepdims: bool = False
) -> jax.Array:
    r"""``log(sum(exp(x)))`` along ``axis``, without overflow.

    .. math::
        \mathrm{logsumexp}(x) = m + \log\Big(1 + \sum_{j \ne \arg\max} e^{x_j - m}\Big),
        \quad m = \max_{j \in \mathrm{where}} x_j

    Args:
      x: floating array of any shape.
      axis: the axis or axes to reduce (int, tuple of ints, or None for all).
      where: optional boolean array broadcastable to ``x``; False entries are excluded.
      keepdims: keep the reduced axes with size 1.

    Returns:
      An array of the dtype of ``x``: ``-inf`` for rows with no valid entry (with zero
      gradient); its gradient is the softmax of ``x``.

    Example:
      >>> softjax.logsumexp(jnp.array([1000.0, 1000.0]))
      Array(1000.6931, dtype=float32)
    """
    x, axes, where = _prepare(x, axis, where)
    out = _logsumexp(x, where, axes)
    return out if keepdims else jnp.squeeze(out, axis=axes)
