"""Cross-entropies re-weighted toward hard examples: ``sigmoid_focal_loss`` and ``poly_loss``.

Both multiply or extend a cross-entropy by a function of the probability of the right
answer ``p_t``. Its complement ``1 - p_t`` is computed without cancelling ``1 - p`` where
``p`` is near 1 (the confident, easy examples these losses exist to down-weight): for the
focal loss from the two sigmoids of one exponential, for the poly loss as
``-expm1(log p_t)`` from the exact log-probability.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from . import _checks
from . import _numerics as nx
from ._losses import Reduction, _bce_terms, binary_operands, cross_entropy, reduce_elements
from ._softmax import log_softmax


def _sigmoids(x):
    """``(σ(x), σ(-x))`` from one exponential, each with its relative accuracy."""
    e = jnp.exp(-jnp.abs(x))
    big, small = 1 / (1 + e), e / (1 + e)
    return jnp.where(x >= 0, big, small), jnp.where(x >= 0, small, big)


def _power(s, gamma):
    """``s ** gamma`` for ``s >= 0``, 0 at ``s = 0`` with a zero derivative there (no
    ``0 · inf`` in the chain rule when ``gamma < 1``)."""
    safe = jnp.where(s > 0, s, 1.0)
    return jnp.where(s > 0, safe**gamma, 0.0 if gamma > 0 else 1.0)


def sigmoid_focal_loss(
    logits: ArrayLike,
    targets: ArrayLike,
    *,
    alpha: float | None = None,
    gamma: float = 2.0,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Focal loss (Lin et al. 2017) on logits, as ``optax.sigmoid_focal_loss``::

        ℓ = α_t · (1 - p_t)^γ · BCE(x, t),   p_t = t σ(x) + (1 - t) σ(-x),
        α_t = α t + (1 - α)(1 - t)   (α None: 1)

    ``BCE`` is :func:`binary_cross_entropy`'s (exact log-sigmoids); ``1 - p_t = t σ(-x) +
    (1 - t) σ(x)`` is a sum of two positive terms, so a confident, right prediction keeps
    its tiny weight instead of ``1 - 0.99999994``.

    Args:
      logits: floating ``[...]``.
      targets: floating, the same shape, in [0, 1] (binary or soft).
      alpha: optional weight of the positive class in [0, 1] (optax's default None;
        torchvision's is 0.25).
      gamma: the focusing exponent ``γ >= 0`` (0: the BCE itself).
      where: optional boolean broadcastable to ``logits``; False elements are excluded.
      reduction: "mean" (over the counted elements), "sum" or "none" (optax returns
        "none").

    Returns:
      float32 (float64 for float64 logits).

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0]))
      Array(0.1732868, dtype=float32)
    """
    logits, targets = binary_operands(logits, targets)
    _checks.reduction(reduction)
    gamma = _checks.number(gamma, "gamma")
    if not (np.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if alpha is not None:
        _checks.unit_interval(alpha, "alpha")
    dtype = nx.compute_dtype(logits.dtype)
    valid = _checks.mask(where, logits.shape)
    x = logits.astype(dtype)
    if valid is not None:
        x = jnp.where(valid, x, 0.0)
    t = targets.astype(dtype)
    bce = _bce_terms(x, t, jnp.ones((), dtype))
    sig_pos, sig_neg = _sigmoids(x)
    loss = _power(t * sig_neg + (1 - t) * sig_pos, gamma) * bce
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return reduce_elements(loss, valid, reduction)


def poly_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: float = 2.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Poly-1 loss (Leng et al. 2022), as ``optax.poly_loss_cross_entropy``::

        ℓ = CE(z, y) + ε · (1 - p_t),     p_t = Σ_c y_c p_c   (integer y: p_y)

    with ``CE`` :func:`cross_entropy`'s and ``1 - p_c = -expm1(log p_c)`` from the exact
    log-probabilities (no cancellation for a confident class).

    Args:
      logits: floating ``[..., C]`` (the class axis is ``axis``).
      labels: integer labels (``logits``' shape without the class axis) or class
        probabilities (``logits``' shape), as :func:`cross_entropy`.
      epsilon: ``ε``, the weight of the first polynomial term (optax's default 2.0; ``-1``
        removes it from the cross-entropy's Taylor series).
      where: optional boolean broadcastable to the batch shape; False excludes.
      reduction: "mean" (over the counted examples), "sum" or "none".

    Returns:
      float32 (float64 for float64 logits).

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.poly_loss(jnp.array([[0.0, 0.0]]), jnp.array([0]))
      Array(1.6931472, dtype=float32)
    """
    logits = _checks.floating(logits, "logits")
    _checks.reduction(reduction)
    epsilon = _checks.number(epsilon, "epsilon")
    if not np.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite, got {epsilon!r}")
    ce = cross_entropy(logits, labels, axis=axis, where=where, reduction="none")
    labels_arr = jnp.asarray(labels)
    if jnp.issubdtype(labels_arr.dtype, jnp.floating):
        # Σ_c y_c (1 - p_c) = 1 - p_t for probabilities y.
        lp = log_softmax(logits.astype(nx.compute_dtype(logits.dtype)), axis=axis)
        y = labels_arr.astype(lp.dtype)
        one_minus = jnp.sum(nx.zero_where_prob_zero(y, -jnp.expm1(lp)), axis=axis)
    else:
        one_minus = -jnp.expm1(-ce)  # p_y = e^(-CE)
    return reduce_elements(ce + epsilon * one_minus, _checks.mask(where, ce.shape), reduction)
