"""Tests of softjax.sample / filter_logits against a float64 NumPy reference of the semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import softjax
from softjax.sampling import filter_logits, filter_logits_reference, sample, sample_reference

SLOW = pytest.mark.slow

# Upper 1e-6 quantiles of the chi-square distribution, by degrees of freedom (from
# scipy.stats.chi2.isf(1e-6, df)); a correct sampler fails one test in a million.
CHI2_CRIT = {
    1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52, 8: 42.70,
    9: 44.81, 10: 46.86, 11: 48.87, 12: 50.83, 13: 52.75, 14: 54.64, 15: 56.49,
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# float64 reference of the semantics, one row at a time


def ref_keep(x, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The kept set of one row (bool [V]) in float64, following the documented order."""
    x = np.asarray(x, np.float64)
    if temperature == 0:
        keep = np.zeros(x.shape, bool)
        keep[np.argmax(x)] = True
        return keep
    z = x / temperature
    keep = np.isfinite(z)
    if top_k:
        kth = np.sort(z[keep])[::-1][min(top_k, keep.sum()) - 1]
        keep &= z >= kth
    if top_p is not None and top_p < 1:
        p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        p /= p.sum()
        srt = np.sort(p)[::-1]
        m = int(np.argmax(np.cumsum(srt) >= top_p * (1 - 1e-12)))
        keep &= p >= srt[m]
    if min_p:
        p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        keep &= p >= min_p * p.max()
    return keep


def ref_probs(x, **kw):
    """The renormalised target distribution of one row (float64)."""
    keep = ref_keep(x, **kw)
    t = kw.get("temperature", 1.0)
    z = np.asarray(x, np.float64) / (t if t else 1.0)
    p = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return p / p.sum()


def kept(z):
    return np.isfinite(np.asarray(z))


def logits_rows(seed, b, v, scale=2.0):
    return np.random.default_rng(seed).normal(size=(b, v)) * scale


KNOBS = [
    dict(),
    dict(temperature=0.5),
    dict(top_k=7),
    dict(top_p=0.8),
    dict(min_p=0.05),
    dict(top_k=20, top_p=0.9),
    dict(top_p=0.7, min_p=0.1),
    dict(top_k=30, top_p=0.95, min_p=0.02, temperature=1.7),
    dict(top_k=1),
    dict(top_p=0.0),
    dict(min_p=1.0),
]


@pytest.mark.parametrize("kw", KNOBS, ids=str)
@pytest.mark.parametrize("traced_k", [False, True])
def test_kept_set_matches_float64_reference(kw, traced_k):
    x = logits_rows(0, 16, 100)
    call = dict(kw)
    if traced_k and "top_k" in call:
        call["top_k"] = jnp.asarray(call["top_k"])
    got = kept(filter_logits(jnp.asarray(x, jnp.float32), **call))
    want = np.stack([ref_keep(r, **kw) for r in x])
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kept(filter_logits_reference(x, **call)), want)


def test_kept_values_are_the_tempered_logits():
    x = logits_rows(1, 4, 50)
    z = np.asarray(filter_logits(x, temperature=0.7, top_p=0.9))
    k = np.isfinite(z)
    np.testing.assert_allclose(z[k], (x / 0.7)[k].astype(np.float32), rtol=1e-6)


def test_per_row_knobs_equal_row_by_row_calls():
    x = logits_rows(2, 6, 64)
    t = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 1.0], np.float32)
    k = np.array([0, 3, 10, 64, 100, 1], np.int32)
    p = np.array([1.0, 0.5, 0.9, 0.0, 0.7, 0.99], np.float32)
    m = np.array([0.0, 0.1, 0.0, 0.3, 0.05, 1.0], np.float32)
    fn = jax.jit(lambda x, t, k, p, m: filter_logits(x, temperature=t, top_k=k, top_p=p, min_p=m))
    got = kept(fn(x, t, k, p, m))
    for i in range(6):
        want = ref_keep(x[i], float(t[i]), int(k[i]), float(p[i]), float(m[i]))
        np.testing.assert_array_equal(got[i], want, err_msg=f"row {i}")


def test_static_and_traced_top_k_agree_with_ties_beyond_k():
    # Integer logits: many ties at the k-th value, some outside lax.top_k's k candidates.
    x = np.random.default_rng(3).integers(-3, 3, size=(32, 40)).astype(np.float32)
    for k in (3, 39):
        for p in (None, 0.3):
            a = kept(filter_logits(x, top_k=k, top_p=p))
            b = kept(filter_logits(x, top_k=jnp.asarray(k), top_p=p))
            want = np.stack([ref_keep(r, top_k=k, top_p=p) for r in x])
            np.testing.assert_array_equal(a, want, err_msg=f"static k={k} p={p}")
            np.testing.assert_array_equal(b, want, err_msg=f"traced k={k} p={p}")


def test_ties_at_the_cut_are_kept():
    np.testing.assert_array_equal(
        kept(filter_logits(jnp.array([3.0, 2.0, 2.0, 2.0, 1.0]), top_k=2)),
        [True, True, True, True, False],
    )
    logp = np.log([0.4, 0.2, 0.2, 0.2])
    np.testing.assert_array_equal(kept(filter_logits(logp, top_p=0.5)), [True] * 4)
    np.testing.assert_array_equal(kept(filter_logits(logp, top_p=0.4)), [1, 0, 0, 0])


@pytest.mark.parametrize(
    "dtype",
    [
        jnp.float32,
        jnp.bfloat16,
        pytest.param(jnp.float16, marks=SLOW),
        pytest.param(jnp.float64, marks=SLOW),
    ],
)
def test_identities_drop_nothing(dtype):
    # A long tail of tiny probabilities: a float32 cumulative sum reaches 1 long before the
    # end of the row, which makes a naive "cumsum < top_p" drop real tokens at top_p = 1.
    x = np.concatenate([[20.0], np.full(5000, -3.0), [-80.0, -jnp.inf]]).astype(np.float32)
    x = jnp.asarray(x, dtype)
    z_plain = np.asarray(filter_logits(x))
    assert np.isfinite(z_plain).sum() == x.shape[0] - 1
    for kw in (dict(top_k=0), dict(top_k=jnp.asarray(0)), dict(top_k=None), dict(top_p=1.0),
               dict(top_p=None), dict(min_p=0.0), dict(min_p=None),
               dict(top_k=0, top_p=1.0, min_p=0.0)):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(filter_logits(x, **kw)), z_plain, err_msg=kw)


def test_top_p_cumulative_mass_is_float32_for_bf16_logits():
    # 2000 equal-ish tokens: in bf16 a running sum stalls once it reaches 256 ulps of a term,
    # which moves the nucleus cut by hundreds of tokens.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(4, 2000)) * 0.3, jnp.bfloat16)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for p in (0.5, 0.9):
        got = kept(filter_logits(x, top_p=p))
        want = np.stack([ref_keep(r, top_p=p) for r in x64])
        np.testing.assert_array_equal(got, want)


def test_at_least_one_token_survives():
    x = logits_rows(5, 8, 30)
    for kw in (dict(top_p=0.0), dict(min_p=1.0), dict(top_k=1, top_p=0.0, min_p=1.0)):
        z = np.asarray(filter_logits(x, **kw))
        np.testing.assert_array_equal(np.isfinite(z).sum(-1), np.ones(8))
        np.testing.assert_array_equal(np.argmax(z, -1), np.argmax(x, -1))


# ---------------------------------------------------------------------------------------
# greedy


def test_temperature_zero_is_exact_greedy_lowest_index_on_ties():
    x = jnp.array(
        [[1.0, 5.0, 5.0, -jnp.inf], [-jnp.inf, -jnp.inf, 2.0, 2.0], [3e38, 3e38, -3e38, 0.0]]
    )
    for kw in (dict(), dict(top_p=0.5), dict(top_k=1), dict(min_p=0.9), dict(top_k=jnp.array(2))):
        for seed in range(3):
            got = sample(jax.random.key(seed), x, temperature=0.0, **kw)
            np.testing.assert_array_equal(got, [1, 2, 0])
    z = np.asarray(filter_logits(x, temperature=0.0))
    assert not np.isnan(z).any()


def test_temperature_zero_per_row_mixed_with_sampling():
    x = jnp.tile(jnp.array([0.0, 0.1, 0.2, 0.3]), (1000, 1))
    t = jnp.where(jnp.arange(1000) % 2 == 0, 0.0, 1.0)
    got = np.asarray(jax.jit(sample)(jax.random.key(0), x, temperature=t))
    np.testing.assert_array_equal(got[::2], 3)
    assert len(np.unique(got[1::2])) == 4  # the tempered rows really sample


def test_tiny_temperature_is_finite_and_greedy():
    x = jnp.array([[0.0, 1.0, 0.5]])
    got = sample(jax.random.key(0), x, temperature=1e-30, top_p=0.9)
    np.testing.assert_array_equal(got, [1])


# ---------------------------------------------------------------------------------------
# distribution: chi-square of empirical frequencies against the renormalised target

CHI_CASES = [
    pytest.param(dict(temperature=0.6), marks=SLOW),
    pytest.param(dict(top_k=4), marks=SLOW),
    dict(top_k=jnp.asarray(4)),
    dict(top_p=0.75),
    pytest.param(dict(min_p=0.2), marks=SLOW),
    pytest.param(dict(top_k=6, top_p=0.85), marks=SLOW),
    dict(top_k=6, top_p=0.85, min_p=0.15, temperature=1.4),
    pytest.param(dict(top_p=0.6, min_p=0.3, temperature=2.0), marks=SLOW),
]


def chi_square(counts, probs):
    """Pearson's statistic over the tokens the target allows, and its degrees of freedom."""
    support = probs > 0
    n = counts.sum()
    expected = n * probs[support]
    stat = float(np.sum((counts[support] - expected) ** 2 / expected))
    return stat, int(support.sum()) - 1


@pytest.mark.parametrize("kw", CHI_CASES, ids=str)
def test_empirical_frequencies_match_target(kw):
    x = np.array([2.0, 1.5, 1.2, 1.0, 0.4, 0.0, -0.5, -1.0, -2.0, -jnp.inf])
    n = 30_000
    draws = np.asarray(jax.jit(sample)(jax.random.key(7), jnp.tile(jnp.asarray(x), (n, 1)), **kw))
    counts = np.bincount(draws, minlength=x.size)
    plain = {k: (int(v) if k == "top_k" else v) for k, v in kw.items()}
    probs = ref_probs(x, **plain)
    np.testing.assert_array_equal(counts[probs == 0], 0)  # nothing filtered is ever drawn
    stat, df = chi_square(counts, probs)
    assert stat < CHI2_CRIT[df], f"chi2 = {stat:.1f} with {df} dof for {kw}"


def test_static_top_k_draws_with_ties_beyond_the_candidates():
    # Row A: the 2nd value ties with three tokens outside lax.top_k's 2 candidates, so those
    # rows take the whole-vocabulary draw; row B has no such tie and draws among candidates.
    a = np.array([2.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    b = np.array([2.0, 1.5, 1.0, 0.5, 0.2, 0.0])
    n = 20_000
    x = jnp.asarray(np.where(np.arange(2 * n)[:, None] % 2 == 0, a, b), jnp.float32)
    for kw in (dict(top_k=2, min_p=0.3),):
        draws = np.asarray(jax.jit(lambda k, x, kw=kw: sample(k, x, **kw))(jax.random.key(5), x))
        for row, got in ((a, draws[0::2]), (b, draws[1::2])):
            probs = ref_probs(row, **kw)
            counts = np.bincount(got, minlength=row.size)
            np.testing.assert_array_equal(counts[probs == 0], 0)
            stat, df = chi_square(counts, probs)
            assert stat < CHI2_CRIT[df], f"chi2 = {stat:.1f} with {df} dof for {kw}, row {row}"


def test_chi_square_detects_a_wrong_distribution():
    # The test above can fail: unfiltered draws against the top-p target are rejected.
    x = np.array([2.0, 1.5, 1.2, 1.0, 0.4, 0.0])
    draws = np.asarray(sample(jax.random.key(1), jnp.tile(jnp.asarray(x), (20_000, 1))))
    counts = np.bincount(draws, minlength=x.size)
    probs = ref_probs(x)
    probs_wrong = ref_probs(x, temperature=0.9)
    assert chi_square(counts, probs)[0] < CHI2_CRIT[5]
    assert chi_square(counts, probs_wrong)[0] > CHI2_CRIT[5]


def test_fast_and_reference_draw_the_same_tokens():
    x = jnp.asarray(logits_rows(8, 64, 300), jnp.float32)
    # (a static top_k draws among its candidates only, from a different random stream)
    for kw in (dict(top_k=jnp.asarray(40), top_p=0.8, min_p=0.05),):
        np.testing.assert_array_equal(
            sample(jax.random.key(3), x, **kw), sample_reference(jax.random.key(3), x, **kw)
        )


# ---------------------------------------------------------------------------------------
# shapes, transformations, edge rows, validation


def test_axis_and_batch_shape():
    x = jnp.asarray(np.random.default_rng(9).normal(size=(3, 20, 2)), jnp.float32)
    a = sample(jax.random.key(0), x, axis=1, top_p=0.9, temperature=jnp.ones((3, 2)))
    assert a.shape == (3, 2) and a.dtype == jnp.int32
    b = sample(jax.random.key(0), jnp.moveaxis(x, 1, -1), top_p=0.9)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        kept(filter_logits(x, axis=1, top_k=3)),
        np.moveaxis(kept(filter_logits(jnp.moveaxis(x, 1, -1), top_k=3)), -1, 1),
    )


def test_jit_and_vmap_with_traced_knobs():
    x = jnp.asarray(logits_rows(10, 5, 40), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 5)
    p = jnp.linspace(0.1, 1.0, 5)

    def one(key, row, p):
        return sample(key, row, top_p=p, top_k=jnp.asarray(10), temperature=0.8)

    got = jax.jit(jax.vmap(one))(keys, x, p)
    want = jnp.stack([one(keys[i], x[i], p[i]) for i in range(5)])
    np.testing.assert_array_equal(got, want)


def test_undrawable_rows_give_the_vocabulary_size_and_leave_others_alone():
    x = jnp.array([[0.0, 1.0], [-jnp.inf, -jnp.inf], [jnp.nan, 1.0], [5.0, 0.0]])
    got = np.asarray(sample(jax.random.key(0), x, temperature=0.0))
    np.testing.assert_array_equal(got, [1, 2, 2, 0])
    got = np.asarray(sample(jax.random.key(0), x, top_p=0.9))
    np.testing.assert_array_equal(got[1:3], [2, 2])
    got = np.asarray(sample(jax.random.key(0), x, top_k=1))  # the static top-k path
    np.testing.assert_array_equal(got, [1, 2, 2, 0])
    assert np.isnan(np.asarray(filter_logits(x))[2]).all()
    assert sample(jax.random.key(0), jnp.zeros((3, 0))).tolist() == [0, 0, 0]  # V = 0


def test_an_undrawable_token_is_loud_downstream():
    # The answer for "nothing to draw" must not pass for a token: an embedding lookup of it
    # gives NaN (jnp.take's and Flax Embed's fill), where -1 would give the last token's row.
    import flax.linen as nn

    x = jnp.array([[0.0, 1.0, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    tokens = sample(jax.random.key(0), x, temperature=0.0)
    table = jnp.arange(12.0).reshape(3, 4)
    looked_up = jnp.take(table, tokens, axis=0)
    np.testing.assert_array_equal(looked_up[0], table[2])
    assert np.isnan(np.asarray(looked_up[1])).all()
    embed = nn.Embed(num_embeddings=3, features=4)
    params = embed.init(jax.random.key(1), tokens)
    assert np.isnan(np.asarray(embed.apply(params, tokens))[1]).all()


def test_exported_from_package():
    assert softjax.sample is sample


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(top_k=jnp.array([1.0])), TypeError, "top_k must have an integer dtype"),
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_p=1.5), ValueError, r"top_p must be in \[0, 1\]"),
        (dict(min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
        (dict(top_p=jnp.ones(3)), ValueError, "top_p has shape"),
        (dict(temperature=jnp.array([1, 2])), TypeError, "temperature must have a floating"),
        (dict(axis=2), ValueError, "out of range"),
    ],
)
def test_validation(kw, err, match):
    with pytest.raises(err, match=match):
        sample(jax.random.key(0), jnp.zeros((2, 5)), **kw)


def test_validation_of_logits():
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        sample(jax.random.key(0), jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="at least one axis"):
        sample(jax.random.key(0), jnp.float32(1.0))


def test_traced_invalid_knobs_do_not_raise():
    fn = jax.jit(lambda p: filter_logits(jnp.zeros(4), top_p=p))
    fn(jnp.float32(2.0))  # no check on traced data


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    v=st.sampled_from([1, 2, 9, 40]),
    k=st.one_of(st.none(), st.integers(0, 45)),
    p=st.one_of(st.none(), st.floats(0.0, 1.0)),
    m=st.one_of(st.none(), st.floats(0.0, 1.0)),
    t=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    ints=st.booleans(),
)
def test_hypothesis_fast_equals_sort_oracle_equals_float64(seed, v, k, p, m, t, ints):
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 4, size=v).astype(np.float64) if ints else rng.normal(size=v) * 3
    x = x.astype(np.float32).astype(np.float64)
    if t and p is not None:  # stay clear of float32-vs-float64 rounding at the top-p cut
        keep = ref_keep(x, t, k, None, None)
        q = np.where(keep, np.exp(x / t - (x / t)[keep].max()), 0.0)
        mass = np.cumsum(np.sort(q / q.sum())[::-1])
        assume(np.min(np.abs(mass - p)) > 1e-5)
    if t and m:
        assume(np.min(np.abs(np.exp((x - x.max()) / t) - m)) > 1e-5)
    want = ref_keep(x, t, k, p, m)
    kw = dict(temperature=t, top_k=k, top_p=p, min_p=m)
    np.testing.assert_array_equal(kept(filter_logits(x, **kw)), want)
    np.testing.assert_array_equal(kept(filter_logits_reference(x, **kw)), want)
    if k is not None:
        kw["top_k"] = jnp.asarray(k)
        np.testing.assert_array_equal(kept(filter_logits(x, **kw)), want)
