"""The numerics policy of softjax, written once.

Every function in the softmax family goes through the same four steps, and this module is
the one place where they are spelled out:

1. **Compute dtype.** Low-precision inputs (bf16, f16) are upcast to float32 for all of the
   arithmetic and rounded once at the end; float64 stays float64. The row maximum is taken
   in the input's own dtype (exact), and each other full-size pass converts the input
   itself (:func:`upcast_for_pass`), so no float32 copy of it is ever kept.
2. **Masking before the max.** Excluded entries (``where=False``) become ``-inf`` before the
   row maximum is taken, so they can never dominate it.
3. **A stable, compensated shift.** The row maximum ``m`` is subtracted (under
   ``stop_gradient``) before ``exp``. The rounding error of ``x - m`` is what limits the
   accuracy of a float32 softmax: ``exp`` turns an absolute error ``e`` in its argument
   into a relative error ``e``, and ``|x - m|`` reaches ~87 for outputs still in the normal
   range, so a half-ulp error in the difference becomes ~40 ulp in the result. The
   difference is therefore computed as an unevaluated sum ``hi + lo`` (Knuth's TwoSum, and
   an exact product for the temperature division), and ``exp(hi + lo)`` is evaluated as
   ``exp(hi) * (1 + lo)``.
4. **Empty rows.** A row with no valid entry (all masked, all ``-inf``, or a zero-size
   axis) has maximum ``-inf``; its shift is replaced by 0 so that nothing computes
   ``-inf - -inf``, and its normaliser is handled explicitly by the callers (probabilities
   0, log-probabilities and logsumexp ``-inf``, zero gradients).
5. **Rows holding ``+inf``.** ``exp(+inf)`` dominates every finite term, so such a row is
   the limit of its ``+inf`` entries growing together: they share the mass equally, every
   finite entry gets probability 0 (log-probability ``-inf``), and the logsumexp is
   ``+inf``. Such a row is shifted by the largest finite float instead of its maximum:
   its finite entries then lie so far below the shift that ``exp`` gives exactly 0, and
   its ``+inf`` entries are clamped to a difference of 0 (``exp(0) = 1``), inside each
   pass (a clamped copy of the input, shared by the passes, would make XLA materialise
   it). The callers restore the infinities on their outputs, row by row
   (:attr:`Shifted.offset` is ``+inf`` there). One approximation, on purpose: a finite
   entry equal to the largest float, in a row that also holds ``+inf``, shares the mass.

NaN inputs are never hidden: a NaN makes its row's maximum NaN, which flows into every
output of that row and no other.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

Axes = tuple[int, ...]


def compute_dtype(dtype) -> np.dtype:
    """The dtype softjax computes in for inputs of ``dtype``: float64 stays, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in its compute dtype (see :func:`compute_dtype`)."""
    return x.astype(compute_dtype(x.dtype))


def row_max(x: jax.Array, axes: Axes) -> jax.Array:
    """The maximum over ``axes``, dims kept; ``-inf`` along a zero-size axis.

    ``lax.reduce_max`` rather than ``jnp.max``: the latter refuses zero-size reductions,
    where the maximum of nothing is the identity ``-inf`` (an empty row).
    """
    return jnp.expand_dims(lax.reduce_max(x, axes), axes)


def flush_temperature(t: jax.Array) -> jax.Array:
    """``t`` with values below the smallest normal number of its dtype flushed to 0.

    A temperature that is subnormal (which XLA may or may not flush itself) or that rounds
    to 0 in the compute dtype means the limit ``T -> 0+``, on every backend alike: the
    maximal entries of a row keep ``(x - max) / T = 0``, the others become ``-inf``.
    """
    return jnp.where(t < jnp.finfo(t.dtype).tiny, jnp.zeros_like(t), t)


def saturate_infinite_rows(x: jax.Array, infinite: jax.Array) -> jax.Array:
    """Rows flagged ``infinite`` (holding ``+inf``) as the indicator of their ``+inf`` entries.

    0 at ``+inf`` entries and ``-inf`` elsewhere: the limit of the row's softmax as its
    ``+inf`` entries grow together (rule 5, for the sort-based functions, which select
    anyway).
    """
    indicator = jnp.where(x == jnp.inf, 0.0, -jnp.inf).astype(x.dtype)
    return jnp.where(infinite, indicator, x)


def _dims(d) -> tuple[int, ...]:
    return (d,) if isinstance(d, (int, np.integer)) else tuple(d)


def dot(a: jax.Array, b: jax.Array, contract, dtype, batch=((), ())) -> jax.Array:
    """``lax.dot_general`` contracting axes ``contract[0]`` of ``a`` with ``contract[1]`` of
    ``b`` (ints or tuples), batched over ``batch[0]`` / ``batch[1]``, accumulated in ``dtype``.

    The one matmul of softjax. float32 and float64 operands ask for ``Precision.HIGHEST``: a
    TPU's default float32 matmul rounds its operands to bfloat16 (one MXU pass), which is
    not float32 arithmetic. Low precision operands are multiplied exactly as they are and
    accumulated in ``dtype``.
    """
    wide = np.dtype(a.dtype).itemsize >= 4
    dims = ((_dims(contract[0]), _dims(contract[1])), (_dims(batch[0]), _dims(batch[1])))
    return lax.dot_general(
        a,
        b,
        dims,
        precision=lax.Precision.HIGHEST if wide else None,
        preferred_element_type=dtype,
    )


def empty_row_shift(m: jax.Array) -> jax.Array:
    """Rule 4: the shift of a row whose maximum is ``m``: ``m`` itself, or 0 for an empty
    row (``m = -inf``), so that nothing computes ``-inf - -inf``.

    A NaN maximum passes through (the row stays NaN, loudly); rows holding ``+inf`` are
    shifted by :func:`shift_rows` under rule 5, or mapped first by the caller.
    """
    return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def softcap(logits: jax.Array, cap) -> jax.Array:
    """``cap * tanh(logits / cap)`` (Gemma 2), or ``logits`` when ``cap`` is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def softcap_grad(logits: jax.Array, cap, grad: jax.Array) -> jax.Array:
    """Chains ``grad`` (with respect to the capped logits) through :func:`softcap`."""
    if cap is None:
        return grad
    t = jnp.tanh(logits / cap)
    return grad * (1 - t * t)


def mask_invalid(x: jax.Array, where: jax.Array | None) -> jax.Array:
    """``x`` with excluded entries replaced by ``-inf``, so they drop out of max and sum."""
    if where is None:
        return x
    return jnp.where(where, x, -jnp.inf)


def two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Knuth's TwoSum: ``s + err == a + b`` exactly, with ``s = fl(a + b)``.

    Where ``s`` is not finite the error term is meaningless (``inf - inf``); it is set to 0
    there so that it never turns a valid ``-inf`` into NaN.
    """
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return s, jnp.where(jnp.isfinite(s), err, jnp.zeros_like(err))


def _split(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``a == hi + lo`` exactly with ``hi`` holding half of the significand bits.

    Uses ``reduce_precision`` rather than Veltkamp's ``(2**s + 1) * a`` trick, because the
    latter is silently broken when a compiler contracts it into a fused multiply-add.
    """
    finfo = jnp.finfo(a.dtype)
    # Half of the significand (plus the implicit bit) in hi, the rest in lo, so that every
    # partial product of two splits fits in the significand exactly.
    hi = lax.reduce_precision(a, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant // 2)
    return hi, a - hi


def divide_compensated(hi: jax.Array, lo: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(hi + lo) / t`` as an unevaluated sum ``q + q_lo`` accurate well beyond one ulp.

    ``q = fl(hi / t)``; the remainder ``hi - q * t`` is computed exactly from products of
    half-width splits (each partial product is exact, so contraction into FMAs cannot change
    it), then divided by ``t`` as a first-order correction.
    """
    # 0 / t is 0 for every t >= 0: the limit t -> 0 included (a row's maximal entries).
    q = jnp.where(hi == 0, jnp.zeros_like(hi), hi / t)
    q_hi, q_lo = _split(q)
    t_hi, t_lo = _split(jnp.broadcast_to(t, q.shape).astype(q.dtype))
    remainder = (((hi - q_hi * t_hi) - q_hi * t_lo) - q_lo * t_hi) - q_lo * t_lo
    correction = (remainder + lo) / t
    return q, jnp.where(jnp.isfinite(correction), correction, jnp.zeros_like(correction))


class Shifted(NamedTuple):
    """The shifted, tempered logits of a row, ``(x - max) / T == hi + lo`` (``hi <= 0``).

    ``shift`` is the row maximum of the untempered (masked) input ``x``, 0 for empty rows.
    ``empty`` is True for rows with no valid entry. ``x`` is the masked input in its compute
    dtype and ``native`` the same in the input's own dtype (for a pass of its own, see
    :func:`upcast_for_pass`); ``offset`` is ``+inf`` for a row holding ``+inf`` (0
    elsewhere), to be added to its logsumexp; its ``shift`` is then the largest float and
    ``hi`` is 0 at its ``+inf`` entries (rule 5).
    """

    hi: jax.Array
    lo: jax.Array
    shift: jax.Array
    empty: jax.Array
    offset: jax.Array
    native: jax.Array

    @property
    def x(self) -> jax.Array:
        return upcast(self.native)


def shift_rows(x: jax.Array, axes: Axes, where: jax.Array | None, temperature=None) -> Shifted:
    """Masks, shifts and tempers ``x`` along ``axes``, in its compute dtype.

    ``temperature`` is None (meaning 1) or a positive array broadcastable to ``x`` with
    size-1 reduced axes (see :func:`flush_temperature`). Since ``T > 0`` the row maximum of
    ``x / T`` is ``max(x) / T``, so the shift is taken on ``x`` itself and the division
    applied to the exact difference. The maximum of a low-precision ``x`` is taken in its
    own dtype (exact), so that the pass reads ``x`` as it is.
    """
    native = mask_invalid(x, where)
    raw_max = upcast(row_max(native, axes))
    x = upcast(native)
    infinite = raw_max == jnp.inf
    empty = raw_max == -jnp.inf
    # Rule 5: a row holding +inf is shifted by the largest float; its +inf entries then give
    # inf - big = inf, which the clamp in _shift_entries turns into 0 (arithmetic only: the
    # passes over x stay fused), and its finite entries lie so far below that exp gives 0.
    big = jnp.finfo(x.dtype).max
    shift = lax.stop_gradient(jnp.where(empty, 0.0, jnp.minimum(raw_max, big)))
    offset = jnp.where(infinite, jnp.inf, 0.0).astype(x.dtype)
    hi, lo = _shift_entries(x, shift, infinite, temperature)
    return Shifted(hi, lo, shift, lax.stop_gradient(empty), lax.stop_gradient(offset), native)


def reshift(x: jax.Array, rows: Shifted, where: jax.Array | None, temperature=None):
    """``(hi, lo)`` of :func:`shift_rows` for ``x`` with the row shift of ``rows`` (elementwise).

    For an output pass that recomputes the shifted entries from the input instead of reading
    back the ones the reductions used (see :func:`unshared`).
    """
    return _shift_entries(mask_invalid(x, where), rows.shift, rows.offset == jnp.inf, temperature)


def _shift_entries(x, shift, infinite, temperature):
    hi, lo = two_sum(x, -shift)
    # A select, not minimum: the derivative at the maximum (hi == 0) must stay 1.
    hi = jnp.where(hi > 0, 0.0, hi)
    if temperature is not None:
        # x - max overflows where the two are more than the largest float apart, though
        # (x - max) / T may be finite: there, halve both (exactly) and the divisor with them.
        overflow = jnp.isinf(hi) & jnp.isfinite(x)
        half_hi, half_lo = two_sum(x * 0.5, -shift * 0.5)
        hi, lo = jnp.where(overflow, half_hi, hi), jnp.where(overflow, half_lo, lo)
        t = jnp.where(overflow, temperature * 0.5, temperature)
        # Divide only finite differences: -inf / T is -inf anyway, and its derivative with
        # respect to T (-inf * dT) would poison second derivatives through the mask.
        finite = jnp.isfinite(hi)
        q, q_lo = divide_compensated(jnp.where(finite, hi, 0.0), lo, t)
        hi, lo = jnp.where(finite, q, hi), q_lo
        # (x - inf) / T is -inf whatever T: a huge T must not bring the finite entries back.
        hi = jnp.where(infinite & (x < shift), -jnp.inf, hi)
    return hi, lo


def unshared(x: jax.Array) -> jax.Array:
    """``x``, as a value XLA cannot identify with ``x`` on GPU and TPU (the identity on CPU).

    An output pass computed from ``unshared(x)`` recomputes its elementwise work instead of
    reusing that of the reductions: XLA:GPU would otherwise fuse the reduction with a second
    output, the full-size float32 exponentials, and read them back (a 4 GiB temporary and
    1.75x the bytes of ``jax.nn.softmax`` for a bf16 ``[8192, 131072]``). On XLA:CPU the
    recomputation costs more than it saves, so there it is the plain ``x``.
    """
    return lax.platform_dependent(x, cpu=lambda x: x, default=lax.optimization_barrier)


def upcast_for_pass(x: jax.Array, k: int) -> jax.Array:
    """``upcast(x)`` for the ``k``-th full-size pass over ``x`` (``k = 0, 1, 2, ...``).

    XLA merges identical converts. On XLA:CPU a low-precision ``x`` converted once and read
    by several reductions is then converted into a float32 copy of ``x`` first, where a
    convert read by one pass fuses into it: for a bf16 ``[2048, 32768]`` logsumexp that copy
    was 256 MiB of temp memory and 1.7x the time. So on CPU each pass ``k > 0`` converts a
    value of its own: ``x`` through ``k`` nested optimization barriers, which no merge sees
    through (one barrier tagged with ``k`` is not enough: XLA drops the unused tag and then
    merges the barriers). Elsewhere, and for inputs already in their compute dtype, it is
    ``upcast``.
    """
    if k == 0 or compute_dtype(x.dtype) == x.dtype:
        return upcast(x)

    def own(x):
        for _ in range(k):
            x = lax.optimization_barrier(x)
        return x

    return upcast(lax.platform_dependent(x, cpu=own, default=lambda x: x))


def exp_compensated(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """``exp(hi + lo)`` for ``|lo| <= ulp(hi)``: ``exp(hi) * (1 + lo)`` to first order."""
    e = jnp.exp(hi)
    return e + e * lo


def compensated_sum(e: jax.Array, axes: Axes) -> jax.Array:
    """Sum over ``axes`` (dims kept) with an error below one ulp of the result.

    A plain float32 reduction of 32k terms is off by ~2 ulp, and that error lands on every
    probability of the row. Two forms with that accuracy, chosen when lowering: on CPU
    :func:`folded_sum` (a plain reduction XLA:CPU vectorises, then TwoSum on 512 partial
    sums a row), elsewhere :func:`streaming_sum` (one variadic reduction carrying the
    rounding errors). The folded form's strided reshape is free on CPU and GPU, but a TPU
    stores arrays in (8, 128) tiles, where it is a relayout: XLA:TPU wrote the float32
    exponentials of a bf16 ``[8192, 131072]`` softmax out twice (8 GiB of temp, 3x the
    bytes of ``jax.nn.softmax``) to make it; the streaming form reads ``x`` as jax.nn does.

    Its derivative is the plain sum of the tangents (the sum is linear; the compensation
    only refines the rounding), which also keeps the platform choice out of reverse-mode
    transposition.
    """
    return _compensated_sum(e, tuple(axes))


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _compensated_sum(e, axes):
    return lax.platform_dependent(
        e, cpu=partial(folded_sum, axes=axes), default=partial(streaming_sum, axes=axes)
    )


@_compensated_sum.defjvp
def _compensated_sum_jvp(axes, primals, tangents):
    (e,), (e_dot,) = primals, tangents
    return _compensated_sum(e, axes), jnp.sum(e_dot, axis=axes, keepdims=True)


def streaming_sum(e: jax.Array, axes: Axes) -> jax.Array:
    """Sum over ``axes`` (dims kept) as one reduction of ``(sum, error)`` pairs.

    The reducer adds two partial sums with TwoSum and carries the rounding error in the
    second component: ``(s1, c1) + (s2, c2) = (s1 (+) s2, c1 + c2 + err)``. The result
    ``s + c`` is off by the final rounding plus the rounding of the carried errors (of
    order ``n * eps`` relative to the error, negligible), in whatever order XLA reduces.
    """

    def add(a, b):
        (s1, c1), (s2, c2) = a, b
        s, err = two_sum(s1, s2)  # err 0 where s overflows, so an infinite sum stays inf
        return s, c1 + c2 + err

    zero = jnp.zeros((), e.dtype)
    s, c = lax.reduce((e, jnp.zeros_like(e)), (zero, zero), add, tuple(axes))
    return jnp.expand_dims(s + c, tuple(axes))


def folded_sum(e: jax.Array, axes: Axes, partials: int = 512) -> jax.Array:
    """Sum over ``axes`` (dims kept): ``partials`` strided partial sums, then TwoSum.

    The row is first folded into ``partials`` strided partial sums (each ~1/partials of the
    total, so their rounding errors are small in absolute terms), and those are added
    pairwise with TwoSum, carrying every rounding error along, so the largest additions
    are exact. The extra work is on ``partials`` numbers a row.
    """
    keep = [a for a in range(e.ndim) if a not in axes]
    lead = tuple(e.shape[a] for a in keep)
    n = math.prod(e.shape[a] for a in axes)
    if n == 0:
        return jnp.sum(e, axis=axes, keepdims=True)  # the empty sum, 0
    flat = jnp.transpose(e, keep + list(axes)).reshape(lead + (n,))
    if n > partials:
        folds = -(-n // partials)
        flat = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, folds * partials - n)])
        flat = flat.reshape(lead + (folds, partials)).sum(axis=-2)
    total, carry = flat, jnp.zeros_like(flat)
    while total.shape[-1] > 1:
        n = total.shape[-1]
        h = n // 2
        s, err = two_sum(total[..., :h], total[..., h : 2 * h])
        c = carry[..., :h] + carry[..., h : 2 * h] + err
        total = jnp.concatenate([s, total[..., 2 * h :]], axis=-1)
        carry = jnp.concatenate([c, carry[..., 2 * h :]], axis=-1)
    return jnp.expand_dims((total + carry)[..., 0], axes)


# The log normaliser sums exp(z - shift + LIFT) * exp(-LIFT): the terms that decide the tiny
# log-probability of a dominant class lie below exp(-87), where float32 is subnormal and
# XLA flushes to zero; lifted by e**32 they stay normal (and V * e**32 cannot overflow).
LIFT = 32.0


def log_normalizer(z: jax.Array, shift: jax.Array, axes: Axes, lo=None) -> jax.Array:
    """``log(sum(exp(z - shift + lo)))`` over ``axes``, dims kept; 0 for empty rows.

    ``z`` holds the (masked) values with ``-inf`` for excluded entries, in their compute
    dtype or a lower precision (each of the two passes below then converts its own, see
    :func:`upcast_for_pass`), ``shift`` their row maximum (0 for an empty row, compute
    dtype) and ``lo`` an optional compensation term of ``z``.

    The entries at the maximum contribute exactly 1 each; summing only the others
    (``rest``) and taking ``log1p(rest + count - 1)`` keeps full relative accuracy when one
    class dominates, where ``log(sum)`` would round to exactly 0.

    Its derivative is the softmax (a custom JVP), so the masks below never enter it.
    """
    return _log_normalizer(z, shift, lo, axes)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def _log_normalizer(z, shift, lo, axes):
    dtype = shift.dtype
    # The rest pass reads z as view 1, the count pass as view 2; a caller's output pass
    # reads view 0 (upcast_for_pass).
    z, z_count = upcast_for_pass(z, 1), upcast_for_pass(z, 2)
    # Every full-size expression below is arithmetic only, and the two reductions share no
    # full-size operand (not even a broadcast of ``shift``): on XLA:CPU a select, compare
    # or shared broadcast in a reduction's input makes XLA materialise that input at full
    # size, where arithmetic alone fuses into a single streaming pass.
    big = 2.0 / float(jnp.finfo(dtype).tiny)  # turns any non-zero difference into >= 2
    largest = jnp.finfo(dtype).max
    c_hi, c_lo = two_sum(shift, jnp.asarray(-LIFT, dtype))
    # Clamped below so that -inf entries give exp(-huge) == 0 rather than NaN through TwoSum
    # (the clamp is local to the ``rest`` sum, the input stays unchanged). The floor (per
    # row) lies at least 1e30 below the shift, or twice as far from 0 where subtracting 1e30
    # would round back to the shift itself (|shift| > ~8e36), and never below the largest
    # negative float; only a shift of exactly -max has no floor below it.
    floor = jnp.maximum(2.0 * jnp.minimum(c_hi, 0.0) - 1e30, -largest)
    s, err = _two_sum_unguarded(jnp.maximum(z, floor), -c_hi)
    if lo is not None:
        err = err + lo
    e = jnp.exp(s)
    not_max = jnp.minimum(1.0, (z + (-shift)) * -big)  # 0 at the maximum, else 1
    # exp(z - c_hi - c_lo) = exp(s + err) exp(-c_lo): the row's c_lo is applied once, after
    # the sum (exactly, where a shift beyond ~2**29 leaves all of LIFT in c_lo).
    rest = jnp.sum((e + e * err) * not_max, axis=axes, keepdims=True) * jnp.exp(-c_lo)
    # 2 below the maximum (and at -inf), 0 at it and at the +inf entries of a row shifted by
    # the largest float (rule 5). Arithmetic only, with constants of its own (a broadcast
    # shared with the ``rest`` pass, or a clamp, would be materialised at full size), and its
    # shift goes through a barrier so as not to share a caller's broadcast of it either.
    top = lax.optimization_barrier(shift)
    below = jnp.minimum(2.0, (top - jnp.minimum(z_count, top)) * big)
    size = math.prod(z.shape[a] for a in axes)
    count = size - jnp.sum(below, axis=axes, keepdims=True) * 0.5
    log_sum = jnp.log1p(rest * math.exp(-LIFT) + (count - 1))
    # Rule 5: in a row holding +inf (shifted by the largest float) those entries made
    # ``rest`` NaN; they share the mass, the row's finite entries lie infinitely far below.
    log_sum = jnp.where(shift == largest, jnp.log(count), log_sum)
    return jnp.where(count == 0, jnp.zeros_like(log_sum), log_sum)


@partial(_log_normalizer.defjvp, symbolic_zeros=True)
def _log_normalizer_jvp(axes, primals, tangents):
    z, shift, lo = primals
    z_dot, _, lo_dot = tangents
    log_sum = _log_normalizer(z, shift, lo, axes)
    if isinstance(z_dot, SymbolicZero):
        return log_sum, jnp.zeros_like(log_sum)
    z, z_dot = upcast(z), upcast(z_dot)
    dz = z_dot if lo is None or isinstance(lo_dot, SymbolicZero) else z_dot + lo_dot
    # 0 at -inf entries, whose tangent is finite; 1 / count at the +inf ones (rule 5). A
    # select, not a clamp: differentiated again (second order), the rule must stay exact.
    p = jnp.exp(jnp.where(z == jnp.inf, 0.0, z - shift) - log_sum)
    return log_sum, jnp.sum(p * dz, axis=axes, keepdims=True)


def _two_sum_unguarded(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def minus_compensated(x: jax.Array, c_hi: jax.Array, c_lo: jax.Array) -> jax.Array:
    """``x - (c_hi + c_lo)`` rounded once, for a per-row ``c`` given as an exact pair.

    Used for ``log_softmax = x - (max + log_norm)``: evaluated straight from ``x`` rather
    than from the shifted ``hi + lo`` so that the output pass shares no full-size
    intermediate with the reductions (XLA would materialise it), at the same accuracy.
    """
    s, err = two_sum(x, -c_hi)
    return s + (err - c_lo)


def log_or_neg_inf(total: jax.Array, shift: jax.Array) -> jax.Array:
    """``shift + log(total)`` for a sum of exponentials ``total >= 0``; ``-inf`` where it is 0.

    The ``-inf`` of an empty row comes from ``log(0)`` itself (no infinite constant is
    built, so ``jax.debug_infs`` only fires where the result holds one), and its
    derivative is cut there, so that an empty row has zero gradient rather than NaN.
    """
    empty = total == 0
    safe = shift + jnp.log(jnp.where(empty, jnp.ones_like(total), total))
    return jnp.where(empty, lax.stop_gradient(jnp.log(total)), safe)


def safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` with 0 wherever ``den == 0`` (an empty row or an empty reduction)."""
    zero = den == 0
    return jnp.where(zero, jnp.zeros_like(num), num / jnp.where(zero, jnp.ones_like(den), den))


def zero_where_prob_zero(p: jax.Array, v: jax.Array) -> jax.Array:
    """``p * v`` with exact zeros where ``p == 0``, whatever ``v`` is there.

    Used in derivative rules: a masked or ``-inf`` entry has probability 0 and must
    contribute nothing even where its tangent is infinite or undefined.
    """
    return jnp.where(p == 0, jnp.zeros_like(p), p * v)


@jax.custom_jvp
def log_sigmoid(x: jax.Array) -> jax.Array:
    """``log σ(x) = min(x, 0) - log1p(e^(-|x|))``: one exponential, no cancellation in
    either tail (``≈ x`` far below 0, ``≈ -e^(-x)`` far above). The one log-sigmoid of
    softjax (``log_sigmoid``, the binary losses)."""
    return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


@log_sigmoid.defjvp
def _log_sigmoid_jvp(primals, tangents):
    """``d log σ(x) / dx = σ(-x)``, each side from the same exponential (relative accuracy
    where it is tiny, ``x`` far above 0)."""
    (x,), (x_dot,) = primals, tangents
    e = jnp.exp(-jnp.abs(x))
    grad = jnp.where(x >= 0, e, 1.0) / (1 + e)
    return log_sigmoid(x), grad * x_dot
