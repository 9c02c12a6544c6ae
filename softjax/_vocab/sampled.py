"""``sampled_softmax_cross_entropy``: a cross-entropy over the target and sampled classes.

A cheaper, biased but consistent stand-in for :func:`softjax.linear_cross_entropy`: ``S``
classes ``c_1..c_S`` are drawn with replacement from a proposal ``Q`` (one draw shared by
every row, so the work is one ``[S, D]`` gather and one ``[N, S]`` matmul), and each row's
normaliser ``Z = Σ_c e^(z_c)`` is replaced by its importance-sampling estimate::

    Ẑ_i = e^(z_i,y) + Σ_j [c_j != y_i] e^(z_i,c_j) / (S Q(c_j))

(``E[Ẑ] = Z``: the sampled sum estimates the classes other than the target, which is
counted exactly). The loss is ``log Ẑ_i - z_i,y``: a cross-entropy over the ``1 + S``
logits ``[z_y, z_c_j - log(S Q(c_j))]`` with the target first and the accidental hits
(``c_j = y_i``) masked, as :func:`softjax.cross_entropy` computes it. As ``S`` grows it
tends to the full cross-entropy, and so does its gradient (the log is concave, so for a
finite ``S`` the expected loss is below the exact one: the bias users measure).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from .. import _checks, _losses, _sharding
from .. import _numerics as nx
from . import api, chunked

PROPOSALS = ("log_uniform", "uniform")


def _log_uniform_log_q(classes, num_classes: int):
    """``log Q(c)`` of the log-uniform (Zipfian) proposal ``Q(c) = log(1 + 1/(c+1)) / log(V+1)``
    over classes ``0..V-1`` sorted by decreasing frequency."""
    c = classes.astype(jnp.float32)
    return jnp.log(jnp.log1p(1 / (c + 1))) - math.log(math.log1p(num_classes))


def draw(key, num_samples: int, num_classes: int, proposal):
    """``S`` classes drawn with replacement from the proposal and ``log(S Q(c))`` of each.

    ``proposal`` is "log_uniform" (inverse CDF: ``c = floor((V+1)^u) - 1``), "uniform", or
    a ``[V]`` float array of log-probabilities (normalised here).
    """
    if isinstance(proposal, str) and proposal == "log_uniform":
        u = jax.random.uniform(key, (num_samples,), jnp.float32)
        c = jnp.floor(jnp.exp(u * math.log1p(num_classes))).astype(jnp.int32) - 1
        c = jnp.clip(c, 0, num_classes - 1)
        log_q = _log_uniform_log_q(c, num_classes)
    elif isinstance(proposal, str):
        c = jax.random.randint(key, (num_samples,), 0, num_classes, jnp.int32)
        log_q = jnp.full((num_samples,), -math.log(num_classes), jnp.float32)
    else:
        log_p = jax.nn.log_softmax(proposal.astype(jnp.float32))
        c = jax.random.categorical(key, log_p, shape=(num_samples,)).astype(jnp.int32)
        log_q = log_p[c]
    return c, log_q + math.log(num_samples)


def _proposal(proposal, num_classes: int):
    if isinstance(proposal, str):
        if proposal not in PROPOSALS:
            raise ValueError(
                f"proposal must be one of {PROPOSALS} or a [V] array of class "
                f"log-probabilities, got {proposal!r}"
            )
        return proposal
    log_q = _checks.floating(proposal, "proposal")
    if log_q.shape != (num_classes,):
        raise ValueError(
            f"proposal has shape {log_q.shape}: expected the log-probabilities of the "
            f"{num_classes} classes, shape ({num_classes},)"
        )
    return lax.stop_gradient(log_q)


@jax.custom_vjp
def _row_logits(x, w, labels, classes):
    """``(x_i . w[y_i]`` ``[N]``, ``x @ w[classes].T`` ``[N, S]``), compute dtype; indices
    are clamped to ``w``'s rows (the callers mask what falls outside).

    Differentiated by hand so that ``dw`` never needs a ``[V, D]`` float32 accumulator: the
    ``N + S`` gathered rows' gradients are summed per distinct class in float32 (a sort,
    ``segment_sum``), cast once and written into ``dw``'s zeros.
    """
    return _row_logits_fwd(x, w, labels, classes)[0]


def _clip(idx, v):
    return jnp.clip(idx, 0, v - 1)


def _row_logits_fwd(x, w, labels, classes):
    dtype = nx.compute_dtype(x.dtype)
    target = chunked.target_dots(x, w, labels)
    samp = nx.dot(x, w[_clip(classes, w.shape[0])], (1, 1), dtype)
    return (target, samp), (x, w, labels, classes)


def _row_logits_bwd(res, cts):
    x, w, labels, classes = res
    ct_t, ct_s = cts
    dtype = nx.compute_dtype(x.dtype)
    v = w.shape[0]
    rows_y, rows_s = w[_clip(labels, v)], w[_clip(classes, v)]
    dx = ct_t[:, None] * rows_y.astype(dtype) + nx.dot(ct_s.astype(x.dtype), rows_s, (1, 0), dtype)
    d_rows = jnp.concatenate(
        [ct_t[:, None] * x.astype(dtype), nx.dot(ct_s.astype(x.dtype), x, (0, 0), dtype)]
    )
    idx = _clip(jnp.concatenate([labels, classes]), v)
    uniq, inverse = jnp.unique(idx, size=idx.shape[0], fill_value=v, return_inverse=True)
    summed = jax.ops.segment_sum(d_rows, inverse.reshape(-1), num_segments=idx.shape[0])
    dx = _sharding.sum_to_type(dx, x)
    return dx.astype(x.dtype), _write_rows(summed, uniq, w.shape, w.dtype), None, None


_row_logits.defvjp(_row_logits_fwd, _row_logits_bwd)


def _write_rows(rows, idx, shape, dtype):
    """A ``shape`` array of ``dtype``: ``rows[k]`` (``[K, D]``) at row ``idx[k]`` (sorted,
    distinct; entries ``>= shape[0]`` unused), zeros elsewhere.

    A gather from the ``K`` rows rather than a scatter into zeros: each output row finds
    its position among ``idx`` (``searchsorted``), so the ``[V, D]`` result is written once,
    as the output. A scatter would add a ``[V, D]`` temporary (XLA:CPU converts a
    bfloat16 scatter's operand to float32, and a bit-cast scatter needs a copy back).
    """
    cls = lax.iota(jnp.int32, shape[0])
    pos = jnp.clip(jnp.searchsorted(idx, cls), 0, idx.shape[0] - 1)
    found = idx[pos] == cls
    return jnp.where(found[:, None], rows[pos], 0.0).astype(dtype)


def _logits(x, w, labels, classes, axis):
    """The target logits ``[N]`` and the sampled ones ``[N, S]``, with ``w`` sharded over
    ``axis`` along ``V``: each shard fills the classes it holds, the parts are summed."""
    local_y, here_y = api._local_labels(labels, w.shape[0], axis)
    local_c, here_c = api._local_labels(classes, w.shape[0], axis)
    target, samp = _row_logits(x, w, local_y, local_c)
    if axis is None:
        return target, samp
    target = lax.psum(jnp.where(here_y, target, 0.0), axis)
    return target, lax.psum(jnp.where(here_c[None, :], samp, 0.0), axis)


class _Static(NamedTuple):
    """The static choices of one call."""

    num_samples: int
    num_classes: int
    remove_hits: bool
    reduction: str
    axis: object


@partial(jax.jit, static_argnums=(0, 1))
def _run(static: _Static, name, x, w, labels, valid, key, log_q, cap):
    """The loss of flattened operands (``x`` ``[N, D]``, ``labels``/``valid`` ``[N]``) under
    one ``jit``: an eager call (a notebook) runs one compiled executable, not op by op."""
    dtype = nx.compute_dtype(x.dtype)
    n, axis = x.shape[0], static.axis
    proposal = name if log_q is None else log_q
    classes, log_sq = draw(key, static.num_samples, static.num_classes, proposal)
    classes, log_sq = lax.stop_gradient(classes), lax.stop_gradient(log_sq).astype(dtype)
    target, sampled = _logits(x, w, labels, classes, axis)
    target, sampled = nx.softcap(target, cap), nx.softcap(sampled, cap) - log_sq[None, :]
    if static.remove_hits:
        sampled = jnp.where(classes[None, :] == labels[:, None], -jnp.inf, sampled)
    logits = jnp.concatenate([target[:, None], sampled], axis=-1)
    zeros = jnp.zeros((n,), jnp.int32)
    losses = _losses.cross_entropy(logits, zeros, where=valid, reduction="none")
    losses = losses + _losses.bad_labels(labels, valid, static.num_classes, dtype)
    return _losses.reduce_losses(losses, jnp.sum(valid.astype(dtype)), static.reduction)


def sampled_softmax_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    key: ArrayLike,
    *,
    num_samples: int,
    proposal: str | ArrayLike = "log_uniform",
    remove_accidental_hits: bool = True,
    logit_softcap: float | None = None,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    reduction: _losses.Reduction = "mean",
    vocab_axis_name: Hashable | None = None,
) -> jax.Array:
    """Sampled-softmax cross-entropy of the logits ``x @ w.T``: the target and ``S`` sampled
    classes instead of all ``V``, with the log-Q correction.

    ``S = num_samples`` classes are drawn with replacement from ``Q`` with ``key`` (one
    draw for the whole batch) and each row's loss is::

        ℓ_i = log( e^(z_i,y) + Σ_j [c_j != y_i] e^(z_i,c_j - log(S Q(c_j))) ) - z_i,y

    whose normaliser is an unbiased estimate of ``Σ_c e^(z_i,c)``: the loss and its
    gradient tend to :func:`linear_cross_entropy`'s as ``S`` grows (for finite ``S`` the
    expected loss is lower: the log of an unbiased estimate). Cost: a gather of ``[S, D]``
    rows of ``w`` and an ``[N, S]`` matmul; memory ``O(N S)``, flat in ``V``.

    Args:
      x: hidden states ``[..., D]``; w: output embedding ``[V, D]`` (with
        ``vocab_axis_name``: this device's shard).
      labels: integer ``[...]`` global class indices (an out-of-range counted label gives
        NaN).
      key: a ``jax.random`` key (the same on every device with ``vocab_axis_name``).
      num_samples: ``S >= 1``, a Python int.
      proposal: "log_uniform" (``Q(c) = log(1 + 1/(c+1)) / log(V+1)``, for classes sorted by
        decreasing frequency, as word-piece vocabularies are), "uniform", or a ``[V]`` array
        of class log-probabilities (e.g. log unigram frequencies; normalised here).
      remove_accidental_hits: mask sampled classes equal to the row's target (the default;
        the estimate above). With False they stay in the sum, which then counts the target
        twice in expectation: biased even as ``S`` grows (kept for parity with
        implementations that do so).
      logit_softcap: ``c`` applies ``c * tanh(z / c)`` to the logits first.
      ignore_index, where, reduction: as :func:`linear_cross_entropy` ("mean" over the
        counted positions).
      vocab_axis_name: the ``shard_map`` mesh axis ``w`` is sharded over along ``V``.

    Returns:
      float32 (float64 for float64 inputs): a scalar, or ``labels``' shape for "none".
      Differentiable in ``x`` and ``w`` (reverse mode: ``dw`` is summed per distinct
      sampled or target class, never through a ``[V, D]`` float32 buffer); ``key`` and
      the proposal are constants.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import softjax
      >>> x = jnp.ones((4, 8)); w = jnp.ones((10, 8)) / 8
      >>> loss = softjax.sampled_softmax_cross_entropy(
      ...     x, w, jnp.array([0, 1, 2, 3]), jax.random.key(0), num_samples=5)
      >>> loss.shape
      ()
    """
    x, w = api._operands(x, w)
    api._check_sharded(w, vocab_axis_name)
    num_samples = _checks.number(num_samples, "num_samples", integral=True)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not isinstance(remove_accidental_hits, bool):
        raise TypeError(f"remove_accidental_hits must be a bool, got {remove_accidental_hits!r}")
    mm_dtype = jnp.promote_types(x.dtype, w.dtype)
    dtype = nx.compute_dtype(mm_dtype)
    cap = _losses.loss_options(0.0, 0.0, logit_softcap, reduction, dtype).softcap
    batch_shape = x.shape[:-1]
    labels = _checks.int_labels(
        labels, batch_shape, f"x {x.shape} without its last axis", "sampled_softmax_cross_entropy"
    )
    valid = _checks.mask(where, batch_shape)
    valid = jnp.ones(batch_shape, bool) if valid is None else valid
    ignore_index = _checks.ignore_index(ignore_index)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    v_local = w.shape[0]
    axis = vocab_axis_name
    num_classes = v_local if axis is None else v_local * lax.axis_size(axis)
    proposal = _proposal(proposal, num_classes)
    n = math.prod(batch_shape)
    x2 = x.astype(mm_dtype).reshape(n, x.shape[-1])
    labels, valid = labels.reshape(n), valid.reshape(n)

    static = _Static(num_samples, int(num_classes), remove_accidental_hits, reduction, axis)
    name, log_q = (proposal, None) if isinstance(proposal, str) else (None, proposal)
    out = _run(static, name, x2, w.astype(mm_dtype), labels, valid, key, log_q, cap)
    return out.reshape(batch_shape) if reduction == "none" else out
