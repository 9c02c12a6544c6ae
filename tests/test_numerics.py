"""The compensated arithmetic of softjax._numerics against exact rational arithmetic.

Every float32 or float64 number is a rational, so ``fractions.Fraction`` of the inputs and
outputs gives the exact value of an error-free transformation (``s + err == a + b``) and the
exact error of the compensated ones. Inputs stay in the normal range with room below: XLA on
CPU flushes subnormal results to zero, which no error-free transformation survives.
"""

import math
from fractions import Fraction

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import ulp
from hypothesis import given, settings
from hypothesis import strategies as st

from softjax import _numerics as nx

N = 64  # entries per example: one compilation per test, many cases per call


def exact(a) -> list[Fraction]:
    """The exact rational value of each entry of the float array ``a``."""
    return [Fraction(float(v)) for v in np.asarray(a, np.float64).ravel()]


def ulps(errors: list[Fraction], reference, dtype) -> float:
    """The largest ``|error|`` in ulps of ``dtype`` at the matching ``|reference|``."""
    spacing = ulp(np.abs(np.asarray(reference, np.float64)).ravel(), dtype)
    return max((abs(e) / Fraction(float(s)) for e, s in zip(errors, spacing, strict=True)),
               default=Fraction(0))  # fmt: skip


def floats(dtype, lo=2.0**-64, hi=2.0**64, sign=True):
    """Finite values of ``dtype``: 0 or magnitudes in [lo, hi] (errors stay normal).

    ``lo`` and ``hi`` are rounded to ``dtype`` (hypothesis wants exact bounds).
    """
    width = np.finfo(dtype).bits
    mag = st.floats(float(dtype(lo)), float(dtype(hi)), width=width)
    value = st.tuples(mag, st.sampled_from([1.0, -1.0] if sign else [1.0])).map(
        lambda ms: ms[0] * ms[1]
    )
    return st.one_of(st.just(0.0), value)


def arrays(dtype, **kw):
    return hnp.arrays(dtype, N, elements=floats(dtype, **kw))


# ---------------------------------------------------------------------------------------
# two_sum: error-free


@pytest.mark.x64
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_two_sum_is_error_free(dtype, data):
    a, b = data.draw(arrays(dtype)), data.draw(arrays(dtype))
    s, err = jax.jit(nx.two_sum)(jnp.asarray(a), jnp.asarray(b))
    assert s.dtype == dtype and err.dtype == dtype
    # s is the rounded sum, and s + err is the exact sum, with no rounding at all.
    np.testing.assert_array_equal(s, a + b)
    lhs = [x + y for x, y in zip(exact(s), exact(err), strict=True)]
    rhs = [x + y for x, y in zip(exact(a), exact(b), strict=True)]
    assert lhs == rhs
    # ... so the error is at most half an ulp of the sum (round to nearest).
    assert np.all(np.abs(err) <= ulp(np.abs(np.where(s == 0, 1.0, s)), dtype) / 2)


def test_two_sum_error_is_zero_where_the_sum_is_not_finite():
    big = np.finfo(np.float32).max
    a = jnp.array([big, -jnp.inf, jnp.inf, -jnp.inf], jnp.float32)
    b = jnp.array([big, 1.0, -2.0, -jnp.inf], jnp.float32)
    s, err = jax.jit(nx.two_sum)(a, b)
    np.testing.assert_array_equal(s, [np.inf, -np.inf, np.inf, -np.inf])
    np.testing.assert_array_equal(err, 0.0)  # inf - inf would be NaN


# ---------------------------------------------------------------------------------------
# divide_compensated: (hi + lo) / t as q + q_lo, far better than one ulp


@st.composite
def shifted_logits(draw, dtype):
    """``hi <= 0`` (a shifted logit), ``|lo| <= ulp(hi) / 2`` (its compensation), ``t > 0``."""
    hi = -np.abs(draw(arrays(dtype, lo=1e-8, hi=1e4)))
    frac = draw(hnp.arrays(np.float64, N, elements=st.floats(-0.5, 0.5)))
    lo = (frac * ulp(np.where(hi == 0, 1.0, -hi), dtype)).astype(dtype)
    lo = np.where(hi == 0, 0.0, lo).astype(dtype)
    temperatures = st.floats(float(dtype(0.05)), 20.0, width=np.finfo(dtype).bits)
    t = draw(hnp.arrays(dtype, N, elements=temperatures))
    return hi, lo, t


@pytest.mark.x64
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=st.data())
def test_divide_compensated_is_accurate_far_below_one_ulp(dtype, data):
    hi, lo, t = data.draw(shifted_logits(dtype))
    q, q_lo = jax.jit(nx.divide_compensated)(jnp.asarray(hi), jnp.asarray(lo), jnp.asarray(t))
    # q is the plainly rounded quotient of hi alone (0 for hi == 0).
    np.testing.assert_array_equal(q, np.where(hi == 0, 0.0, hi / t).astype(dtype))
    quotient = [(h + x) / d for h, x, d in zip(exact(hi), exact(lo), exact(t), strict=True)]
    errors = [x + y - z for x, y, z in zip(exact(q), exact(q_lo), quotient, strict=True)]
    # The pair is within 2**-16 ulp of the exact quotient (the rounding of q alone is up
    # to half an ulp): the remainder is exact, only its correction term is rounded.
    nonzero = [i for i, v in enumerate(quotient) if v != 0]
    assert ulps([errors[i] for i in nonzero], np.asarray(q)[nonzero], dtype) <= 2.0**-16
    assert all(errors[i] == 0 for i in range(N) if quotient[i] == 0)


def test_divide_compensated_of_zero_is_zero_for_any_temperature():
    hi = jnp.zeros(3, jnp.float32)
    q, q_lo = jax.jit(nx.divide_compensated)(hi, hi, jnp.array([0.0, 1e-38, 2.0], jnp.float32))
    np.testing.assert_array_equal(q, 0.0)
    np.testing.assert_array_equal(q_lo, 0.0)  # 0 / 0 in the correction would be NaN


# ---------------------------------------------------------------------------------------
# compensated_sum: below one ulp where a plain float32 sum is off by several


# The two forms compensated_sum picks between when lowering (folded on CPU, streaming on
# GPU and TPU), each called directly so that both are held to the bound here, and the
# dispatching entry point itself (the folded form on this CPU, through its custom JVP).
SUMS = {"folded": nx.folded_sum, "streaming": nx.streaming_sum, "dispatched": nx.compensated_sum}


@pytest.mark.parametrize("form", ["folded", "streaming"])  # "dispatched" is "folded" here
@given(
    data=st.data(),
    n=st.sampled_from([1, 2, 3, 511, 512, 513, 4096, 32768]),
)
@settings(max_examples=40)  # 8 shapes, each compiled once: 5 draws a shape on average
def test_compensated_sum_is_within_one_ulp(form, data, n):
    # Non-negative terms, as the sums of exponentials it serves.
    seed = data.draw(st.integers(0, 2**32 - 1))
    scale = data.draw(st.sampled_from([1.0, 1e-10, 1e10]))
    e = np.random.default_rng(seed).exponential(scale, size=(2, n)).astype(np.float32)
    got = jax.jit(lambda e: SUMS[form](e, (1,)))(jnp.asarray(e))
    assert got.shape == (2, 1) and got.dtype == np.float32
    for row, total in zip(e, np.asarray(got)[:, 0], strict=True):
        # fsum is the exact sum correctly rounded to float64: 2**-29 float32 ulps at most.
        want = Fraction(math.fsum(row.astype(np.float64)))
        assert ulps([Fraction(float(total)) - want], [float(want)], np.float32) <= 1


@pytest.mark.parametrize("form", sorted(SUMS))
def test_compensated_sum_beats_the_plain_float32_sum(form):
    # The motivating case: a 32k-term row, where a plain reduction is off by ~2 ulp.
    e = np.random.default_rng(0).exponential(size=(16, 32768)).astype(np.float32)
    want = e.astype(np.float64).sum(-1)  # exact to ~1e-16: far below a float32 ulp
    ours = np.asarray(jax.jit(lambda e: SUMS[form](e, (1,)))(e), np.float64)[:, 0]
    plain = np.asarray(jax.jit(lambda e: jnp.sum(e, -1))(e), np.float64)
    spacing = ulp(want, np.float32)
    assert np.max(np.abs(ours - want) / spacing) <= 1
    assert np.max(np.abs(ours - want)) <= np.max(np.abs(plain - want))


@pytest.mark.parametrize("form", sorted(SUMS))
def test_compensated_sum_over_several_axes_keeps_dims_and_sums_empty_to_zero(form):
    e = np.random.default_rng(1).random((3, 4, 5)).astype(np.float32)
    got = jax.jit(lambda e: SUMS[form](e, (0, 2)))(e)
    assert got.shape == (1, 4, 1)
    np.testing.assert_allclose(got[0, :, 0], e.astype(np.float64).sum((0, 2)), rtol=2**-23)
    empty = SUMS[form](jnp.zeros((2, 0), jnp.float32), (1,))
    np.testing.assert_array_equal(empty, [[0.0], [0.0]])


@pytest.mark.parametrize("form", sorted(SUMS))
def test_compensated_sum_overflows_to_inf_not_nan(form):
    big = np.finfo(np.float32).max
    e = jnp.array([[big, big, 1.0], [1.0, 2.0, 3.0]], jnp.float32)
    got = jax.jit(lambda e: SUMS[form](e, (1,)))(e)
    np.testing.assert_array_equal(got[:, 0], [np.inf, 6.0])


# ---------------------------------------------------------------------------------------
# exp_compensated and minus_compensated


@given(data=st.data())
def test_exp_compensated_sees_the_low_part(data):
    hi = -np.abs(data.draw(arrays(np.float32, lo=1e-6, hi=60.0)))
    frac = data.draw(hnp.arrays(np.float64, N, elements=st.floats(-1.0, 1.0)))
    lo = (frac * ulp(np.where(hi == 0, 1.0, -hi), np.float32)).astype(np.float32)
    got = np.asarray(jax.jit(nx.exp_compensated)(hi, lo), np.float64)
    want = np.exp(hi.astype(np.float64) + lo.astype(np.float64))
    # exp(hi) alone is off by up to |lo| * exp(hi), an ulp of hi times the result's size
    # (many ulps of it for |hi| >> 1); with lo, the rounding of exp itself is all that is left.
    err = np.abs(got - want) / ulp(want, np.float32)
    assert np.max(err) <= 2, np.max(err)


@given(data=st.data())
def test_minus_compensated_is_rounded_once(data):
    x = data.draw(arrays(np.float32, lo=1e-3, hi=1e4))
    # c as the exact pair two_sum gives, e.g. max + log_norm of a row.
    a, b = (
        data.draw(arrays(np.float32, lo=1e-3, hi=1e4)),
        data.draw(arrays(np.float32, lo=1e-6, hi=10.0)),
    )
    c_hi, c_lo = (np.asarray(v) for v in jax.jit(nx.two_sum)(a, b))
    got = jax.jit(nx.minus_compensated)(x, c_hi, c_lo)
    want = [u - v - w for u, v, w in zip(exact(x), exact(c_hi), exact(c_lo), strict=True)]
    errors = [Fraction(float(g)) - w for g, w in zip(np.asarray(got), want, strict=True)]
    # Half an ulp is correct rounding; the extra 2**-20 ulp is the rounding of err - c_lo.
    keep = [i for i, w in enumerate(want) if abs(w) >= Fraction(2.0**-100)]
    err = ulps([errors[i] for i in keep], [float(want[i]) for i in keep], np.float32)
    assert err <= Fraction(1, 2) + Fraction(1, 2**20), float(err)
