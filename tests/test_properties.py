"""Property-based contracts of every public function (hypothesis).

Each test draws a dtype, a shape (zero-size axes included), a mask, option values at and
near their boundaries, and entries mixing ordinary values with ``±inf``, NaN, subnormals and
huge magnitudes, then checks the documented contract against a float64 NumPy reference
written here: the right answer, NaN exactly where documented, or an error at trace time.
Examples are derandomised so that CI is reproducible; shapes are few, to bound compilation.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import SLACK, loss_atol, slack, tol
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softjax as sj
from softjax import calibration as cal

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DTYPES = st.sampled_from([np.float32, np.float64, jnp.bfloat16])
F32_TINY = float(np.finfo(np.float32).tiny)
SPECIAL = [np.inf, -np.inf, np.nan, 1e-42, -1e-42, 3e38, -3e38, 0.0]


@st.composite
def rows(draw, max_rows=3, max_cols=5, special=True):
    """A float64 array [R, C] (R, C may be 0) with some special entries, and a dtype."""
    r = draw(st.integers(0, max_rows))
    c = draw(st.integers(0, max_cols))
    x = np.asarray(draw(st.lists(st.floats(-30, 30), min_size=r * c, max_size=r * c)))
    x = x.reshape(r, c)
    if special and x.size:
        for _ in range(draw(st.integers(0, 3))):
            i, j = draw(st.integers(0, r - 1)), draw(st.integers(0, c - 1))
            x[i, j] = draw(st.sampled_from(SPECIAL))
    return x, draw(DTYPES)


def masks(draw, shape):
    if not draw(st.booleans()):
        return None
    bits = draw(st.lists(st.booleans(), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.asarray(bits, bool).reshape(shape)


def as_input(x, dtype):
    """The array softjax sees, and the float64 values it holds (rounded to ``dtype``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        arr = jnp.asarray(x).astype(dtype)
    return arr, np.asarray(arr.astype(np.float64))


def flush(x, dtype):
    """float64 values as float32 computes them: subnormal inputs are flushed to zero."""
    x = np.array(x, np.float64)
    if np.dtype(dtype) != np.float64:
        x[np.abs(x) < F32_TINY] = 0.0
    return x


def ref_softmax(x, where, t):
    """float64 softmax by the documented rules (+inf rows share, empty rows 0, NaN loud)."""
    x = np.where(where, x, -np.inf) if where is not None else x
    out = np.zeros_like(x)
    for i, row in enumerate(x):
        if np.isnan(row).any():
            out[i] = np.nan
        elif (row == np.inf).any():
            out[i] = (row == np.inf) / (row == np.inf).sum()
        elif (row > -np.inf).any():
            m = row.max()
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                z = (row / 2 - m / 2) / (t / 2) if t > 0 else np.where(row == m, 0.0, -np.inf)
            e = np.exp(z)
            out[i] = e / e.sum()
    return out


def close(actual, expected, dtype, scale=8, atol=2 * F32_TINY):
    """Equal NaN pattern, equal infinities, finite values within the dtype's tolerance."""
    a = np.asarray(jnp.asarray(actual).astype(np.float64))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(a), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(a), np.isneginf(expected))
    ok = np.isfinite(expected)
    np.testing.assert_allclose(a[ok], expected[ok], rtol=scale * tol(dtype), atol=atol)


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_softmax_log_softmax_logsumexp_contract(data):
    x, dtype = data.draw(rows())
    where = masks(data.draw, x.shape)
    t = data.draw(st.sampled_from([1.0, 0.5, 1e-3, 1e-40, 1e38]))
    arr, x64 = as_input(x, dtype)
    x64 = flush(x64, dtype)
    t64 = float(np.float32(t)) if dtype != np.float64 else t
    t64 = 0.0 if t64 < F32_TINY and dtype != np.float64 else t64
    p = ref_softmax(x64, where, t64)
    close(sj.softmax(arr, where=where, temperature=t), p, dtype)
    if t != 1.0:
        return
    # log p, compared where p is a normal number (below it, both are -inf or tiny).
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    out = np.asarray(sj.log_softmax(arr, where=where).astype(np.float64))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(p))
    assert np.all(out[~np.isnan(out)] <= 0)
    big = p > 1e-30
    np.testing.assert_allclose(
        out[big], logp[big], rtol=slack("chained", dtype), atol=slack("chained", dtype)
    )
    close(sj.logsumexp(arr, where=where, axis=-1), ref_logsumexp(x64, where), dtype)


def ref_logsumexp(x, where):
    """float64 logsumexp by the documented rules: -inf empty, +inf with +inf, NaN loud."""
    x = np.where(where, x, -np.inf) if where is not None else x
    out = np.full(x.shape[0], -np.inf)
    for i, row in enumerate(x):
        if np.isnan(row).any() or (row == np.inf).any():
            out[i] = np.nan if np.isnan(row).any() else np.inf
        elif (row > -np.inf).any():
            m = row.max()
            out[i] = m + np.log(np.sum(np.exp(row - m)))
    return out


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_cross_entropy_contract(data):
    x, dtype = data.draw(rows(max_rows=4, max_cols=4))
    if x.shape[1] == 0:
        return  # refused, tested in test_edge_cases
    n, v = x.shape
    label_dtype = data.draw(st.sampled_from([np.int8, np.uint8, np.int32, np.uint32, np.int64]))
    labels = np.asarray(data.draw(st.lists(st.integers(-1, v), min_size=n, max_size=n)), np.int64)
    if np.iinfo(label_dtype).min == 0:
        labels = np.abs(labels)
    smoothing = data.draw(st.sampled_from([0.0, 0.1, 1.0]))
    z_loss = data.draw(st.sampled_from([0.0, 1e-3]))
    cap = data.draw(st.sampled_from([None, 5.0, np.inf]))
    arr, x64 = as_input(x, dtype)
    out = sj.cross_entropy(arr, labels.astype(label_dtype), ignore_index=-1, reduction="none",
                           label_smoothing=smoothing, z_loss=z_loss, logit_softcap=cap)  # fmt: skip
    assert out.dtype == (np.float64 if dtype == np.float64 else np.float32)
    z = flush(x64, dtype)
    if cap is not None and np.isfinite(cap):
        z = cap * np.tanh(z / cap)
    p = ref_softmax(z, None, 1.0)
    expect = np.zeros(n)
    for i in range(n):
        if labels[i] == -1:
            continue  # ignored: exactly 0
        if labels[i] >= v or np.isnan(p[i]).any():
            expect[i] = np.nan
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            nlp = -np.log(p[i])
        y = np.full(v, smoothing / v)
        y[labels[i]] += 1 - smoothing
        expect[i] = np.sum(np.where(y == 0, 0.0, y * np.where(y == 0, 0.0, nlp)))
        if z_loss:
            lse = ref_logsumexp(z[i : i + 1], None)[0]
            expect[i] += z_loss * lse**2
    cdt = np.float64 if dtype == np.float64 else np.float32
    # The exact loss rounded to the output dtype: beyond its range that is inf (the z-loss
    # of a 3e38 logit is 9e73, an overflow in float32, as in the loss itself).
    with np.errstate(over="ignore"):
        expect = expect.astype(cdt).astype(np.float64)
    atol = loss_atol("composite_loss", cdt, z)
    close(out, expect, cdt, scale=SLACK["composite_loss"], atol=atol)


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_binary_cross_entropy_contract(data):
    x, dtype = data.draw(rows(max_rows=3, max_cols=3))
    t = np.asarray(data.draw(st.lists(st.sampled_from([0.0, 1.0, 0.25]), min_size=x.size,
                                      max_size=x.size))).reshape(x.shape)  # fmt: skip
    where = masks(data.draw, x.shape)
    arr, x64 = as_input(x, dtype)
    z = flush(x64, dtype)
    out = sj.binary_cross_entropy(arr, jnp.asarray(t, dtype), where=where, reduction="none")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_sig = -np.logaddexp(0, -z)
        log_sig_neg = -np.logaddexp(0, z)
        expect = -(np.where(t == 0, 0, t * log_sig) + np.where(t == 1, 0, (1 - t) * log_sig_neg))
    if where is not None:
        expect = np.where(where, expect, 0.0)
    close(out, expect, np.float64 if dtype == np.float64 else np.float32, scale=8)


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_sparsemax_and_entmax_contract(data):
    x, dtype = data.draw(rows(special=False))
    where = masks(data.draw, x.shape)
    arr, x64 = as_input(x, dtype)
    for fn in (sj.sparsemax, sj.entmax15):
        p = np.asarray(fn(arr, where=where).astype(np.float64))
        assert p.shape == x.shape and np.all(p >= 0)
        valid = np.ones(x.shape, bool) if where is None else where
        np.testing.assert_array_equal(p[~valid], 0.0)
        nonempty = valid.any(-1)
        np.testing.assert_allclose(p.sum(-1)[nonempty], 1.0, rtol=slack("row_sum", dtype))
        np.testing.assert_array_equal(p.sum(-1)[~nonempty], 0.0)
        # Order-preserving: a larger valid logit never gets a smaller probability.
        for i in np.nonzero(nonempty)[0]:
            order = np.argsort(x64[i][valid[i]], kind="stable")
            assert np.all(np.diff(p[i][valid[i]][order]) >= -slack("row_sum", dtype))


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_linear_cross_entropy_contract(data):
    n = data.draw(st.integers(0, 4))
    v = data.draw(st.sampled_from([1, 7]))
    dtype = data.draw(st.sampled_from([np.float32, np.float64, jnp.bfloat16]))
    kx, kw = jax.random.split(jax.random.key(data.draw(st.integers(0, 100))))
    x = jax.random.normal(kx, (n, 4), jnp.float64).astype(dtype)
    w = jax.random.normal(kw, (v, 4), jnp.float64).astype(dtype)
    labels = np.asarray(data.draw(st.lists(st.integers(-1, v), min_size=n, max_size=n)), np.int32)
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    cap = data.draw(st.sampled_from([None, 2.0]))
    out = sj.linear_cross_entropy(x, w, labels, ignore_index=-1, reduction=reduction,
                                  logit_softcap=cap)  # fmt: skip
    z = np.asarray(x.astype(np.float64)) @ np.asarray(w.astype(np.float64)).T
    z = z if cap is None else cap * np.tanh(z / cap)
    top = z.max(-1, keepdims=True, initial=-np.inf)
    lse = (top + np.log(np.exp(z - top).sum(-1, keepdims=True)))[:, 0] if n else np.zeros(0)
    rows_ = np.zeros(n)
    for i in range(n):
        if labels[i] == -1:
            continue
        rows_[i] = np.nan if labels[i] >= v else lse[i] - z[i, labels[i]]
    valid = labels != -1
    expect = {"none": rows_, "sum": rows_.sum(),
              "mean": rows_.sum() / valid.sum() if valid.sum() else 0.0}[reduction]  # fmt: skip
    # A loss near 0 is accurate to the rounding of the logits it is computed from.
    cdt = np.float64 if dtype == np.float64 else np.float32
    atol = loss_atol("matmul_loss", cdt, z)
    close(out, np.asarray(expect, np.float64), cdt, scale=SLACK["matmul_loss"], atol=atol)


# The slowest property (each example compiles three attention paths): under `slow`; the
# attention tests compare the paths on fixed cases by default.
@pytest.mark.slow
@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_attention_contract(data):
    t_len, s_len = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 5))
    causal = data.draw(st.booleans())
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    key = jax.random.key(data.draw(st.integers(0, 100)))
    keys = jax.random.split(key, 3)
    q, k, v = (
        jax.random.normal(kk, (1, n, 2, 4), dtype)
        for kk, n in zip(keys, (t_len, s_len, s_len), strict=True)
    )
    mask = masks(data.draw, (t_len, s_len))
    cap = data.draw(st.sampled_from([None, 3.0, np.inf]))
    results = [sj.dot_product_attention(q, k, v, mask=mask, is_causal=causal, logit_softcap=cap,
                                        return_lse=True, implementation=impl)
               for impl in ("xla", "chunked")]  # fmt: skip
    s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), np.asarray(k, np.float64)) / 2
    if cap is not None and np.isfinite(cap):
        s = cap * np.tanh(s / cap)
    ok = np.ones((t_len, s_len), bool) if mask is None else mask.copy()
    if causal:
        ok &= np.arange(s_len)[None, :] <= np.arange(t_len)[:, None]
    s = np.where(ok, s, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.max(s, -1, keepdims=True, initial=-np.inf)
        e = np.exp(s - np.where(np.isfinite(m), m, 0))
        total = e.sum(-1, keepdims=True)
        lse = (np.where(np.isfinite(m), m, 0) + np.log(total))[..., 0]
        p = np.where(total > 0, e / np.where(total > 0, total, 1), 0.0)
    out = np.einsum("bnts,bsnh->btnh", p, np.asarray(v, np.float64))
    for o, lse_out in results:
        close(o, out, dtype, scale=8)
        close(lse_out, np.transpose(lse, (0, 2, 1)), dtype, scale=8)


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_sample_contract(data):
    x, dtype = data.draw(rows(max_rows=3, max_cols=5))
    arr, x64 = as_input(x, dtype)
    top_k = data.draw(st.sampled_from([None, 1, 2]))
    temperature = data.draw(st.sampled_from([0.0, 1.0, 1e-3]))
    tokens = np.asarray(sj.sample(jax.random.key(0), arr, temperature=temperature, top_k=top_k))
    assert tokens.shape == x.shape[:1] and tokens.dtype == np.int32
    for i, row in enumerate(x64):
        drawable = np.isfinite(row).any() or (row == np.inf).any()
        if np.isnan(row).any() or not drawable:
            assert tokens[i] == x.shape[1], (row, tokens[i])  # V: one past the last token
        else:
            assert 0 <= tokens[i] < x.shape[1] and row[tokens[i]] > -np.inf


@pytest.mark.x64
@given(data=st.data())
@SETTINGS
def test_calibration_contract(data):
    x, dtype = data.draw(rows(max_rows=6, max_cols=4, special=False))
    if x.shape[1] == 0:
        return  # refused, tested in test_edge_cases
    n, v = x.shape
    labels = np.asarray(
        data.draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)), np.int64
    )
    bad = n > 0 and data.draw(st.booleans())
    if bad:
        labels[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([-1, v, 1000]))
    arr, _ = as_input(x, dtype)
    ece = float(cal.expected_calibration_error(arr, labels))
    mce = float(cal.maximum_calibration_error(arr, labels))
    t = float(cal.fit_temperature(arr, labels))
    if bad:
        assert np.isnan(ece) and np.isnan(mce) and np.isnan(t)
    else:
        assert 0 <= ece <= mce + 1e-6 <= 1 + 1e-6 and 1e-3 * 0.999 <= t <= 1e3 * 1.001
        if n == 0:
            assert ece == 0 and mce == 0 and t == 1
