"""``linear_log_probs``: per-token log-probabilities (and entropies) of ``x @ w.T``, streamed.

With ``z = softcap(x w^T) / T`` (``[N, V]``, never materialised on the streaming paths)::

    log p_i(y_i) = z[i, y_i] - lse_i,        H_i = lse_i - sum_c p_ic z_ic

Without a temperature or the entropy, ``log p(y)`` is minus the per-row cross-entropy, so
every backend of ``linear_cross_entropy`` serves it as is (``api.row_losses``: the Pallas
kernels, the vocab-parallel merge). With them, the streaming pass (``chunked.forward_stats``
or the Pallas forward kernel) also keeps two moments of the logits below the running
maximum ``m`` (``chunked.Moments``)::

    s1 = sum_c e^(z_c - m) (m - z_c),   s2 = sum_c e^(z_c - m) (m - z_c)^2,   S0 = e^(lse - m)
    H = log S0 + s1 / S0,               Var_p(z) = s2 / S0 - (s1 / S0)^2

and the custom VJP recomputes each block of logits into its gradient block
(``chunked.backward``, or the Pallas kernels' ``pallas.backward``) with::

    d/dz_c [g log p_y + h H] = g ([c = y] - p_c) + h p_c ((m - z_c) - s1 / S0)
    d/dT                     = -(g (log p_y + H) - h Var_p(z)) / T

so memory stays flat in ``V``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from .. import _checks, _dispatch, _losses, _sharding, _softmax
from .. import _numerics as nx
from . import api, chunked, pallas


def _merge_moments(st: chunked.Stats, mo: chunked.Moments, m, axis) -> chunked.Moments:
    """The moments of every shard re-anchored at the global maximum ``m`` and summed."""
    if axis is None:
        return mo
    s1, s2 = chunked.reanchor_moments(mo, st.m, m, 1 + st.rest + st.rest_c)
    return chunked.Moments(lax.psum(s1, axis), lax.psum(s2, axis))


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _tempered(x, w, labels, valid, scale, cap, cfg: api.Config):
    """``(log p(y), H)`` per row ``[N]`` of ``z = scale * softcap(x @ w.T)`` (chunked)."""
    return _tempered_fwd(x, w, labels, valid, scale, cap, cfg)[0]


def _tempered_fwd(x, w, labels, valid, scale, cap, cfg: api.Config):
    axis, v_local = cfg.axis_name, w.shape[0]
    lmap = chunked.LogitMap(cap, scale)
    st, mo = cfg.stream.forward_stats(cfg, x, w, None, lmap, moments=True)
    merged = api._merge_shards(st, jnp.asarray(v_local, st.m.dtype), axis)
    mo = _merge_moments(st, mo, merged.m, axis)
    local, here = api._local_labels(labels, v_local, axis)
    z_y = chunked.target_logits(x, w, local, lmap)
    z_y = z_y if axis is None else lax.psum(jnp.where(here, z_y, 0.0), axis)
    bad = _losses.bad_labels(labels, valid, cfg.num_classes, nx.compute_dtype(x.dtype))
    log_p = jnp.where(valid, -((merged.m - z_y) + merged.log_norm), 0.0) + bad
    total = jnp.exp(merged.log_norm)
    mean_gap = mo.s1 / total  # E_p[m - z]
    entropy = jnp.where(valid, merged.log_norm + mean_gap, 0.0) + bad
    var = jnp.maximum(mo.s2 / total - mean_gap * mean_gap, 0.0)
    stats = (merged.m, merged.log_norm, mean_gap, var)
    return (log_p, entropy), (x, w, labels, valid, scale, cap, *stats, log_p, entropy)


def _tempered_bwd(cfg: api.Config, res, cts):
    x, w, labels, valid, scale, cap, m, log_norm, mean_gap, var, log_p, entropy = res
    g, h = (jnp.where(valid, c, 0.0) for c in cts)
    zero = jnp.zeros_like(g)
    coefs = _losses.GradCoefs(prob=-g - h * mean_gap, target=-g, smooth=zero, spread=h)
    local, _ = api._local_labels(labels, w.shape[0], cfg.axis_name)
    lmap = chunked.LogitMap(cap, scale)
    shift = nx.empty_row_shift(m)
    dx, dw = cfg.stream.backward(cfg, x, w, local, valid, coefs, shift, log_norm, None, lmap)
    dx, dw = _sharding.sum_to_type(dx, x), _sharding.sum_to_type(dw, w)
    # sum_c dL/dz_c * z_c = g (log p_y + H) - h Var_p(z), and z is linear in the scale.
    terms = jnp.where(valid, g * (log_p + entropy) - h * var, 0.0)
    d_scale = _sharding.sum_to_type(jnp.sum(terms) / scale, scale)
    d_cap = None if cap is None else jnp.zeros_like(cap)
    return dx.astype(x.dtype), dw, None, None, d_scale.astype(scale.dtype), d_cap


_tempered.defvjp(_tempered_fwd, _tempered_bwd)


def _plain(x, w, labels, valid, scale, cap, cfg: api.Config, entropy: bool):
    """Minus the per-row cross-entropy (the streaming backend ``cfg.stream``)."""
    del scale, entropy
    zero = jnp.zeros((), nx.compute_dtype(x.dtype))
    opts = _losses.Options(smoothing=zero, z_loss=zero, softcap=cap)
    losses = api.row_losses(x, w, labels, valid, None, opts, cfg)
    return -losses, None


def _streamed(x, w, labels, valid, scale, cap, cfg: api.Config, entropy: bool):
    """Minus the row loss without a temperature or the entropy, else :func:`_tempered`, on
    the streaming backend ``cfg.stream``."""
    if scale is None and not entropy:
        return _plain(x, w, labels, valid, scale, cap, cfg, entropy)
    scale = jnp.ones((), nx.compute_dtype(x.dtype)) if scale is None else scale
    log_p, ent = _tempered(x, w, labels, valid, scale, cap, cfg)
    return log_p, ent if entropy else None


def _chunked(*args):
    return _streamed(*args[:6], args[6]._replace(stream=api.CHUNKED), args[7])


def _pallas(*args):
    return _streamed(*args[:6], args[6]._replace(stream=api.PALLAS), args[7])


def _materialized(x, w, labels, valid, scale, cap, cfg: api.Config, entropy: bool):
    """``"xla"``: the ``[N, V]`` float32 logits, then :func:`softjax.log_softmax` (``w``
    gathered first with ``vocab_axis_name``); differentiated by autodiff."""
    if cfg.axis_name is not None:
        w = lax.all_gather(w, cfg.axis_name, tiled=True)
    raw = nx.dot(x, w, (1, 1), nx.compute_dtype(x.dtype))
    z = chunked.map_logits(raw, chunked.LogitMap(cap, scale))
    log_probs = _softmax.log_softmax(z, axis=-1)
    safe = jnp.clip(labels, 0, w.shape[0] - 1)
    log_p = jnp.take_along_axis(log_probs, safe[:, None], axis=-1)[:, 0]
    bad = _losses.bad_labels(labels, valid, cfg.num_classes, nx.compute_dtype(x.dtype))
    log_p = jnp.where(valid, log_p, 0.0) + bad
    ent = None
    if entropy:
        p = jnp.exp(log_probs)
        ent = -jnp.sum(nx.zero_where_prob_zero(p, log_probs), axis=-1)
        ent = jnp.where(valid, ent, 0.0) + bad
    return log_p, ent


def _pallas_unsupported(call: _dispatch.Call) -> str | None:
    return pallas.unsupported(call.dtypes["w"], call.shapes["w"][0])


def _preference(call: _dispatch.Call) -> tuple[str, ...]:
    del call
    return ("chunked",)  # as linear_cross_entropy (see api._preference)


REGISTRY = _dispatch.Registry("linear_log_probs", _preference)
REGISTRY.register("xla", _materialized)
REGISTRY.register("chunked", _chunked)
REGISTRY.register("pallas", _pallas, _pallas_unsupported)


def temperature_scale(temperature, dtype):
    """``1 / T`` as a scalar of ``dtype``, or None for a literal 1 (nothing to scale)."""
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        return None if temperature == 1 else jnp.asarray(1.0 / temperature, dtype)
    t = _checks.floating(temperature, "temperature")
    if t.ndim != 0:
        raise ValueError(f"temperature must be a scalar, got shape {t.shape}")
    value = _checks.concrete_value(t)
    if value is not None and not (np.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
    return 1 / t.astype(dtype)


def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    labels: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    logit_softcap: float | None = None,
    where: ArrayLike | None = None,
    return_entropy: bool = False,
    vocab_axis_name: Hashable | None = None,
    implementation: _dispatch.Name | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Log-probability of ``labels`` under ``softmax(x @ w.T)``, without the ``[N, V]`` logits.

    With ``z = softcap(x w^T) / T``::

        log p_i = z[i, y_i] - log Σ_c e^(z[i, c]),      H_i = -Σ_c p[i, c] log p[i, c]

    the per-token scores of sequence scoring, perplexity, and the policy ratios of RL
    post-training (PPO, GRPO, DPO), with their gradients. Computed as
    :func:`linear_cross_entropy` is: an online logsumexp over vocabulary blocks (plus two
    moments of the logits for the entropy and the temperature's gradient), a custom VJP that
    recomputes each block of logits into its gradient block; memory flat in ``V``.

    Args:
      x: hidden states ``[..., D]``, float32 or bfloat16 (float16, float64 too).
      w: output embedding ``[V, D]`` (with ``vocab_axis_name``: this device's shard).
      labels: integer ``[...]`` (``x``'s shape without ``D``), global class indices; a
        label outside ``[0, V)`` at a counted position gives NaN (a bug in the data).
      temperature: ``T > 0``, a Python number or a traced scalar (differentiable). Applied
        after the soft-cap, as sampling applies it to a model's (capped) logits.
      logit_softcap: ``c`` applies ``c * tanh(z / c)`` to the raw logits first (Gemma 2).
      where: optional boolean broadcastable to ``labels``' shape; False positions give
        ``log p = 0`` and ``H = 0``, with zero gradient.
      return_entropy: also return the entropy ``H`` of each position's distribution.
      vocab_axis_name: the ``shard_map`` mesh axis ``w`` is sharded over along ``V``.
      implementation: "chunked" (streaming, any backend; the default), "pallas" (the
        kernels of :func:`linear_cross_entropy`, which also take the temperature and keep
        the moments; not float64), "xla" (materialises the float32 logits; small
        vocabularies, references) or None.

    Returns:
      float32 (float64 for float64 inputs) ``log p`` of ``labels``' shape, and with
      ``return_entropy`` the pair ``(log_p, entropy)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> x = jnp.ones((2, 4)); w = jnp.eye(3, 4)
      >>> softjax.linear_log_probs(x, w, jnp.array([0, 2]))
      Array([-1.0986123, -1.0986123], dtype=float32)
    """
    x, w = api._operands(x, w)
    api._check_sharded(w, vocab_axis_name)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {return_entropy!r}")
    mm_dtype = jnp.promote_types(x.dtype, w.dtype)
    dtype = nx.compute_dtype(mm_dtype)
    cap = _losses.loss_options(0.0, 0.0, logit_softcap, "none", dtype).softcap
    scale = temperature_scale(temperature, dtype)
    batch_shape = x.shape[:-1]
    labels = _checks.int_labels(
        labels, batch_shape, f"x {x.shape} without its last axis", "linear_log_probs"
    )
    valid = _checks.mask(where, batch_shape)
    valid = jnp.ones(batch_shape, bool) if valid is None else valid
    call = _dispatch.Call(
        shapes={"x": x.shape, "w": w.shape},
        dtypes={"x": x.dtype, "w": mm_dtype},
        options={
            "vocab_axis_name": vocab_axis_name,
            "temperature": scale is not None,
            "return_entropy": return_entropy,
        },
    )
    impl = REGISTRY.select(implementation, call)
    v_local = w.shape[0]
    num_classes = v_local if vocab_axis_name is None else v_local * lax.axis_size(vocab_axis_name)
    n = math.prod(batch_shape)
    cfg = api.Config(
        stream=None,
        axis_name=vocab_axis_name,
        num_classes=int(num_classes),
        block_v=chunked.default_block_v(n, v_local),
        smoothing=False,
    )
    x2 = x.astype(mm_dtype).reshape(n, x.shape[-1])
    args = (x2, w.astype(mm_dtype), labels.reshape(n), valid.reshape(n), scale, cap)
    log_p, entropy = _run(impl.fn, cfg, return_entropy, *args)
    if return_entropy:
        return log_p.reshape(batch_shape), entropy.reshape(batch_shape)
    return log_p.reshape(batch_shape)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _run(fn, cfg: api.Config, entropy: bool, *args):
    """``fn(*args, cfg, entropy)`` under one ``jit`` (see ``api._run``)."""
    return fn(*args, cfg, entropy)
