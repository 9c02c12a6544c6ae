"""The ``"pallas"`` implementation of ``dot_product_attention``: flash attention kernels.

Three kernels per platform family, on the layout ``q`` ``[B, N, T, H]``, ``k``/``v``
``[B, K, S, H]`` in the inputs' dtype (nothing upcast or scaled in HBM):

* ``softjax_attn_fwd``: the online softmax; saves the float32 output and logsumexp.
* ``softjax_attn_dq`` and ``softjax_attn_dkv``: the backward pass (FlashAttention-2),
  recomputing the scores tile by tile from the saved logsumexp; with
  ``delta = rowsum(dO * O) - dlse`` computed here (``O(T H)`` work).

The block maths is shared (``tiles``); the families differ in how they walk the blocks:
Mosaic (``pallas_tpu``, a sequential grid axis and VMEM scratch) for ``tpu``, Triton
(``pallas_gpu``, loops inside each program) for ``cuda`` and ``rocm``, and the TPU family
interpreted elsewhere (CPU, for tests). The family is chosen when the function is lowered
(``softjax._lowering.platform_dependent``), so a function jitted for a TPU topology from a
CPU host, or exported for several platforms, holds the right kernels for each.

Masks. ``causal``, ``local_window_size`` and the key padding are index arithmetic in the
kernels, and hidden blocks are skipped. ``segment_ids`` and the sequence lengths travel as
``[B, 8, T]`` / ``[B, 8, S]`` int32 rows (segment, valid) and per-block segment ranges, with
which the kernels skip blocks whose tokens cannot meet. A boolean ``mask`` is folded into the
additive bias (``-inf`` where it is False), which is what it means.

Memory: the saved output and logsumexp (float32, linear in T), the blocks of the kernels.
With a ``bias`` (or a ``mask``) the backward pass also writes the score gradient
``dS`` ``[B, N, T, S]`` in float32 and sums it to the bias's shape: the bias's gradient,
of the size of the scores, the one place this path is not linear in T.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._lowering import platform_dependent
from . import pallas_gpu, pallas_tpu, pallas_tpu_heads
from .tiles import Config

# Block sizes (query, key) per family. TPU: lanes are 128 wide and a [512, 512] float32 tile
# is 1 MiB of VMEM (the backward keeps about eight such temporaries, under the 48 MiB limit
# the kernels ask for). GPU: power-of-two blocks whose float32 accumulators ([64, H]) and
# score tiles ([64, 64]) fit four warps' registers at H = 128. Interpreted (CPU, tests):
# small blocks so that ragged edges and several blocks per row are exercised.
TPU_BLOCKS = (512, 512)
GPU_BLOCKS = (64, 64)
INTERPRET_BLOCKS = (32, 16)

INT_MAX = np.iinfo(np.int32).max
INT_MIN = np.iinfo(np.int32).min


class Options(NamedTuple):
    """The static part of a call (hashable): see ``tiles.Config``, less the block sizes."""

    causal: bool
    window: tuple[int, int] | None
    group: int
    bias_axes: tuple[bool, bool, bool, bool] | None
    dynamic: bool
    softcap: bool
    bias_grad: bool


class Dynamic(NamedTuple):
    """Segment ids (``[B, T]``, ``[B, S]``) and lengths (``[B]``), each None when unused."""

    q_segment: jax.Array | None
    kv_segment: jax.Array | None
    q_length: jax.Array | None
    kv_length: jax.Array | None


def unsupported(dtype) -> str | None:
    """What these kernels lack for inputs of ``dtype`` (None: they serve it)."""
    if np.dtype(dtype) == np.float64:
        return (
            "the attention kernels have no float64 form (TPUs and GPU matmul units have no "
            "float64); use implementation='chunked'"
        )
    return None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _kernels(family: str, opts: Options):
    """The kernel module of ``family`` for a call: on TPU the all-heads kernels
    (``pallas_tpu_heads``, no relayout of the operands) unless the bias has a head axis, or
    the per-head ones when pinned (``"tpu_per_head"``, tests)."""
    if family == "gpu":
        return pallas_gpu
    if family == "tpu_per_head" or (opts.bias_axes is not None and opts.bias_axes[1]):
        return pallas_tpu
    return pallas_tpu_heads


def _blocks(family: str, interpret: bool, t_len: int, s_len: int, heads) -> tuple[int, int]:
    """``(bq, bk)`` for a family at these lengths (``heads``: ``(N, H)``, and whether the
    all-heads TPU kernels serve the call)."""
    if family == "gpu":  # Triton: powers of two, at least 16
        bq, bk = INTERPRET_BLOCKS if interpret else GPU_BLOCKS
        return min(bq, max(16, _pow2_at_least(t_len))), min(bk, max(16, _pow2_at_least(s_len)))
    if interpret:
        bq, bk = INTERPRET_BLOCKS
        return min(bq, _round_up(t_len, 8)), min(bk, _round_up(s_len, 8))
    bq, bk = TPU_BLOCKS
    n_heads, h, all_heads = heads
    if all_heads:
        bq = pallas_tpu_heads.block_q(n_heads, h, bq)
    return min(bq, _round_up(t_len, 128)), min(bk, _round_up(s_len, 128))


def _pad(x, axis: int, to: int, broadcast: bool = False):
    """``x`` zero-padded to length ``to`` along ``axis`` (a broadcast axis of size 1 left)."""
    if x is None or x.shape[axis] == to or (broadcast and x.shape[axis] == 1):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, widths)


def _token_rows(segment, length, batch: int, real: int, padded: int):
    """``[B, 8, padded]`` int32: row 0 the segment id (0 without), row 1 whether the token is
    real and within its sequence's length."""
    pos = jnp.arange(padded, dtype=jnp.int32)[None, :]
    valid = pos < real
    if length is not None:
        valid = valid & (pos < length[:, None])
    valid = jnp.broadcast_to(valid, (batch, padded))
    seg = jnp.zeros((batch, padded), jnp.int32) if segment is None else _pad(segment, 1, padded)
    rows = jnp.stack([seg, valid.astype(jnp.int32)], axis=1)
    return jnp.pad(rows, ((0, 0), (0, 6), (0, 0)))


def _block_ranges(rows, block: int):
    """Flat int32 ``[B * blocks * 2]``: per block, the (min, max) segment id of its valid
    tokens (an empty range, ``(INT_MAX, INT_MIN)``, when none is valid)."""
    batch, _, padded = rows.shape
    seg = rows[:, 0].reshape(batch, padded // block, block)
    valid = rows[:, 1].reshape(batch, padded // block, block) > 0
    lo = jnp.min(jnp.where(valid, seg, INT_MAX), axis=-1)
    hi = jnp.max(jnp.where(valid, seg, INT_MIN), axis=-1)
    return jnp.stack([lo, hi], axis=-1).reshape(-1)


class _Padded(NamedTuple):
    cfg: Config
    q: jax.Array
    k: jax.Array
    v: jax.Array
    bias: jax.Array | None
    info: tuple | None
    ranges: tuple | None


def _prepare(opts: Options, family: str, interpret: bool, q, k, v, bias, dyn) -> _Padded:
    """Everything a family's kernels take, padded to its whole blocks."""
    bsz, t_len = q.shape[:2]
    s_len = k.shape[1]
    all_heads = _kernels(family, opts) is pallas_tpu_heads
    bq, bk = _blocks(family, interpret, t_len, s_len, (*q.shape[2:], all_heads))
    t_pad, s_pad = _round_up(t_len, bq), _round_up(s_len, bk)
    cfg = Config(*opts[:2], t_len, s_len, opts.group, bq, bk, *opts[3:])
    info = ranges = None
    if opts.dynamic:
        q_rows = _token_rows(dyn.q_segment, dyn.q_length, bsz, t_len, t_pad)
        kv_rows = _token_rows(dyn.kv_segment, dyn.kv_length, bsz, s_len, s_pad)
        info = (q_rows, kv_rows)
        ranges = (_block_ranges(q_rows, bq), _block_ranges(kv_rows, bk))
    bias = _pad(_pad(bias, 2, t_pad, broadcast=True), 3, s_pad, broadcast=True)
    return _Padded(cfg, _pad(q, 1, t_pad), _pad(k, 1, s_pad), _pad(v, 1, s_pad), bias, info, ranges)


def _forward_on(family: str, interpret: bool, opts: Options, q, k, v, bias, consts, dyn):
    kernels = _kernels(family, opts)
    pad = _prepare(opts, family, interpret, q, k, v, bias, dyn)
    o, lse = kernels.forward(
        pad.q, pad.k, pad.v, consts, pad.bias, pad.info, pad.ranges,
        cfg=pad.cfg, interpret=interpret,
    )  # fmt: skip
    t_len = q.shape[1]
    return o[:, :t_len], lse[:, :, :t_len]


def _backward_on(family, interpret, opts: Options, q, k, v, bias, consts, dyn, rows, do):
    kernels = _kernels(family, opts)
    pad = _prepare(opts, family, interpret, q, k, v, bias, dyn)
    t_pad = pad.q.shape[1]
    dq, dk, dv, ds = kernels.backward(
        pad.q, pad.k, pad.v, _pad(do, 1, t_pad), _pad(rows, 3, t_pad), consts,
        pad.bias, pad.info, pad.ranges, cfg=pad.cfg, interpret=interpret,
    )  # fmt: skip
    t_len, s_len = q.shape[1], k.shape[1]
    if ds is not None:
        ds = ds[:, :, :t_len, :s_len]
    return dq[:, :t_len], dk[:, :s_len], dv[:, :s_len], ds


def _per_platform(fn, opts: Options, *args, family=None):
    """``fn`` with the family of the platform being lowered for (or ``family``, interpreted:
    tests pin one); ``opts`` is static, ``args`` are arrays (or None)."""
    if family is not None:
        return fn(family, True, opts, *args)
    tpu = functools.partial(fn, "tpu", False, opts)
    gpu = functools.partial(fn, "gpu", False, opts)
    default = functools.partial(fn, "interpret", True, opts)
    return platform_dependent(*args, tpu=tpu, cuda=gpu, rocm=gpu, default=default)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(opts: Options, family, q, k, v, bias, consts, dyn: Dynamic):
    return _per_platform(_forward_on, opts, q, k, v, bias, consts, dyn, family=family)


def _fwd(opts, family, q, k, v, bias, consts, dyn):
    o, lse = _attention(opts, family, q, k, v, bias, consts, dyn)
    return (o, lse), (q, k, v, bias, consts, dyn, o, lse)


def _bwd(opts, family, res, cts):
    q, k, v, bias, consts, dyn, o, lse = res
    d_out, d_lse = cts
    # [B, T, N] -> [B, N, T], beside the lse.
    delta = jnp.sum(d_out.astype(jnp.float32) * o, axis=-1).transpose(0, 2, 1) - d_lse
    # exp(s - lse) with lse = -inf (a row that attends to nothing) must be 0: use +inf there.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    rows = jnp.pad(jnp.stack([lse, delta], axis=2), ((0, 0), (0, 0), (0, 6), (0, 0)))
    args = (opts, q, k, v, bias, consts, dyn, rows, d_out.astype(q.dtype))
    dq, dk, dv, ds = _per_platform(_backward_on, *args, family=family)
    dbias = None
    if ds is not None:
        axes = tuple(a for a in range(4) if bias.shape[a] == 1 and ds.shape[a] != 1)
        dbias = jnp.sum(ds, axis=axes, keepdims=True).astype(bias.dtype)
    none = jax.tree.map(lambda _: None, (consts, dyn))
    return (dq, dk, dv, dbias, *none)


_attention.defvjp(_fwd, _bwd)


def attention(
    query, key, value, bias, mask, *, scale, softcap, causal, window, dyn: Dynamic, family=None
):
    """Flash attention on the API's layout: ``query`` ``[B, T, N, H]``, ``key``/``value``
    ``[B, S, K, H]``, ``bias``/``mask`` broadcastable rank-4 ``[B|1, N|1, T|1, S|1]`` or
    None. Returns ``(out [B, T, N, H] float32, lse [B, T, N] float32)``.

    ``family`` (``"tpu"`` or ``"gpu"``) pins one kernel family, interpreted (tests); by
    default the platform's own family.
    """
    n_heads, kv_heads = query.shape[2], key.shape[2]
    bias_grad = bias is not None  # a bias made of the mask alone is a constant
    if mask is not None:
        fill = jnp.zeros((), jnp.bfloat16) if bias is None else bias
        bias = jnp.where(mask, fill, -jnp.inf)
    if bias is not None and np.dtype(bias.dtype).itemsize > 4:
        bias = bias.astype(jnp.float32)
    opts = Options(
        causal=causal,
        window=window,
        group=n_heads // kv_heads,
        bias_axes=None if bias is None else tuple(d != 1 for d in bias.shape),
        dynamic=any(x is not None for x in dyn),
        softcap=softcap is not None,
        bias_grad=bias_grad,
    )
    cap = jnp.ones((), jnp.float32) if softcap is None else jnp.asarray(softcap, jnp.float32)
    consts = jnp.stack([jnp.asarray(scale, jnp.float32), cap]).reshape(1, 2)
    o, lse = _attention(opts, family, query, key, value, bias, consts, dyn)
    return o, lse.transpose(0, 2, 1)
