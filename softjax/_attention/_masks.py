"""Which (query, key) pairs may attend, and the dropout mask, computed from indices.

Both implementations build their masks here, block by block for ``"chunked"`` and all at once
for ``"xla"``, so the two agree by construction. Nothing of size T x S is ever stored: the
causal, window, length and segment masks and the dropout mask are functions of the global
indices ``(b, k, t, g, s)`` and are regenerated wherever a block of scores is (re)computed.

Scores are laid out ``[B, K, T, G, S]``: key/value head ``k`` serves the ``G = N / K``
query heads ``n = k * G + g`` (the grouping of ``jax.nn.dot_product_attention``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import _numerics as nx


class Spec(NamedTuple):
    """The static (hashable) description of an attention call's masking and scoring.

    ``window`` is ``(left, right)``: query ``t`` sees keys ``t - left <= s <= t + right``.
    ``s_valid`` is the number of real keys when the chunked path has padded the keys to whole
    blocks, else None.
    """

    causal: bool
    window: tuple[int, int] | None
    dropout_rate: float
    s_valid: int | None
    num_heads: int  # N, to number heads for the dropout hash
    group: int  # G


class Masks(NamedTuple):
    """The dynamic (traceable, non-differentiable) inputs of masking and scoring, each None
    when unused.

    ``mask``: bool ``[B|1, K|1, T|1, G|1, S|1]``; ``q_segment`` int ``[B, T]``;
    ``kv_segment`` int ``[B, S]``; ``q_length``/``kv_length`` int ``[B]``; ``seed`` uint32
    ``[2]`` (dropout); ``softcap`` the cap ``c`` of ``c tanh(s / c)``, a scalar in the
    compute dtype (traced or not, as in the losses).
    """

    mask: jax.Array | None = None
    q_segment: jax.Array | None = None
    kv_segment: jax.Array | None = None
    q_length: jax.Array | None = None
    kv_length: jax.Array | None = None
    seed: jax.Array | None = None
    softcap: jax.Array | None = None


def structural_bounds(spec: Spec, t0, tq: int, s0, sk: int):
    """Whether the key block ``[s0, s0 + sk)`` is entirely visible to the query block
    ``[t0, t0 + tq)`` under causal/window/key padding alone (scalars, ints or traced)."""
    t_last, s_last = t0 + tq - 1, s0 + sk - 1
    ok = True if spec.s_valid is None else s_last < spec.s_valid
    if spec.causal:
        ok = ok & (s_last <= t0)
    if spec.window is not None:
        left, right = spec.window
        ok = ok & (s0 >= t_last - left) & (s_last <= t0 + right)
    return ok


def has_dynamic_masks(masks: Masks) -> bool:
    """True when some mask depends on data (so no block is known to be fully visible)."""
    return any(
        m is not None
        for m in (masks.mask, masks.q_segment, masks.kv_segment, masks.q_length, masks.kv_length)
    )


def _slice(x, start, size: int, axis: int):
    """``x[start:start + size]`` along ``axis``, or ``x`` itself where that axis has size 1."""
    if x.shape[axis] == 1:
        return x
    return lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def both(a, b):
    """``a & b`` where either may be None (no mask: everything visible)."""
    return b if a is None else a & b


def structural_mask(t, s, causal: bool, window, s_valid):
    """Which (query ``t``, key ``s``) pairs the causal mask, the window ``(left, right)`` and
    the key padding (keys ``>= s_valid``) let attend, from broadcastable index arrays; None
    when none of them applies."""
    ok = None
    if s_valid is not None:
        ok = both(ok, s < s_valid)
    if causal:
        ok = both(ok, s <= t)
    if window is not None:
        left, right = window
        ok = both(ok, (s >= t - left) & (s <= t + right))
    return ok


def block_mask(spec: Spec, masks: Masks, t0, tq: int, s0, sk: int) -> jax.Array | None:
    """Boolean ``[B|1, K|1, tq, G|1, sk]`` (True = attend) for one block, or None if all True.

    ``t0``/``s0`` are the global offsets of the block (traced ints are fine).
    """
    t = t0 + lax.broadcasted_iota(jnp.int32, (tq, 1, 1), 0)
    s = s0 + lax.broadcasted_iota(jnp.int32, (1, 1, sk), 2)
    ok = structural_mask(t, s, spec.causal, spec.window, spec.s_valid)
    ok = None if ok is None else ok[None, None]  # [1, 1, tq, 1, sk]
    if masks.q_length is not None:
        ok = both(ok, t[None, None] < masks.q_length[:, None, None, None, None])
    if masks.kv_length is not None:
        ok = both(ok, s[None, None] < masks.kv_length[:, None, None, None, None])
    if masks.q_segment is not None:
        qs = _slice(masks.q_segment, t0, tq, 1)[:, None, :, None, None]
        ks = _slice(masks.kv_segment, s0, sk, 1)[:, None, None, None, :]
        ok = both(ok, qs == ks)
    if masks.mask is not None:
        ok = both(ok, _slice(_slice(masks.mask, t0, tq, 2), s0, sk, 4))
    return ok


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (``lowbias32``): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(spec: Spec, seed: jax.Array, shape, t0, s0) -> jax.Array:
    """Boolean keep-mask ``[B, K, tq, G, sk]`` for the block at ``(t0, s0)``.

    A counter-based hash of ``(seed, b, n, t, s)``: the same entry gets the same bit in the
    forward and the backward, in every block layout and in both implementations, and the
    mask is never stored.
    """
    b_, k_, tq, g_, sk = shape
    u32 = jnp.uint32
    b = lax.broadcasted_iota(u32, (b_, k_, tq, g_, 1), 0)
    n = lax.broadcasted_iota(u32, (b_, k_, tq, g_, 1), 1) * u32(spec.group) + (
        lax.broadcasted_iota(u32, (b_, k_, tq, g_, 1), 3)
    )
    t = lax.broadcasted_iota(u32, (b_, k_, tq, g_, 1), 2) + jnp.asarray(t0).astype(u32)
    row = _mix32(seed[0] ^ _mix32((b * u32(spec.num_heads) + n) ^ _mix32(t + seed[1])))
    s = lax.broadcasted_iota(u32, (1, 1, 1, 1, sk), 4) + jnp.asarray(s0).astype(u32)
    bits = _mix32(row + s * u32(0x9E3779B9))
    threshold = min(int(round(spec.dropout_rate * 2.0**32)), 2**32 - 1)
    return bits >= u32(threshold)


def scores(q: jax.Array, k: jax.Array, bias_block, cap) -> jax.Array:
    """``softcap(q . k) + bias`` for ``q`` [B, K, tq, G, H] (already scaled), ``k`` [B, K, sk, H].

    Returns ``[B, K, tq, G, sk]`` in the compute dtype.
    """
    b_, k_, tq, g_, h = q.shape
    sk = k.shape[2]
    # A plain batched matmul on [B*K, tq*G, H]: the 5-d einsum is much slower on CPU.
    s = nx.dot(
        q.reshape(b_ * k_, tq * g_, h), k.reshape(b_ * k_, sk, h), (2, 2), q.dtype, (0, 0)
    ).reshape(b_, k_, tq, g_, sk)
    s = nx.softcap(s, cap)
    if bias_block is not None:
        s = s + bias_block
    return s
