"""Sparse alternatives to softmax: sparsemax and 1.5-entmax, exact and sort-based.

Both are Euclidean-style projections onto the probability simplex that give exact zeros:

- sparsemax (Martins & Astudillo, 2016): ``p = argmin_{q in simplex} ||q - x||^2``, i.e.
  ``p_i = max(x_i - tau, 0)`` with ``tau`` chosen so that ``sum p = 1``.
- 1.5-entmax (Peters, Niculae & Martins, 2019): ``p_i = max(x_i / 2 - tau, 0) ** 2``.

``tau`` is found exactly by sorting the row (O(V log V)): on the sorted row the support is a
prefix, and each prefix length gives a closed-form candidate threshold. Both have a custom JVP
built from the support alone, so gradients are exact and cheap: with ``s`` the support
indicator (sparsemax) or ``g = sqrt(p)`` (entmax),
``J v = g * v - g * (g . v) / sum(g)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from . import _checks
from . import _numerics as nx

Axis = int | Sequence[int]


# ---------------------------------------------------------------------------------------
# rows: the reduced axes moved last and flattened into one


def _to_rows(x: jax.Array, axes: tuple):
    """``x`` with ``axes`` moved last and merged, and the inverse of that reshaping."""
    keep = [a for a in range(x.ndim) if a not in axes]
    perm = keep + list(axes)
    moved = jnp.transpose(x, perm)
    lead = moved.shape[: len(keep)]
    rows = moved.reshape(lead + (math.prod(moved.shape[len(keep) :]),))

    def back(r):
        inv = [perm.index(a) for a in range(x.ndim)]
        return jnp.transpose(r.reshape(moved.shape), inv)

    return rows, back


def _sorted_rows(x: jax.Array, where):
    """Masked, max-shifted rows sorted descending, with the count of valid entries.

    Returns ``(z, srt, valid_sorted, empty, nan_row)``: ``z`` has masked entries at ``-inf``;
    in ``srt`` the invalid tail is replaced by 0 so that running sums stay finite, and
    ``valid_sorted`` marks the valid prefix.
    """
    z = nx.mask_invalid(nx.upcast(x), where)
    m = nx.row_max(z, (z.ndim - 1,))
    # A row holding +inf is the limit of its +inf entries growing together: they share the
    # mass (softjax._numerics, rule 5).
    infinite = m == jnp.inf
    z = nx.saturate_infinite_rows(z, infinite)
    m = jnp.where(infinite, 0.0, m)
    empty = m == -jnp.inf
    z = z - lax.stop_gradient(nx.empty_row_shift(m))
    n_valid = jnp.sum(z > -jnp.inf, axis=-1, keepdims=True)
    valid_sorted = jnp.arange(z.shape[-1]) < n_valid
    srt = jnp.where(valid_sorted, -jnp.sort(-z, axis=-1), 0.0)
    nan_row = jnp.any(jnp.isnan(z), axis=-1, keepdims=True)
    return z, srt, valid_sorted, empty, nan_row


def _finish(p, empty, nan_row):
    p = jnp.where(empty, 0.0, p)
    return jnp.where(nan_row, jnp.nan, p)


# ---------------------------------------------------------------------------------------
# sparsemax


def sparsemax_rows(x, where):
    """``(z, p)``: the max-shifted float32 rows and their sparsemax (classes last)."""
    z, srt, valid, empty, nan_row = _sorted_rows(x, where)
    k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    cs = jnp.cumsum(srt, axis=-1)
    # Prefix k is in the support iff its k-th value stays above the threshold it implies.
    support = valid & (1 + k * srt > cs)
    size = jnp.sum(support, axis=-1, keepdims=True)
    idx = jnp.maximum(size - 1, 0)
    tau = (jnp.take_along_axis(cs, idx, axis=-1) - 1) / jnp.maximum(size, 1).astype(z.dtype)
    p = jnp.maximum(z - tau, 0.0)
    return z, _finish(p, empty, nan_row)


def _sparsemax_value(x, where):
    return sparsemax_rows(x, where)[1]


@jax.custom_jvp
def _sparsemax(x, where):
    return _sparsemax_value(x, where).astype(x.dtype)


@_sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
    x, where = primals
    x_dot, _ = tangents
    p = _sparsemax_value(x, where)
    s = (p > 0).astype(p.dtype)
    dz = jnp.where(p > 0, nx.upcast(x_dot), 0.0)
    dp = dz - s * nx.safe_divide(
        jnp.sum(dz, axis=-1, keepdims=True), jnp.sum(s, axis=-1, keepdims=True)
    )
    return p.astype(x.dtype), dp.astype(x.dtype)


def sparsemax(x, axis: Axis = -1, *, where=None) -> jax.Array:
    """Sparsemax: the Euclidean projection of ``x`` onto the probability simplex.

    ::

        sparsemax(x)_i = [x_i - τ(x)]_+,
                     τ = (Σ_{j ≤ k} x_(j) - 1) / k,
                     k = max { k : 1 + k · x_(k) > Σ_{j ≤ k} x_(j) }

    with ``x_(1) ≥ x_(2) ≥ …`` the sorted row (Martins & Astudillo, 2016).

    Args:
      x: floating array ``[..., V, ...]``.
      axis: the axis or axes to normalise over.
      where: optional boolean mask broadcastable to ``x``; False entries get exactly 0.

    Returns:
      An array of the shape and dtype of ``x``: non-negative, summing to 1 along ``axis``,
      usually with exact zeros. Its Jacobian is ``diag(s) - s s^T / |s|`` with ``s`` the
      support indicator.

    Numerics: computed in float32 (float64 for float64 input) after a max shift; a row with
    no valid entry gives zeros and zero gradient; a row holding a NaN gives NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.sparsemax(jnp.array([1.0, 0.8, -1.0]))
      Array([0.6       , 0.40000004, 0.        ], dtype=float32)
    """
    return _apply(_sparsemax, x, axis, where)


# ---------------------------------------------------------------------------------------
# 1.5-entmax


def entmax15_rows(x, where):
    """``(z, p)``: the max-shifted float32 rows and their 1.5-entmax (classes last)."""
    z, srt, valid, empty, nan_row = _sorted_rows(x, where)
    z2, srt = z / 2, srt / 2
    rho = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
    mean = jnp.cumsum(srt, axis=-1) / rho
    mean_sq = jnp.cumsum(srt * srt, axis=-1) / rho
    # For a support of size k, tau solves sum_{j<=k} (z_(j) - tau)^2 = 1:
    # tau = mean - sqrt((1 - k * var) / k), real only while the support is consistent.
    var_k = rho * (mean_sq - mean * mean)
    delta = jnp.maximum((1 - var_k) / rho, 0.0)
    tau = mean - jnp.sqrt(delta)
    support = valid & (tau <= srt)
    size = jnp.sum(support, axis=-1, keepdims=True)
    tau_star = jnp.take_along_axis(tau, jnp.maximum(size - 1, 0), axis=-1)
    g = jnp.maximum(z2 - tau_star, 0.0)
    return z, _finish(g * g, empty, nan_row)


def _entmax15_value(x, where):
    return entmax15_rows(x, where)[1]


@jax.custom_jvp
def _entmax15(x, where):
    return _entmax15_value(x, where).astype(x.dtype)


@_entmax15.defjvp
def _entmax15_jvp(primals, tangents):
    x, where = primals
    x_dot, _ = tangents
    # p from the function itself, so that differentiating this rule (second order) uses it.
    p = nx.upcast(_entmax15(x, where))
    pos = p > 0
    g = jnp.where(pos, jnp.sqrt(jnp.where(pos, p, 1.0)), 0.0)
    gdz = jnp.where(pos, g * nx.upcast(x_dot), 0.0)
    dp = gdz - g * nx.safe_divide(
        jnp.sum(gdz, axis=-1, keepdims=True), jnp.sum(g, axis=-1, keepdims=True)
    )
    return p.astype(x.dtype), dp.astype(x.dtype)


def entmax15(x, axis: Axis = -1, *, where=None) -> jax.Array:
    """1.5-entmax (Peters, Niculae & Martins, 2019): sparse, between softmax and sparsemax.

    ::

        entmax_1.5(x)_i = [x_i / 2 - τ(x)]_+²,
        Σ_i [x_i / 2 - τ]_+² = 1

    ``tau`` is exact: for each prefix of the sorted row the quadratic above has a closed-form
    root, and the support is the longest prefix consistent with its own root.

    Args:
      x: floating array ``[..., V, ...]``.
      axis: the axis or axes to normalise over.
      where: optional boolean mask broadcastable to ``x``; False entries get exactly 0.

    Returns:
      An array of the shape and dtype of ``x``: non-negative and summing to 1 along ``axis``.
      Its Jacobian is ``diag(g) - g g^T / sum(g)`` with ``g = sqrt(p)``.

    Numerics: as :func:`sparsemax`.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.entmax15(jnp.array([1.0, 0.8, -1.0]))
      Array([0.5705337, 0.4294664, 0.       ], dtype=float32)
    """
    return _apply(_entmax15, x, axis, where)


def _apply(fn, x, axis, where):
    x = _checks.floating(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one axis, got a scalar")
    axes = _checks.normalize_axes(axis, x.ndim)
    return _apply_jit(fn, x, _checks.mask(where, x.shape), axes)


@partial(jax.jit, static_argnums=(0, 3))
def _apply_jit(fn, x, where, axes):
    # Jitted whole, also when called eagerly: the sort-based rows are many small ops.
    rows, back = _to_rows(x, axes)
    mask_rows = None if where is None else _to_rows(where, axes)[0]
    return back(fn(rows, mask_rows))
