"""``dot_product_attention``: validation, canonical layout and dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _checks, _dispatch
from .. import _numerics as nx
from . import chunked, pallas, reference
from ._masks import Masks, Spec

# Below this many query x key pairs per head the materialising path is faster on CPU (and its
# memory, T x S floats per head, is small). Measured with ``python -m bench --only attention``
# (causal fwd+bwd, N=8, H=64): chunked/xla time 1.6 at T=256, 0.79 at T=512, 0.35 at T=1024.
CPU_CROSSOVER = 512 * 512


def _rank4(x, name: str):
    x = _checks.floating(x, name)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must have rank 4 [B, T|S, N|K, H] (or 3 without B), got {x.shape}"
        )
    return x


def _broadcastable(x, name: str, target: tuple, kind: str):
    """``x`` padded to rank 4 with leading 1s; each axis must be 1 or match ``target``."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if kind == "bool" and x.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean array (True = attend), got dtype {x.dtype}")
    if kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    _checks.broadcasts_to(x.shape, target, name, f"[B, N, T, S] = {target}")
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def _to_groups(x, num_kv: int, group: int):
    """[B|1, N|1, T|1, S|1] -> [B|1, K|1, T|1, G|1, S|1] (head n = k * G + g)."""
    b, n, t, s = x.shape
    if n == 1:
        return x.reshape(b, 1, t, 1, s)
    return x.reshape(b, num_kv, group, t, s).transpose(0, 1, 3, 2, 4)


def _lengths(x, name: str, batch: int):
    if x is None:
        return None
    x = _checks.integer(x, name)
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one length per batch), got {x.shape}")
    return x.astype(jnp.int32)


def _window(w) -> tuple[int, int] | None:
    if w is None:
        return None
    pair = (w, w) if not isinstance(w, (tuple, list)) else tuple(w)
    try:
        if len(pair) != 2:
            raise TypeError
        pair = tuple(_checks.number(v, "local_window_size", integral=True) for v in pair)
    except TypeError:
        raise TypeError(f"local_window_size must be an int or a pair of ints, got {w!r}") from None
    if min(pair) < 0:
        raise ValueError(f"local_window_size must be >= 0, got {w!r}")
    return int(pair[0]), int(pair[1])


def _segments(segment_ids, batch: int, t_len: int, s_len: int):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                "segment_ids must be one [B, T] array or a pair ([B, T], [B, S]), "
                f"got a sequence of {len(segment_ids)}"
            )
        q_seg, kv_seg = segment_ids
    else:
        q_seg = kv_seg = segment_ids
    q_seg = _checks.integer(q_seg, "segment_ids")
    kv_seg = _checks.integer(kv_seg, "segment_ids")
    if q_seg.shape != (batch, t_len):
        raise ValueError(f"query segment_ids must have shape {(batch, t_len)}, got {q_seg.shape}")
    if kv_seg.shape != (batch, s_len):
        raise ValueError(
            f"key/value segment_ids must have shape {(batch, s_len)}, got {kv_seg.shape}"
            + (" (pass a pair (q [B, T], kv [B, S]) when T != S)" if t_len != s_len else "")
        )
    return q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)


def _materialized(spec, q, k, v, bias, masks, *, block_q, block_k):
    del block_q, block_k
    return reference.attention(spec, q, k, v, bias, masks)


def _streamed(spec, q, k, v, bias, masks, *, block_q, block_k):
    return chunked.attention(spec, q, k, v, bias, masks, block_q=block_q, block_k=block_k)


def _preference(call: _dispatch.Call) -> tuple[str, ...]:
    t_len, s_len = call.shapes["query"][1], call.shapes["key"][1]
    if t_len == 0 or s_len == 0:
        return ("xla",)  # nothing to stream: no query, or nothing to attend to (output 0)
    if call.platform == "cpu" and t_len * s_len < CPU_CROSSOVER:
        return ("xla", "chunked")
    return ("chunked", "xla")


def _pallas_serves(call: _dispatch.Call) -> str | None:
    if call.options["dropout_rate"] > 0:
        return (
            "dropout is not implemented by the attention kernels (their tiles do not "
            "regenerate the dropout hash yet); use implementation='chunked'"
        )
    return pallas.unsupported(call.dtypes["query"])


REGISTRY = _dispatch.Registry("dot_product_attention", _preference)
REGISTRY.register("xla", _materialized)
REGISTRY.register("chunked", _streamed)
# The kernels take the API's layout and dtypes (nothing upcast or scaled in HBM), so this
# entry is called with its own signature (see dot_product_attention).
REGISTRY.register("pallas", pallas.attention, _pallas_serves)


def _qkv(query, key, value):
    """``query``, ``key``, ``value`` checked, at rank 4 (a leading batch of 1 added when
    unbatched), and whether they were unbatched."""
    query = _checks.floating(query, "query")
    unbatched = query.ndim == 3
    if unbatched:
        # bias and mask ([N, T, S] or any rank <= 4) broadcast from the right as they are.
        query, key, value = (jnp.asarray(x)[None] for x in (query, key, value))
    query, key, value = _rank4(query, "query"), _rank4(key, "key"), _rank4(value, "value")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(
            "query, key and value must have the same dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}"
        )
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape, got {key.shape} and {value.shape}"
        )
    (b_, _, n_, h), (kb, _, k_, hk) = query.shape, key.shape
    if kb != b_:
        raise ValueError(
            f"key has batch {kb} but query has batch {b_} (shapes {key.shape}, {query.shape})"
        )
    if hk != h:
        raise ValueError(f"key has head dim {hk} but query has head dim {h}")
    if n_ % k_:
        raise ValueError(f"query has {n_} heads, which is not a multiple of key/value's {k_} heads")
    return query, key, value, unbatched


def _dropout_seed(dropout_rate, dropout_rng):
    """The checked rate and the ``[2]`` uint32 seed of the dropout hash (None without)."""
    dropout_rate = _checks.number(dropout_rate, "dropout_rate")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
    if dropout_rate == 0:
        return 0.0, None
    if dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng (a PRNG key), got None")
    return float(dropout_rate), jax.random.bits(dropout_rng, (2,), jnp.uint32)


def _blocks(block_q, block_k, t_len: int) -> tuple[int, int]:
    if block_q is None:
        block_q = chunked.default_block_q(t_len)
    block_q = _checks.number(block_q, "block_q", integral=True)
    block_k = _checks.number(block_k, "block_k", integral=True)
    for name, x in (("block_q", block_q), ("block_k", block_k)):
        if x < 8 or x % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {x!r}")
    return block_q, block_k


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids=None,
    logit_softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    return_lse: bool = False,
    implementation: _dispatch.Name | None = None,
    block_q: int | None = None,
    block_k: int = 256,
):
    """Scaled dot-product attention, exact and memory-lean, with an online softmax.

    ::

         s_ts = softcap(scale · q_t · k_s) + b_ts,
          o_t = Σ_{s ∈ M_t} ( e^(s_ts) / Σ_{s' ∈ M_t} e^(s_ts') ) · v_s,
        lse_t = log Σ_{s ∈ M_t} e^(s_ts)

    where ``M_t`` is the set of keys query ``t`` may attend to (the
    intersection of ``mask``, causal, window, lengths and segments) and
    ``softcap(x) = c tanh(x / c)``.

    Layout and argument meanings are those of :func:`jax.nn.dot_product_attention` (a
    superset of its arguments).

    Args:
      query: ``[B, T, N, H]`` (or ``[T, N, H]``), floating.
      key: ``[B, S, K, H]`` with ``N`` a multiple of ``K``: grouped-query attention, query
        head ``n`` uses key/value head ``n // (N / K)``, without repeating K/V in memory.
      value: ``[B, S, K, H]``, same shape and dtype as ``key``.
      bias: optional additive bias broadcastable to ``[B, N, T, S]`` (differentiable).
      mask: optional boolean array broadcastable to ``[B, N, T, S]``, True = attend.
      scale: multiplies ``q . k``; default ``1 / sqrt(H)``.
      is_causal: query ``t`` attends to keys ``s <= t`` (top-left aligned, as in jax.nn and
        PyTorch).
      query_seq_lengths: int ``[B]``; queries ``t >= length`` attend to nothing (output 0).
      key_value_seq_lengths: int ``[B]``; keys ``s >= length`` are never attended.
      local_window_size: ``w`` or ``(left, right)``: query ``t`` attends to
        ``t - left <= s <= t + right``.
      segment_ids: int ``[B, T]`` (self-attention) or a pair (``[B, T]``, ``[B, S]``): tokens
        attend only within their segment (sequence packing).
      logit_softcap: ``c > 0`` applies ``c tanh(x / c)`` to the scaled scores (before the
        bias); a number or a traced scalar (as in the losses), a constant for
        differentiation; ``+inf`` is no cap.
      dropout_rate: probability of dropping each attention weight (the kept ones are scaled
        by ``1 / (1 - rate)``); the mask is a hash of ``(dropout_rng, b, n, t, s)``,
        regenerated block by block and never stored. lse is that of the undropped weights.
      dropout_rng: a PRNG key, required when ``dropout_rate > 0``.
      return_lse: also return the logsumexp ``[B, T, N]`` (float32, float64 for float64
        inputs), differentiable.
      implementation: ``"xla"`` materialises the ``[B, N, T, S]`` scores (fast for short
        sequences, the reference); ``"chunked"`` streams over blocks of ``block_q`` queries and
        ``block_k`` keys with a custom VJP, memory linear in T and S, skipping blocks hidden
        by the causal mask or the window; ``"pallas"`` runs flash attention kernels (Mosaic
        on TPU, Triton on GPU, interpreted on CPU; chosen when lowering) on the inputs as
        they are, ``bf16`` in HBM, with every option but dropout (which raises
        ``NotImplementedError``: the kernels do not regenerate the dropout hash) and no
        float64; ``None`` picks ``"xla"`` on CPU below ``T * S = 512**2`` and
        ``"chunked"`` otherwise (``"pallas"`` only when named).
      block_q, block_k: block sizes of ``"chunked"`` (clipped to the lengths); ``"pallas"``
        sizes its blocks per chip. ``block_q=None``
        is 512 where that pads T no further than 256 would, else 256: twice the work per loop
        step keeps more cores busy (fwd+bwd 1.1-1.4x faster on two CPU cores at T=1024-8192).

    Returns:
      The output ``[B, T, N, H]`` in the dtype of ``query``, and with ``return_lse`` also
      the logsumexp ``[B, T, N]``.

    Numerics: bf16/f16 inputs are upcast; scores, softmax and the weighted sum are computed
    in float32 (float64 for float64) and rounded once. A query row with nothing to attend to
    (fully masked, outside its length, a bias of ``-inf`` everywhere) gives output exactly 0,
    lse ``-inf`` and zero gradients, never NaN and never the average of ``value``.

    Differentiation: reverse mode (``grad``, ``vjp``) works with every implementation, for
    ``query``, ``key``, ``value``, ``bias`` and through the lse; ``"chunked"`` and
    ``"pallas"`` recompute the scores block by block in their backward pass, saving only the
    (float32) output and the lse; ``"pallas"`` with a ``bias`` or ``mask`` also writes the
    float32 score gradient ``[B, N|1, T, S]`` (the bias's gradient), the one quadratic
    buffer of that path, and takes ``scale`` as a constant for differentiation (as every
    path takes ``logit_softcap``). Higher-order derivatives and forward mode (``jvp``,
    ``jacfwd``) are supported by ``"xla"`` only; the others raise for ``jvp`` (their custom
    VJPs define no JVP).

    Example:
      >>> import jax, softjax
      >>> q = k = v = jax.numpy.ones((1, 4, 2, 8))
      >>> softjax.dot_product_attention(q, k, v, is_causal=True).shape
      (1, 4, 2, 8)
    """
    query, key, value, unbatched = _qkv(query, key, value)
    (b_, t_len, n_, h), (_, s_len, k_, _) = query.shape, key.shape
    g_ = n_ // k_
    target = (b_, n_, t_len, s_len)
    bias = _broadcastable(bias, "bias", target, "float")
    mask = _broadcastable(mask, "mask", target, "bool")
    if scale is None:
        scale = 1.0 / float(np.sqrt(h))
    logit_softcap = _checks.softcap(logit_softcap)  # traced or not, as in the losses
    dropout_rate, seed = _dropout_seed(dropout_rate, dropout_rng)
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be a Python bool, got {type(is_causal).__name__}")
    block_q, block_k = _blocks(block_q, block_k, t_len)
    call = _dispatch.Call(
        shapes={"query": query.shape, "key": key.shape},
        dtypes={"query": query.dtype},
        options={"dropout_rate": dropout_rate},
    )
    impl = REGISTRY.select(implementation, call)
    if t_len == 0 or s_len == 0:
        impl = REGISTRY.select("xla", call)  # nothing to stream (output 0), whatever was named
    q_seg, kv_seg = _segments(segment_ids, b_, t_len, s_len)
    q_len = _lengths(query_seq_lengths, "query_seq_lengths", b_)
    kv_len = _lengths(key_value_seq_lengths, "key_value_seq_lengths", b_)
    if impl.name == "pallas":
        out, lse = impl.fn(
            query, key, value, bias, mask,
            scale=lax.stop_gradient(jnp.asarray(scale, jnp.float32)),
            softcap=None if logit_softcap is None else lax.stop_gradient(logit_softcap),
            causal=bool(is_causal),
            window=_window(local_window_size),
            dyn=pallas.Dynamic(q_seg, kv_seg, q_len, kv_len),
        )  # fmt: skip
        out = out.astype(query.dtype)
        if unbatched:
            out, lse = out[0], lse[0]
        return (out, lse) if return_lse else out

    cdt = nx.compute_dtype(query.dtype)
    # Canonical layout: q [B, K, T, G, H] (scaled once here, O(T) work), k/v [B, K, S, H].
    q = (query.astype(cdt) * jnp.asarray(scale, cdt)).reshape(b_, t_len, k_, g_, h)
    q = q.transpose(0, 2, 1, 3, 4)
    k = key.astype(cdt).transpose(0, 2, 1, 3)
    v = value.astype(cdt).transpose(0, 2, 1, 3)
    spec = Spec(
        causal=bool(is_causal),
        window=_window(local_window_size),
        dropout_rate=float(dropout_rate),
        s_valid=None,
        num_heads=n_,
        group=g_,
    )
    masks = Masks(
        mask=None if mask is None else _to_groups(mask, k_, g_),
        q_segment=q_seg,
        kv_segment=kv_seg,
        q_length=q_len,
        kv_length=kv_len,
        seed=seed,
        softcap=None
        if logit_softcap is None
        else lax.stop_gradient(jnp.asarray(logit_softcap, cdt)),
    )
    bias = None if bias is None else _to_groups(bias.astype(cdt), k_, g_)
    out, lse = impl.fn(spec, q, k, v, bias, masks, block_q=block_q, block_k=block_k)
    out = out.transpose(0, 2, 1, 3, 4).reshape(b_, t_len, n_, h).astype(query.dtype)
    lse = lse.transpose(0, 2, 1, 3).reshape(b_, t_len, n_)
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
