"""Scores of a model's logits against the tokens or labels that occurred: per-token and
sequence log-probabilities (beam and rerank scoring), perplexity, top-k accuracy.

The class (vocabulary) axis is the last axis throughout; ``tokens``/``labels`` have the
shape of ``logits`` without it, and the sequence axis is the one before it. Every
log-probability is :func:`softjax.cross_entropy`'s (exact, float32 for low-precision logits,
NaN for a counted token outside ``[0, V)``), so these agree with the loss a model trains on.
For logits never materialised (``x @ w.T`` at vocabulary scale) use
:func:`softjax.linear_log_probs`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from . import _checks
from . import _numerics as nx
from ._losses import bad_labels, cross_entropy

__all__ = ["perplexity", "sequence_log_probs", "token_log_probs", "top_k_accuracy"]


def _counted(logits, tokens, where, ignore_index):
    """The checked operands and the mask of counted positions (``where`` and not ignored)."""
    logits = _checks.floating(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis (the last), got a scalar")
    _checks.has_classes(logits.shape[-1], "logits", logits.shape, -1)
    tokens = _checks.int_labels(tokens, logits.shape[:-1], f"logits {logits.shape} without axis -1")
    valid = _checks.mask(where, tokens.shape)
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid
    ignore_index = _checks.ignore_index(ignore_index)
    if ignore_index is not None:
        valid = valid & (tokens != ignore_index)
    return logits, tokens, valid


def token_log_probs(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    """``log softmax(logits)[token]`` at every position, as Hugging Face's
    ``compute_transition_scores(..., normalize_logits=True)``.

    Args:
      logits: floating ``[..., T, V]`` (position ``t``'s scores for the token at ``t``:
        already shifted, as for the loss).
      tokens: integer ``[..., T]``.
      where: optional boolean broadcastable to ``tokens``; False positions give 0.
      ignore_index: tokens equal to it give 0 (padding).

    Returns:
      float32 ``[..., T]`` (float64 for float64 logits), ``<= 0``; differentiable in
      ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import metrics
      >>> metrics.token_log_probs(jnp.log(jnp.array([[0.5, 0.25, 0.25]])), jnp.array([1]))
      Array([-1.3862944], dtype=float32)
    """
    return _token_log_probs(logits, tokens, where, ignore_index)[0]


def _token_log_probs(logits, tokens, where, ignore_index):
    """The per-token log-probabilities (0 where not counted) and the counted positions."""
    logits, tokens, valid = _counted(logits, tokens, where, ignore_index)
    return -cross_entropy(logits, tokens, where=valid, reduction="none"), valid


def sequence_log_probs(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    length_penalty: float | None = None,
) -> jax.Array:
    """The log-probability of each sequence, ``Σ_t log p(tokens_t)`` over counted positions,
    optionally length-normalised as Hugging Face's beam scores: ``Σ_t log p / L^α`` with
    ``L`` the number of counted tokens and ``α = length_penalty``.

    Args:
      logits: floating ``[..., T, V]``.
      tokens: integer ``[..., T]``.
      where: optional boolean broadcastable to ``tokens``; False positions are not counted
        (the prompt, padding).
      ignore_index: tokens equal to it are not counted.
      length_penalty: ``α`` (None: the plain sum; 1.0: the mean log-probability per token).
        A sequence with no counted token scores 0.

    Returns:
      float32 ``[...]`` (float64 for float64 logits); differentiable in ``logits``.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import metrics
      >>> logits = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]]))
      >>> metrics.sequence_log_probs(logits, jnp.array([0, 1]))
      Array(-0.98082924, dtype=float32)
    """
    if jnp.ndim(tokens) == 0:
        raise ValueError("tokens must have a sequence axis (the last), got a scalar")
    per_token, valid = _token_log_probs(logits, tokens, where, ignore_index)
    total = jnp.sum(per_token, axis=-1)
    if length_penalty is None:
        return total
    alpha = _checks.number(length_penalty, "length_penalty")
    length = jnp.sum(valid, axis=-1).astype(total.dtype)
    return nx.safe_divide(total, length**alpha)


def perplexity(
    logits: ArrayLike,
    tokens: ArrayLike,
    *,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    """``exp`` of the mean negative log-likelihood over every counted token, as
    ``torchmetrics.text.Perplexity`` (one value for the batch; ``jax.vmap`` for one per
    sequence).

    Args:
      logits: floating ``[..., T, V]`` (any batch shape: all positions are pooled).
      tokens: integer ``[..., T]``.
      where: optional boolean broadcastable to ``tokens``; False positions are not counted.
      ignore_index: tokens equal to it are not counted.

    Returns:
      A float32 scalar (float64 for float64 logits), ``>= 1``. With nothing counted it is 1
      (the exponential of the cross-entropy's empty mean, 0; torchmetrics gives NaN).

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import metrics
      >>> metrics.perplexity(jnp.zeros((3, 4)), jnp.array([0, 1, 2]))  # uniform over 4
      Array(4., dtype=float32)
    """
    logits, tokens, valid = _counted(logits, tokens, where, ignore_index)
    return jnp.exp(cross_entropy(logits, tokens, where=valid))


def top_k_accuracy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    k: int = 1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
    """The fraction of counted examples whose label is among the ``k`` highest logits, as
    ``sklearn.metrics.top_k_accuracy_score`` and torchmetrics' micro ``top_k`` accuracy.

    The label's rank is the number of classes scoring above it, ties going to the lower
    index (so ``k = 1`` is ``argmax == label``, the first maximal index); it counts when its
    rank is below ``k``. (scikit-learn breaks ties toward the higher index.)

    Args:
      logits: floating ``[..., V]``.
      labels: integer ``[...]``; a counted label outside ``[0, V)`` makes the result NaN.
      k: a positive int (``k >= V``: every label counts as right).
      where: optional boolean broadcastable to ``labels``; False examples are not counted.
      ignore_index: labels equal to it are not counted.

    Returns:
      A float32 scalar in ``[0, 1]``; 0 with nothing counted. A NaN logit in a counted row
      makes it NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import metrics
      >>> logits = jnp.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
      >>> metrics.top_k_accuracy(logits, jnp.array([2, 1]), k=2)
      Array(1., dtype=float32)
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    logits, labels, valid = _counted(logits, labels, where, ignore_index)
    num_classes = logits.shape[-1]
    x = nx.upcast(logits)
    safe = jnp.clip(labels, 0, num_classes - 1)
    z_y = jnp.take_along_axis(x, safe[..., None], axis=-1)
    before = jnp.arange(num_classes) < safe[..., None]
    rank = jnp.sum((x > z_y) | ((x == z_y) & before), axis=-1)
    correct = (rank < k).astype(jnp.float32) + bad_labels(labels, valid, num_classes, jnp.float32)
    correct = jnp.where(jnp.any(jnp.isnan(x), axis=-1), jnp.nan, correct)
    counted = jnp.sum(valid, dtype=jnp.float32)
    return nx.safe_divide(jnp.sum(jnp.where(valid, correct, 0.0)), counted)
