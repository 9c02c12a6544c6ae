"""Tests of sampling's Hugging Face processors beyond temperature, top-k, top-p and min-p.

Typical-p, epsilon and eta sampling, ``min_tokens_to_keep``, and the repetition, presence
and frequency penalties: against a float64 NumPy transcription of Hugging Face's algorithms
(written here), against transformers' own classes where it is installed (it is not a test
extra: those tests skip without it), and against the sort-based oracle.

Most tests call one compiled function: every knob given (traced), the ones not under test at
their neutral value (``top_p=1``, ``epsilon_cutoff=0``, ``repetition_penalty=1``, ...), which
changes nothing, exactly. Only the None pattern and the static ints key the compile cache.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from softjax.sampling import filter_logits, filter_logits_reference, sample

SLOW = pytest.mark.slow

# Rows where a float64 decision lies closer than this (relative) to its threshold are left
# out of exact kept-set comparisons: float32 rounding may decide them either way.
MARGIN = 1e-4

# Every knob, at the value that changes nothing; tests override what they test.
NEUTRAL = dict(
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    min_tokens_to_keep=1,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
)
INT_KNOBS = ("top_k", "min_tokens_to_keep")

# One batch shape (rows, vocabulary, previous tokens) for the tests of the traced function,
# so that they share its compilation.
B, V, L = 24, 96, 16
NO_PREV = np.full((B, L), -1, np.int32)

# Hugging Face's order (GenerationMixin._get_logits_processor, transformers 5.25.0).
HF_ORDER = [
    "RepetitionPenaltyLogitsProcessor",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "EpsilonLogitsWarper",
    "EtaLogitsWarper",
]


def traced(**kw):
    """All knobs as per-row arrays (``kw`` over the neutral values): one compile for all."""
    out = {"prev_tokens": jnp.asarray(NO_PREV)}
    for name, value in {**NEUTRAL, **kw}.items():
        if name == "prev_tokens":
            out[name] = jnp.broadcast_to(jnp.asarray(value, jnp.int32), (B, L))
        else:
            dtype = jnp.int32 if name in INT_KNOBS else jnp.float32
            out[name] = jnp.broadcast_to(jnp.asarray(value, dtype), (B,))
    return out


def fast(x, knobs):
    # Eager: its jitted core is then compiled once for every test that calls it.
    return filter_logits(x, **knobs)


def oracle(x, knobs):
    return filter_logits_reference(x, **knobs)


# ---------------------------------------------------------------------------------------
# float64 reference: Hugging Face's algorithms transcribed, one row at a time, ties kept


def ref_penalised(x, prev, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0):
    """Repetition (Hugging Face), then frequency and presence (OpenAI, vLLM) penalties."""
    x = np.asarray(x, np.float64)
    prev = np.asarray(prev, np.int64).ravel()
    counts = np.bincount(prev[(prev >= 0) & (prev < x.size)], minlength=x.size)
    seen = counts > 0
    r = repetition_penalty
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    return x - frequency_penalty * counts - presence_penalty * seen


def ref_row(x, prev=(), **kw):
    """One row in float64: ``(kept, penalised tempered logits, margin)``.

    ``margin`` is the smallest relative distance of a decision from its threshold (a
    cumulative mass from ``top_p`` or ``typical_p``, a probability from a cutoff, two
    neighbours of a sort at a cut): rows with a margin below ``MARGIN`` are too close to
    call in float32.
    """
    kw = {**NEUTRAL, **kw}
    m = kw["min_tokens_to_keep"]
    x = ref_penalised(
        x, prev, kw["repetition_penalty"], kw["presence_penalty"], kw["frequency_penalty"]
    )
    if kw["temperature"] == 0:
        keep = np.arange(x.size) == np.argmax(x)
        return keep, np.where(keep, 0.0, -np.inf), np.inf
    z = x / kw["temperature"]
    keep = np.isfinite(z)
    margins = [np.inf]

    def largest(vals, keep, n):
        """The kept tokens among the ``n`` largest kept ``vals``, ties kept."""
        srt = np.sort(vals[keep])[::-1]
        return keep & (vals >= srt[min(n, srt.size) - 1])

    def log_probs(keep):
        top = z[keep].max()
        return np.where(keep, z - top - np.log(np.sum(np.exp(z[keep] - top))), -np.inf)

    def cumulative(vals, p, keep, target):
        """HF's top-p cut along decreasing ``vals``: the first position whose cumulative
        probability reaches ``target``, and every token at least as large."""
        order = np.argsort(-np.where(keep, vals, -np.inf), kind="stable")[: keep.sum()]
        cum = np.cumsum(p[order])
        i = int(np.argmax(cum >= target))
        # Only the ends of runs of tied values decide anything (the ties go together).
        ends = np.append(vals[order][1:] != vals[order][:-1], True)
        margins.append(np.min(np.abs(cum[ends] - target)))
        if i + 1 < order.size:
            gap = vals[order[i]] - vals[order[i + 1]]
            margins.append(gap / max(1.0, abs(vals[order[i]])) if gap > 0 else np.inf)
        return keep & (vals >= vals[order[i]])

    def cutoff(p, keep, c):
        if c > 0:
            margins.append(np.min(np.abs(p[keep] - c)) / c)
        return (keep & (p >= c)) | largest(z, keep, m)

    if kw["top_k"] > 0:
        keep = largest(z, keep, max(kw["top_k"], m))
    if kw["top_p"] < 1:
        p = np.exp(log_probs(keep))
        keep = cumulative(z, p, keep, kw["top_p"]) | largest(z, keep, m)
    if kw["min_p"] > 0:
        ratio = np.exp(z - z[keep].max())
        below = keep & (ratio < 1)  # (the maximum's ratio is exactly 1 in float32 too)
        margins.append(np.min(np.abs(ratio[below] - kw["min_p"]), initial=1) / kw["min_p"])
        keep = (keep & (ratio >= kw["min_p"])) | largest(z, keep, m)
    if kw["typical_p"] < 1:
        logp = log_probs(keep)
        p = np.exp(logp)
        h = -np.sum(p[keep] * logp[keep])
        typicality = np.where(keep, -np.abs(logp + h), -np.inf)
        keep = cumulative(typicality, p, keep, kw["typical_p"]) | largest(typicality, keep, m)
    if kw["epsilon_cutoff"] > 0:
        keep = cutoff(np.exp(log_probs(keep)), keep, kw["epsilon_cutoff"])
    if kw["eta_cutoff"] > 0:
        logp = log_probs(keep)
        p = np.exp(logp)
        h = -np.sum(p[keep] * logp[keep])
        eps = kw["eta_cutoff"]
        keep = cutoff(p, keep, min(eps, np.sqrt(eps) * np.exp(-h)))
    return keep, np.where(keep, z, -np.inf), min(margins)


def ref_rows(x, **kw):
    """:func:`ref_row` over the rows of ``x`` (per-row knobs as arrays)."""
    prev = kw.pop("prev_tokens", None)
    out = []
    for i in range(x.shape[0]):
        row = {k: (np.asarray(v)[i] if np.ndim(v) else v) for k, v in kw.items()}
        row = {k: (v.item() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
        out.append(ref_row(x[i], () if prev is None else prev[i], **row))
    keep, z, margin = (np.stack(a) for a in zip(*out, strict=True))
    return keep, z, margin


def usable(margin, least=0.75):
    ok = margin > MARGIN
    assert ok.mean() >= least, f"only {ok.sum()} of {ok.size} rows clear of rounding"
    return ok


def rows(seed, b=B, v=V, scale=2.5):
    return (np.random.default_rng(seed).normal(size=(b, v)) * scale).astype(np.float32)


def kept(z):
    return np.isfinite(np.asarray(z))


def padded(x):
    """Short rows ``[b, v]`` as the standard ``[B, V]`` (padded with ``-inf``, tiled)."""
    x = np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1])
    out = np.full((B, V), -np.inf, np.float32)
    out[:, : x.shape[1]] = np.resize(x, (B, x.shape[1]))
    return out


def fast_kept(x, **kw):
    """The kept sets of the short rows ``x`` (through the shared compiled function)."""
    x = np.asarray(x)
    n, v = (1, x.shape[0]) if x.ndim == 1 else x.shape
    got = kept(fast(padded(x), traced(**kw)))[:n, :v]
    return got[0] if x.ndim == 1 else got


# ---------------------------------------------------------------------------------------
# each processor against the float64 reference (one compile for all of them)

CASES = [
    dict(typical_p=0.9),
    dict(typical_p=0.2),
    dict(typical_p=0.0),
    dict(epsilon_cutoff=3e-3),
    dict(epsilon_cutoff=0.3),
    dict(epsilon_cutoff=1.0),
    dict(eta_cutoff=3e-3),
    dict(eta_cutoff=0.2),
    dict(typical_p=0.5, min_tokens_to_keep=4),
    dict(epsilon_cutoff=0.5, min_tokens_to_keep=3),
    dict(eta_cutoff=0.9, min_tokens_to_keep=5),
    dict(top_p=0.0, min_tokens_to_keep=3),
    dict(min_p=1.0, min_tokens_to_keep=3),
    dict(top_k=2, min_tokens_to_keep=6),
    dict(top_k=5, top_p=0.9, min_p=0.02, typical_p=0.8, epsilon_cutoff=1e-3, eta_cutoff=1e-3),
    dict(temperature=0.7, top_p=0.95, typical_p=0.6, eta_cutoff=0.02, min_tokens_to_keep=2),
    dict(typical_p=0.3, epsilon_cutoff=0.1, min_tokens_to_keep=2),
    dict(min_tokens_to_keep=1000, typical_p=0.0, epsilon_cutoff=1.0),
]


@pytest.mark.parametrize("kw", CASES, ids=str)
def test_kept_set_and_values_match_float64_reference(kw):
    x = rows(0)
    want, z64, margin = ref_rows(x, **kw)
    ok = usable(margin)
    got = np.asarray(fast(x, traced(**kw)))
    np.testing.assert_array_equal(kept(got)[ok], want[ok])
    finite = want & kept(got)
    np.testing.assert_allclose(got[finite], z64[finite], rtol=tol(np.float32))
    # At least min(m, V) tokens survive every filter.
    m = kw.get("min_tokens_to_keep", 1)
    assert (kept(got).sum(-1) >= min(m, x.shape[-1])).all()


@pytest.mark.parametrize("kw", CASES[:3] + CASES[8:9] + CASES[-4:], ids=str)
def test_sort_oracle_matches_float64_reference(kw):
    x = rows(1)
    want, _, margin = ref_rows(x, **kw)
    ok = usable(margin)
    got = kept(oracle(x, traced(**kw)))
    np.testing.assert_array_equal(got[ok], want[ok])


def test_static_ints_and_none_knobs_agree_with_the_traced_ones():
    # Integer logits: many ties, at the top-k cut (some beyond lax.top_k's candidates) and
    # among the typical scores.
    x = np.random.default_rng(2).integers(-3, 3, size=(B, V)).astype(np.float32)
    for kw in (dict(top_k=3, top_p=0.7, typical_p=0.5, epsilon_cutoff=0.05, min_tokens_to_keep=2),):
        want = kept(fast(x, traced(**kw)))
        np.testing.assert_array_equal(kept(filter_logits(x, **kw)), want, err_msg=str(kw))
        ref, _, margin = ref_rows(x, **kw)
        ok = usable(margin)
        np.testing.assert_array_equal(want[ok], ref[ok], err_msg=str(kw))


# ---------------------------------------------------------------------------------------
# ties, min_tokens_to_keep, never empty


def test_ties_at_the_cuts_are_kept():
    # Two tokens tie at the top: with epsilon = 1 nothing passes, so the protected most
    # likely token is kept, with its tie.
    x = np.log(np.array([0.3, 0.3, 0.2, 0.2], np.float32))
    np.testing.assert_array_equal(fast_kept(x, epsilon_cutoff=1.0), [1, 1, 0, 0])
    np.testing.assert_array_equal(fast_kept(x, eta_cutoff=1.0), [1, 1, 0, 0])
    # p = (0.4, 0.2, 0.2, 0.2): H = 1.33, so the 0.2s are the most typical (|log 0.2 + H| =
    # 0.28 < 0.42); they tie, so all three are kept whatever typical_p.
    x = np.log(np.array([0.4, 0.2, 0.2, 0.2], np.float32))
    for mass in (0.0, 0.1, 0.5):
        np.testing.assert_array_equal(fast_kept(x, typical_p=mass), [0, 1, 1, 1])
    np.testing.assert_array_equal(fast_kept(x, typical_p=0.61), [1, 1, 1, 1])


def test_typical_p_may_drop_the_most_likely_token():
    # The top token is far less surprising than the entropy (|log 0.3 + H| = 2.6), the
    # long tail close to it (|log 0.007 + H| = 1.1).
    x = np.log(np.array([0.3] + [0.007] * 90, np.float32))
    got = fast_kept(x, typical_p=0.4)
    assert not got[0] and got[1:].all()
    # min_tokens_to_keep protects the most typical tokens there, not the most likely.
    got = fast_kept(x, typical_p=0.0, min_tokens_to_keep=2)
    assert not got[0]


def test_min_tokens_to_keep_per_row():
    x = rows(3)
    m = np.resize(np.array([1, 2, 3, 7, V, V + 50], np.int32), B)
    kw = dict(top_k=1, top_p=0.0, min_p=1.0, typical_p=0.0, epsilon_cutoff=1.0, eta_cutoff=1.0)
    got = kept(fast(x, traced(**kw, min_tokens_to_keep=m)))
    # Typical-p keeps its m most typical, then epsilon and eta keep the m most likely of
    # those: m tokens in all, or all of them where m exceeds the vocabulary.
    np.testing.assert_array_equal(got.sum(-1), np.minimum(m, V))
    np.testing.assert_array_equal(got, ref_rows(x, **kw, min_tokens_to_keep=m)[0])


def test_never_empty_and_edge_rows():
    x = np.array(
        [
            [0.0, 1.0, 2.0, -np.inf],
            [-np.inf, -np.inf, 3.0, -np.inf],  # one finite token
            [5.0, 5.0, 5.0, 5.0],  # uniform: every token equally typical
            [np.nan, 1.0, 0.0, 0.0],  # NaN stays loud
            [-np.inf] * 4,  # nothing to draw
        ],
        np.float32,
    )
    z = np.asarray(fast(padded(x), traced(typical_p=0.0, epsilon_cutoff=1.0, eta_cutoff=1.0)))
    np.testing.assert_array_equal(kept(z[:3]).sum(-1), [1, 1, 4])
    assert np.isnan(z[3]).all() and not kept(z[4]).any()


# ---------------------------------------------------------------------------------------
# penalties


def test_penalties_match_float64_reference_with_padding_and_repeats():
    rng = np.random.default_rng(4)
    x = rows(5)
    x[0, :3] = [-np.inf, 0.0, -0.0]  # -inf stays -inf
    # Repeats (counted once by repetition and presence, each time by frequency) and padding
    # on both sides of the vocabulary: -1 must not penalise token V - 1, nor V token 0.
    prev = rng.integers(-1, V + 1, size=(B, L)).astype(np.int32)
    prev[0, :5] = [0, 1, 2, 2, 2]
    r = rng.choice(np.float32([1.3, 0.7, 1.0, 2.0, 0.5]), B)
    pres = rng.uniform(-2, 2, B).astype(np.float32)
    freq = rng.uniform(-2, 2, B).astype(np.float32)
    kn = traced(
        repetition_penalty=r, presence_penalty=pres, frequency_penalty=freq, prev_tokens=prev
    )
    got = np.asarray(fast(x, kn))
    want = np.stack(
        [
            ref_penalised(x[i], prev[i], float(r[i]), float(pres[i]), float(freq[i]))
            for i in range(B)
        ]
    )
    np.testing.assert_array_equal(kept(got), kept(want))
    fin = kept(want)
    # Logits near 0 after subtracting penalties keep the absolute error of the terms (~10).
    np.testing.assert_allclose(got[fin], want[fin], rtol=tol(np.float32), atol=1e-5)
    # The oracle counts with a one-hot sum: the same values.
    ref = np.asarray(oracle(x, kn))
    np.testing.assert_array_equal(kept(ref), kept(got))
    np.testing.assert_allclose(ref[fin], got[fin], rtol=tol(np.float32), atol=1e-5)


def test_penalty_applies_before_temperature_and_to_greedy_rows():
    x = padded([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    prev = np.resize(np.array([[0, 0, -1] * 6, [-1] * 18])[:, :L], (B, L))
    greedy = fast_kept(x, temperature=0.0, repetition_penalty=1.3, prev_tokens=prev)
    np.testing.assert_array_equal(np.argmax(greedy[:2], -1), [1, 0])  # 2 / 1.3 < 1.9
    z = np.asarray(fast(x, traced(temperature=0.5, presence_penalty=1.0, prev_tokens=prev)))
    np.testing.assert_allclose(z[0, :3], [2.0, 3.8, 0.0])  # (2 - 1) / 0.5 = 2


def test_prev_tokens_broadcast_and_axis():
    x = rows(6)
    prev = np.resize(np.array([1, 4, 4, -1], np.int32), L)
    kn = traced(frequency_penalty=0.5)
    a = fast(x, {**kn, "prev_tokens": prev})  # one row of ids for every row
    np.testing.assert_array_equal(a, fast(x, {**kn, "prev_tokens": np.tile(prev, (B, 1))}))
    c = filter_logits(x.T, **{**kn, "prev_tokens": prev}, axis=0)
    np.testing.assert_array_equal(np.asarray(c).T, a)
    # Without a penalty prev_tokens is not read.
    np.testing.assert_array_equal(filter_logits(x, prev_tokens=prev), filter_logits(x))


# ---------------------------------------------------------------------------------------
# traced per-row knobs under jit and vmap; the static top-k sampler


def test_per_row_knobs_under_jit_and_vmap():
    x = rows(7)
    rng = np.random.default_rng(7)
    kn = dict(
        temperature=rng.choice([0.5, 0.8, 1.0, 1.5], B),
        top_k=rng.choice([0, 5, 40], B),
        top_p=rng.choice([1.0, 0.9, 0.5], B),
        typical_p=rng.choice([1.0, 0.95, 0.5, 0.2, 0.0], B),
        epsilon_cutoff=rng.choice([0.0, 1e-3, 0.02], B),
        eta_cutoff=rng.choice([0.0, 3e-3, 0.05], B),
        min_tokens_to_keep=rng.choice([1, 2, 3], B),
        repetition_penalty=rng.choice([1.0, 1.2, 0.8], B),
        presence_penalty=rng.choice([0.0, 0.5, -0.5], B),
        frequency_penalty=rng.choice([0.0, 0.3, -0.2], B),
        prev_tokens=rng.integers(-1, V, size=(B, L)),
    )
    kn = traced(**kn)
    batch = np.asarray(fast(x, kn))
    want, _, margin = ref_rows(x, **{k: np.asarray(v) for k, v in kn.items()})
    ok = usable(margin)
    np.testing.assert_array_equal(kept(batch)[ok], want[ok])
    rowwise = jax.jit(jax.vmap(fast))
    np.testing.assert_array_equal(rowwise(x, kn), batch)
    # A traced min_tokens_to_keep of 0 (invalid, not checked on traced data) counts as 1.
    m = kn["min_tokens_to_keep"]
    np.testing.assert_array_equal(rowwise(x, {**kn, "min_tokens_to_keep": m * (m > 1)}), batch)


def chi_square(counts, probs):
    support = probs > 0
    expected = counts.sum() * probs[support]
    return float(np.sum((counts[support] - expected) ** 2 / expected)), int(support.sum()) - 1


# Upper 1e-6 quantiles of the chi-square distribution (scipy.stats.chi2.isf(1e-6, df)).
CHI2_CRIT = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52, 8: 42.70}

# Row A's 4th value ties with two tokens outside lax.top_k's 4 candidates: its rows take the
# whole-vocabulary draw, where the later filters see every tied token. Row B draws among
# the candidates, where the later filters then run.
ROW_A = [2.0, 1.5, 1.0, 1.0, 1.0, 1.0, 0.0, -0.5, -1.0, -np.inf]
ROW_B = [2.0, 1.5, 1.2, 1.0, 0.4, 0.0, -0.5, -1.0, -2.0, -np.inf]
DRAW_CASES = [
    dict(top_k=4, typical_p=0.5, eta_cutoff=0.1, min_tokens_to_keep=2),
    pytest.param(dict(top_k=9, epsilon_cutoff=0.05, temperature=1.3), marks=SLOW),
    pytest.param(dict(typical_p=0.7, epsilon_cutoff=0.03), marks=SLOW),
    pytest.param(dict(top_k=jnp.asarray(4), typical_p=0.5, eta_cutoff=0.1), marks=SLOW),
]


@pytest.mark.parametrize("kw", DRAW_CASES, ids=str)
def test_empirical_frequencies_match_target(kw):
    n = 20_000
    x = jnp.asarray(np.tile(np.array([ROW_A, ROW_B], np.float32), (n, 1)))
    draws = np.asarray(jax.jit(lambda k, x: sample(k, x, **kw))(jax.random.key(3), x))
    plain = {k: (int(v) if k == "top_k" else v) for k, v in kw.items()}
    for row, got in ((ROW_A, draws[0::2]), (ROW_B, draws[1::2])):
        keep, z, _ = ref_row(np.array(row), **plain)
        probs = np.where(keep, np.exp(z - z[keep].max()), 0.0)
        probs /= probs.sum()
        counts = np.bincount(got, minlength=len(row))
        np.testing.assert_array_equal(counts[probs == 0], 0)
        stat, df = chi_square(counts, probs)
        assert stat < CHI2_CRIT[df], f"chi2 = {stat:.1f} with {df} dof for {kw}, row {row}"


# ---------------------------------------------------------------------------------------
# parity with transformers (skipped where it is not installed)


@pytest.fixture(scope="module")
def hf():
    lp = pytest.importorskip("transformers.generation.logits_process")
    pytest.importorskip("torch")  # (transformers imports it: here only to be explicit)
    return lp


def hf_processors(lp, **kw):
    """The LogitsProcessorList Hugging Face's ``generate`` builds for these settings."""
    kw = {**NEUTRAL, **kw}
    m = kw["min_tokens_to_keep"]
    procs = []
    if kw["repetition_penalty"] != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw["temperature"] != 1.0:
        procs.append(lp.TemperatureLogitsWarper(kw["temperature"]))
    if kw["top_k"]:
        procs.append(lp.TopKLogitsWarper(kw["top_k"], min_tokens_to_keep=m))
    if kw["top_p"] < 1:
        procs.append(lp.TopPLogitsWarper(kw["top_p"], min_tokens_to_keep=m))
    if kw["min_p"] > 0:
        procs.append(lp.MinPLogitsWarper(kw["min_p"], min_tokens_to_keep=m))
    if kw["typical_p"] < 1:
        procs.append(lp.TypicalLogitsWarper(kw["typical_p"], min_tokens_to_keep=m))
    if 0 < kw["epsilon_cutoff"] < 1:
        procs.append(lp.EpsilonLogitsWarper(kw["epsilon_cutoff"], min_tokens_to_keep=m))
    if 0 < kw["eta_cutoff"] < 1:
        procs.append(lp.EtaLogitsWarper(kw["eta_cutoff"], min_tokens_to_keep=m))
    return lp.LogitsProcessorList(procs)


def test_hugging_face_builds_the_documented_order(hf):
    # generate's own list for every setting at once (its private builder, on a stand-in
    # model; skipped if that internal API moves).
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    every = dict(
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, typical_p=0.9, epsilon_cutoff=3e-4,
        eta_cutoff=1e-3, repetition_penalty=1.2,
    )  # fmt: skip
    config = GenerationConfig(do_sample=True, **every)
    model = types.SimpleNamespace(config=types.SimpleNamespace(is_encoder_decoder=False))
    model._merge_criteria_processor_list = lambda default, custom: default
    try:
        built = GenerationMixin._get_logits_processor(
            model, config, input_ids_seq_length=3, logits_processor=hf.LogitsProcessorList()
        )
    except (AttributeError, TypeError) as e:
        pytest.skip(f"transformers' _get_logits_processor changed: {e}")
    assert [type(p).__name__ for p in built] == HF_ORDER
    assert [type(p).__name__ for p in hf_processors(hf, **every)] == HF_ORDER


HF_CASES = [
    dict(typical_p=0.9),
    dict(typical_p=0.2, min_tokens_to_keep=3),
    dict(epsilon_cutoff=3e-3),
    dict(epsilon_cutoff=0.5, min_tokens_to_keep=3),
    dict(eta_cutoff=3e-3),
    dict(eta_cutoff=0.5, min_tokens_to_keep=2),
    dict(top_p=0.3, min_tokens_to_keep=3),
    dict(top_k=2, min_tokens_to_keep=3),
    dict(min_p=0.5, min_tokens_to_keep=3),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(
        repetition_penalty=1.2,
        temperature=0.8,
        top_k=60,
        top_p=0.95,
        min_p=0.01,
        typical_p=0.9,
        epsilon_cutoff=1e-3,
        eta_cutoff=2e-3,
        min_tokens_to_keep=2,
    ),  # fmt: skip
    dict(temperature=1.3, top_p=0.9, typical_p=0.5, eta_cutoff=0.01, min_tokens_to_keep=1),
]


@pytest.mark.parametrize("kw", HF_CASES, ids=str)
def test_matches_transformers(hf, kw):
    import torch

    x = rows(8)
    # Hugging Face drops ids >= V (its padding); ours also drops negative ones.
    prev = np.random.default_rng(8).integers(0, V + 1, size=(B, L))
    with torch.no_grad():
        want = hf_processors(hf, **kw)(torch.from_numpy(prev), torch.from_numpy(x.copy()))
    want = want.numpy()
    ok = usable(ref_rows(x, prev_tokens=prev, **kw)[2])
    got = np.asarray(fast(x, traced(**kw, prev_tokens=prev)))
    np.testing.assert_array_equal(kept(got)[ok], kept(want)[ok])
    both = kept(got) & kept(want)
    # XLA:CPU divides by a per-row value as a product with its reciprocal: an ulp apart.
    np.testing.assert_allclose(got[both], want[both], rtol=tol(np.float32))


def test_greedy_matches_transformers_penalised_argmax(hf):
    import torch

    x = rows(9)
    prev = np.random.default_rng(9).integers(0, V, size=(B, L))
    with torch.no_grad():
        scores = hf_processors(hf, repetition_penalty=1.5)(
            torch.from_numpy(prev), torch.from_numpy(x.copy())
        )
    greedy = kept(fast(x, traced(temperature=0.0, repetition_penalty=1.5, prev_tokens=prev)))
    np.testing.assert_array_equal(np.argmax(greedy, -1), scores.numpy().argmax(-1))


# ---------------------------------------------------------------------------------------
# the oracle on random settings; validation


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    v=st.integers(1, V),
    typical=st.floats(0.0, 1.0),
    eps=st.floats(0.0, 0.3),
    eta=st.floats(0.0, 0.3),
    m=st.integers(1, 5),
    ints=st.booleans(),
)
def test_hypothesis_fast_and_oracle_equal_float64(seed, v, typical, eps, eta, m, ints):
    # Rows of v finite logits (the rest -inf), each with its own knobs around the drawn ones.
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 4, size=(B, V)) if ints else rng.normal(size=(B, V)) * 3
    x = np.where(np.arange(V) < v, x, -np.inf).astype(np.float32)
    kw = dict(
        temperature=rng.choice([0.0, 0.5, 1.0, 2.0], B),
        top_k=rng.choice([0, 1, 7], B),
        top_p=rng.choice([1.0, 0.8, 0.3], B),
        min_p=rng.choice([0.0, 0.1], B),
        typical_p=rng.choice([1.0, typical], B),
        epsilon_cutoff=rng.choice([0.0, eps], B),
        eta_cutoff=rng.choice([0.0, eta], B),
        min_tokens_to_keep=rng.choice([1, m], B),
        repetition_penalty=rng.choice([1.0, 1.3], B),
        presence_penalty=rng.choice([0.0, 0.4], B),
        prev_tokens=rng.integers(-1, V, size=(B, L)),
    )
    kn = traced(**kw)
    want, _, margin = ref_rows(x, **{k: np.asarray(a) for k, a in kn.items()})
    ok = margin > MARGIN
    assume(ok.mean() > 0.5)
    np.testing.assert_array_equal(kept(fast(x, kn))[ok], want[ok])
    np.testing.assert_array_equal(kept(oracle(x, kn))[ok], want[ok])


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(typical_p=1.5), ValueError, r"typical_p must be in \[0, 1\]"),
        (dict(epsilon_cutoff=-0.1), ValueError, r"epsilon_cutoff must be in \[0, 1\]"),
        (dict(eta_cutoff=2.0), ValueError, r"eta_cutoff must be in \[0, 1\]"),
        (dict(typical_p=jnp.ones(3)), ValueError, "typical_p has shape"),
        (dict(eta_cutoff=jnp.array([1, 0])), TypeError, "eta_cutoff must have a floating"),
        (dict(min_tokens_to_keep=0), ValueError, "min_tokens_to_keep must be >= 1"),
        (dict(min_tokens_to_keep=2.0), TypeError, "min_tokens_to_keep must be an int"),
        (dict(min_tokens_to_keep=jnp.array([1, 0])), ValueError, "min_tokens_to_keep must be"),
        (dict(repetition_penalty=1.2), ValueError, "repetition_penalty needs prev_tokens"),
        (dict(frequency_penalty=0.1), ValueError, "frequency_penalty needs prev_tokens"),
        (
            dict(repetition_penalty=0.0, prev_tokens=jnp.zeros((2, 3), jnp.int32)),
            ValueError,
            "repetition_penalty must be > 0",
        ),
        (
            dict(presence_penalty=np.inf, prev_tokens=jnp.zeros((2, 3), jnp.int32)),
            ValueError,
            "presence_penalty must be finite",
        ),
        (
            dict(presence_penalty=0.5, prev_tokens=jnp.zeros((2, 3))),
            TypeError,
            "prev_tokens must have an integer dtype",
        ),
        (
            dict(presence_penalty=0.5, prev_tokens=jnp.zeros((3, 4), jnp.int32)),
            ValueError,
            "prev_tokens's leading axes has shape",
        ),
        (
            dict(presence_penalty=0.5, prev_tokens=jnp.int32(3)),
            ValueError,
            "prev_tokens must have at least one axis",
        ),
    ],
)
def test_validation(kw, err, match):
    with pytest.raises(err, match=match):
        sample(jax.random.key(0), jnp.zeros((2, 5)), **kw)
