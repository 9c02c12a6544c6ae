"""Block and chunk sizes of the Pallas vocabulary kernels, per target.

A kernel holds, per grid step, a ``[block_n, block_d]`` slice of ``x``, a
``[block_v, block_d]`` slice of ``w`` and a ``[block_n, block_v]`` float32 logits block: the
logits block is accumulated over ``D / block_d`` steps (a K loop), so fast memory (VMEM on
TPU, shared memory and registers on GPU) is bounded whatever ``D`` is.

The backward pass (``pallas.backward``) walks chunks of tokens and classes around a kernel
that turns a logits block into its gradient block, and multiplies those with the chip's
matmul. ``chunk_n``/``chunk_v`` bound its temporary memory; ``None`` derives them from
:data:`CHUNK_ELEMENTS` at the call's sizes.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

# Elements of each float32 accumulator ([chunk, D]) and of each gradient chunk of the
# backward pass: 2**21 float32 is 8 MiB, and the pass keeps about two such chunks at once
# (an accumulator, its gradient chunk, the operand slices): ~16 MiB whatever N, V and D,
# under 2 % of the float32 logits from 8192 tokens x 32000 classes up.
CHUNK_ELEMENTS = 2**21
MIN_CHUNK = 128

# The smallest VMEM of the TPU generations softjax targets (v5p: 64 MiB per core; v5e and
# v6e have 128 MiB): blocks that fit it fit all of them.
TPU_VMEM_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of one kernel family.

    Attributes:
      block_n: tokens per block (rows of ``x`` and of the logits block).
      block_v: classes per block (rows of ``w``, columns of the logits block).
      block_d: hidden units per K step (columns of the ``x`` and ``w`` blocks).
      chunk_n, chunk_v: token and class chunks of the backward pass (None: from the budget).
    """

    block_n: int
    block_v: int
    block_d: int
    chunk_n: int | None = None
    chunk_v: int | None = None

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d", "chunk_n", "chunk_v"):
            value = getattr(self, name)
            if value is None and name.startswith("chunk"):
                continue
            if not isinstance(value, int) or value <= 0 or value % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")

    @classmethod
    def tpu(cls, vmem_bytes: int = TPU_VMEM_BYTES) -> BlockSizes:
        """Mosaic: lane dimensions (``block_v``, ``block_d``) are multiples of 128.

        Per grid step the kernels keep two buffers of each input block, the float32 logits
        block and a few float32 temporaries of its size (the gradient block): about
        ``4 * (bn + bv) * bd + 6 * 4 * bn * bv`` bytes, 9 MiB at (512, 1024, 512) — within the
        default scoped VMEM of every generation.
        """
        if vmem_bytes >= 64 * 2**20:
            return cls(512, 1024, 512)
        return cls(256, 512, 512)

    @classmethod
    def gpu(cls) -> BlockSizes:
        """Triton: power-of-two blocks; ``(64, 128, 64)`` bf16 is 24 KiB of shared memory per
        pipeline stage and a 32 KiB float32 accumulator spread over four warps' registers."""
        return cls(64, 128, 64)

    @classmethod
    def interpret(cls) -> BlockSizes:
        """CPU (interpreted, for tests): small blocks so that ragged edges are exercised."""
        return cls(8, 128, 16)


def tpu_vmem_bytes() -> int:
    """VMEM per core of the TPU this process runs on, else :data:`TPU_VMEM_BYTES`.

    Only a TPU host can say: when compiling for a TPU from another host (deviceless, or
    ``jax.export``), the blocks that fit every targeted generation are used.
    """
    try:
        from jax.experimental.pallas import tpu as pltpu

        return int(pltpu.get_tpu_info().vmem_capacity_bytes)
    except Exception:  # no TPU here: the chip is not known when tracing
        return TPU_VMEM_BYTES


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def chunks(n: int, v: int, dim: int, blocks: BlockSizes) -> tuple[int, int, int, int]:
    """``(dx_rows, dx_cols, dw_cols, dw_rows)``: the chunks of the two backward passes.

    The dx pass keeps a float32 ``[dx_rows, D]`` accumulator and ``[dx_rows, dx_cols]``
    gradient chunks; the dw pass a ``[dw_cols, D]`` accumulator and ``[dw_rows, dw_cols]``
    chunks. Each is within :data:`CHUNK_ELEMENTS` (at least :data:`MIN_CHUNK` wide).
    """
    # Every [chunk, D] slice and every [chunk, chunk] gradient chunk stays within the budget.
    acc = _round_down(CHUNK_ELEMENTS // dim, MIN_CHUNK)
    dx_rows = min(n, blocks.chunk_n or acc)
    dx_cols = min(v, blocks.chunk_v or min(acc, _round_down(CHUNK_ELEMENTS // dx_rows, MIN_CHUNK)))
    dw_cols = min(v, blocks.chunk_v or acc)
    dw_rows = min(n, blocks.chunk_n or min(acc, _round_down(CHUNK_ELEMENTS // dw_cols, MIN_CHUNK)))
    return dx_rows, dx_cols, dw_cols, dw_rows


def chunk(a, start, size):
    """Rows ``[start, start + size)`` of ``a``."""
    return lax.dynamic_slice_in_dim(a, start, size, 0)


def clamped(k, size, total):
    """Start of chunk ``k`` of ``size`` rows, clamped to ``total - size``, and which of its
    rows are its own ``[size]`` (not already in chunk ``k - 1``).

    Clamping instead of padding keeps every chunk inside the array (no padded copy of it):
    the last chunk overlaps the one before.
    """
    start = jnp.minimum(k * size, total - size)
    return start, start + lax.iota(jnp.int32, size) >= k * size


def token_chunk(n: int, dim: int) -> int:
    """Rows of a ``[rows, D]`` chunk within :data:`CHUNK_ELEMENTS` (all ``n`` if they fit)."""
    return min(n, _round_down(CHUNK_ELEMENTS // dim, MIN_CHUNK))
