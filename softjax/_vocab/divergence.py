"""The divergences of distillation, on blocks of log-probabilities: values and gradients.

A student ``s`` and a teacher ``t`` over the same ``V`` classes, each row of a block given by
its log-probabilities ``lp = z - lse`` (``[n, Bv]``, ``-inf`` on columns outside the block),
so that the same code serves the materialised rows (one block of all ``V`` classes), the
token chunks of a single pass and the vocabulary blocks of the streaming pass (whose sums
over blocks are the row sums)::

    forward KL   KL(p_t || p_s) = Σ_c p_t,c (lp_t,c - lp_s,c)
    reverse KL   KL(p_s || p_t) = Σ_c p_s,c (lp_s,c - lp_t,c)
    JSD_β        β KL(p_t || m) + (1 - β) KL(p_s || m),   m = β p_t + (1 - β) p_s

(the generalised Jensen-Shannon divergence; β = 1/2 is the symmetric JSD, and JSD_β / β
tends to the forward KL as β -> 0). Each value is a sum ``a`` (and ``b`` for the JSD's
second KL) of per-class terms, and the gradient with respect to the student's logits is a
function of the block and those row sums::

    forward      d/dz_s,c = p_s,c - p_t,c
    reverse      d/dz_s,c = p_s,c ((lp_s,c - lp_t,c) - KL(p_s || p_t))
    JSD_β        d/dz_s,c = (1 - β) p_s,c ((lp_s,c - log m_c) - KL(p_s || m))

A class of probability 0 contributes exactly nothing (``-inf`` logits, masked columns).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _numerics as nx

DIRECTIONS = ("forward", "reverse")


class Divergence(NamedTuple):
    """Which divergence: ``kind`` "forward", "reverse" or "jsd" (with ``beta`` in (0, 1))."""

    kind: str
    beta: float | None = None


def _log_mixture(lp_s, lp_t, beta: float):
    """``log m = log(β p_t + (1 - β) p_s)`` from the two log-probabilities."""
    return jnp.logaddexp(math.log(beta) + lp_t, math.log1p(-beta) + lp_s)


def sums(lp_s, lp_t, div: Divergence) -> tuple[jax.Array, jax.Array]:
    """The row sums ``(a, b)`` (``[n]``) of a block: ``a`` the KL of the divergence (for the
    JSD, ``KL(p_t || m)``), ``b`` the JSD's ``KL(p_s || m)`` (0 for the KLs)."""
    p_s, p_t = jnp.exp(lp_s), jnp.exp(lp_t)
    if div.kind == "forward":
        a = nx.zero_where_prob_zero(p_t, lp_t - lp_s)
        return jnp.sum(a, axis=-1), jnp.zeros(a.shape[:-1], a.dtype)
    if div.kind == "reverse":
        a = nx.zero_where_prob_zero(p_s, lp_s - lp_t)
        return jnp.sum(a, axis=-1), jnp.zeros(a.shape[:-1], a.dtype)
    log_m = _log_mixture(lp_s, lp_t, div.beta)
    a = nx.zero_where_prob_zero(p_t, lp_t - log_m)
    b = nx.zero_where_prob_zero(p_s, lp_s - log_m)
    return jnp.sum(a, axis=-1), jnp.sum(b, axis=-1)


def value(a, b, div: Divergence):
    """The divergence of each row from its sums (:func:`sums`, summed over all blocks)."""
    if div.kind == "jsd":
        return div.beta * a + (1 - div.beta) * b
    return a


def grad(lp_s, lp_t, a, b, div: Divergence):
    """``d divergence / d z_s`` on a block ``[n, Bv]``; ``a``, ``b`` are the rows' whole sums
    (``[n]``)."""
    p_s = jnp.exp(lp_s)
    if div.kind == "forward":
        return p_s - jnp.exp(lp_t)
    if div.kind == "reverse":
        return nx.zero_where_prob_zero(p_s, (lp_s - lp_t) - a[:, None])
    log_m = _log_mixture(lp_s, lp_t, div.beta)
    return (1 - div.beta) * nx.zero_where_prob_zero(p_s, (lp_s - log_m) - b[:, None])
