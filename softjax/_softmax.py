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
from jax import lax
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
    t = _compute_t(t, x.dtype)
    s = nx.shift_rows(nx.upcast(x), axes, where, t)
    total = nx.compensated_sum(nx.exp_compensated(s.hi, s.lo), axes)
    # The output pass recomputes the exponentials from the input (in its own dtype: one
    # read of a bf16 x) rather than reading back those of the sum; see nx.unshared.
    hi, lo = nx.reshift(nx.upcast(nx.unshared(x)), s, where, t)
    return nx.safe_divide(nx.exp_compensated(hi, lo), total), s


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
    """Softmax, ``exp(x / T) / sum(exp(x / T))`` along ``axis``.

    ::

        softmax(x)_i = exp(x_i / T) / Σ_{j ∈ where} exp(x_j / T)

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
      >>> import jax.numpy as jnp
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
    s = nx.shift_rows(x, axes, where, _compute_t(t, x.dtype))
    if t is None:
        log_norm = nx.log_normalizer(s.native, s.shift, axes)
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
    """Log-softmax, ``x / T - logsumexp(x / T)`` along ``axis``.

    ::

        log softmax(x)_i = x_i / T - log Σ_{j ∈ where} exp(x_j / T)

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
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.log_softmax(jnp.array([0.0, -80.0]))
      Array([-1.8048515e-35, -8.0000000e+01], dtype=float32)
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
    s = nx.shift_rows(x, axes, where)
    e = nx.exp_compensated(s.hi, s.lo)
    log_norm = nx.log_normalizer(s.native, s.shift, axes)
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


def _weighted_logsumexp(x, b, axes, where):
    """``(log|sum(b exp(x))|, sign)`` over ``axes`` (dims kept), in the compute dtype.

    Entries with ``b == 0`` are excluded, from the maximum too: ``log(0 * e^1000 + e^0)``
    is 0, where a shift by 1000 would underflow the ``e^0`` to nothing. The signed terms are
    added by :func:`~softjax._numerics.compensated_sum`, which carries the rounding error of
    each addition, so cancelling terms lose no more than the cancellation itself. Rows where
    the sum is 0 (empty, or cancelled exactly) give ``-inf`` with sign 0 and zero gradient.
    """
    x = nx.upcast(x)
    b = jnp.broadcast_to(nx.upcast(b), x.shape)
    keep = b != 0 if where is None else (b != 0) & where
    x = nx.mask_invalid(x, keep)
    m = nx.row_max(x, axes)
    shift = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    # A +inf entry dominates: the sign of its weight decides (of the weights of all of them).
    at_inf = x == jnp.inf
    inf_weight = jnp.sum(jnp.where(at_inf, b, 0.0), axis=axes, keepdims=True)
    e = jnp.exp(jnp.where(at_inf, -jnp.inf, x) - shift)
    total = nx.compensated_sum(jnp.where(keep, b * e, 0.0), axes)
    total = jnp.where(m == jnp.inf, inf_weight * jnp.inf, total)
    sign = jnp.sign(total)
    return nx.log_or_neg_inf(jnp.abs(total), shift), sign


def logsumexp(
    a: ArrayLike,
    axis: Axis = None,
    b: ArrayLike | None = None,
    keepdims: bool = False,
    return_sign: bool = False,
    where: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``log(sum(b * exp(a)))`` over ``axis``, without overflow; ``jax.nn.logsumexp``'s call.

    ::

        logsumexp(a) = m + log(1 + Σ_{j ≠ argmax} e^(a_j - m)),
                   m = max_{j ∈ where} a_j

    Args:
      a: floating (or integer, computed in float32) array of any shape.
      axis: the axis or axes to reduce (int, tuple of ints, or None for all, the default,
        as in ``jax.nn.logsumexp``).
      b: optional weights broadcastable to ``a``: ``log(sum(b * exp(a)))``. Entries with
        ``b == 0`` are excluded (from the maximum too). Negative weights need
        ``return_sign`` (otherwise a negative sum gives NaN, as in ``jax.nn``).
      keepdims: keep the reduced axes with size 1.
      return_sign: also return the sign of the sum (0 where it is 0), and
        ``log|sum(b * exp(a))|``.
      where: optional boolean array broadcastable to ``a``; False entries are excluded.

    Returns:
      An array of the dtype of ``a`` (and the sign, same dtype, with ``return_sign``):
      ``-inf`` for rows with no valid entry (with zero gradient); without ``b`` its gradient
      is the softmax of ``a``, and the result is accurate to an ulp even when one entry
      dominates.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.logsumexp(jnp.array([1000.0, 1000.0]))
      Array(1000.6932, dtype=float32)
    """
    x, axes, where = _prepare(a, axis, where)
    if b is None:
        out = _logsumexp(x, where, axes)
        sign = jnp.where(out == -jnp.inf, 0.0, jnp.where(jnp.isnan(out), out, 1.0))
    else:
        out, sign = _weighted_logsumexp(x, _checks.floating(b, "b"), axes, where)
        if not return_sign:
            out = jnp.where(sign < 0, jnp.nan, out)
    out, sign = out.astype(x.dtype), sign.astype(x.dtype)
    if not keepdims:
        out, sign = jnp.squeeze(out, axis=axes), jnp.squeeze(sign, axis=axes)
    return (out, sign) if return_sign else out
