"""Calibration of a classifier's probabilities: ECE, MCE, reliability diagrams, temperature.

Everything follows Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks"
(ICML 2017). For ``N`` samples with top-label confidence ``c_n = max_i softmax(x_n)_i`` and
correctness ``a_n = [argmax_i x_n = y_n]``, the unit interval is cut into ``M`` equal-width
bins ``B_m = ((m - 1) / M, m / M]``, and ::

    ECE = Σ_m (|B_m| / N) · |acc(B_m) - conf(B_m)|,
    MCE = max_{m : |B_m| > 0} |acc(B_m) - conf(B_m)|

Empty bins are skipped. Bin membership is exact: ``c > m / M`` is decided against the
largest float at or below ``m / M``, so a confidence of exactly ``0.5`` is in ``(0.25, 0.5]``.

``fit_temperature`` is temperature scaling: the ``T > 0`` minimising the mean negative
log-likelihood of ``softmax(x / T)``, the one-parameter recalibration of Guo et al.

The class axis is the last axis throughout; ``labels`` has the shape of ``logits`` without it.
matplotlib is imported only inside :func:`reliability_diagram`.
"""

from __future__ import annotations

from fractions import Fraction
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks
from . import _numerics as nx

__all__ = [
    "bin_statistics",
    "expected_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "reliability_diagram",
]

# Temperature scaling searches T in [1 / _BETA_MAX, 1 / _BETA_MIN].
_BETA_MIN, _BETA_MAX = 1e-3, 1e3


# ---------------------------------------------------------------------------------------
# validation and the per-sample statistics


def _prepare(logits, labels, where):
    logits = _checks.floating(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis (the last), got a scalar")
    _checks.has_classes(logits.shape[-1], "logits", logits.shape, -1)
    labels = _checks.class_labels(labels, "labels")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels has shape {labels.shape} but logits {logits.shape} without axis -1 has "
            f"shape {logits.shape[:-1]}"
        )
    where = _checks.mask(where, labels.shape)
    valid = jnp.ones(labels.shape, bool) if where is None else where
    return logits, labels, valid


def _nan_if_bad_labels(result, labels, valid, num_classes: int):
    """``result`` (any pytree), NaN throughout if a counted label is out of ``[0, V)``.

    A label outside the classes is a bug in the data, as loud here as in the losses (jit
    cannot raise on data values); -1 is not "the last class".
    """
    in_range = (labels >= 0) & (labels < num_classes)
    bad = jnp.any(valid & ~in_range)
    return jax.tree.map(lambda r: jnp.where(bad, jnp.nan, r).astype(r.dtype), result)


def _n_bins(n_bins) -> int:
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    return int(n_bins)


def _top_label(logits, labels):
    """Top-label confidence ``max softmax`` (compute dtype) and correctness per sample.

    ``max softmax = exp(max - logsumexp)``; the prediction is the first maximal index.
    """
    x = nx.upcast(logits)
    m = nx.row_max(x, (x.ndim - 1,))
    finite = m > -jnp.inf
    e = jnp.exp(x - jnp.where(finite, m, 0.0))
    conf = nx.safe_divide(jnp.ones_like(m), nx.compensated_sum(e, (x.ndim - 1,)))[..., 0]
    correct = jnp.argmax(x, axis=-1) == labels
    return conf, correct


def _inner_edges(n_bins: int, dtype) -> np.ndarray:
    """For m = 1..M-1 the largest ``dtype`` value ``<= m / M``, so ``c > m / M`` is exact."""
    edges = []
    for m in range(1, n_bins):
        f = np.asarray(m / n_bins, dtype)
        if Fraction(float(f)) > Fraction(m, n_bins):
            f = np.nextafter(f, np.asarray(-np.inf, dtype))
        edges.append(f)
    return np.asarray(edges, dtype)


@partial(jax.jit, static_argnums=3)
def _bins(logits, labels, valid, n_bins: int):
    """Per-bin (count, summed confidence, summed correctness) in the compute dtype."""
    conf, correct = _top_label(logits, labels)
    dtype = conf.dtype
    edges = jnp.asarray(_inner_edges(n_bins, dtype))
    index = jnp.sum(conf.reshape(-1, 1) > edges, axis=-1)
    w = valid.reshape(-1).astype(dtype)
    seg = partial(jax.ops.segment_sum, segment_ids=index, num_segments=n_bins)
    count = seg(w)
    sum_conf = seg(w * conf.reshape(-1))
    sum_acc = seg(w * correct.reshape(-1).astype(dtype))
    return _nan_if_bad_labels((count, sum_conf, sum_acc), labels, valid, logits.shape[-1])


def bin_statistics(logits, labels, *, n_bins: int = 15, where=None):
    """Per-bin sample count, mean confidence and accuracy (the data of a reliability diagram).

    Args:
      logits: ``[..., V]`` floating.
      labels: ``[...]`` integer class indices (NaN statistics for one outside ``[0, V)``).
      n_bins: number ``M`` of equal-width bins ``((m-1)/M, m/M]``.
      where: optional boolean ``[...]``; False samples are left out.

    Returns:
      ``(count, confidence, accuracy)``, each ``[M]`` in float32 (float64 for float64
      logits); the means of an empty bin are 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax.calibration import bin_statistics
      >>> count, conf, acc = bin_statistics(jnp.array([[2.0, 0.0], [0.0, 0.3]]),
      ...                                   jnp.array([0, 0]), n_bins=2)
      >>> count
      Array([0., 2.], dtype=float32)
    """
    logits, labels, valid = _prepare(logits, labels, where)
    count, sum_conf, sum_acc = _bins(logits, labels, valid, _n_bins(n_bins))
    return count, nx.safe_divide(sum_conf, count), nx.safe_divide(sum_acc, count)


def expected_calibration_error(logits, labels, *, n_bins: int = 15, where=None) -> jax.Array:
    """Expected calibration error (Guo et al. 2017), top-label, ``M`` equal-width bins.

    ::

        ECE = Σ_{m=1..M} (|B_m| / N) · |acc(B_m) - conf(B_m)|
            = (1 / N) · Σ_m | Σ_{n ∈ B_m} (a_n - c_n) |

    Args:
      logits: ``[..., V]`` floating (any dtype; computed in float32).
      labels: ``[...]`` integer class indices, any integer dtype; a counted label outside
        ``[0, V)`` makes the result NaN (loud, as in the losses).
      n_bins: number of bins ``M`` (static).
      where: optional boolean ``[...]``; False samples are left out of every count.

    Returns:
      A scalar in ``[0, 1]``, float32 (float64 for float64 logits); 0 when no sample counts.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax.calibration import expected_calibration_error
      >>> expected_calibration_error(jnp.array([[2.0, 0.0], [0.0, 0.3]]), jnp.array([0, 0]))
      Array(0.34682274, dtype=float32)
    """
    logits, labels, valid = _prepare(logits, labels, where)
    count, sum_conf, sum_acc = _bins(logits, labels, valid, _n_bins(n_bins))
    return nx.safe_divide(jnp.sum(jnp.abs(sum_acc - sum_conf)), jnp.sum(count))


def maximum_calibration_error(logits, labels, *, n_bins: int = 15, where=None) -> jax.Array:
    """Maximum calibration error (Guo et al. 2017): the worst gap over non-empty bins.

    ::

        MCE = max_{m : |B_m| > 0} |acc(B_m) - conf(B_m)|

    Arguments and return as in :func:`expected_calibration_error` (0 when no sample counts).

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax.calibration import maximum_calibration_error
      >>> maximum_calibration_error(jnp.array([[2.0, 0.0], [0.0, 0.3]]), jnp.array([0, 0]))
      Array(0.5744425, dtype=float32)
    """
    logits, labels, valid = _prepare(logits, labels, where)
    count, sum_conf, sum_acc = _bins(logits, labels, valid, _n_bins(n_bins))
    gap = nx.safe_divide(jnp.abs(sum_acc - sum_conf), count)
    return jnp.max(jnp.where(count == 0, 0.0, gap))  # NaN stays NaN


# ---------------------------------------------------------------------------------------
# temperature scaling


def _nll_derivatives(x, labels, w, beta):
    """First and second derivative in ``beta`` of ``mean_w NLL(softmax(beta * x))``.

    With ``d = x - max x`` and ``p = softmax(beta * d)``: the NLL is
    ``logsumexp(beta d) - beta d_y``, so its derivative is ``E_p[d] - d_y`` and its second
    derivative ``Var_p[d] >= 0`` (convex in ``beta``).
    """
    m = jnp.max(x, axis=-1, keepdims=True)
    d = x - jnp.where(m > -jnp.inf, m, 0.0)
    e = jnp.exp(beta * d)
    s = jnp.sum(e, axis=-1, keepdims=True)
    p = e / s
    d0 = jnp.where(p > 0, d, 0.0)  # -inf logits have p == 0 and must add nothing
    mean_d = jnp.sum(p * d0, axis=-1, keepdims=True)
    var_d = jnp.sum(p * (d0 - mean_d) ** 2, axis=-1)
    d_y = jnp.take_along_axis(d, labels[..., None], axis=-1)[..., 0]
    total = jnp.sum(w)
    g = nx.safe_divide(jnp.sum(w * (mean_d[..., 0] - d_y)), total)
    h = nx.safe_divide(jnp.sum(w * var_d), total)
    return g, h


@partial(jax.jit, static_argnames="steps")
def _fit(x, labels, w, steps: int):
    # Safeguarded Newton on u = log(beta) = -log T: g(u) = f'(beta) is increasing in u (f is
    # convex in beta), so a bracket [lo, hi] of its root is kept; a Newton step that leaves it
    # (or a flat curvature) is replaced by bisection, which alone would converge too.
    def step(_, state):
        u, lo, hi = state
        beta = jnp.exp(u)
        g, h = _nll_derivatives(x, labels, w, beta)
        lo = jnp.where(g < 0, u, lo)
        hi = jnp.where(g > 0, u, hi)
        newton = u - g / jnp.where(h > 0, beta * h, 1.0)
        inside = (h > 0) & (newton > lo) & (newton < hi) & jnp.isfinite(newton)
        u_next = jnp.where(g == 0, u, jnp.where(inside, newton, (lo + hi) / 2))
        return u_next, lo, hi

    dtype = x.dtype
    init = (
        jnp.zeros((), dtype),
        jnp.asarray(np.log(_BETA_MIN), dtype),
        jnp.asarray(np.log(_BETA_MAX), dtype),
    )
    u, lo, hi = lax.fori_loop(0, steps, step, init)
    return jnp.exp(-jnp.clip(u, lo, hi))


def fit_temperature(logits, labels, *, where=None, steps: int = 30) -> jax.Array:
    """The temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` (Guo 2017).

    ::

        T* = argmin_{T > 0} (1 / N) · Σ_n [ log Σ_i e^(x[n, i] / T) - x[n, y_n] / T ]

    The loss is convex in ``beta = 1 / T``; the search runs on ``log beta = -log T`` (so
    ``T > 0`` by construction) with ``steps`` safeguarded Newton steps, each one pass over
    the logits, within ``T in [1e-3, 1e3]`` (a bound is returned when the optimum lies
    beyond it, e.g. ``T -> 0`` for perfectly separated data). Jittable.

    Args:
      logits: ``[..., V]`` floating validation logits (computed in float32, float64 for
        float64).
      labels: ``[...]`` integer class indices; a counted label outside ``[0, V)`` gives
        ``T = NaN`` (loud, as in the losses).
      where: optional boolean ``[...]``; False samples are left out.
      steps: number of iterations (static); 30 reach float32 precision from ``T = 1``.

    Returns:
      ``T`` as a float32 scalar (float64 for float64 logits); divide logits by it to
      recalibrate. 1 when no sample counts.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax.calibration import fit_temperature
      >>> fit_temperature(jnp.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]), jnp.array([0, 1, 1]))
      Array(5.7707796, dtype=float32)
    """
    logits, labels, valid = _prepare(logits, labels, where)
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    x = nx.upcast(logits).reshape(-1, logits.shape[-1])
    w = valid.reshape(-1).astype(x.dtype)
    labels = labels.reshape(-1)
    t = _fit(x, jnp.clip(labels, 0, x.shape[-1] - 1), w, int(steps))
    t = jnp.where(jnp.sum(w) > 0, t, 1.0)
    return _nan_if_bad_labels(t, labels, w > 0, x.shape[-1]).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# the picture


def reliability_diagram(
    logits, labels, *, n_bins: int = 15, ax=None, where=None, show_counts: bool = True
):
    """Draws the reliability diagram of Guo et al. 2017 and returns the matplotlib Axes.

    Bars are the accuracy of each non-empty bin; the gap to the bin's mean confidence is
    shaded (red, hatched); the diagonal is perfect calibration; the legend carries the ECE.
    The number at the foot of each bar is its bin's sample count: a bar drawn from a handful
    of samples says little, and the ECE weighs it by that count.

    Args:
      logits, labels, n_bins, where: as in :func:`expected_calibration_error`.
      ax: a matplotlib Axes to draw on; a new figure is made when None.
      show_counts: write each bin's sample count on its bar.

    Example:
      >>> ax = reliability_diagram(logits, labels)  # doctest: +SKIP
      >>> ax.figure.savefig("reliability.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    stats = bin_statistics(logits, labels, n_bins=n_bins, where=where)
    count, conf, acc = (np.asarray(a) for a in stats)
    ece = float(expected_calibration_error(logits, labels, n_bins=n_bins, where=where))
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    width = 1.0 / n_bins
    centers = (np.arange(n_bins) + 0.5) * width
    full = count > 0
    bar = dict(width=width, align="center")
    ax.bar(centers[full], acc[full], color="tab:blue", edgecolor="black", label="accuracy", **bar)
    gap_label = f"gap (ECE = {100 * ece:.2f}%)"
    ax.bar(centers[full], (conf - acc)[full], bottom=acc[full], color="tab:red", alpha=0.3,
           edgecolor="tab:red", hatch="//", label=gap_label, **bar)  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    if show_counts:
        for x, n in zip(centers[full], count[full], strict=True):
            ax.text(x, 0.01, f"{int(n)}", rotation=90, ha="center", va="bottom", fontsize=7)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.legend(loc="upper left")
    return ax
