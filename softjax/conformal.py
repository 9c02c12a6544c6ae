"""Split-conformal prediction sets for a classifier: LAC, APS and RAPS.

Split conformal prediction turns any classifier's logits into sets of classes ``C(x)`` that
hold the true label with probability at least ``1 - alpha``, whatever the classifier and the
distribution of the data, provided the calibration and test samples are exchangeable
(Vovk, Gammerman & Shafer 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal
Prediction" 2021). A nonconformity score ``s(x, y)`` (large: ``y`` is an unusual label for
``x``) is computed for ``n`` held-out calibration samples, and ::

    q    = the k-th smallest of s(x_1, y_1), ..., s(x_n, y_n),   k = ceil((n + 1)(1 - alpha))
           (+inf when k > n)
    C(x) = {y : s(x, y) <= q}
    P(y_test in C(x_test)) >= 1 - alpha

and, when the scores have no ties, the coverage averaged over calibration sets is exactly
``k / (n + 1) < 1 - alpha + 1 / (n + 1)``. :func:`calibrate` computes ``q``,
:func:`prediction_sets` the sets, and both go through one score function, computed with the
same arithmetic, so the true label is in its set exactly when its score (:func:`scores`) is
``<= q``: no rounding puts it on the other side of ``q``.

The input is logits: the probabilities are ``p = softmax(logits)`` (:func:`softjax.softmax`,
computed in float32, float64 for float64 logits). Classes are ranked by decreasing ``p``;
classes of equal probability are ranked by index, lowest first (as ``argmax`` picks the
first maximum), so the top class ``o(y) = 1`` is ``argmax p``. With ``rho(y)`` the mass of
the classes ranked before ``y``, the scores are ::

    "lac"   s = 1 - p_y                                            (Sadinle, Lei & Wasserman 2019)
    "aps"   s = rho(y) + u p_y                                     (Romano, Sesia & Candes 2020)
    "raps"  s = rho(y) + u p_y + lam max(0, o(y) - k_reg)          (Angelopoulos et al. 2021)

with ``u = 1`` (deterministic: the mass up to and including ``y``) or, when a ``key`` is
given, ``u ~ U[0, 1)`` drawn once per sample (randomised: the last class of a set counts
with a random share of its mass, so the sets are smaller on average, at the same
guarantee). For APS and RAPS the top class scores 0, so it is in every set and no set is
empty, while membership stays exactly ``s <= q`` (the sets are the papers' sets with the top
class always kept, calibrated by the same rule). Every correctly classified calibration
sample then scores 0: where the top-1 accuracy exceeds ``1 - alpha``, ``q = 0`` and the sets
are the top class alone (coverage = accuracy). LAC gives the smallest sets on average, and a
set may be empty (no class with ``p_y >= 1 - q``): the maths allows it, and it says that
``x`` looks like none of the classes.

``alpha`` is read to a relative precision of ``2**-20``: ``k`` is the rank that the decimal
``alpha`` gives (float32 cannot hold 0.01; ``100 * float32(0.01)`` is just below 1, which
would ask for one sample more than ``ceil(100 * 0.99) = 99``). Exact for ``n < 2**24``.

NaN logits give NaN scores and a NaN threshold (a NaN row's set is empty, and a NaN
threshold's sets are all empty: the coverage shows it); a counted label outside ``[0, V)``
gives a NaN threshold. ``-inf`` logits are classes of probability 0 (LAC score 1).

The class axis is the last axis throughout; ``labels`` has the shape of ``logits`` without
it (letter legend: V classes). Everything is jittable: ``alpha``, ``threshold`` and ``lam``
may be traced; ``method`` and ``k_reg`` are static.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _checks
from . import _numerics as nx
from ._softmax import softmax

__all__ = ["calibrate", "coverage", "mean_set_size", "prediction_sets", "scores"]

METHODS = ("lac", "aps", "raps")

# The relative precision to which alpha is read: (n + 1) * alpha within this of an integer
# is that integer (see the module docstring).
_SNAP = 2.0**-20


# ---------------------------------------------------------------------------------------
# validation


def _logits(logits):
    logits = _checks.floating(logits, "logits")
    if logits.ndim == 0:
        raise ValueError("logits must have a class axis (the last), got a scalar")
    _checks.has_classes(logits.shape[-1], "logits", logits.shape, -1)
    return logits


def _labels(labels, shape: tuple, what: str = "logits"):
    labels = _checks.class_labels(labels, "labels")
    if labels.shape != shape[:-1]:
        raise ValueError(
            f"labels has shape {labels.shape} but {what} {shape} without axis -1 has "
            f"shape {shape[:-1]}"
        )
    return labels


def _options(method, k_reg, lam, key, dtype):
    """Checks the score options; returns ``(k_reg, lam)`` (a Python int, an array of
    ``dtype``, the compute dtype: a weakly typed Python number would compile apart)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if key is not None and method == "lac":
        raise ValueError("key randomises method='aps' or 'raps'; method='lac' has no randomness")
    if method != "raps":
        if k_reg is not None or lam is not None:
            raise ValueError(f"k_reg and lam apply to method='raps' only, got method={method!r}")
        return None, None
    if k_reg is None or lam is None:
        raise ValueError(
            "method='raps' needs k_reg and lam (its penalty is lam * max(0, rank - k_reg)), "
            f"got k_reg={k_reg!r}, lam={lam!r}"
        )
    k_reg = _checks.number(k_reg, "k_reg", integral=True)
    if k_reg < 0:
        raise ValueError(f"k_reg must be >= 0, got {k_reg}")
    return k_reg, _scalar(lam, "lam", ">= 0", lambda v: v >= 0).astype(dtype)


def _scalar(value, name: str, expected: str, ok):
    """A real scalar (concrete or traced) as an array; a concrete one must satisfy ``ok``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    v = _checks.concrete_value(value)
    if v is not None:
        if v.ndim != 0 or not (
            np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating)
        ):
            raise TypeError(f"{name} must be a number {expected}, got {value!r}")
        if not ok(v):
            raise ValueError(f"{name} must be {expected}, got {v.item()!r}")
        return jnp.asarray(value)
    value = jnp.asarray(value)
    if value.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
    if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)):
        raise TypeError(f"{name} must be a number {expected}, got dtype {value.dtype}")
    return value


def _sets(sets):
    sets = jnp.asarray(sets)
    if sets.dtype != jnp.bool_:
        raise TypeError(f"sets must be a boolean array [..., V], got dtype {sets.dtype}")
    if sets.ndim == 0:
        raise ValueError("sets must have a class axis (the last), got a scalar")
    return sets


# ---------------------------------------------------------------------------------------
# the one score function


def _ranked_scores(p, method: str, u, k_reg, lam):
    """APS/RAPS: ``(s, order)``, the score of the class at each rank and the ranking.

    One stable sort of ``-p`` ranks the classes (ties by lower index). The masses before
    each rank are an exclusive prefix sum in ranked order, as a scan of fixed shape: its
    additions, and so the scores, are the same in every compilation and for every batch
    size (:func:`calibrate` and :func:`prediction_sets` must agree to the last bit). The
    scores are made non-decreasing along the ranking with a running maximum, which is
    exact (the prefix sums of a scan need not be, by an ulp), so that every set is a
    prefix of the ranking. A row holding NaN scores NaN throughout.
    """
    axis = p.ndim - 1
    rank = lax.broadcasted_iota(jnp.int32, p.shape, axis)  # 0 for the top class
    neg, order = lax.sort((-p, rank), dimension=axis, num_keys=1, is_stable=True)
    ranked = -neg
    before = lax.associative_scan(jnp.add, ranked[..., :-1], axis=axis)
    before = jnp.concatenate([jnp.zeros_like(ranked[..., :1]), before], axis=-1)
    s = before + (ranked if u is None else u[..., None].astype(p.dtype) * ranked)
    if method == "raps":
        excess = (rank + 1 - k_reg).astype(p.dtype)  # o(y) - k_reg, o(y) = 1 for the top
        # A select, not lam * max(0, excess): lam = +inf caps the sets at k_reg classes.
        s = s + jnp.where(excess > 0, lam * excess, 0.0)
    s = lax.cummax(jnp.where(rank == 0, 0.0, s), axis=axis)  # the top class: in every set
    return jnp.where(jnp.any(jnp.isnan(p), axis=-1, keepdims=True), jnp.nan, s), order


def _uniform(key, shape, dtype):
    return None if key is None else jax.random.uniform(key, shape, dtype)


def _probs(logits):
    return softmax(nx.upcast(logits))


@partial(jax.jit, static_argnames=("method", "k_reg"))
def _label_scores(logits, labels, key, lam, method: str, k_reg):
    p = _probs(logits)
    v = p.shape[-1]
    in_range = (labels >= 0) & (labels < v)
    if method == "lac":
        p_y = jnp.take_along_axis(p, jnp.clip(labels, 0, v - 1)[..., None], axis=-1)[..., 0]
        s = 1 - p_y
    else:
        by_rank, order = _ranked_scores(p, method, _uniform(key, labels.shape, p.dtype), k_reg, lam)
        # The one rank that holds the label (none for a label out of range: NaN below).
        s = jnp.sum(jnp.where(order == labels[..., None], by_rank, 0.0), axis=-1)
    return jnp.where(in_range, s, jnp.nan)


def _rank(n, alpha):
    """``k = ceil((n + 1)(1 - alpha)) = (n + 1) - floor((n + 1) alpha)``, ``alpha`` read to
    a relative precision of ``_SNAP``; ``n`` an int32 count."""
    m = (n + 1).astype(alpha.dtype)
    t = m * alpha
    nearest = jnp.round(t)
    floor = jnp.where(jnp.abs(t - nearest) <= _SNAP * t, nearest, jnp.floor(t))
    return (m - floor).astype(jnp.int32)


@partial(jax.jit, static_argnames=("method", "k_reg"))
def _calibrate(logits, labels, valid, alpha, key, lam, method: str, k_reg):
    s = _label_scores(logits, labels, key, lam, method, k_reg).reshape(-1)
    valid = valid.reshape(-1)
    n = jnp.sum(valid, dtype=jnp.int32)
    k = _rank(n, alpha)
    if s.size:
        ranked = jnp.sort(jnp.where(valid, s, jnp.inf))
        q = jnp.where(k > n, jnp.inf, ranked[jnp.clip(k - 1, 0, s.size - 1)])
    else:
        q = jnp.full((), jnp.inf, s.dtype)
    bad = jnp.any(valid & jnp.isnan(s)) | ~((alpha > 0) & (alpha < 1))
    return jnp.where(bad, jnp.nan, q).astype(s.dtype)


@partial(jax.jit, static_argnames=("method", "k_reg"))
def _prediction_sets(logits, threshold, key, lam, method: str, k_reg):
    p = _probs(logits)
    q = threshold[..., None]
    if method == "lac":
        return 1 - p <= q
    s, order = _ranked_scores(p, method, _uniform(key, p.shape[:-1], p.dtype), k_reg, lam)
    # s is non-decreasing along the ranking, so the set is its first `size` ranks: the
    # classes ranked at or before the last of them, (p, index) against (p_last, last).
    size = jnp.sum(s <= q, axis=-1, keepdims=True)
    at = jnp.maximum(size - 1, 0)
    last = jnp.take_along_axis(order, at, axis=-1)
    p_last = jnp.take_along_axis(p, last, axis=-1)
    index = lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1)
    return (size > 0) & ((p > p_last) | ((p == p_last) & (index <= last)))


# ---------------------------------------------------------------------------------------
# the public functions


def scores(logits, labels, *, method: str = "lac", k_reg=None, lam=None, key=None) -> jax.Array:
    """The nonconformity score ``s(x, y)`` of each sample's label (see the module docstring).

    ::

        "lac"   s = 1 - p_y
        "aps"   s = rho(y) + u p_y                         (0 for the top class)
        "raps"  s = rho(y) + u p_y + lam max(0, o(y) - k_reg)   (0 for the top class)

    with ``p = softmax(logits)``, ``rho(y)`` the mass of the classes ranked before ``y``
    (decreasing ``p``, ties by lower index), ``o(y)`` the rank of ``y`` (1 for the top) and
    ``u = 1``, or ``u ~ U[0, 1)`` per sample when ``key`` is given.

    These are the scores that :func:`calibrate` takes the quantile of, and the label is in
    :func:`prediction_sets`' set exactly when its score is ``<= threshold`` (with the same
    ``key`` for the same samples).

    Args:
      logits: ``[..., V]`` floating (computed in float32, float64 for float64).
      labels: ``[...]`` integer class indices; a label outside ``[0, V)`` scores NaN.
      method: ``"lac"``, ``"aps"`` or ``"raps"`` (static).
      k_reg: RAPS only: the rank from which the penalty grows (a non-negative int, static).
      lam: RAPS only: the penalty per rank beyond ``k_reg`` (``>= 0``; may be traced).
      key: optional PRNG key (APS and RAPS): draws ``u`` for the randomised score.

    Returns:
      ``[...]`` float32 (float64 for float64 logits). The probabilities are float32, and
      the APS sums are float32 cumulative sums (an absolute error of a few ``eps log2 V``).

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import conformal
      >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
      >>> conformal.scores(logits, jnp.array([1, 2]))  # 1 - 0.3, 1 - 0.3
      Array([0.7, 0.7], dtype=float32)
      >>> conformal.scores(logits, jnp.array([1, 2]), method="aps")  # 0.5 + 0.3, 0.6 + 0.3
      Array([0.8, 0.9], dtype=float32)
    """
    logits = _logits(logits)
    labels = _labels(labels, logits.shape)
    k_reg, lam = _options(method, k_reg, lam, key, nx.compute_dtype(logits.dtype))
    return _label_scores(logits, labels, key, lam, method, k_reg)


def calibrate(
    logits, labels, *, alpha, method: str = "lac", k_reg=None, lam=None, key=None, where=None
) -> jax.Array:
    """The split-conformal threshold ``q`` for miscoverage ``alpha``, from calibration data.

    ::

        q = the k-th smallest of the n counted scores s(x_i, y_i),
        k = ceil((n + 1)(1 - alpha)),   q = +inf when k > n

    so that ``prediction_sets(x, q)`` holds a new sample's label with probability at least
    ``1 - alpha`` (the ``n + 1`` is the finite-sample correction: the test sample is the
    ``(n + 1)``-th). All samples of the batch (every leading axis) are one calibration set.

    Args:
      logits: ``[..., V]`` floating calibration logits, held out from training.
      labels: ``[...]`` integer class indices; a counted label outside ``[0, V)`` makes the
        threshold NaN (loud, as in the losses).
      alpha: the miscoverage in ``(0, 1)``, e.g. 0.1 for 90% coverage; may be traced (a
        traced value outside ``(0, 1)`` gives NaN).
      method: ``"lac"``, ``"aps"`` or ``"raps"`` (static); see :func:`scores`.
      k_reg, lam: RAPS only, see :func:`scores`.
      key: optional PRNG key (APS and RAPS): randomises the calibration scores. Use another
        key for the test sets.
      where: optional boolean ``[...]``; False samples are left out (``n`` counts the rest).

    Returns:
      ``q`` as a float32 scalar (float64 for float64 logits): one of the counted scores, or
      ``+inf`` (every set is then all classes) when ``n < 1 / alpha - 1``; NaN when a
      counted score is NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import conformal
      >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
      >>> conformal.calibrate(logits, jnp.array([1, 1, 0]), alpha=0.5)
      Array(0.39999998, dtype=float32)
    """
    logits = _logits(logits)
    labels = _labels(labels, logits.shape)
    k_reg, lam = _options(method, k_reg, lam, key, nx.compute_dtype(logits.dtype))
    alpha = _scalar(alpha, "alpha", "in (0, 1)", lambda v: 0 < v < 1)
    alpha = alpha.astype(nx.compute_dtype(logits.dtype))
    where = _checks.mask(where, labels.shape)
    valid = jnp.ones(labels.shape, bool) if where is None else where
    return _calibrate(logits, labels, valid, alpha, key, lam, method, k_reg)


def prediction_sets(
    logits, threshold, *, method: str = "lac", k_reg=None, lam=None, key=None
) -> jax.Array:
    """The conformal prediction set of each sample: ``C(x) = {y : s(x, y) <= threshold}``.

    ::

        "lac"         {y : 1 - p_y <= q}
        "aps"/"raps"  the top class, and each class whose score (cumulative mass in ranked
                      order, plus the RAPS penalty) is <= q

    Pass the ``method`` (and ``k_reg``, ``lam``) that :func:`calibrate` used. APS and RAPS
    sets are never empty for a threshold ``>= 0`` (every threshold of :func:`calibrate`: the
    top class scores 0) and are a prefix of the ranking; LAC sets may be empty. With a
    ``key``, ``u`` is drawn per sample, as in :func:`scores`.

    Args:
      logits: ``[..., V]`` floating test logits.
      threshold: ``q`` from :func:`calibrate`: a number, or an array broadcastable to
        ``[...]`` (one per sample); may be traced.
      method, k_reg, lam, key: as in :func:`scores`.

    Returns:
      A boolean ``[..., V]`` mask of the classes in each set. A row with NaN logits, or a
      NaN threshold, gives an empty set.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import conformal
      >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
      >>> conformal.prediction_sets(logits, 0.75)  # p_y >= 0.25
      Array([[ True,  True, False],
             [False,  True,  True]], dtype=bool)
      >>> conformal.prediction_sets(logits, 0.85, method="aps")  # cumulative mass <= 0.85
      Array([[ True,  True, False],
             [False,  True, False]], dtype=bool)
    """
    logits = _logits(logits)
    k_reg, lam = _options(method, k_reg, lam, key, nx.compute_dtype(logits.dtype))
    if isinstance(threshold, (bool, np.bool_)):
        raise TypeError(f"threshold must be a number or a floating array, got {threshold!r}")
    threshold = jnp.asarray(threshold)
    if jnp.issubdtype(threshold.dtype, jnp.integer):
        threshold = threshold.astype(jnp.float32)
    threshold = _checks.floating(threshold, "threshold").astype(nx.compute_dtype(logits.dtype))
    batch = logits.shape[:-1]
    _checks.broadcasts_to(
        threshold.shape, batch, "threshold", f"logits {logits.shape} without axis -1, {batch}"
    )
    threshold = jnp.broadcast_to(threshold, batch)
    return _prediction_sets(logits, threshold, key, lam, method, k_reg)


def coverage(sets, labels, *, where=None) -> jax.Array:
    """The empirical coverage: the fraction of counted samples whose label is in its set.

    ::

        coverage = (1 / n) Σ_i [y_i in C(x_i)]

    Args:
      sets: ``[..., V]`` boolean, e.g. from :func:`prediction_sets`.
      labels: ``[...]`` integer class indices; a counted label outside ``[0, V)`` makes the
        result NaN.
      where: optional boolean ``[...]``; False samples are left out.

    Returns:
      A float32 scalar in ``[0, 1]``; 0 when no sample counts.

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import conformal
      >>> conformal.coverage(jnp.array([[True, True], [False, True]]), jnp.array([0, 0]))
      Array(0.5, dtype=float32)
    """
    sets = _sets(sets)
    labels = _labels(labels, sets.shape, "sets")
    where = _checks.mask(where, labels.shape)
    return _coverage(sets, labels, jnp.ones(labels.shape, bool) if where is None else where)


@jax.jit
def _coverage(sets, labels, valid):
    v = sets.shape[-1]
    in_range = (labels >= 0) & (labels < v)
    hit = jnp.take_along_axis(sets, jnp.clip(labels, 0, v - 1)[..., None], axis=-1)[..., 0]
    n = jnp.sum(valid, dtype=jnp.int32)
    covered = jnp.sum(valid & hit & in_range, dtype=jnp.int32)
    result = nx.safe_divide(covered.astype(jnp.float32), n.astype(jnp.float32))
    return jnp.where(jnp.any(valid & ~in_range), jnp.nan, result)


def mean_set_size(sets, *, where=None) -> jax.Array:
    """The mean number of classes in the counted sets (smaller is more informative).

    Args:
      sets: ``[..., V]`` boolean, e.g. from :func:`prediction_sets`.
      where: optional boolean ``[...]``; False samples are left out.

    Returns:
      A float32 scalar in ``[0, V]``; 0 when no sample counts. (Per-sample sizes are
      ``sets.sum(-1)``.)

    Example:
      >>> import jax.numpy as jnp
      >>> from softjax import conformal
      >>> conformal.mean_set_size(jnp.array([[True, True, False], [False, True, False]]))
      Array(1.5, dtype=float32)
    """
    sets = _sets(sets)
    where = _checks.mask(where, sets.shape[:-1])
    return _mean_set_size(sets, jnp.ones(sets.shape[:-1], bool) if where is None else where)


@jax.jit
def _mean_set_size(sets, valid):
    n = jnp.sum(valid, dtype=jnp.int32)
    # float32 totals: an int32 one overflows past 2**31 classes in all (1e6 sets of 4096).
    sizes = jnp.sum(sets, axis=-1, dtype=jnp.int32).astype(jnp.float32)
    total = jnp.sum(jnp.where(valid, sizes, 0.0))
    return nx.safe_divide(total, n.astype(jnp.float32))
