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
    """Attention on canonical arguments; returns ``(out [B,K,T,G,H], lse [B,K,T,G])``.

    ``q`` [B, K, T, G, H] is already scaled, ``k``/``v`` are [B, K, S, H] and ``bias`` is
    ``[B|1, K|1, T|1, G|1, S|1]`` or None, all in the compute dtype.

    ::

          s = softcap(q k^T) + b,
        lse = log Σ_{s ∈ mask} e^s,
          o = Σ_{s ∈ mask} e^(s - lse) · keep / (1 - r) · v

    A row with nothing to attend to has ``lse = -inf`` and ``o = 0``, with zero gradients.
    """
    b_, k_, t_, g_, h = q.shape
    s_len = k.shape[2]
    s = scores(q, k, bias, masks.softcap)
    ok = block_mask(spec, masks, 0, t_, 0, s_len)
    # Masked scores become the lowest finite number, not -inf, and exp never sees them:
    # nothing here makes an infinity that the inputs do not hold (jax.debug_infs stays quiet).
    lowest = float(jnp.finfo(s.dtype).min)
    masked = s if ok is None else jnp.where(ok, s, lowest)
    row_max = lax.stop_gradient(nx.row_max(masked, (4,)))
    # An empty row (nothing attended, -inf scores, or S = 0) is shifted by 0, never by -inf.
    shift = nx.empty_row_shift(row_max)
    z = s - shift
    p = jnp.exp(z if ok is None else jnp.where(ok, z, lowest))
    total = jnp.sum(p, axis=-1, keepdims=True)
    if spec.dropout_rate > 0:
        keep = dropout_keep(spec, masks.seed, s.shape, 0, 0)
        p = jnp.where(keep, p, jnp.zeros_like(p)) / (1.0 - spec.dropout_rate)
    acc = nx.dot(
        p.reshape(b_ * k_, t_ * g_, s_len), v.reshape(b_ * k_, s_len, h), (2, 1), q.dtype, (0, 0)
    ).reshape(b_, k_, t_, g_, h)
    out = nx.safe_divide(acc, total)
    return out, nx.log_or_neg_inf(total, shift)[..., 0]
