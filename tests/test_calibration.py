"""Tests of softjax.calibration against float64 NumPy references of Guo et al. 2017."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import softjax
from softjax import calibration as cal

# ---------------------------------------------------------------------------------------
# float64 references


def ref_conf_correct(logits, labels):
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p.max(-1), (x.argmax(-1) == np.asarray(labels))


def ref_bins(conf, correct, n_bins, w=None):
    """Bins ((m-1)/M, m/M] by exact comparison with m/M (correctly rounded in float64)."""
    w = np.ones(conf.shape) if w is None else np.asarray(w, np.float64)
    edges = np.arange(n_bins + 1) / n_bins
    count, gap = np.zeros(n_bins), np.zeros(n_bins)
    acc, cf = np.zeros(n_bins), np.zeros(n_bins)
    for m in range(n_bins):
        inb = (conf > edges[m]) & (conf <= edges[m + 1])
        count[m] = (w * inb).sum()
        if count[m]:
            acc[m] = (w * inb * correct).sum() / count[m]
            cf[m] = (w * inb * conf).sum() / count[m]
            gap[m] = abs(acc[m] - cf[m])
    return count, cf, acc, gap


def ref_ece(logits, labels, n_bins=15, w=None):
    count, _, _, gap = ref_bins(*ref_conf_correct(logits, labels), n_bins, w)
    return (count * gap).sum() / max(count.sum(), 1e-300) if count.sum() else 0.0


def ref_mce(logits, labels, n_bins=15, w=None):
    count, _, _, gap = ref_bins(*ref_conf_correct(logits, labels), n_bins, w)
    return gap[count > 0].max() if (count > 0).any() else 0.0


def synthetic(seed, n=20_000, v=10, t_true=2.5):
    """Logits ``t_true`` times too confident: labels drawn from softmax(z), logits t * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, v)) * 2.0
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    labels = (p.cumsum(-1) > rng.random((n, 1))).argmax(-1)
    return z * t_true, labels


def ref_fit_temperature(logits, labels):
    """argmin_T mean NLL in float64, by golden-section search on log T."""
    x = np.asarray(logits, np.float64)

    def nll(log_t):
        z = x / np.exp(log_t)
        m = z.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(z - m).sum(-1))
        return np.mean(lse - z[np.arange(len(z)), labels])

    a, b = np.log(1e-2), np.log(1e2)
    r = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        c, d = b - r * (b - a), a + r * (b - a)
        a, b = (a, d) if nll(c) < nll(d) else (c, b)
    return np.exp((a + b) / 2)


# ---------------------------------------------------------------------------------------


@pytest.mark.x64
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_mce_match_reference(dtype, n_bins):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(500, 7)) * 3, dtype)
    y = rng.integers(0, 7, 500)
    x64 = np.asarray(x if dtype == jnp.float64 else x.astype(jnp.float32), np.float64)
    rtol = 1e-5 if dtype != jnp.float64 else 1e-12
    np.testing.assert_allclose(
        cal.expected_calibration_error(x, y, n_bins=n_bins), ref_ece(x64, y, n_bins), rtol=rtol
    )
    np.testing.assert_allclose(
        cal.maximum_calibration_error(x, y, n_bins=n_bins), ref_mce(x64, y, n_bins), rtol=rtol
    )


@pytest.mark.x64
def test_bin_statistics_and_known_value():
    # Confidences 0.9 (right), 0.8 (right), 0.6 (wrong), 0.7 (wrong); two bins (0, .5], (.5, 1].
    conf = np.array([0.9, 0.8, 0.6, 0.7])
    logits = np.stack([np.log(conf), np.log(1 - conf)], -1)
    labels = np.array([0, 0, 1, 1])
    count, mean_conf, acc = cal.bin_statistics(logits, labels, n_bins=2)
    np.testing.assert_allclose(count, [0, 4])
    np.testing.assert_allclose(mean_conf, [0, 0.75], rtol=1e-6)
    np.testing.assert_allclose(acc, [0, 0.5])
    np.testing.assert_allclose(cal.expected_calibration_error(logits, labels, n_bins=2), 0.25)
    # Four bins: (0.5, 0.75] holds 0.6 and 0.7 (both wrong), (0.75, 1] 0.8 and 0.9 (right).
    np.testing.assert_allclose(
        cal.expected_calibration_error(logits, labels, n_bins=4), (0.65 * 2 + 0.15 * 2) / 4
    )
    np.testing.assert_allclose(cal.maximum_calibration_error(logits, labels, n_bins=4), 0.65)


def test_bins_are_closed_on_the_right():
    # Confidence exactly 0.5 belongs to (0.25, 0.5] with 4 bins, and exactly 1.0 to the last.
    logits = jnp.array([[0.0, 0.0], [0.0, -jnp.inf]])
    count, _, _ = cal.bin_statistics(logits, jnp.array([0, 0]), n_bins=4)
    np.testing.assert_array_equal(count, [0, 1, 0, 1])
    # float32(0.2) > 0.2, so it belongs to (0.2, 0.4]: the edge is the float just below.
    edges = cal._inner_edges(5, np.float32)
    assert edges[0] < np.float32(0.2) and edges[0] == np.nextafter(np.float32(0.2), 0)
    edges = cal._inner_edges(4, np.float32)
    np.testing.assert_array_equal(edges, [0.25, 0.5, 0.75])


def test_where_equals_filtering_and_empty_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)) * 2
    y = rng.integers(0, 5, 300)
    w = rng.random(300) > 0.5
    for fn in (cal.expected_calibration_error, cal.maximum_calibration_error):
        np.testing.assert_allclose(fn(x, y, where=w), fn(x[w], y[w]), rtol=1e-12)
        assert float(fn(x, y, where=np.zeros(300, bool))) == 0.0
    t_all = cal.fit_temperature(x[w], y[w])
    np.testing.assert_allclose(cal.fit_temperature(x, y, where=w), t_all, rtol=1e-5)
    assert float(cal.fit_temperature(x, y, where=np.zeros(300, bool))) == 1.0


@pytest.mark.x64
def test_batch_dims_and_jit():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 50, 6))
    y = rng.integers(0, 6, (4, 50))
    ece = jax.jit(cal.expected_calibration_error)(x, y)
    np.testing.assert_allclose(ece, ref_ece(x.reshape(200, 6), y.reshape(200)), rtol=1e-12)
    t = jax.jit(cal.fit_temperature)(jnp.asarray(x, jnp.float32), y)
    assert t.dtype == jnp.float32 and t.shape == ()


def test_fit_temperature_recovers_known_temperature():
    logits, labels = synthetic(0)
    t = cal.fit_temperature(jnp.asarray(logits, jnp.float32), labels)
    assert t.dtype == jnp.float32 and t.shape == ()
    np.testing.assert_allclose(float(t), 2.5, rtol=0.02)
    # ...and it is the float64 optimum of the same data to float32 precision.
    np.testing.assert_allclose(float(t), ref_fit_temperature(logits, labels), rtol=2e-5)
    before = cal.expected_calibration_error(logits, labels)
    after = cal.expected_calibration_error(logits / float(t), labels)
    assert float(before) > 0.15 and float(after) < 0.02


def test_fit_temperature_underconfident_and_bf16():
    logits, labels = synthetic(1, n=5000, t_true=0.5)
    t_ref = ref_fit_temperature(logits, labels)
    np.testing.assert_allclose(float(cal.fit_temperature(logits, labels)), t_ref, rtol=1e-6)
    xb = jnp.asarray(logits, jnp.bfloat16)
    t_ref_b = ref_fit_temperature(np.asarray(xb.astype(jnp.float32), np.float64), labels)
    np.testing.assert_allclose(float(cal.fit_temperature(xb, labels)), t_ref_b, rtol=2e-5)


def test_fit_temperature_with_masked_classes():
    logits, labels = synthetic(2, n=3000, v=6)
    logits = logits.copy()
    logits[:, -1] = -np.inf  # a class never predicted; labels never point at it
    labels = np.where(labels == 5, 0, labels)
    t = float(cal.fit_temperature(logits, labels))
    assert np.isfinite(t)
    np.testing.assert_allclose(t, ref_fit_temperature(logits[:, :5], labels), rtol=2e-5)


def test_reliability_diagram_draws_bars_gap_and_ece():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logits, labels = synthetic(3, n=2000)
    ax = cal.reliability_diagram(logits, labels, n_bins=10)
    labels_text = [t.get_text() for t in ax.get_legend().get_texts()]
    ece = float(cal.expected_calibration_error(logits, labels, n_bins=10))
    assert any(f"{100 * ece:.2f}%" in s and "ECE" in s for s in labels_text)
    count = np.asarray(cal.bin_statistics(logits, labels, n_bins=10)[0])
    assert len(ax.patches) == 2 * int((count > 0).sum())
    # Each non-empty bin's sample count is written on its bar (and nothing else is).
    written = sorted(int(t.get_text()) for t in ax.texts)
    assert written == sorted(int(n) for n in count[count > 0]) and sum(written) == 2000
    bare = cal.reliability_diagram(logits, labels, n_bins=10, show_counts=False)
    assert not bare.texts
    fig, ax2 = plt.subplots()
    assert cal.reliability_diagram(logits, labels, ax=ax2) is ax2
    plt.close("all")


def test_validation():
    assert softjax.calibration is cal
    x, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match=r"labels has shape \(5,\) but logits"):
        cal.expected_calibration_error(x, jnp.zeros(5, jnp.int32))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        cal.fit_temperature(x, jnp.zeros(4))
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        cal.maximum_calibration_error(x, y, n_bins=0)
    with pytest.raises(ValueError, match="where has shape"):
        cal.expected_calibration_error(x, y, where=jnp.ones(3, bool))


@pytest.mark.x64
@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.sampled_from([1, 7, 64]),
    n_bins=st.sampled_from([1, 3, 15]),
    scale=st.floats(0.1, 20),
)
def test_hypothesis_ece_bounds_and_reference(seed, n, n_bins, scale):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)) * scale
    y = rng.integers(0, 4, n)
    ece = float(cal.expected_calibration_error(x, y, n_bins=n_bins))
    mce = float(cal.maximum_calibration_error(x, y, n_bins=n_bins))
    assert 0 <= ece <= mce + 1e-12 <= 1 + 1e-12
    np.testing.assert_allclose(ece, ref_ece(x, y, n_bins), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(mce, ref_mce(x, y, n_bins), rtol=1e-10, atol=1e-15)
