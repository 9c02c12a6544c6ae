"""The materialising ``"xla"`` implementation: all T x S scores at once.

The oracle for :mod:`softjax._attention.chunked` (same canonical arguments, same masks), and
the fastest choice for short sequences. Differentiated by JAX's own autodiff, so ``grad``,
grad-of-grad and ``jvp`` all work through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .. import _numerics as nx
from ._masks import Masks, Spec, block_mask, dropout_keep, scores


def attention(spec: Spec, q, k, v, bias, masks: Masks) -> tuple[jax.Array, jax.Array]:
    r"""Attention on canonical arguments; returns ``(out [B,K,T,G,H], lse [B,K,T,G])``.

    ``q`` [B, K, T, G, H] is already scaled, ``k``/``v`` are [B, K, S, H] and ``bias`` is
    ``[B|1, K|1, T|1, G|1, S|1]`` or None, all in the compute dtype.

    .. math::
        s = \mathrm{softcap}(q k^\top) + b,\quad
        \mathrm{lse} = \log \sum_{s \in \mathrm{mask}} e^{s},\quad
        o = \sum_{s \in \mathrm{mask}} e^{s - \mathrm{lse}}\, \frac{\mathrm{keep}}{1 - r}\, v

    A row with nothing to attend to has ``lse = -inf`` and ``o = 0``, with zero gradients.
    """
    b_, k_, t_, g_, h = q.shape
    s_len = k.shape[2]
    s = scores(spec, q, k, bias)
    ok = block_mask(spec, masks, 0, t_, 0, s_len)
    if ok is not None:
        s = jnp.where(ok, s, -jnp.inf)
    row_max = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    # An empty row has max -inf: shift by 0 instead, so exp gives 0 and never NaN.
    shift = jnp.where(row_max == -jnp.inf, jnp.zeros_like(row_max), row_max)
    p = jnp.exp(s - shift)
    total = jnp.sum(p, axis=-1, keepdims=True)
    if spec.dropout_rate > 0:
        keep = dropout_keep(spec, masks.seed, s.shape, 0, 0)
        p = jnp.where(keep, p, jnp.zeros_like(p)) / (1.0 - spec.dropout_rate)
    acc = lax.dot_general(
        p.reshape(b_ * k_, t_ * g_, s_len),
        v.reshape(b_ * k_, s_len, h),
        (((2,), (1,)), ((0,), (0,))),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=q.dtype,
    ).reshape(b_, k_, t_, g_, h)
    out = nx.safe_divide(acc, total)
    empty = total == 0
    lse = jnp.where(empty, -jnp.inf, shift + jnp.log(jnp.where(empty, 1.0, total)))
    return out, lse[..., 0]
