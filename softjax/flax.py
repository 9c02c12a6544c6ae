"""Flax adapters: softjax attention as the ``attention_fn`` of Flax's attention modules.

``flax.linen.MultiHeadDotProductAttention(attention_fn=...)`` and
``flax.nnx.MultiHeadAttention(attention_fn=...)`` call ``attention_fn`` with Flax's signature
(``query [..., T, N, H]``, ``key``/``value`` ``[..., S, N, H]``, ``mask [..., N|1, T, S]``,
dropout arguments, ``dtype``, ``precision``, ``module``). The adapter maps that onto
:func:`softjax.dot_product_attention`; nothing here imports Flax, so this module is importable
(and ``import softjax`` works) without it.

Example::

    import flax.linen as nn
    import softjax.flax

    layer = nn.MultiHeadDotProductAttention(
        num_heads=8, attention_fn=softjax.flax.make_attention_fn(implementation="chunked")
    )
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp

from ._attention import dot_product_attention as _attention


def make_attention_fn(**options) -> Callable:
    """A Flax ``attention_fn`` running :func:`softjax.dot_product_attention`.

    ``options`` are keyword arguments of :func:`softjax.dot_product_attention` fixed for every
    call (``implementation``, ``logit_softcap``, ``local_window_size``, ``is_causal``,
    ``block_q``, ``block_k``...). Flax's ``mask`` (nonzero = attend, bool or 0/1 floats) and
    ``bias`` pass through; any number of leading batch axes is accepted. A query row whose
    mask is all False gives 0 (Flax's own attention gives the average of ``value`` there).

    Dropout: applied when ``dropout_rate > 0`` and not ``deterministic``, element by element
    (Flax's ``broadcast_dropout=True`` shares one mask across batch and heads; softjax draws an
    independent mask per batch and head, which it never stores). ``dtype`` casts the inputs;
    ``precision`` is ignored (softjax always accumulates in float32 or better). ``module``
    (Flax's ``sow_weights``) is not supported: the weights are never materialised.
    """

    def attention_fn(
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout: bool = True,
        dropout_rng=None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype=None,
        precision=None,
        module=None,
        is_causal: bool = False,
    ):
        del broadcast_dropout, precision
        if module is not None:
            raise NotImplementedError(
                "softjax attention never materialises the attention weights, so it cannot "
                "sow them (module was given: sow_weights=True)"
            )
        if dtype is not None:
            query, key, value = (jnp.asarray(x, dtype) for x in (query, key, value))
        batch = query.shape[:-3]
        flat = (math.prod(batch),)

        def fold(x, rank):
            # Leading batch axes -> one; arrays broadcast over batch keep their size-1 axes.
            if x is None:
                return None
            x = jnp.asarray(x)
            if x.ndim == len(batch) + rank and x.shape[: len(batch)] == batch:
                return x.reshape(flat + x.shape[len(batch) :])
            if x.ndim > rank:
                x = jnp.broadcast_to(x, batch + x.shape[-rank:])
                return x.reshape(flat + x.shape[len(batch) :])
            return x

        if mask is not None:
            # Flax masks are often float 0/1 (``make_attention_mask``): nonzero = attend.
            mask = jnp.asarray(mask) != 0
        kwargs = dict(options)
        if dropout_rate > 0 and not deterministic:
            kwargs.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
        kwargs["is_causal"] = bool(kwargs.get("is_causal", False) or is_causal)
        out = _attention(
            fold(query, 3), fold(key, 3), fold(value, 3), fold(bias, 3), fold(mask, 3), **kwargs
        )
        return out.reshape(batch + out.shape[1:])

    return attention_fn


dot_product_attention = make_attention_fn()
"""A ready ``attention_fn`` with default options (``implementation=None``)."""
