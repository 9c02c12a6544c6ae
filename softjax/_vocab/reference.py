"""The materialising oracle of ``linear_cross_entropy`` (small sizes, tests only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .. import _numerics as nx
from .._losses import cross_entropy


def linear_cross_entropy_reference(
    x,
    w,
    labels,
    *,
    ignore_index=None,
    where=None,
    weight=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
    vocab_axis_name=None,
    implementation=None,
) -> jax.Array:
    """``cross_entropy(x @ w.T, labels, ...)``: builds the ``[..., V]`` logits.

    With ``vocab_axis_name`` the shards of ``w`` (and ``weight``) are gathered first.
    ``implementation`` is accepted for signature parity and ignored.
    """
    del implementation
    x, w = jnp.asarray(x), jnp.asarray(w)
    if vocab_axis_name is not None:
        w = lax.all_gather(w, vocab_axis_name, tiled=True)
        if weight is not None:
            weight = lax.all_gather(jnp.asarray(weight), vocab_axis_name, tiled=True)
    dtype = nx.compute_dtype(jnp.promote_types(x.dtype, w.dtype))
    logits = jnp.einsum("...d,vd->...v", x, w, preferred_element_type=dtype)
    return cross_entropy(
        logits,
        labels,
        weight=weight,
        ignore_index=ignore_index,
        where=where,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        reduction=reduction,
    )
