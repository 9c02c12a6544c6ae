"""The Pallas backend of ``linear_cross_entropy``: kernels per platform, chosen when lowering.

The backend contract of ``api.py`` (``forward_stats`` and ``backward``) is served by two
kernels per platform, each accumulating its ``[bn, bv]`` logits blocks over D steps (so
fast memory is bounded whatever D is):

* ``softjax_lce_fwd``: the per-row online logsumexp and smoothing statistics; nothing of
  size ``N x V`` leaves the chip.
* ``softjax_lce_grad``: gradient blocks ``dz = d loss / d logits`` for a chunk of tokens and
  classes, in the operands' dtype.

The backward pass multiplies those chunks with the chip's own matmul (cuBLAS on GPU, the
XLA TPU matmul), in two passes that each accumulate one gradient in a float32 chunk and cast
it once: ``dx`` over token chunks (``[Cn, D]`` float32 accumulators, summed over class
chunks) and ``dw`` over class chunks (``[Cv, D]``, summed over token chunks). Temporary
memory is those chunks, about 16 MiB (``blocks.CHUNK_ELEMENTS``) whatever N, V and D; the
logits are recomputed once per pass, so the backward does two ``N x V x D`` products more
than it differentiates (five in all, as the chunked path with bf16 weights plus one).

The kernel family is chosen per platform when the function is lowered, not when it is
traced (``softjax._lowering.platform_dependent``): Mosaic (``pallas_tpu``) for ``tpu``, Triton
(``pallas_gpu``) for ``cuda`` and ``rocm``, and the TPU family interpreted elsewhere (CPU,
for tests). A function jitted for a TPU topology from a CPU host, or exported for
``["cpu", "cuda", "tpu"]``, holds the right kernel for each platform.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _numerics as nx
from .._lowering import platform_dependent
from .._sharding import match_vma
from . import blocks as _blocks
from . import pallas_gpu, pallas_tpu
from .blocks import BlockSizes

PLATFORMS = ("tpu", "cuda", "rocm", "cpu")


def unsupported(dtype, num_classes: int) -> str | None:
    """What these kernels lack for a call with operands of ``dtype`` and ``num_classes``
    classes per call (None: they serve it)."""
    if num_classes >= 2**24:
        return (
            f"the kernels take fewer than 2**24 classes per call (got {num_classes}: labels "
            "travel as float32); use implementation='chunked'"
        )
    if np.dtype(dtype) == np.float64:
        return (
            "the kernels have no float64 form (TPUs and GPU matmul units have no float64); "
            "use implementation='chunked'"
        )
    return None


def _per_platform(fn_name: str, *args, **kw):
    """``family.<fn_name>(*args, **kw)`` of the family of the platform being lowered for."""

    def branch(family, blocks, interpret):
        fn = getattr(family, fn_name)
        return functools.partial(fn, blocks=blocks, interpret=interpret, **kw)

    gpu = branch(pallas_gpu, BlockSizes.gpu(), False)
    out = platform_dependent(
        *args,
        tpu=branch(pallas_tpu, BlockSizes.tpu(_blocks.tpu_vmem_bytes()), False),
        cuda=gpu,
        rocm=gpu,
        default=branch(pallas_tpu, BlockSizes.interpret(), True),
    )
    # Inside shard_map the results vary over the mesh axes the operands vary over.
    return match_vma(out, *args)


def forward_stats(
    x, w, class_weight, cap, *, smoothing: bool, moments=False, family=None, blocks=None
):
    """Per-row :class:`chunked.Stats` (``[N]``) of ``softcap(x @ w.T)`` over ``w``'s rows
    (``cap`` a soft-cap or a :class:`chunked.LogitMap`), and with ``moments`` the
    :class:`chunked.Moments` too, as ``chunked.forward_stats``.

    ``family`` (a kernel module) and ``blocks`` pin one family and its blocks (tests; the
    family runs interpreted): by default the platform's family with its own blocks.
    """
    kw = dict(smoothing=smoothing, moments=moments)
    if family is not None:
        return family.forward_stats(x, w, class_weight, cap, blocks=blocks, interpret=True, **kw)
    return _per_platform("forward_stats", x, w, class_weight, cap, **kw)


def row_data(row_ok, coefs, shift, log_norm, labels):
    """The per-row inputs of the gradient kernels, ``[8, N]`` float32: the rows
    ``(ok, prob, target, smooth, shift, log_norm, label, spread)`` (``spread`` 0 when
    ``coefs.spread`` is None).

    Tokens along the minor axis because a TPU pads an array's minor dimension to 128 lanes:
    ``[N, 8]`` (or a ``[N, 1]`` array per column) would cost ``N * 512`` bytes of HBM,
    ``[8, N]`` costs ``N * 32``; the kernels transpose their blocks. 8 rows because Triton
    blocks have power-of-two sizes. The label
    (an index into this call's ``w``, possibly negative) is exact as a float32:
    :func:`unsupported` keeps ``V`` below ``2**24``.
    """
    cols = (row_ok, coefs.prob, coefs.target, coefs.smooth, shift, log_norm, labels)
    cols += (jnp.zeros_like(shift) if coefs.spread is None else coefs.spread,)
    return jnp.stack([c.astype(jnp.float32) for c in cols], axis=0)


LABEL = 6  # the label's row of row_data


def _rows_chunk(rows, start, size, class_start, own=None):
    """The ``[8, size]`` row data of tokens ``[start, start + size)``, labels
    counted from ``class_start`` (a chunk of ``w``), and ``ok`` cleared where ``own`` is
    False (tokens a previous chunk covered)."""
    rows = lax.dynamic_slice_in_dim(rows, start, size, 1)
    rows = rows.at[LABEL].add(-class_start.astype(rows.dtype))
    if own is not None:
        rows = rows.at[0].multiply(own.astype(rows.dtype))
    return rows


def backward(
    x,
    w,
    labels,
    row_ok,
    coefs,
    shift,
    log_norm,
    class_weight,
    cap,
    *,
    dx_dtype=None,
    family=None,
    blocks: BlockSizes | None = None,
):
    """``dx`` (``dx_dtype``, default ``x.dtype``; summed over this ``w``) and ``dw``
    (``w.dtype``), each accumulated in float32 and cast once (see the module docstring).

    Arguments as ``chunked.backward`` (``cap`` a soft-cap or a :class:`chunked.LogitMap`,
    ``coefs`` with or without a ``spread``); ``family``/``blocks`` as :func:`forward_stats`.
    """
    n, dim = x.shape
    v = w.shape[0]
    dx_rows, dx_cols, dw_cols, dw_rows = _blocks.chunks(n, v, dim, blocks or BlockSizes.interpret())
    rows = row_data(row_ok, coefs, shift, log_norm, labels)
    cw = jnp.ones((v,), jnp.float32) if class_weight is None else class_weight

    spread = coefs.spread is not None

    def grads(*chunk):
        if family is not None:
            return family.logit_grads(*chunk, cap, blocks=blocks, interpret=True, spread=spread)
        return _per_platform("logit_grads", *chunk, cap, spread=spread)

    def dx_rows_chunk(i, dx):
        r, _ = _blocks.clamped(i, dx_rows, n)
        x_c = _blocks.chunk(x, r, dx_rows)

        def cols(j, acc):
            s, own = _blocks.clamped(j, dx_cols, v)
            w_c = _blocks.chunk(w, s, dx_cols)
            # Classes of the previous chunk (clamped start) must not reach dx twice.
            keep = own.astype(jnp.float32)
            rows_c = _rows_chunk(rows, r, dx_rows, s)
            dz = grads(x_c, w_c, _blocks.chunk(cw, s, dx_cols), keep, rows_c)
            return acc + nx.dot(dz, w_c, (1, 0), jnp.float32)

        acc = lax.fori_loop(0, -(-v // dx_cols), cols, jnp.zeros((dx_rows, dim), jnp.float32))
        # Rows shared with the previous chunk are recomputed identically and overwritten.
        return lax.dynamic_update_slice_in_dim(dx, acc.astype(dx.dtype), r, 0)

    def dw_cols_chunk(j, dw):
        s, _ = _blocks.clamped(j, dw_cols, v)
        w_c, cw_c = _blocks.chunk(w, s, dw_cols), _blocks.chunk(cw, s, dw_cols)

        def toks(i, acc):
            r, own = _blocks.clamped(i, dw_rows, n)
            x_c = _blocks.chunk(x, r, dw_rows)
            # Tokens of the previous chunk must not reach dw twice: their rows are excluded.
            rows_c = _rows_chunk(rows, r, dw_rows, s, own)
            keep = jnp.ones((dw_cols,), jnp.float32)
            dz = grads(x_c, w_c, cw_c, keep, rows_c)
            return acc + nx.dot(dz, x_c, (0, 0), jnp.float32)

        acc = lax.fori_loop(0, -(-n // dw_rows), toks, jnp.zeros((dw_cols, dim), jnp.float32))
        return lax.dynamic_update_slice_in_dim(dw, acc.astype(dw.dtype), s, 0)

    dx = jnp.zeros((n, dim), dx_dtype or x.dtype)
    dx = lax.fori_loop(0, -(-n // dx_rows), dx_rows_chunk, match_vma(dx, x, w, coefs))
    dw = match_vma(jnp.zeros_like(w), x, w, coefs)
    dw = lax.fori_loop(0, -(-v // dw_cols), dw_cols_chunk, dw)
    return dx, dw
