"""The Fenchel-Young losses of sparsemax and 1.5-entmax: ``sparsemax_loss``, ``entmax15_loss``.

For a regulariser ``Ω`` on the probability simplex, the Fenchel-Young loss (Blondel, Martins &
Niculae, JMLR 2020) of scores ``z`` against a target distribution ``q`` is ::

    L(z, q) = Ω*(z) + Ω(q) - ⟨z, q⟩,      ∇_z L = p - q,   p = argmax_{p ∈ Δ} ⟨z, p⟩ - Ω(p)

so the loss is 0 exactly when the prediction ``p`` is the target. ``Ω(p) = ½ (‖p‖² - 1)``
gives sparsemax's loss (Martins & Astudillo 2016), ``Ω(p) = 4/3 (Σ p^{3/2} - 1)`` (Tsallis,
α = 1.5) gives 1.5-entmax's. With ``Ω*(z) = ⟨z, p⟩ - Ω(p)`` and ``Σ p = Σ q = 1`` ::

    L = Σ_c (p_c - q_c)(z_c - m) + G(p) - G(q),   G(p) = Ω(e) - Ω(p) ≥ 0

for any constant ``m`` (the row maximum here) and ``e`` a vertex of the simplex:
``G = ½ Σ p (1 - p)`` (sparsemax), ``G = 4/3 Σ p (1 - p) / (1 + √p)`` (1.5-entmax). Written
this way nothing cancels near a confident prediction: ``1 - p`` of the most likely class is the
sum of the others, and a one-hot target has ``G(q) = 0`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from . import _numerics as nx
from ._losses import Reduction, bad_labels, classes_last, reduce_elements
from ._sparse import entmax15_rows, sparsemax_rows


class _Regulariser(NamedTuple):
    """A sparse map and its ``Ω``: the map's rows, the gap ``G`` and ``∇Ω``."""

    rows: Callable  # (x, where) -> (max-shifted z, p), float32, classes last
    gap: Callable  # (p, 1 - p) -> Σ over the row of G's terms
    grad: Callable  # q -> ∇Ω(q)


_SPARSEMAX = _Regulariser(
    rows=sparsemax_rows,
    gap=lambda p, one_minus: 0.5 * jnp.sum(p * one_minus, axis=-1),
    grad=lambda q: q,
)
_ENTMAX15 = _Regulariser(
    rows=entmax15_rows,
    # 1 - √p = (1 - p) / (1 + √p): no cancellation as p → 1.
    gap=lambda p, one_minus: (
        (4 / 3) * jnp.sum(p * one_minus / (1 + jnp.sqrt(jnp.maximum(p, 0.0))), axis=-1)
    ),
    grad=lambda q: 2 * jnp.sqrt(jnp.maximum(q, 0.0)),
)


def _one_minus(p):
    """``1 - p`` per class; for the most likely class the sum of the others (exact where
    ``p`` is near 1, which only that class can be)."""
    top = jnp.arange(p.shape[-1]) == jnp.argmax(p, axis=-1, keepdims=True)
    rest = jnp.sum(jnp.where(top, 0.0, p), axis=-1, keepdims=True)
    return jnp.where(top, rest, 1 - p)


def _row_parts(reg: _Regulariser, x, q):
    z, p = reg.rows(x, None)
    # A class neither predicted nor targeted adds nothing, even at z = -inf.
    linear = jnp.sum(jnp.where(p == q, 0.0, (p - q) * z), axis=-1)
    return linear + reg.gap(p, _one_minus(p)) - reg.gap(q, _one_minus(q)), z, p


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fenchel_young(reg: _Regulariser, x, q):
    return _row_parts(reg, x, q)[0]


@_fenchel_young.defjvp
def _fenchel_young_jvp(reg, primals, tangents):
    x, q = primals
    x_dot, q_dot = tangents
    loss, z, p = _row_parts(reg, x, q)
    # ∂L/∂z = p - q (Danskin); ∂L/∂q = ∇Ω(q) - (z - m), the shift m a constant.
    finite_z = jnp.where(jnp.isfinite(z), z, 0.0)
    out_dot = jnp.sum((p - q) * nx.upcast(x_dot), axis=-1)
    out_dot = out_dot + jnp.sum((reg.grad(q) - finite_z) * nx.upcast(q_dot), axis=-1)
    return loss, out_dot


def _loss(reg: _Regulariser, logits, labels, axis, where, reduction):
    logits = _checks.floating(logits, "logits")
    shape = logits.shape
    z, batch_shape, num_classes = classes_last(logits, axis, "logits")
    _checks.reduction(reduction)
    dtype = nx.compute_dtype(z.dtype)
    valid = _checks.mask(where, batch_shape)
    counted = jnp.ones(batch_shape, bool) if valid is None else valid
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        q, _, _ = classes_last(labels, axis, "labels")
        if q.shape != z.shape:
            raise ValueError(
                f"labels has shape {labels.shape}: class probabilities must have the shape "
                f"of logits {shape}"
            )
        q = q.astype(dtype)
        nan = jnp.zeros(batch_shape, dtype)
    else:
        desc = f"logits {shape} without axis {axis}"
        labels = _checks.int_labels(labels, batch_shape, desc)
        q = jax.nn.one_hot(labels, num_classes, dtype=dtype)
        nan = bad_labels(labels, counted, num_classes, dtype)
    # Excluded rows never reach the maths (a NaN there stays out of the result).
    x = jnp.where(counted[..., None], z.astype(dtype), 0.0)
    q = jnp.where(counted[..., None], q, jax.nn.one_hot(0, num_classes, dtype=dtype))
    losses = _fenchel_young(reg, x, q) + nan
    return reduce_elements(losses, valid, reduction)


def sparsemax_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Sparsemax's Fenchel-Young loss, as ``optax.multiclass_sparsemax_loss``::

        L(z, q) = ⟨p - q, z⟩ + ½ (‖q‖² - ‖p‖²),    p = sparsemax(z),   ∇_z L = p - q

    0 exactly when ``sparsemax(z) == q`` (optax's ``sparsemax_loss`` is the binary case,
    ``multiclass_sparsemax_loss`` this one).

    Args:
      logits: floating ``[..., C]`` (the class axis is ``axis``).
      labels: integer labels (``logits``' shape without the class axis; a counted label
        outside ``[0, C)`` gives NaN) or class probabilities (``logits``' shape, each row
        summing to 1).
      axis: the class axis (or axes).
      where: optional boolean broadcastable to the batch shape; False excludes.
      reduction: "mean" (over the counted examples), "sum" or "none" (optax returns "none").

    Returns:
      float32 (float64 for float64 logits). Differentiable in both arguments
      (``∂L/∂q = q - z`` for probabilities).

    Numerics: computed in float32 after a max shift; with ``1 - p`` of the most likely class
    taken as the sum of the others, a near-perfect prediction keeps its small loss's relative
    accuracy. A ``-inf`` logit is fine (``+inf`` loss only when it is the target's).

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.sparsemax_loss(jnp.array([[1.0, 0.8, -1.0]]), jnp.array([1]))
      Array(0.35999998, dtype=float32)
    """
    return _loss(_SPARSEMAX, logits, labels, axis, where, reduction)


def entmax15_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """1.5-entmax's Fenchel-Young loss (Peters, Niculae & Martins 2019), as the ``entmax``
    package's ``Entmax15Loss``::

        L(z, q) = ⟨p - q, z⟩ + 4/3 (Σ q^{3/2} - Σ p^{3/2}),   p = entmax15(z),   ∇_z L = p - q

    Args:
      logits: floating ``[..., C]`` (the class axis is ``axis``).
      labels: integer labels (``logits``' shape without the class axis; a counted label
        outside ``[0, C)`` gives NaN) or class probabilities (``logits``' shape, each row
        summing to 1).
      axis: the class axis (or axes).
      where: optional boolean broadcastable to the batch shape; False excludes.
      reduction: "mean" (over the counted examples), "sum" or "none".

    Returns:
      float32 (float64 for float64 logits). Differentiable in both arguments
      (``∂L/∂q = 2 √q - z`` for probabilities).

    Numerics: as :func:`sparsemax_loss`.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.entmax15_loss(jnp.array([[1.0, 0.8, -1.0]]), jnp.array([0]))
      Array(0.29758656, dtype=float32)
    """
    return _loss(_ENTMAX15, logits, labels, axis, where, reduction)
