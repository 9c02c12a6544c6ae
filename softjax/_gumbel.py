"""The Gumbel-softmax (concrete) relaxation of a categorical draw, with its straight-through
hard variant: ``gumbel_softmax``, as ``torch.nn.functional.gumbel_softmax``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from . import _checks
from . import _numerics as nx
from ._softmax import softmax


def _hard_choice(z, g, valid):
    """The index of the Gumbel-max draw along the last axis: ``argmax(z + g)`` over the valid
    entries; among ``+inf`` logits (a row's limit as they grow together) the largest ``g``."""
    scores = jnp.where(valid, z + g, -jnp.inf)
    infinite = jnp.any(valid & (z == jnp.inf), axis=-1, keepdims=True)
    scores = jnp.where(infinite, jnp.where(valid & (z == jnp.inf), g, -jnp.inf), scores)
    return jnp.argmax(scores, axis=-1), jnp.any(scores > -jnp.inf, axis=-1)


def gumbel_softmax(
    key: ArrayLike,
    logits: ArrayLike,
    *,
    tau: ArrayLike = 1.0,
    hard: bool = False,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """A sample of the Gumbel-softmax distribution (Jang et al. 2017; Maddison et al. 2017)::

        y = softmax((z + g) / τ),     g_i ~ Gumbel(0, 1) i.i.d.

    As τ → 0 the sample tends to the one-hot vector of ``argmax(z + g)``, a draw from the
    categorical distribution ``softmax(z)`` (the Gumbel-max trick). With ``hard=True`` the
    value is exactly that one-hot vector and the gradient is the soft sample's
    (straight-through), as ``torch.nn.functional.gumbel_softmax(logits, tau, hard, dim)``.

    Args:
      key: a PRNG key; the noise is ``jax.random.gumbel(key, logits.shape)`` in the compute
        dtype (float32, float64 for float64 logits).
      logits: floating ``[..., V]`` unnormalised log-probabilities (the class axis is
        ``axis``).
      tau: the temperature ``τ > 0``: a float, or an array broadcastable to ``logits`` with
        size 1 along ``axis``. Traced and differentiable.
      hard: return the one-hot draw (value) with the soft sample's gradient.
      axis: the class axis.
      where: optional boolean broadcastable to ``logits``; False classes are never drawn
        and get exactly 0.

    Returns:
      An array of ``logits``' shape and dtype, summing to 1 along ``axis``. A row with no
      valid class (all masked or ``-inf``) gives zeros (no class can be drawn).

    Numerics: computed in float32 (float64 for float64 logits) by :func:`softjax.softmax`,
    rounded once; the hard value is exactly one-hot (``y_hard + (y - stop_gradient(y))``
    adds an exact 0). A NaN logit makes its row NaN.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.gumbel_softmax(jax.random.key(0), jnp.log(jnp.array([0.5, 0.5])), hard=True)
      Array([0., 1.], dtype=float32)
    """
    logits = _checks.floating(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis, got a scalar")
    (ax,) = _checks.normalize_axes(axis, logits.ndim)
    tau = _checks.temperature(tau, logits.shape, (ax,), "tau")
    valid = _checks.mask(where, logits.shape)
    dtype = nx.compute_dtype(logits.dtype)
    z = logits.astype(dtype)
    g = jax.random.gumbel(key, logits.shape, dtype)
    soft = softmax(z + g, ax, valid, temperature=1.0 if tau is None else tau)
    if not hard:
        return soft.astype(logits.dtype)
    ok = jnp.ones(z.shape, bool) if valid is None else jnp.broadcast_to(valid, z.shape)
    index, drawable = _hard_choice(
        jnp.moveaxis(z, ax, -1), jnp.moveaxis(g, ax, -1), jnp.moveaxis(ok, ax, -1)
    )
    one_hot = jax.nn.one_hot(index, z.shape[ax], dtype=dtype) * drawable[..., None]
    y_hard = jnp.moveaxis(one_hot, -1, ax)
    return (y_hard + (soft - lax.stop_gradient(soft))).astype(logits.dtype)
