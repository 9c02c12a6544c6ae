"""How close is close enough: the per-dtype tolerance table, ulp errors and one assert_close.

Every tolerance in the suite is a multiple of ``tol(dtype)``, the rounding of the dtype a
result is computed in and returned as. Where a result rounds more than once (a probability
summed over a row, a loss built from a logsumexp), the multiple is a named entry of
``SLACK`` with the reason beside it, never a bare ``50 *`` at the call site.
"""

import jax.numpy as jnp
import numpy as np

# Relative tolerance of a result against a float64 reference, by the dtype it is computed
# in and returned as: the rounding of that dtype plus a few float32 ulps of arithmetic.
TOL = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 8e-3, "float16": 1e-3}

# Multiples of ``tol(dtype)`` for results that are rounded more than once. Each is the
# smallest power-of-two-ish step that the suite passes with, so a regression shows.
SLACK = {
    # The log of a probability, or a probability from a tempered and shifted logit: two
    # roundings of the input (dtype, then the shift) before the one of the output.
    "chained": 8,
    # A sum over a row of probabilities that each carry their own rounding: sums to one
    # and order preservation of sparsemax/entmax, whose thresholds come from a bisection.
    "row_sum": 20,
    # A loss built from float32 logits x @ w.T (each rounded in the matmul) and its
    # logsumexp: the error grows with the logits' magnitude (see ``loss_atol``).
    "matmul_loss": 20,
    # The gradient of log_softmax is softmax - onehot: near 1 - p the subtraction cancels,
    # so the relative error of the small differences is large while the absolute one is tol.
    "cancelling_grad": 50,
    # A cross-entropy with label smoothing, z-loss and soft-capping: a sum of V log
    # probabilities (each 'chained') plus the square of a logsumexp.
    "composite_loss": 50,
    # Two float32 implementations of one quantity compared with each other (streamed over
    # vocabulary blocks and materialised, softjax and optax, a row and its batch): each
    # rounds its sums in its own order, so they differ by two errors of a couple of ulps.
    "two_paths": 4,
    # A gradient of a loss of the logits x @ w.T against float64: every dx (dw) entry is a
    # sum over V (N) of rounded probabilities times rounded operands.
    "matmul_grad": 10,
    # bf16 gradients accumulated in float32 and cast once (half an ulp), against a
    # reference whose probabilities come from the same bf16 operands (another ulp).
    "bf16_grad": 2,
}


def tol(dtype) -> float:
    """The relative tolerance for results of ``dtype`` (see ``TOL``)."""
    return TOL[np.dtype(dtype).name]


def slack(name: str, dtype) -> float:
    """``SLACK[name] * tol(dtype)``: the tolerance of a result rounded several times."""
    return SLACK[name] * tol(dtype)


def loss_atol(name: str, dtype, logits) -> float:
    """An absolute floor for a loss near 0: ``slack`` times ``1 + max |finite logit|``.

    A loss is a difference of a logsumexp and a logit, each as accurate as the logits'
    magnitude allows; a loss that cancels to nearly 0 keeps that absolute error.
    """
    z = np.asarray(logits, np.float64)
    return slack(name, dtype) * (1 + np.max(np.abs(z[np.isfinite(z)]), initial=0))


def as_float64(a) -> np.ndarray:
    """``a`` as a float64 NumPy array (bfloat16 through float32, which NumPy cannot cast)."""
    a = jnp.asarray(a)
    if a.dtype == jnp.bfloat16:
        a = a.astype(jnp.float32)
    return np.asarray(a, np.float64)


def assert_close(actual, desired, dtype=None, *, rtol=None, atol=None, err_msg=""):
    """``np.testing.assert_allclose`` of ``actual`` against the float64 ``desired``.

    The rule, written once:

    - ``rtol`` defaults to ``tol(dtype)``, and ``dtype`` to that of ``actual``;
    - ``atol`` defaults to ``rtol * max |desired|`` (over its finite entries): a result
      computed from terms of that magnitude carries an absolute error of that size, so
      entries that cancel towards 0 (gradients, attention outputs) are judged by it rather
      than by their own tiny magnitude. Pass ``atol=0`` for a purely relative comparison.

    NaN must meet NaN and infinities must match exactly (``assert_allclose``'s rules); the
    mismatching entries are printed on failure.
    """
    actual = as_float64(actual)
    desired = as_float64(desired)
    dtype = jnp.asarray(actual).dtype if dtype is None else dtype
    rtol = tol(dtype) if rtol is None else rtol
    if atol is None:
        finite = np.abs(desired[np.isfinite(desired)])
        atol = rtol * float(np.max(finite, initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)


def ulp(a, dtype) -> np.ndarray:
    """The spacing of ``dtype`` at each positive, normal float64 value of ``a``.

    For ``2**e <= a < 2**(e+1)`` it is ``2**(e - p)``, ``p`` the number of explicitly
    stored significand bits of ``dtype`` (23 for float32, 7 for bfloat16, 10 for float16).
    """
    _, exponent = np.frexp(np.asarray(a, np.float64))  # a = m * 2**exponent, m in [0.5, 1)
    return np.ldexp(1.0, exponent - 1 - int(jnp.finfo(dtype).nmant))


def ulp_error(actual, reference, dtype) -> float:
    """``max |actual - reference| / ulp(|reference|)``, in ulps of ``dtype``.

    ``reference`` is the exact (float64) value. Only entries whose reference is finite and
    at least ``dtype``'s smallest normal number count: below it the spacing is fixed and
    relative accuracy is not promised. 0 where no entry counts. A correctly rounded result
    is within 0.5 ulp.
    """
    actual = as_float64(actual)
    reference = np.asarray(reference, np.float64)
    keep = np.isfinite(reference) & (np.abs(reference) >= float(jnp.finfo(dtype).tiny))
    if not keep.any():
        return 0.0
    # Differences of the kept entries only: an infinite reference would make inf - inf.
    err = np.abs(actual[keep] - reference[keep]) / ulp(np.abs(reference[keep]), dtype)
    return float(np.max(err))
