"""``linear_kl_divergence``: distillation losses between two vocabulary-sized softmaxes, streamed.

A student ``z_s = x_s w_s^T / T`` and a teacher ``z_t = x_t w_t^T / T`` (``[N, V]`` each,
never materialised on the streaming paths) and a divergence of ``divergence.py``. Three
ways to compute it (``softjax._dispatch``):

* ``"chunked"``: a pass over vocabulary blocks for each side's logsumexp
  (``chunked.forward_stats``, merged across shards as the cross-entropy's), then one pass
  over the blocks of both that sums the divergence's terms; the custom VJP recomputes both
  blocks into the student's gradient block (``chunked.backward_blocks``). Memory flat in V.
* with float32 (float64) student weights and a scalar reduction, unsharded, the gradients
  come from one pass over token chunks that see the whole vocabulary
  (``chunked.single_pass_chunks``): four matmuls, as the materialising path.
* ``"xla"``: the float32 logits of both, :func:`softjax.log_softmax`, autodiff.

The teacher is a constant: no gradient is computed or kept for it (as under
``lax.stop_gradient``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from .. import _checks, _dispatch, _losses, _sharding, _softmax
from .. import _numerics as nx
from . import api, chunked
from . import divergence as dv
from .log_probs import temperature_scale


class Config(NamedTuple):
    """Static choices of one call (hashable: a ``nondiff_argnums`` argument)."""

    div: dv.Divergence
    axis_name: object  # the mesh axis the vocabulary is sharded over, or None
    block_v: int


def _log_probs(z, shift, log_norm, col_ok=None):
    """``z - lse`` of a block (``shift``/``log_norm`` ``[n]``), ``-inf`` outside ``col_ok``."""
    lp = (z - shift[:, None]) - log_norm[:, None]
    return lp if col_ok is None else jnp.where(col_ok[None, :], lp, -jnp.inf)


def _lse(x, w, lmap, cfg: Config):
    """Each row's ``(shift, log_norm)`` over the whole vocabulary (all shards)."""
    st = chunked.forward_stats(x, w, None, lmap, block_v=cfg.block_v, smoothing=False)
    merged = api._merge_shards(st, jnp.asarray(w.shape[0], st.m.dtype), cfg.axis_name)
    return nx.empty_row_shift(merged.m), merged.log_norm


def _sums(xs, ws, xt, wt, stats, lmap, cfg: Config):
    """The divergence's row sums ``(a, b)`` ``[N]`` over this shard's vocabulary blocks."""
    n, v = xs.shape[0], ws.shape[0]
    dtype = nx.compute_dtype(xs.dtype)
    bv = min(cfg.block_v, v)

    def body(i, carry):
        a, b, ops = carry
        xs, ws, xt, wt = chunked._opaque(ops)
        s, _, col_ok = chunked._block_start(i, bv, v)
        _, z_s = chunked.block_logits(xs, chunked._rows(ws, s, bv), lmap, dtype)
        _, z_t = chunked.block_logits(xt, chunked._rows(wt, s, bv), lmap, dtype)
        lp_s = _log_probs(z_s, *stats[:2], col_ok)
        lp_t = _log_probs(z_t, *stats[2:], col_ok)
        da, db = dv.sums(lp_s, lp_t, cfg.div)
        return a + da, b + db, (xs, ws, xt, wt)

    zeros = jnp.zeros((n,), dtype)
    init = _sharding.match_vma((zeros, zeros, (xs, ws, xt, wt)), xs, ws, xt, wt)
    a, b, _ = lax.fori_loop(0, -(-v // bv), body, init)
    return _sharding.psum(a, cfg.axis_name), _sharding.psum(b, cfg.axis_name)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def row_divergences(xs, ws, xt, wt, valid, scale, cfg: Config):
    """The divergence of each row ``[N]`` (0 where not ``valid``), streamed; ``scale`` is
    ``1 / T`` or None."""
    return _rows_fwd(xs, ws, xt, wt, valid, scale, cfg)[0]


def _rows_fwd(xs, ws, xt, wt, valid, scale, cfg: Config):
    lmap = chunked.LogitMap(None, scale)
    stats = (*_lse(xs, ws, lmap, cfg), *_lse(xt, wt, lmap, cfg))
    a, b = _sums(xs, ws, xt, wt, stats, lmap, cfg)
    out = jnp.where(valid, dv.value(a, b, cfg.div), 0.0)
    return out, (xs, ws, xt, wt, valid, scale, stats, a, b)


def _rows_bwd(cfg: Config, res, g):
    xs, ws, xt, wt, valid, scale, stats, a, b = res
    lmap = chunked.LogitMap(None, scale)
    dtype = nx.compute_dtype(xs.dtype)
    g = jnp.where(valid, g, 0.0).astype(dtype)

    def grad_block(raw, cols, rows, side, tok):
        del cols
        g, sh_s, ln_s, sh_t, ln_t, a, b = rows
        (wt_blk,), (xt_blk,) = side, tok
        _, z_t = chunked.block_logits(xt_blk, wt_blk, lmap, dtype)
        lp_s = _log_probs(chunked.map_logits(raw, lmap), sh_s, ln_s)
        lp_t = _log_probs(z_t, sh_t, ln_t)
        dz = g[:, None] * dv.grad(lp_s, lp_t, a, b, cfg.div)
        return chunked.map_grad(raw, lmap, jnp.where(g[:, None] == 0, 0.0, dz))

    rows = (g, *stats, a, b)
    dx, dw = chunked.backward_blocks(xs, ws, grad_block, rows, (wt,), (xt,), block_v=cfg.block_v)
    dx, dw = _sharding.sum_to_type(dx, xs), _sharding.sum_to_type(dw, ws)
    return dx.astype(xs.dtype), dw, None, None, None, None


row_divergences.defvjp(_rows_fwd, _rows_bwd)


def _row_sums_whole(z_s, z_t):
    """Log-probabilities of whole rows by :func:`softjax.log_softmax` (exact, float32)."""
    return _softmax.log_softmax(z_s, axis=-1), _softmax.log_softmax(z_t, axis=-1)


def _reduce(rows, valid, reduction: str):
    count = jnp.sum(valid.astype(rows.dtype))
    return _losses.reduce_losses(rows, count, reduction)


# ---------------------------------------------------------------------------------------
# float32 student weights, "mean"/"sum", unsharded: loss and gradients in one pass.


@partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def reduced_divergence(xs, ws, xt, wt, valid, scale, cfg: Config, reduction: str):
    """``reduce(row_divergences(...))`` for "mean"/"sum"; differentiated in a single pass."""
    return _reduce(row_divergences(xs, ws, xt, wt, valid, scale, cfg), valid, reduction)


def _reduced_fwd(xs, ws, xt, wt, valid, scale, cfg: Config, reduction: str):
    lmap = chunked.LogitMap(None, scale)
    dtype = nx.compute_dtype(xs.dtype)

    def chunk(raw, ok, tok, wt):
        (xt_blk,) = tok
        z_s = chunked.map_logits(raw, lmap)
        _, z_t = chunked.block_logits(xt_blk, wt, lmap, dtype)
        st_s, st_t = _losses.row_stats(z_s, None), _losses.row_stats(z_t, None)
        lp_s = (z_s - st_s.shift) - st_s.log_norm
        lp_t = (z_t - st_t.shift) - st_t.log_norm
        a, b = dv.sums(lp_s, lp_t, cfg.div)
        dz = jnp.where(ok[:, None], dv.grad(lp_s, lp_t, a, b, cfg.div), 0.0)
        return jnp.where(ok, dv.value(a, b, cfg.div), 0.0), chunked.map_grad(raw, lmap, dz)

    # Two [Bn, V] logits blocks (and their log-probabilities) at a time: half the rows.
    block = max(1, chunked.default_single_pass_block(xs.shape[0], ws.shape[0]) // 2)
    rows, dx, dw = chunked.single_pass_chunks(xs, ws, chunk, valid, (xt,), wt, block_n=block)
    out = _reduce(rows, valid, reduction)
    one = jnp.ones((), dtype)
    factor = one if reduction == "sum" else nx.safe_divide(one, jnp.sum(valid.astype(dtype)))
    return out, (dx, dw, factor)


def _reduced_bwd(cfg, reduction, res, g):
    dx, dw, factor = res
    s = factor * g
    return (dx * s).astype(dx.dtype), (dw * s).astype(dw.dtype), None, None, None, None


reduced_divergence.defvjp(_reduced_fwd, _reduced_bwd)


# ---------------------------------------------------------------------------------------
# The implementations: flattened operands (x [N, D], w [V, D], valid [N]) -> the reduced
# divergence, or the rows [N] for "none".


def _materialized(xs, ws, xt, wt, valid, scale, cfg: Config, reduction: str):
    """``"xla"``: both ``[N, V]`` float32 logits, :func:`softjax.log_softmax`, autodiff
    (with ``vocab_axis_name`` both ``w`` are gathered first)."""
    axis = cfg.axis_name
    if axis is not None:
        ws = lax.all_gather(ws, axis, tiled=True)
        wt = lax.all_gather(wt, axis, tiled=True)
    lmap = chunked.LogitMap(None, scale)
    dtype = nx.compute_dtype(xs.dtype)
    z_s = chunked.map_logits(nx.dot(xs, ws, (1, 1), dtype), lmap)
    z_t = chunked.map_logits(nx.dot(xt, wt, (1, 1), dtype), lmap)
    a, b = dv.sums(*_row_sums_whole(z_s, z_t), cfg.div)
    out = _reduce(jnp.where(valid, dv.value(a, b, cfg.div), 0.0), valid, reduction)
    if axis is None:
        return out
    # Every device computed the same value from the gathered weights (see api._materialized).
    return lax.psum(out, axis) / lax.axis_size(axis)


def _chunked(xs, ws, xt, wt, valid, scale, cfg: Config, reduction: str):
    # The cross-entropy's rule for its single pass: float32/float64 weights, unsharded.
    if api._single_pass_applies(cfg, reduction, ws.dtype):
        return reduced_divergence(xs, ws, xt, wt, valid, scale, cfg, reduction)
    return _reduce(row_divergences(xs, ws, xt, wt, valid, scale, cfg), valid, reduction)


def _pallas_unsupported(call: _dispatch.Call) -> str | None:
    del call
    return "no kernel streams two matmuls per block yet; use implementation='chunked'"


def _preference(call: _dispatch.Call) -> tuple[str, ...]:
    del call
    return ("chunked",)


REGISTRY = _dispatch.Registry("linear_kl_divergence", _preference)
REGISTRY.register("xla", _materialized)
REGISTRY.register("chunked", _chunked)
REGISTRY.register("pallas", _chunked, _pallas_unsupported)


def _divergence(direction: str, beta) -> dv.Divergence:
    if direction not in dv.DIRECTIONS:
        raise ValueError(f"direction must be one of {dv.DIRECTIONS}, got {direction!r}")
    if beta is None:
        return dv.Divergence(direction)
    if direction != "forward":
        raise ValueError(
            "beta selects the generalised Jensen-Shannon divergence, which has no direction; "
            f"leave direction='forward' (got direction={direction!r})"
        )
    beta = _checks.number(beta, "beta")
    if not 0 < beta < 1:
        raise ValueError(
            f"beta must lie strictly between 0 and 1, got {beta!r} (for a KL divergence, "
            "leave beta=None and choose direction)"
        )
    return dv.Divergence("jsd", float(beta))


def linear_kl_divergence(
    x_student: ArrayLike,
    w_student: ArrayLike,
    x_teacher: ArrayLike,
    w_teacher: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    direction: Literal["forward", "reverse"] = "forward",
    beta: float | None = None,
    multiply_by_temperature_squared: bool = False,
    labels: ArrayLike | None = None,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    reduction: _losses.Reduction = "mean",
    vocab_axis_name: Hashable | None = None,
    implementation: _dispatch.Name | None = None,
) -> jax.Array:
    """Distillation loss between a teacher's and a student's softmax, without their logits.

    With ``p_s = softmax(x_s w_s^T / T)`` and ``p_t = softmax(x_t w_t^T / T)`` per token::

        forward (default)   KL(p_t || p_s) = Σ_c p_t,c log(p_t,c / p_s,c)
        reverse             KL(p_s || p_t)
        beta=β              β KL(p_t || m) + (1 - β) KL(p_s || m),   m = β p_t + (1 - β) p_s

    (the last the generalised Jensen-Shannon divergence: β = 1/2 is the symmetric JSD;
    divided by β it tends to the forward KL as β -> 0). The logits are streamed over
    vocabulary blocks (a logsumexp pass per side, one pass summing the divergence's terms, a
    custom VJP that recomputes both blocks into the student's gradient block), so memory is
    flat in ``V``; with float32 student weights and a scalar reduction the gradients come
    from one pass over token chunks (as many matmuls as the materialising path).

    Hinton et al. (2015) multiply the loss at temperature ``T`` by ``T²`` so that its
    gradients keep their magnitude as ``T`` changes: ask for it with
    ``multiply_by_temperature_squared=True`` (off by default: the value is then the
    divergence itself).

    Args:
      x_student: the student's hidden states ``[..., Ds]``, float32 or bfloat16.
      w_student: its output embedding ``[V, Ds]`` (with ``vocab_axis_name``: this shard).
      x_teacher: the teacher's hidden states ``[..., Dt]`` (same leading shape; ``Dt`` may
        differ from ``Ds``).
      w_teacher: its output embedding ``[V, Dt]`` (sharded like ``w_student``). The teacher
        is a constant: its gradients are zero, and nothing is computed or kept for them.
      temperature: ``T > 0`` applied to both sides' logits (a constant, not differentiated).
      direction: "forward" (``KL(teacher || student)``, the distillation loss of Hinton et
        al.) or "reverse" (``KL(student || teacher)``, mode-seeking).
      beta: None for a KL divergence, or β in (0, 1) for the generalised JSD.
      multiply_by_temperature_squared: multiply by ``T²`` (see above).
      labels: optional integer ``[...]`` token labels, used only with ``ignore_index``.
      ignore_index: positions whose label equals it are excluded (needs ``labels``).
      where: optional boolean broadcastable to the leading shape; False excludes.
      reduction: "mean" (over the counted positions; 0 if none), "sum" or "none".
      vocab_axis_name: the ``shard_map`` mesh axis both ``w`` are sharded over along ``V``.
      implementation: "chunked" (streaming, any backend; the default), "xla" (materialises
        both float32 logits; small vocabularies, references) or None. "pallas" raises
        ``NotImplementedError``: no kernel streams the two matmuls of a block yet.

    Returns:
      float32 (float64 for float64 inputs): a scalar, or the leading shape for "none";
      excluded positions give 0 with zero gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> import softjax
      >>> xs = jnp.ones((2, 4)); ws = jnp.eye(3, 4); xt = 2 * xs
      >>> softjax.linear_kl_divergence(xs, ws, xt, ws, reduction="none")
      Array([0., 0.], dtype=float32)
    """
    xs, ws = api._operands(x_student, w_student, "x_student", "w_student")
    xt, wt = api._operands(x_teacher, w_teacher, "x_teacher", "w_teacher")
    if xt.shape[:-1] != xs.shape[:-1]:
        raise ValueError(
            f"x_teacher has shape {xt.shape} but x_student {xs.shape}: their shapes must "
            "agree but for the hidden size (last axis)"
        )
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(
            f"w_teacher has {wt.shape[0]} classes (shape {wt.shape}) but w_student "
            f"{ws.shape[0]} (shape {ws.shape}): both must cover the same vocabulary"
        )
    api._check_sharded(ws, vocab_axis_name)
    api._check_sharded(wt, vocab_axis_name)
    div = _divergence(direction, beta)
    reduction = _checks.reduction(reduction)
    if not isinstance(multiply_by_temperature_squared, bool):
        raise TypeError(
            "multiply_by_temperature_squared must be a bool, "
            f"got {multiply_by_temperature_squared!r}"
        )
    s_dtype = jnp.promote_types(xs.dtype, ws.dtype)
    t_dtype = jnp.promote_types(xt.dtype, wt.dtype)
    dtype = nx.compute_dtype(jnp.promote_types(s_dtype, t_dtype))
    scale = temperature_scale(temperature, dtype)
    scale = None if scale is None else lax.stop_gradient(scale)
    batch_shape = xs.shape[:-1]
    valid = _checks.mask(where, batch_shape)
    valid = jnp.ones(batch_shape, bool) if valid is None else valid
    ignore_index = _checks.ignore_index(ignore_index)
    if labels is not None:
        labels = _checks.int_labels(
            labels, batch_shape, f"x_student {xs.shape} without its last axis",
            "linear_kl_divergence",
        )  # fmt: skip
        if ignore_index is not None:
            valid = valid & (labels != ignore_index)
    elif ignore_index is not None:
        raise ValueError("ignore_index needs labels: pass labels=... (the token labels)")
    call = _dispatch.Call(
        shapes={"x": xs.shape, "w": ws.shape},
        dtypes={"x": xs.dtype, "w": s_dtype},
        options={"vocab_axis_name": vocab_axis_name, "reduction": reduction},
    )
    impl = REGISTRY.select(implementation, call)
    n = math.prod(batch_shape)
    cfg = Config(div, vocab_axis_name, chunked.default_block_v(2 * n, ws.shape[0]))
    xs2 = xs.astype(s_dtype).reshape(n, xs.shape[-1])
    xt2 = lax.stop_gradient(xt.astype(t_dtype).reshape(n, xt.shape[-1]))
    args = (xs2, ws.astype(s_dtype), xt2, lax.stop_gradient(wt.astype(t_dtype)))
    out = _run(impl.fn, cfg, reduction, *args, valid.reshape(n), scale)
    if multiply_by_temperature_squared:
        out = out / (scale * scale) if scale is not None else out
    return out.reshape(batch_shape) if reduction == "none" else out


@partial(jax.jit, static_argnums=(0, 1, 2))
def _run(fn, cfg: Config, reduction: str, *args):
    """``fn(*args, cfg, reduction)`` under one ``jit`` (see ``api._run``)."""
    return fn(*args, cfg, reduction)
