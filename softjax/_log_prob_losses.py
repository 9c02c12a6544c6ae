"""Losses of log-probabilities given by the caller: ``nll_loss``, ``kl_divergence``, and the
log-sigmoid they and the binary losses share.

Where :func:`softjax.cross_entropy` takes logits and normalises them, these take what a model
already normalised (``log_softmax`` outputs, a teacher's log-probabilities), as PyTorch's
``nll_loss`` and ``kl_div`` do, with the same semantics and softjax's rules: float32 results
for low-precision inputs, ``where`` masks, 0 (never NaN) where the maths has an answer, NaN
inputs and out-of-range labels loud.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from . import _numerics as nx
from ._losses import (
    Reduction,
    _label_weight,
    bad_labels,
    classes_last,
    reduce_elements,
    reduce_losses,
)


def log_sigmoid(x: ArrayLike) -> jax.Array:
    """``log σ(x) = -log(1 + e^(-x))``, elementwise, exact in both tails.

    ``min(x, 0) - log1p(e^(-|x|))``: ``-1000`` gives ``-1000`` (not ``-inf``), ``40`` gives
    ``-4.25e-18`` (not ``0``); the derivative ``σ(-x)`` keeps its relative accuracy too.
    bfloat16/float16 inputs are computed in float32 and rounded once; the result has ``x``'s
    dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.log_sigmoid(jnp.array([-1000.0, 0.0, 40.0]))
      Array([-1.000000e+03, -6.931472e-01, -4.248354e-18], dtype=float32)
    """
    x = _checks.floating(x, "x")
    return nx.log_sigmoid(nx.upcast(x)).astype(x.dtype)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Negative log-likelihood of integer labels under given log-probabilities, as
    ``torch.nn.functional.nll_loss``::

        ℓ_i = -w[y_i] · log_probs[i, y_i],     mean = Σ_i ℓ_i / Σ_i w[y_i]

    over the counted positions (not ``ignore_index``, ``where`` True). The input is not
    normalised: ``cross_entropy(z, y) == nll_loss(log_softmax(z), y)``.

    Args:
      log_probs: floating ``[..., C]`` (the class axis is ``axis``: PyTorch's layout
        ``[N, C, d1, ...]`` is ``axis=1``).
      labels: integer, ``log_probs``' shape without the class axis; a counted label outside
        ``[0, C)`` gives NaN.
      weight: optional ``[C]`` class weights.
      ignore_index: labels equal to it are excluded (PyTorch's default is -100; softjax's
        is None, as in :func:`cross_entropy`).
      where: optional boolean broadcastable to ``labels``' shape; False excludes.
      reduction: "mean" (weighted, as above; 0 when nothing is counted, where PyTorch gives
        NaN), "sum" or "none" (0 at excluded positions).

    Returns:
      float32 (float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> softjax.nll_loss(jnp.log(jnp.array([[0.5, 0.25, 0.25]])), jnp.array([1]))
      Array(1.3862944, dtype=float32)
    """
    log_probs = _checks.floating(log_probs, "log_probs")
    shape = log_probs.shape
    lp, batch_shape, num_classes = classes_last(log_probs, axis, "log_probs")
    _checks.reduction(reduction)
    dtype = nx.compute_dtype(lp.dtype)
    class_weight = _checks.vector(weight, num_classes, "weight", "class")
    class_weight = None if class_weight is None else class_weight.astype(dtype)
    labels = _checks.int_labels(labels, batch_shape, f"log_probs {shape} without axis {axis}")
    valid = _checks.mask(where, batch_shape)
    valid = jnp.ones(batch_shape, bool) if valid is None else valid
    ignore_index = _checks.ignore_index(ignore_index)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    safe = jnp.clip(labels, 0, num_classes - 1)
    picked = jnp.take_along_axis(lp, safe[..., None], axis=-1)[..., 0].astype(dtype)
    label_weight = _label_weight(class_weight, labels, dtype)
    losses = jnp.where(valid, -picked * label_weight, 0.0)
    losses = losses + bad_labels(labels, valid, num_classes, dtype)
    return reduce_losses(losses, jnp.sum(jnp.where(valid, label_weight, 0.0)), reduction)


KLReduction = Literal["mean", "batchmean", "sum", "none"]


def _kl_terms(x, t, log_target: bool):
    """``p_t (log p_t - x)`` elementwise: 0 where ``p_t = 0`` whatever ``x`` is (``-inf``
    included) unless ``x`` is NaN, which stays loud."""
    if log_target:
        p = jnp.exp(t)
        terms = nx.zero_where_prob_zero(p, t - x)
    else:
        safe = jnp.where(t > 0, t, 1.0)
        terms = nx.zero_where_prob_zero(t, jnp.log(safe) - x)
        terms = jnp.where(t < 0, jnp.nan, terms)  # not a probability: loud, as log(t) is
    return jnp.where(jnp.isnan(x), jnp.nan, terms)


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    *,
    log_target: bool = False,
    where: ArrayLike | None = None,
    reduction: KLReduction = "mean",
) -> jax.Array:
    """Pointwise KL divergence ``KL(targets || predictions)``, as ``torch.nn.functional.kl_div``::

        ℓ = t · (log t - log_predictions)          (log_target=False: t probabilities)
        ℓ = e^t · (t - log_predictions)             (log_target=True: t log-probabilities)

    elementwise, with ``0 · log 0 = 0`` (a zero target costs nothing, whatever the
    prediction, ``-inf`` included). Summed over the classes and averaged over a batch
    (``reduction="batchmean"``) it is the KL divergence of each row's distributions.

    Args:
      log_predictions: floating log-probabilities (PyTorch's ``input``).
      targets: floating, the same shape: probabilities, or log-probabilities with
        ``log_target``. The targets are differentiable too.
      where: optional boolean broadcastable to the inputs' shape; False elements count 0.
      reduction: "mean" (over the counted elements: PyTorch's default, which is not the
        KL divergence of rows), "batchmean" (the sum over the size of the first axis:
        PyTorch's recommended form), "sum" or "none" (elementwise).

    Returns:
      float32 (float64 for float64 inputs).

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> p = jnp.array([[0.5, 0.5, 0.0]])
      >>> softjax.kl_divergence(jnp.log(jnp.array([[0.25, 0.5, 0.25]])), p, reduction="batchmean")
      Array(0.3465736, dtype=float32)
    """
    x = _checks.floating(log_predictions, "log_predictions")
    t = _checks.floating(targets, "targets")
    if t.shape != x.shape:
        raise ValueError(f"targets has shape {t.shape} but log_predictions has shape {x.shape}")
    if not isinstance(log_target, bool):
        raise TypeError(f"log_target must be a bool, got {log_target!r}")
    if reduction not in ("mean", "batchmean", "sum", "none"):
        raise ValueError(
            f"reduction must be one of ('mean', 'batchmean', 'sum', 'none'), got {reduction!r}"
        )
    if reduction == "batchmean" and x.ndim == 0:
        raise ValueError("reduction='batchmean' needs a batch axis; log_predictions is a scalar")
    dtype = nx.compute_dtype(jnp.promote_types(x.dtype, t.dtype))
    terms = _kl_terms(x.astype(dtype), t.astype(dtype), log_target)
    valid = _checks.mask(where, x.shape)
    if reduction == "batchmean":
        return jnp.sum(terms if valid is None else jnp.where(valid, terms, 0.0)) / x.shape[0]
    return reduce_elements(terms, valid, reduction)
