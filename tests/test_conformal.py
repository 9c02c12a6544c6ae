"""Tests of softjax.conformal: float64 NumPy references of the scores and of the conformal
quantile, the exact membership rule, and the coverage guarantee on synthetic data with a
known distribution."""

import math
from fractions import Fraction
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol

import softjax
from softjax import conformal

METHODS = ("lac", "aps", "raps")
RAPS = dict(k_reg=2, lam=0.05)


def options(method):
    return RAPS if method == "raps" else {}


# ---------------------------------------------------------------------------------------
# float64 references


def ref_probs(logits):
    x = np.asarray(logits, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ref_scores(logits, labels, method, u=None, k_reg=None, lam=None):
    """The score of each label, row by row: classes ranked by decreasing p, ties by index."""
    shape = np.shape(labels)
    p = ref_probs(logits).reshape(-1, np.shape(logits)[-1])
    labels = np.asarray(labels).reshape(-1)
    out = np.empty(len(labels))
    for i, (row, y) in enumerate(zip(p, labels, strict=True)):
        if method == "lac":
            out[i] = 1 - row[y]
            continue
        order = np.argsort(-row, kind="stable")
        rank = int(np.flatnonzero(order == y)[0])  # 0 for the top class
        s = row[order[:rank]].sum() + (1.0 if u is None else float(u.reshape(-1)[i])) * row[y]
        if method == "raps":
            s += lam * max(0, rank + 1 - k_reg)
        out[i] = 0.0 if rank == 0 else s
    return out.reshape(shape)


def ref_rank(n, alpha):
    """k = ceil((n + 1)(1 - alpha)) for the decimal alpha, exactly."""
    return math.ceil((n + 1) * (1 - Fraction(str(alpha))))


def ref_quantile(s, alpha):
    s = np.sort(np.asarray(s, np.float64).reshape(-1))
    k = ref_rank(len(s), alpha)
    return np.inf if k > len(s) else s[k - 1]


def random_logits(seed, shape, scale=3.0):
    """Normal logits with two tied columns (equal probabilities) and one -inf column."""
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    x[..., 3] = x[..., 1]
    x[..., -1] = -np.inf
    return x


# ---------------------------------------------------------------------------------------
# scores and the quantile against the references


@pytest.mark.x64
@pytest.mark.parametrize(
    "dtype, method",
    [(jnp.float64, m) for m in METHODS]
    + [(jnp.float32, "aps"), (jnp.bfloat16, "raps"), (jnp.float16, "lac")],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_scores_and_threshold_match_reference(dtype, method):
    x = jnp.asarray(random_logits(0, (2, 150, 7)), dtype)  # all leading axes: one set
    y = np.random.default_rng(1).integers(0, 6, (2, 150))  # never the -inf class
    x64 = np.asarray(x.astype(jnp.float32) if dtype != jnp.float64 else x, np.float64)
    want = ref_scores(x64, y, method, **options(method))
    got = conformal.scores(x, y, method=method, **options(method))
    compute = jnp.float64 if dtype == jnp.float64 else jnp.float32  # bf16/f16 in float32
    assert got.dtype == compute and got.shape == (2, 150)
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * tol(compute))
    if dtype == jnp.float64:  # (float32 thresholds: test_threshold_is_the_kth_smallest_score)
        q = conformal.calibrate(x, y, alpha=0.1, method=method, **options(method))
        assert q.dtype == compute and q.shape == ()
        np.testing.assert_allclose(q, ref_quantile(want, 0.1), rtol=0, atol=4 * tol(compute))
        assert float(q) == ref_quantile(got, 0.1)  # one of the scores, to the bit
    # The -inf class has probability 0: LAC scores it 1, never NaN.
    s_masked = conformal.scores(x, np.full((2, 150), 6), method=method, **options(method))
    assert np.all(np.isfinite(s_masked))
    if method == "lac":
        np.testing.assert_array_equal(s_masked, 1.0)


@pytest.mark.x64
def test_randomised_scores_match_reference():
    # RAPS: APS's code, plus the rank penalty.
    x = random_logits(2, (200, 7))
    y = np.random.default_rng(3).integers(0, 6, 200)
    key = jax.random.key(4)
    # u is one U[0, 1) draw per sample, in the compute dtype.
    u = np.asarray(jax.random.uniform(key, (200,), jnp.float64))
    got = conformal.scores(x, y, method="raps", key=key, **RAPS)
    np.testing.assert_allclose(
        got, ref_scores(x, y, "raps", u=u, **RAPS), rtol=0, atol=4 * tol(jnp.float64)
    )
    # Between the exclusive and the inclusive mass: never above the deterministic score.
    assert np.all(got <= ref_scores(x, y, "raps", **RAPS) + 1e-12)


def test_ties_rank_by_index_and_top_class_scores_zero():
    # p = (0.25, 0.25, 0.25, 0.25): the ranking is the class order, class 0 is the top.
    s = conformal.scores(jnp.zeros((4, 4)), jnp.arange(4), method="aps")
    np.testing.assert_allclose(s, [0.0, 0.5, 0.75, 1.0], rtol=1e-6)
    s = conformal.scores(jnp.zeros((4, 4)), jnp.arange(4), method="raps", k_reg=1, lam=0.5)
    np.testing.assert_allclose(s, [0.0, 1.0, 1.75, 2.5], rtol=1e-6)


@pytest.mark.parametrize("x64", [False, pytest.param(True, marks=pytest.mark.x64)])
def test_threshold_is_the_kth_smallest_score(x64):
    # n = 0..120 calibration samples (a where mask over 120, one compilation), decimal alphas
    # whose (n + 1) alpha is often an exact integer: k = ceil((n + 1)(1 - alpha)) exactly,
    # +inf when k > n.
    dtype = jnp.float64 if x64 else jnp.float32
    x = jnp.asarray(random_logits(5, (120, 7)), dtype)
    y = np.random.default_rng(6).integers(0, 6, 120)
    s = np.asarray(conformal.scores(x, y))
    alphas = (0.01, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.9, 0.99)
    ns = np.arange(121)

    @jax.jit
    def thresholds(x, y, alpha):
        where = jnp.arange(120)[None, :] < ns[:, None]
        return jax.vmap(lambda w: conformal.calibrate(x, y, alpha=alpha, where=w))(where)

    for alpha in alphas:
        got = np.asarray(thresholds(x, y, jnp.asarray(alpha, dtype)))
        want = np.array([ref_quantile(s[:n], alpha) for n in ns])
        np.testing.assert_array_equal(got, want, err_msg=f"alpha={alpha}")
    # Boundary cases: n = 9, alpha = 0.1 gives the largest score, n = 8 gives +inf; float32
    # cannot hold 0.01, yet n = 99 gives the 99-th score, n = 98 gives +inf.
    assert ref_rank(9, 0.1) == 9 and ref_rank(8, 0.1) == 9
    assert ref_rank(99, 0.01) == 99 and ref_rank(98, 0.01) == 99


# ---------------------------------------------------------------------------------------
# the sets

# The shape of the tests below, so that they share their compilations.
X = jnp.asarray(random_logits(9, (300, 7), scale=2.0), jnp.float32)
Y = jnp.asarray(np.random.default_rng(10).integers(0, 6, 300), jnp.int32)
VARIANTS = [("lac", None), ("aps", None), ("aps", 11)]  # RAPS: APS plus a rank penalty
SETS = pytest.mark.xdist_group("conformal_sets")  # shares the compilations at X's shape


def variant(method, seed):
    key = None if seed is None else jax.random.key(seed)
    return dict(method=method, key=key, **options(method))


@SETS
@pytest.mark.parametrize("method, seed", VARIANTS)
def test_membership_is_exactly_score_below_threshold(method, seed):
    kw = variant(method, seed)
    # Every class's score, as if it were the label: sets[:, c] is exactly scores <= q.
    all_scores = np.stack([conformal.scores(X, np.full(300, c), **kw) for c in range(7)], -1)
    cut = np.sort(all_scores.reshape(-1))
    q_cal = float(conformal.calibrate(X, Y, alpha=0.2, **kw))
    assert q_cal in cut  # calibrate's threshold is one of these scores
    for q in [cut[0], cut[700], np.nextafter(cut[700], -1), cut[1400], q_cal, 0.5, 1.0]:
        sets = conformal.prediction_sets(X, q, **kw)
        np.testing.assert_array_equal(sets, all_scores <= np.float32(q), err_msg=f"q={q}")


@SETS
def test_membership_holds_under_jit():
    kw = variant("aps", 11)
    q = conformal.calibrate(X, Y, alpha=0.2, **kw)
    s = conformal.scores(X, Y, **kw)
    # Traced logits and threshold, in one compilation of the caller's.
    sets = jax.jit(lambda x, q: conformal.prediction_sets(x, q, **kw))(X, q)
    np.testing.assert_array_equal(sets[np.arange(300), Y], s <= q)
    np.testing.assert_array_equal(sets, conformal.prediction_sets(X, q, **kw))


@SETS
@pytest.mark.parametrize("method", ["aps", "raps"])
def test_aps_sets_are_never_empty_and_are_ranking_prefixes(method):
    kw = variant(method, None)
    p = ref_probs(X)  # the same ranking as float32's: the tied columns are tied in both
    order = np.argsort(-p, -1, kind="stable")
    for q in (0.0, 0.3, 0.7, 0.95, 1.5):
        sets = np.asarray(conformal.prediction_sets(X, q, **kw))
        assert sets[np.arange(300), np.argmax(p, -1)].all()  # the top class, always
        ranked = np.take_along_axis(sets, order, -1)
        # In ranked order the set is True up to its size, then False.
        np.testing.assert_array_equal(ranked, np.arange(7) < ranked.sum(-1, keepdims=True))
    # At q = 0 the set is the top class alone; at +inf, every class.
    np.testing.assert_array_equal(
        conformal.prediction_sets(X, 0.0, **kw), np.arange(7) == np.argmax(p, -1)[:, None]
    )
    assert conformal.prediction_sets(X, jnp.inf, **kw).all()


def test_lac_sets_may_be_empty_and_per_sample_thresholds():
    x = jnp.log(jnp.array([[0.4, 0.35, 0.25], [0.9, 0.05, 0.05]]))
    # 1 - p_y <= 0.5 keeps nothing of the flat row: empty, as the maths says.
    np.testing.assert_array_equal(
        conformal.prediction_sets(x, 0.5), [[False, False, False], [True, False, False]]
    )
    np.testing.assert_array_equal(
        conformal.prediction_sets(x, jnp.array([0.7, 0.0])),
        [[True, True, False], [False, False, False]],
    )
    assert conformal.prediction_sets(x, 1).all()  # an int threshold is a number too


@SETS
def test_lam_inf_caps_raps_sets_at_k_reg():
    sets = conformal.prediction_sets(X, 10.0, method="raps", k_reg=RAPS["k_reg"], lam=jnp.inf)
    np.testing.assert_array_equal(np.sum(sets, -1), RAPS["k_reg"])


# ---------------------------------------------------------------------------------------
# coverage on synthetic data with a known distribution

ALPHA, N_CAL, N_TEST, SEEDS = 0.1, 500, 500, 200
COVERAGE = pytest.mark.xdist_group("conformal_coverage")  # shares data and compilations


def draw(rng, p):
    """Labels drawn from the class probabilities ``p [..., V]``."""
    return jnp.asarray((p.cumsum(-1) > rng.random(p.shape[:-1] + (1,))).argmax(-1), jnp.int32)


SYNTHETIC = {"calibrated": (2, 0), "noisy": (2, 1.5), "sharp": (4, 0), "diluted": (4, 0)}


@cache
def synthetic(name, seeds=SEEDS, seed=0):
    """``seeds`` data sets of N_CAL + N_TEST samples of V = 10 classes, labels drawn from
    softmax(z), z = scale * N(0, 1): the classifier with logits z is calibrated
    ("calibrated", scale 2; "sharp", scale 4); "noisy" sees z + 1.5 * N(0, 1).
    "diluted" has the right ranking but spreads a random share w ~ U[0, 0.9) of each
    sample's mass evenly over the classes: the label is in the top few, but APS must go
    deep into the flat tail of the diluted samples to gather its mass, the case RAPS's
    rank penalty is made for."""
    scale, noise = SYNTHETIC[name]
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((seeds, N_CAL + N_TEST, 10))
    p = ref_probs(z)
    if name == "diluted":
        w = 0.9 * rng.random(p.shape[:-1] + (1,))
        return jnp.asarray(np.log((1 - w) * p + w / 10), jnp.float32), draw(rng, p)
    logits = z + noise * rng.standard_normal(z.shape)
    return jnp.asarray(logits, jnp.float32), draw(rng, p)


@partial(jax.jit, static_argnames=("method", "randomised", "k_reg"))
def conformal_runs(logits, labels, keys, method, randomised=False, k_reg=None, lam=None):
    """Coverage and mean set size of each data set: calibrate on the first N_CAL samples,
    predict sets for the rest."""
    kw = dict(method=method, k_reg=k_reg, lam=lam)

    def run(x, y, key):
        k_cal, k_test = jax.random.split(key)
        q = conformal.calibrate(
            x[:N_CAL], y[:N_CAL], alpha=ALPHA, key=k_cal if randomised else None, **kw
        )
        sets = conformal.prediction_sets(x[N_CAL:], q, key=k_test if randomised else None, **kw)
        return conformal.coverage(sets, y[N_CAL:]), conformal.mean_set_size(sets)

    return jax.vmap(run)(logits, labels, keys)


@cache
def results(name, method, randomised=False, lam=RAPS["lam"]):
    """(coverage, mean set size) of each of the SEEDS runs, as NumPy arrays."""
    kw = dict(k_reg=RAPS["k_reg"], lam=lam) if method == "raps" else {}
    keys = jax.random.split(jax.random.key(0), SEEDS)
    cov, size = conformal_runs(*synthetic(name), keys, method, randomised, **kw)
    return np.asarray(cov), np.asarray(size)


def expected_coverage_and_se(seeds=SEEDS):
    """E[coverage] = k / (n + 1) (continuous scores) and the standard error of the mean
    coverage over ``seeds`` runs: each run's coverage is a binomial proportion of N_TEST
    test samples around its conditional coverage c ~ Beta(k, n + 1 - k)."""
    k = ref_rank(N_CAL, ALPHA)
    a, b = k, N_CAL + 1 - k
    mean = a / (a + b)
    var_c = a * b / ((a + b) ** 2 * (a + b + 1))
    var = var_c + (mean - (var_c + mean**2)) / N_TEST
    return mean, math.sqrt(var / seeds)


def assert_coverage(cov):
    expected, se = expected_coverage_and_se(len(cov))
    mean = float(np.mean(cov))
    # The guarantee, 1 - alpha <= E[coverage] <= 1 - alpha + 1 / (n + 1), widened by 3
    # standard errors (0.004 at 200 runs)...
    assert 1 - ALPHA - 3 * se <= mean <= 1 - ALPHA + 1 / (N_CAL + 1) + 3 * se, (mean, se)
    # ...and, as the scores have no ties at the threshold, its exact value k / (n + 1)
    # = 451 / 501 = 0.90020 within the same 3 standard errors.
    assert 1 - ALPHA <= expected < 1 - ALPHA + 1 / (N_CAL + 1)
    assert abs(mean - expected) <= 3 * se, (mean, expected, se)


@COVERAGE
@pytest.mark.parametrize(
    "method, randomised", [("lac", False), ("aps", False), ("aps", True), ("raps", False)]
)
def test_coverage_and_set_sizes_on_known_distribution(method, randomised):
    sizes = {}
    for name in ("calibrated", "noisy", "sharp"):
        cov, size = results(name, method, randomised)
        assert_coverage(cov)  # whatever the classifier
        sizes[name] = float(np.mean(size))
    # A better classifier gives smaller sets at the same coverage.
    assert sizes["sharp"] < 0.6 * sizes["calibrated"], sizes
    assert sizes["noisy"] > 1.3 * sizes["calibrated"], sizes


@COVERAGE
def test_randomised_aps_sets_are_smaller():
    # Randomisation removes APS's conservativeness (the whole mass of the last class).
    for name, factor in (("calibrated", 0.97), ("noisy", 1.0), ("sharp", 0.95)):
        det, rnd = results(name, "aps")[1], results(name, "aps", randomised=True)[1]
        assert np.mean(rnd) < factor * np.mean(det), name


@COVERAGE
def test_raps_shrinks_aps_sets_when_tails_are_noisy():
    cov_aps, size_aps = results("diluted", "aps")
    cov_raps, size_raps = results("diluted", "raps", lam=0.2)
    assert_coverage(cov_aps)
    assert_coverage(cov_raps)
    assert np.mean(size_raps) < 0.8 * np.mean(size_aps)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_coverage_over_many_seeds(method):
    # 2000 runs: a standard error of 0.0004, below the 1 / (n + 1) = 0.002 of the band.
    logits, labels = synthetic("noisy", seeds=2000, seed=3)
    keys = jax.random.split(jax.random.key(1), 2000)
    cov, _ = conformal_runs(logits, labels, keys, method, **options(method))
    assert_coverage(np.asarray(cov))


# ---------------------------------------------------------------------------------------
# masks, edge values, NaN, transformations


@SETS
def test_where_equals_filtering():
    w = np.random.default_rng(15).random(300) > 0.4
    kw = dict(alpha=0.15, method="aps")
    filtered = conformal.calibrate(X[w], Y[w], **kw)
    np.testing.assert_array_equal(conformal.calibrate(X, Y, where=w, **kw), filtered)
    # No sample counts: q = +inf (every set is all classes), as when n < 1 / alpha - 1.
    assert float(conformal.calibrate(X, Y, where=np.zeros(300, bool), **kw)) == np.inf
    assert float(conformal.calibrate(X, Y, where=np.arange(300) < 5, **kw)) == np.inf
    assert float(conformal.calibrate(X[:0], Y[:0], **kw)) == np.inf


@SETS
@pytest.mark.parametrize("method", METHODS)
def test_bad_labels_and_nan_are_loud(method):
    kw = variant(method, None)
    bad = np.asarray(Y).copy()
    bad[3] = 7
    keep = np.arange(300) != 3
    assert np.isnan(conformal.calibrate(X, bad, alpha=0.1, **kw))
    assert np.isnan(conformal.scores(X, bad, **kw)[3])
    assert np.isfinite(conformal.calibrate(X, bad, alpha=0.1, where=keep, **kw))
    bad[3] = -1  # -1 is not the last class
    assert np.isnan(conformal.calibrate(X, bad, alpha=0.1, **kw))
    xn = np.asarray(X).copy()
    xn[5, 2] = np.nan
    assert np.isnan(conformal.calibrate(xn, Y, alpha=0.1, **kw))
    s = np.asarray(conformal.scores(xn, Y, **kw))
    assert np.isnan(s[5]) and np.all(np.isfinite(np.delete(s, 5)))
    others = np.arange(300) != 5
    assert np.isfinite(conformal.calibrate(xn, Y, alpha=0.1, where=others, **kw))
    sets = np.asarray(conformal.prediction_sets(xn, 0.9, **kw))
    assert not sets[5].any() and sets[others].any(-1).all()
    assert not conformal.prediction_sets(X, jnp.nan, **kw).any()


@SETS
@pytest.mark.parametrize("method", METHODS)
def test_no_nan_where_the_math_has_an_answer(method):
    kw = variant(method, None)
    x = np.asarray(X).copy()
    x[0, :3] = -np.inf  # -inf classes
    x[1, 2] = np.inf  # +inf takes all the mass
    x[2] = -np.inf  # no class at all
    x[3] = 5.0  # all tied
    assert np.all(np.isfinite(conformal.scores(x, Y, **kw)))
    assert np.isfinite(conformal.calibrate(x, Y, alpha=0.2, **kw))
    sets = np.asarray(conformal.prediction_sets(x, 0.5, **kw))
    if method != "lac":
        np.testing.assert_array_equal(sets[1], np.arange(7) == 2)
        assert sets[2, 0] and sets[3, 0]  # the top class of a row without order: class 0


@SETS
def test_jit_vmap_and_traced_alpha():
    # (Data passed as arguments: closed over, XLA would fold the constant computation.)
    alphas = jnp.array([0.05, 0.1, 0.5, 0.0, 1.0])
    calibrate = jax.vmap(lambda x, y, a: conformal.calibrate(x, y, alpha=a), (None, None, 0))
    over_alpha = jax.jit(calibrate)(X, Y, alphas)
    np.testing.assert_array_equal(
        over_alpha[:3], [conformal.calibrate(X, Y, alpha=float(a)) for a in alphas[:3]]
    )
    assert np.all(np.diff(np.asarray(over_alpha[:3])) < 0)  # a larger alpha, a lower q
    # A traced alpha cannot be checked at trace time: outside (0, 1) it gives NaN.
    assert np.all(np.isnan(over_alpha[3:]))
    # One calibration set per batch entry, one threshold each.
    x = jnp.stack([X, X[::-1], X[:, ::-1]])
    y = jnp.stack([Y, Y[::-1], Y])
    qs = jax.jit(jax.vmap(lambda a, b: conformal.calibrate(a, b, alpha=0.1, method="aps")))(x, y)
    sets = jax.jit(jax.vmap(lambda a, q: conformal.prediction_sets(a, q, method="aps")))(x, qs)
    assert sets.shape == (3, 300, 7) and sets.dtype == jnp.bool_
    for i in range(3):
        np.testing.assert_array_equal(
            qs[i], conformal.calibrate(x[i], y[i], alpha=0.1, method="aps")
        )
        np.testing.assert_array_equal(sets[i], conformal.prediction_sets(x[i], qs[i], method="aps"))


def test_coverage_and_mean_set_size():
    sets = jnp.array([[True, True, False], [False, True, False], [False, False, False]])
    y = jnp.array([0, 2, 1])
    np.testing.assert_allclose(conformal.coverage(sets, y), 1 / 3, rtol=1e-7)
    np.testing.assert_allclose(conformal.mean_set_size(sets), 1.0)
    w = jnp.array([True, True, False])
    np.testing.assert_allclose(conformal.coverage(sets, y, where=w), 0.5)
    np.testing.assert_allclose(conformal.mean_set_size(sets, where=w), 1.5)
    assert float(conformal.coverage(sets, y, where=jnp.zeros(3, bool))) == 0.0
    assert float(conformal.mean_set_size(sets, where=jnp.zeros(3, bool))) == 0.0
    assert np.isnan(conformal.coverage(sets, jnp.array([0, 3, 1])))
    assert conformal.coverage(sets, y).dtype == jnp.float32
    big = jnp.ones((2, 4, 5), bool)
    assert float(conformal.mean_set_size(big)) == 5.0
    assert float(conformal.coverage(big, jnp.zeros((2, 4), jnp.int32))) == 1.0


def test_validation():
    assert softjax.conformal is conformal
    x, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.0"):
        conformal.calibrate(x, y, alpha=1.0)
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 0"):
        conformal.calibrate(x, y, alpha=0)
    with pytest.raises(TypeError, match="alpha must be a number"):
        conformal.calibrate(x, y, alpha=jnp.array([0.1, 0.2]))
    with pytest.raises(TypeError, match="alpha must be a number"):
        conformal.calibrate(x, y, alpha=True)
    with pytest.raises(ValueError, match=r"method must be one of \('lac', 'aps', 'raps'\)"):
        conformal.calibrate(x, y, alpha=0.1, method="thr")
    with pytest.raises(ValueError, match="method='raps' needs k_reg and lam"):
        conformal.scores(x, y, method="raps", lam=0.1)
    with pytest.raises(ValueError, match="k_reg and lam apply to method='raps' only"):
        conformal.prediction_sets(x, 0.5, method="aps", k_reg=2)
    with pytest.raises(ValueError, match="k_reg must be >= 0, got -1"):
        conformal.scores(x, y, method="raps", k_reg=-1, lam=0.1)
    with pytest.raises(TypeError, match="k_reg must be an int"):
        conformal.scores(x, y, method="raps", k_reg=1.5, lam=0.1)
    with pytest.raises(ValueError, match="lam must be >= 0, got -0.1"):
        conformal.scores(x, y, method="raps", k_reg=1, lam=-0.1)
    with pytest.raises(ValueError, match="key randomises method='aps' or 'raps'"):
        conformal.scores(x, y, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but logits \(4, 3\)"):
        conformal.calibrate(x, jnp.zeros(5, jnp.int32), alpha=0.1)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        conformal.scores(x, jnp.zeros(4))
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        conformal.scores(jnp.zeros((4, 3), jnp.int32), y)
    with pytest.raises(ValueError, match="logits must have a class axis"):
        conformal.prediction_sets(jnp.float32(1.0), 0.5)
    with pytest.raises(ValueError, match="with no class along axis -1"):
        conformal.calibrate(jnp.zeros((4, 0)), y, alpha=0.1)
    with pytest.raises(ValueError, match="where has shape"):
        conformal.calibrate(x, y, alpha=0.1, where=jnp.ones(3, bool))
    with pytest.raises(ValueError, match=r"threshold has shape \(3,\), which does not broadcast"):
        conformal.prediction_sets(x, jnp.ones(3))
    with pytest.raises(TypeError, match="threshold must be a number"):
        conformal.prediction_sets(x, True)
    with pytest.raises(TypeError, match="sets must be a boolean array"):
        conformal.coverage(jnp.ones((4, 3)), y)
    with pytest.raises(ValueError, match=r"labels has shape \(3,\) but sets \(4, 3\)"):
        conformal.coverage(jnp.ones((4, 3), bool), y[:3])
    with pytest.raises(ValueError, match="where has shape"):
        conformal.mean_set_size(jnp.ones((4, 3), bool), where=jnp.ones(3, bool))
