"""``linear_cross_entropy``: validation, dispatch and the custom VJP shared by all backends.

Three implementations (``softjax._dispatch``): ``"xla"`` materialises the logits and calls
the loss of :func:`softjax.cross_entropy`; ``"chunked"`` (``chunked.py``) and ``"pallas"``
(``pallas.py``) stream over vocabulary blocks. The per-row maths is that of
:func:`softjax.cross_entropy` (``softjax._losses``), split across vocabulary blocks. A
streaming backend supplies two functions (a :class:`Streaming` pair):

* ``forward_stats(x, w, class_weight, cap, ...)`` -> per-row running max ``m``,
  ``rest = sum_c exp(z_c - m) - 1`` and ``d = sum_c w_c (m - z_c)`` over its ``w``;
* ``backward(x, w, labels, row_ok, coefs, shift, log_norm, class_weight, cap, ...)`` ->
  float32 ``dx`` (summed over its ``w``) and ``dw``.

Everything else (the target logit, the vocab-parallel merge, the per-row loss and its
gradient coefficients) is written once here. A second custom VJP, for scalar reductions
with float32 weights, differentiates by ``chunked.single_pass`` (loss and gradients together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from .. import _checks, _dispatch, _losses, _sharding
from .. import _numerics as nx
from .._sharding import psum as _psum
from . import chunked, pallas


class Streaming(NamedTuple):
    """A streaming backend: ``forward_stats(cfg, x, w, class_weight, cap, moments=False) ->
    Stats`` (``(Stats, Moments)`` with ``moments``) and ``backward(cfg, *args) -> (dx, dw)``
    (the contract in the module docstring; ``cap`` may be a ``chunked.LogitMap``)."""

    forward_stats: Callable
    backward: Callable


class Config(NamedTuple):
    """Static choices of one call (hashable: it is a ``nondiff_argnums`` argument)."""

    stream: Streaming | None  # the streaming backend (None for "xla")
    axis_name: object  # mesh axis the vocabulary is sharded over, or None
    num_classes: int  # the full vocabulary V (all shards)
    block_v: int
    smoothing: bool  # accumulate the smoothing sum (False when label_smoothing is a literal 0)


def _chunked_stats(cfg: Config, x, w, class_weight, cap, moments=False):
    return chunked.forward_stats(
        x, w, class_weight, cap, block_v=cfg.block_v, smoothing=cfg.smoothing, moments=moments
    )


def _chunked_backward(cfg: Config, *args):
    return chunked.backward(*args, block_v=cfg.block_v)


def _pallas_stats(cfg: Config, x, w, class_weight, cap, moments=False):
    return pallas.forward_stats(x, w, class_weight, cap, smoothing=cfg.smoothing, moments=moments)


def _pallas_backward(cfg: Config, *args):
    # Vocabulary shards sum their partial dx: keep it in float32 until then.
    return pallas.backward(*args, dx_dtype=None if cfg.axis_name is None else jnp.float32)


CHUNKED = Streaming(_chunked_stats, _chunked_backward)
PALLAS = Streaming(_pallas_stats, _pallas_backward)


class Merged(NamedTuple):
    """Row statistics over the whole vocabulary (all shards), each ``[N]``."""

    m: jax.Array
    log_norm: jax.Array  # log1p(rest): lse = m + log_norm
    d: jax.Array  # sum_c w_c (m - z_c)


def _merge_shards(st: chunked.Stats, w_local, axis) -> Merged:
    """Combines the per-shard statistics with ``pmax``/``psum`` (identity unsharded).

    The shards at the global maximum contribute their ``rest`` as is (plus 1 for every such
    shard beyond the first), the others ``(1 + rest) * exp(m_local - m)``, so that a
    dominant class keeps its tiny loss exact across shards too.
    """
    rest = st.rest + st.rest_c
    if axis is None:
        return Merged(st.m, jnp.log1p(rest), st.d)
    m = lax.pmax(st.m, axis)
    at_max = st.m == m
    shift = nx.empty_row_shift(m)
    contrib = jnp.where(at_max, rest, (1 + rest) * jnp.exp(st.m - shift))
    count = lax.psum(at_max.astype(rest.dtype), axis)
    total = lax.psum(contrib, axis) + jnp.maximum(count - 1, 0.0)
    moved = jnp.where(jnp.isfinite(st.m) & (w_local != 0), (m - st.m) * w_local, 0.0)
    return Merged(m, jnp.log1p(total), lax.psum(st.d + moved, axis))


def _local_labels(labels, v_local, axis):
    """Labels relative to this shard's first class, and whether they fall in it."""
    offset = 0 if axis is None else lax.axis_index(axis) * v_local
    local = labels - offset
    return local, (local >= 0) & (local < v_local)


def _class_weight_sum(class_weight, v_local, axis, dtype):
    """``sum_c w_c`` over the local classes, and over all of them."""
    local = jnp.asarray(v_local, dtype) if class_weight is None else jnp.sum(class_weight)
    return local, _psum(local, axis)


def label_weights(class_weight, labels, v_local, axis, dtype):
    """``w_{y_i}`` per row (1 without class weights); 0 for labels outside the vocabulary."""
    if class_weight is None:
        return jnp.ones(labels.shape, dtype)
    if axis is None:
        return _losses._label_weight(class_weight, labels, dtype)
    local, here = _local_labels(labels, v_local, axis)
    return lax.psum(jnp.where(here, class_weight[jnp.clip(local, 0, v_local - 1)], 0.0), axis)


def _terms(labels, valid, class_weight, opts, cfg, v_local, dtype):
    lw = label_weights(class_weight, labels, v_local, cfg.axis_name, dtype)
    return _losses.label_terms(labels, valid, lw, cfg.num_classes, opts)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def row_losses(x, w, labels, valid, class_weight, opts: _losses.Options, cfg: Config):
    """Per-row losses ``[N]`` of ``cross_entropy(x @ w.T, labels)`` (x ``[N, D]``, w ``[V, D]``)."""
    return _row_losses_fwd(x, w, labels, valid, class_weight, opts, cfg)[0]


def _row_losses_fwd(x, w, labels, valid, class_weight, opts, cfg: Config):
    dtype = nx.compute_dtype(x.dtype)
    v_local, axis = w.shape[0], cfg.axis_name
    st = cfg.stream.forward_stats(cfg, x, w, class_weight, opts.softcap)
    w_local, w_sum = _class_weight_sum(class_weight, v_local, axis, dtype)
    merged = _merge_shards(st, w_local, axis)
    local, here = _local_labels(labels, v_local, axis)
    z_y = chunked.target_logits(x, w, local, opts.softcap)
    z_y = z_y if axis is None else lax.psum(jnp.where(here, z_y, 0.0), axis)
    terms = _terms(labels, valid, class_weight, opts, cfg, v_local, dtype)
    n_y = (merged.m - z_y) + merged.log_norm
    smooth = merged.d + w_sum * merged.log_norm
    loss = _losses.combine_row_terms(terms, n_y, smooth, merged.m + merged.log_norm)
    res = (x, w, labels, valid, class_weight, opts, merged.m, merged.log_norm)
    return loss, res


def _row_losses_bwd(cfg: Config, res, g):
    x, w, labels, valid, class_weight, opts, m, log_norm = res
    dtype = nx.compute_dtype(x.dtype)
    v_local, axis = w.shape[0], cfg.axis_name
    terms = _terms(labels, valid, class_weight, opts, cfg, v_local, dtype)
    _, w_sum = _class_weight_sum(class_weight, v_local, axis, dtype)
    coefs = _losses.grad_coefs(terms, w_sum, m + log_norm, g.astype(dtype))
    shift = nx.empty_row_shift(m)
    local, _ = _local_labels(labels, v_local, axis)
    args = (x, w, local, valid, coefs, shift, log_norm, class_weight, opts.softcap)
    dx, dw = cfg.stream.backward(cfg, *args)
    # Each vocabulary shard holds the part of dx from its classes, each token shard the part
    # of dw from its tokens: sum over the mesh axes the primal does not vary over.
    dx, dw = _sharding.sum_to_type(dx, x), _sharding.sum_to_type(dw, w)
    zeros = None if class_weight is None else jnp.zeros_like(class_weight)
    return dx.astype(x.dtype), dw, None, None, zeros, jax.tree.map(jnp.zeros_like, opts)


row_losses.defvjp(_row_losses_fwd, _row_losses_bwd)


# ---------------------------------------------------------------------------------------
# Scalar reductions with float32 weights: one pass computes the loss and its gradients.


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def reduced_loss(x, w, labels, valid, class_weight, opts, cfg: Config, reduction: str):
    """``reduce(row_losses(...))`` for "mean"/"sum"; differentiated in a single pass."""
    losses = row_losses(x, w, labels, valid, class_weight, opts, cfg)
    return _reduce(losses, labels, valid, class_weight, cfg, reduction, w.shape[0])[0]


def _reduce(losses, labels, valid, class_weight, cfg, reduction, v_local):
    """The reduced loss and the factor it applies to the rows (1, or 1 / the denominator)."""
    dtype = losses.dtype
    lw = label_weights(class_weight, labels, v_local, cfg.axis_name, dtype)
    den = jnp.sum(jnp.where(valid, lw, 0.0))
    out = _losses.reduce_losses(losses, den, reduction)
    one = jnp.ones((), dtype)
    return out, one if reduction == "sum" else nx.safe_divide(one, den)


def _reduced_loss_fwd(x, w, labels, valid, class_weight, opts, cfg, reduction):
    dtype = nx.compute_dtype(x.dtype)
    terms = _terms(labels, valid, class_weight, opts, cfg, w.shape[0], dtype)
    block = chunked.default_single_pass_block(x.shape[0], w.shape[0])
    losses, dx, dw = chunked.single_pass(
        x,
        w,
        labels,
        valid,
        terms,
        class_weight,
        opts.softcap,
        block_n=block,
        smoothing=cfg.smoothing,
    )
    out, scale = _reduce(losses, labels, valid, class_weight, cfg, reduction, w.shape[0])
    return out, (dx, dw, scale, class_weight, opts)


def _reduced_loss_bwd(cfg, reduction, res, g):
    dx, dw, scale, class_weight, opts = res
    s = scale * g
    zeros = None if class_weight is None else jnp.zeros_like(class_weight)
    return (
        (dx * s).astype(dx.dtype),
        (dw * s).astype(dw.dtype),
        None,
        None,
        zeros,
        jax.tree.map(jnp.zeros_like, opts),
    )


reduced_loss.defvjp(_reduced_loss_fwd, _reduced_loss_bwd)


# ---------------------------------------------------------------------------------------
# The implementations: each takes the flattened operands (x [N, D], w [V, D], labels and
# valid [N]) and returns the reduced loss, or the per-row losses [N] for "none".


def _materialized(x, w, labels, valid, class_weight, opts, cfg: Config, reduction):
    """``"xla"``: the ``[N, V]`` logits in float32, then :func:`softjax.cross_entropy`'s loss
    (with ``vocab_axis_name``, ``w`` and the class weights are gathered first)."""
    if cfg.axis_name is not None:
        w = lax.all_gather(w, cfg.axis_name, tiled=True)
        if class_weight is not None:
            class_weight = lax.all_gather(class_weight, cfg.axis_name, tiled=True)
    logits = nx.dot(x, w, (1, 1), nx.compute_dtype(x.dtype))
    losses = _losses.int_label_losses(logits, labels, valid, class_weight, opts, cfg.smoothing)
    whole = cfg._replace(axis_name=None)
    out = _reduce(losses, labels, valid, class_weight, whole, reduction, w.shape[0])[0]
    if cfg.axis_name is None:
        return out
    # Every device computed the same loss from the gathered w, typed as varying over the
    # axis: their mean is that loss, invariant, and its gradient sums the devices' shares.
    return lax.psum(out, cfg.axis_name) / lax.axis_size(cfg.axis_name)


def _single_pass_applies(cfg: Config, reduction: str, dtype) -> bool:
    """float32/float64 weights (dw accumulates in its own dtype), unsharded."""
    return cfg.axis_name is None and reduction != "none" and np.dtype(dtype).itemsize >= 4


def _chunked(x, w, labels, valid, class_weight, opts, cfg: Config, reduction):
    """``"chunked"``: vocabulary blocks in a ``fori_loop``; for scalar reductions of float32
    weights, one pass over token chunks computing the loss and both gradients."""
    cfg = cfg._replace(stream=CHUNKED)
    if _single_pass_applies(cfg, reduction, w.dtype):
        return reduced_loss(x, w, labels, valid, class_weight, opts, cfg, reduction)
    losses = row_losses(x, w, labels, valid, class_weight, opts, cfg)
    return _reduce(losses, labels, valid, class_weight, cfg, reduction, w.shape[0])[0]


def _pallas(x, w, labels, valid, class_weight, opts, cfg: Config, reduction):
    """``"pallas"``: the kernels of ``pallas.py``, one family per platform."""
    losses = row_losses(x, w, labels, valid, class_weight, opts, cfg._replace(stream=PALLAS))
    return _reduce(losses, labels, valid, class_weight, cfg, reduction, w.shape[0])[0]


def _pallas_unsupported(call: _dispatch.Call) -> str | None:
    return pallas.unsupported(call.dtypes["w"], call.shapes["w"][0])


def _preference(call: _dispatch.Call) -> tuple[str, ...]:
    # The Pallas kernels are verified in interpret mode and compiled (deviceless) for an
    # H200 and TPU v5e/v6e/v5p, but have not run on a chip yet; until they have
    # (python -m bench.device_check), the streaming XLA path is the default everywhere.
    # "xla" is never the default: its [N, V] logits are what this op exists to avoid.
    del call
    return ("chunked",)


REGISTRY = _dispatch.Registry("linear_cross_entropy", _preference)
REGISTRY.register("xla", _materialized)
REGISTRY.register("chunked", _chunked)
REGISTRY.register("pallas", _pallas, _pallas_unsupported)


def _operands(x, w, x_name: str = "x", w_name: str = "w"):
    """``x`` ``[..., D]`` and ``w`` ``[V, D]`` checked (floating, matching D, V > 0)."""
    x = _checks.floating(x, x_name)
    w = _checks.floating(w, w_name)
    if x.ndim < 1:
        raise ValueError(
            f"{x_name} must have shape [..., D] with the hidden axis last, got shape ()"
        )
    if w.ndim != 2:
        raise ValueError(f"{w_name} must have shape (V, D), got shape {w.shape}")
    if w.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{w_name} has shape {w.shape} but {x_name} {x.shape} has hidden size "
            f"D={x.shape[-1]}: expected {w_name} of shape (V, {x.shape[-1]})"
        )
    if w.shape[0] == 0:
        raise ValueError(f"{w_name} must have at least one class (row), got shape {w.shape}")
    return x, w


def _check_sharded(w, axis_name) -> None:
    """With ``vocab_axis_name``, ``w`` must be typed as varying over that mesh axis."""
    if (
        axis_name is not None
        and _sharding.tracks_varying_axes(w)
        and axis_name not in _sharding.varying_axes(w)
    ):
        # Without the varying-axes types, shard_map cannot tell which cotangents to sum over
        # the mesh: the gradients would be silently wrong. Refuse instead.
        raise ValueError(
            f"vocab_axis_name={axis_name!r} needs w sharded over that mesh axis inside "
            "jax.shard_map with check_vma=True (the default); w does not vary over it here"
        )


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: _losses.Reduction = "mean",
    vocab_axis_name: Hashable | None = None,
    implementation: _dispatch.Name | None = None,
) -> jax.Array:
    """Cross-entropy of the logits ``x @ w.T`` without ever materialising them.

    Equals ``softjax.cross_entropy(x @ w.T, labels, ...)`` with the same options and
    semantics (PyTorch's, see :func:`softjax.cross_entropy`): with ``z = softcap(x w^T)``, ::

          ℓ_i = (1 - a) · w[y_i] · (lse_i - z[i, y_i])
              + (a / V) · Σ_c w[c] · (lse_i - z[i, c])
              + λ_z · w[y_i] · lse_i²,
        lse_i = log Σ_c e^(z[i, c])

    computed by streaming over vocabulary blocks: an online logsumexp (running max and sum,
    merged across blocks and, with ``vocab_axis_name``, across devices), the target logit as
    a direct dot product ``x_i . w_{y_i}``, and a custom VJP that saves only ``lse`` per
    token and recomputes each block of logits to turn it into its gradient block. Temporary
    memory is flat in ``V`` and linear in the number of tokens.

    Args:
      x: hidden states ``[..., D]`` (e.g. ``[B, T, D]``), float32 or bfloat16 (float64 too).
      w: output embedding ``[V, D]`` (tied-embedding layout; a Flax ``Dense`` kernel is
        ``w.T``). With ``vocab_axis_name``, this device's shard ``[V / P, D]``.
      labels: integer ``[...]`` (``x``'s shape without ``D``), global class indices.
      weight: optional ``[V]`` class weights (with ``vocab_axis_name``: sharded like ``w``).
      ignore_index: labels equal to it are excluded (loss 0, no gradient).
      where: optional boolean broadcastable to ``labels``' shape; False excludes.
      label_smoothing: ``a`` in [0, 1], as PyTorch.
      z_loss: coefficient of ``lse**2`` per valid token (PaLM).
      logit_softcap: ``c`` applies ``c * tanh(z / c)`` to the logits first (Gemma 2).
      reduction: "mean" (over the weights of valid tokens; 0 if none), "sum" or "none".
      vocab_axis_name: the ``shard_map`` mesh axis ``w`` is sharded over along ``V``; the
        per-device max, sum and target logit are combined with ``pmax``/``psum``, ``w`` and
        the logits are never gathered.
      implementation: "chunked" (streaming ``lax.fori_loop``, any backend), "pallas"
        (Pallas kernels: Mosaic on TPU, Triton on GPU, chosen when lowering, so a function
        compiled or exported for another platform holds that platform's kernel; interpreted
        on CPU, slow, for tests), "xla" (materialises the ``[N, V]`` float32 logits, then
        exactly :func:`softjax.cross_entropy`: small vocabularies, references) or None
        ("chunked" for now, on every platform). The names mean the same in every op
        (``softjax._dispatch``); "pallas" raises ``NotImplementedError`` for float64 and for
        ``2**24`` classes or more per call.

    Returns:
      float32 (float64 for float64 inputs): a scalar, or ``labels``' shape for "none".

    Matmuls take ``x`` and ``w`` in their own dtype and accumulate in float32; ``dx`` and
    each block of ``dw`` are accumulated in float32 and cast once.

    Differentiation: reverse mode (``grad``, ``vjp``) with respect to ``x`` and ``w``. The
    custom VJP that keeps memory flat recomputes the logits in its backward pass, which has
    no forward-mode counterpart: ``jvp``/``jacfwd`` raise JAX's "can't apply forward-mode
    autodiff (jvp) to a custom_vjp function". ``weight`` and the options are constants.

    Memory and speed (chunked path): with bf16/f16 weights, or reduction "none", or
    ``vocab_axis_name``, temporary memory is flat in ``V`` (logits blocks of a fixed size
    plus ``dx`` in float32) at the cost of one extra matmul (the backward recomputes the
    logits). With float32/float64 weights and "mean"/"sum", differentiation runs one pass
    over token chunks that computes the loss and both gradients together (three matmuls,
    as the materialising path); its temporary memory is flat in ``V`` except for one
    float32 ``dw``-sized buffer.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> x = jnp.ones((4, 8)); w = jnp.ones((10, 8)) / 8
      >>> softjax.linear_cross_entropy(x, w, jnp.array([0, 1, 2, 3]))
      Array(2.3025851, dtype=float32)
    """
    x, w = _operands(x, w)
    _check_sharded(w, vocab_axis_name)
    mm_dtype = jnp.promote_types(x.dtype, w.dtype)
    dtype = nx.compute_dtype(mm_dtype)
    opts = _losses.loss_options(label_smoothing, z_loss, logit_softcap, reduction, dtype)
    batch_shape = x.shape[:-1]
    labels = _checks.int_labels(
        labels, batch_shape, f"x {x.shape} without its last axis", "linear_cross_entropy"
    )
    v_local = w.shape[0]
    what = "class of this shard" if vocab_axis_name is not None else "class"
    class_weight = _checks.vector(weight, v_local, "weight", what)
    class_weight = None if class_weight is None else class_weight.astype(dtype)
    valid = _checks.mask(where, batch_shape)
    valid = jnp.ones(batch_shape, bool) if valid is None else valid
    ignore_index = _checks.ignore_index(ignore_index)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    call = _dispatch.Call(
        shapes={"x": x.shape, "w": w.shape},
        dtypes={"x": x.dtype, "w": mm_dtype},
        options={"vocab_axis_name": vocab_axis_name, "reduction": reduction},
    )
    impl = REGISTRY.select(implementation, call)
    num_classes = v_local if vocab_axis_name is None else v_local * lax.axis_size(vocab_axis_name)
    n = math.prod(batch_shape)
    smoothing = _checks.concrete_value(label_smoothing)
    cfg = Config(
        stream=None,
        axis_name=vocab_axis_name,
        num_classes=int(num_classes),
        block_v=chunked.default_block_v(n, v_local),
        smoothing=smoothing is None or bool(smoothing != 0),
    )
    x2 = x.astype(mm_dtype).reshape(n, x.shape[-1])
    args = (x2, w.astype(mm_dtype), labels.reshape(n), valid.reshape(n), class_weight, opts)
    out = _run(impl.fn, cfg, reduction, *args)
    return out.reshape(batch_shape) if reduction == "none" else out


@partial(jax.jit, static_argnums=(0, 1, 2))
def _run(fn, cfg: Config, reduction: str, *args):
    """``fn(*args, cfg, reduction)`` under one ``jit``: the streaming loops are built once
    per shape and option set, so an eager call (a notebook, a script) reuses the compiled
    executable instead of tracing and compiling its loops again on every call."""
    return fn(*args, cfg, reduction)
