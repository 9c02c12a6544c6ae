"""Every edge case a user can reach: the right answer, NaN exactly where documented, or a
clear error at trace time. One test per decision of the README's edge-case table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol

import softjax as sj
from softjax import calibration as cal

INF = float("inf")
INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


# ---------------------------------------------------------------------------------------
# Labels of every integer dtype index the classes exactly (no wrap-around)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_cross_entropy_labels_of_every_integer_dtype(dtype):
    v = 300  # more classes than a uint8 (or int8) can count
    logits = jax.random.normal(jax.random.key(0), (3, v))
    labels = np.array([5, 120, 0])
    ce = lambda y: jax.value_and_grad(  # noqa: E731
        lambda z: sj.cross_entropy(z, y, reduction="sum")
    )(logits)
    ref_value, ref_grad = ce(labels)
    value, grad = ce(labels.astype(dtype))
    np.testing.assert_array_equal(value, ref_value)
    np.testing.assert_array_equal(grad, ref_grad)
    # Exactly one negative gradient entry per row: the target class.
    np.testing.assert_array_equal(np.argwhere(np.asarray(grad) < -0.5)[:, 1], labels)


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_linear_cross_entropy_labels_of_every_integer_dtype(dtype):
    x = jax.random.normal(jax.random.key(1), (3, 8))
    w = jax.random.normal(jax.random.key(2), (300, 8))
    labels = np.array([5, 120, 261])
    f = lambda y: jax.value_and_grad(  # noqa: E731
        lambda x: sj.linear_cross_entropy(x, w, y, reduction="sum")
    )(x)
    ref_value, ref_grad = f(labels)
    value, grad = f(labels.astype(dtype) if np.iinfo(dtype).max >= 261 else labels % 100)
    if np.iinfo(dtype).max >= 261:
        np.testing.assert_array_equal(value, ref_value)
        np.testing.assert_array_equal(grad, ref_grad)
    else:
        np.testing.assert_array_equal(value, f(labels % 100)[0])


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_calibration_labels_of_every_integer_dtype(dtype):
    logits = jax.random.normal(jax.random.key(3), (40, 300)) * 3
    labels = np.asarray(jnp.argmax(logits, -1)) % 128  # fits every dtype
    labels[::3] = 5
    for fn in (cal.expected_calibration_error, cal.maximum_calibration_error, cal.fit_temperature):
        np.testing.assert_array_equal(fn(logits, labels.astype(dtype)), fn(logits, labels))


@pytest.mark.x64
def test_labels_beyond_int32_stay_out_of_range():
    logits = jnp.zeros((2, 4))
    labels = np.array([2**40, 1], np.int64)
    out = sj.cross_entropy(logits, labels, reduction="none")
    assert np.isnan(out[0]) and np.isfinite(out[1])
    big = np.array([2**32 - 1, 1], np.uint32)  # would be -1 after a plain int32 cast
    assert np.isnan(sj.cross_entropy(logits, big, reduction="none", ignore_index=-1)[0])


# ---------------------------------------------------------------------------------------
# Out-of-range labels are loud everywhere


@pytest.mark.parametrize("bad", [4, 100, -1])
def test_calibration_out_of_range_label_is_nan(bad):
    logits = jax.random.normal(jax.random.key(4), (50, 4)) * 3
    labels = jax.random.randint(jax.random.key(5), (50,), 0, 4).at[0].set(bad)
    assert np.isnan(cal.fit_temperature(logits, labels))
    assert np.isnan(cal.expected_calibration_error(logits, labels))
    assert np.isnan(cal.maximum_calibration_error(logits, labels))
    assert np.all(np.isnan(np.asarray(cal.bin_statistics(logits, labels)[0])))
    # Left out by where, the bad sample is not counted, and the fit is that of the rest.
    where = jnp.arange(50) != 0
    np.testing.assert_allclose(
        cal.fit_temperature(logits, labels, where=where),
        cal.fit_temperature(logits[1:], labels[1:]),
        rtol=tol(jnp.float32),
    )


# ---------------------------------------------------------------------------------------
# Temperatures at the edges of the float range


def test_huge_logits_and_huge_temperature_do_not_overflow():
    x = jnp.array([3e38, -3e38], jnp.float32)
    expect = np.exp([0.0, -6.0]) / np.exp([0.0, -6.0]).sum()
    np.testing.assert_allclose(sj.softmax(x, temperature=1e38), expect, rtol=tol(jnp.float32))
    np.testing.assert_allclose(
        sj.log_softmax(x, temperature=1e38), np.log(expect), rtol=tol(jnp.float32)
    )


@pytest.mark.parametrize("t", [1e-40, 1e-50, 0.0])
def test_temperature_below_the_float32_range_is_the_argmax_limit(t):
    x = jnp.array([1.0, 2.0, 2.0, -jnp.inf], jnp.float32)
    if t == 0.0 or np.float32(t) == 0:
        # A concrete temperature must be > 0 in the compute dtype; a traced one may reach 0.
        with pytest.raises(ValueError, match="temperature must be > 0"):
            sj.softmax(x, temperature=jnp.float32(t))
    if t != 0.0:
        np.testing.assert_array_equal(sj.softmax(x, temperature=t), [0, 0.5, 0.5, 0])
    traced = jnp.float32(t)
    soft = jax.jit(lambda x, t: sj.softmax(x, temperature=t))
    log_soft = jax.jit(lambda x, t: sj.log_softmax(x, temperature=t))
    np.testing.assert_array_equal(soft(x, traced), [0, 0.5, 0.5, 0])
    np.testing.assert_array_equal(log_soft(x[:2], traced), [-np.inf, 0.0])
    grad = jax.jit(jax.grad(lambda x, t: sj.softmax(x, temperature=t)[1]))(x[:2], traced)
    np.testing.assert_array_equal(grad, [0.0, 0.0])


# ---------------------------------------------------------------------------------------
# +inf: the soft-cap and the logits


def test_infinite_softcap_means_no_cap():
    logits = jax.random.normal(jax.random.key(6), (4, 7))
    labels = jnp.array([0, 3, 6, 1])
    for cap in (INF, np.float32(np.inf), np.inf):
        np.testing.assert_array_equal(
            sj.cross_entropy(logits, labels, logit_softcap=cap), sj.cross_entropy(logits, labels)
        )
    q = jax.random.normal(jax.random.key(7), (1, 5, 2, 8))
    np.testing.assert_array_equal(
        sj.dot_product_attention(q, q, q, logit_softcap=INF), sj.dot_product_attention(q, q, q)
    )
    x, w = logits[:, :4], jax.random.normal(jax.random.key(8), (7, 4))
    np.testing.assert_array_equal(
        sj.linear_cross_entropy(x, w, labels, logit_softcap=INF),
        sj.linear_cross_entropy(x, w, labels),
    )


def test_positive_infinity_logits_take_the_mass():
    x = jnp.array([[1.0, INF, 0.0], [INF, INF, -INF], [-INF, 2.0, INF]])
    p = np.array([[0, 1, 0], [0.5, 0.5, 0], [0, 0, 1]])
    np.testing.assert_array_equal(sj.softmax(x), p)
    np.testing.assert_array_equal(sj.logsumexp(x, axis=-1), [INF, INF, INF])
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(sj.logsumexp(x, axis=-1)))(x), p)
    with np.errstate(divide="ignore"):
        log_p = np.log(p)
    np.testing.assert_allclose(
        sj.log_softmax(x), log_p, rtol=tol(jnp.float32), atol=tol(jnp.float32)
    )
    np.testing.assert_array_equal(sj.sparsemax(x), p)
    np.testing.assert_allclose(sj.entmax15(x), p, rtol=tol(jnp.float32))
    # The loss: 0 for the +inf class (log 2 for two tied), +inf for any other.
    losses = sj.cross_entropy(x, jnp.array([1, 0, 0]), reduction="none")
    np.testing.assert_allclose(losses, [0.0, np.log(2), INF], rtol=tol(jnp.float32))
    # Full smoothing puts no weight on the label itself: 0 * inf must not turn into NaN.
    full = sj.cross_entropy(x, jnp.array([1, 0, 0]), label_smoothing=1.0, reduction="none")
    np.testing.assert_array_equal(full, [INF, INF, INF])
    grad = jax.grad(lambda x: sj.cross_entropy(x, jnp.array([1, 0, 2]), reduction="sum"))(x)
    np.testing.assert_allclose(grad, p - np.eye(3)[[1, 0, 2]], atol=tol(jnp.float32))
    # A NaN still wins: loud.
    assert np.all(np.isnan(sj.softmax(jnp.array([INF, jnp.nan]))))


def test_binary_cross_entropy_infinite_logits_on_the_right_side_cost_nothing():
    out = sj.binary_cross_entropy(jnp.array([INF, -INF]), jnp.array([1.0, 0.0]), reduction="none")
    np.testing.assert_array_equal(out, [0.0, 0.0])
    grad = jax.grad(lambda x: sj.binary_cross_entropy(x, jnp.array([1.0, 0.0])))(
        jnp.array([INF, -INF])
    )
    np.testing.assert_array_equal(grad, [0.0, 0.0])
    wrong = sj.binary_cross_entropy(jnp.array([-INF, INF]), jnp.array([1.0, 0.0]), reduction="none")
    np.testing.assert_array_equal(wrong, [INF, INF])


# ---------------------------------------------------------------------------------------
# Zero-size axes


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, sj.sparsemax, sj.entmax15])
def test_row_functions_on_empty_axes(fn):
    assert fn(jnp.zeros((0, 3))).shape == (0, 3)
    assert fn(jnp.zeros((2, 0))).shape == (2, 0)
    assert jax.grad(lambda x: jnp.sum(fn(x)))(jnp.zeros((0, 3))).shape == (0, 3)


def test_logsumexp_of_nothing_is_minus_infinity():
    np.testing.assert_array_equal(sj.logsumexp(jnp.zeros((2, 0)), axis=-1), [-INF, -INF])
    assert sj.logsumexp(jnp.zeros((0, 3)), axis=-1).shape == (0,)
    np.testing.assert_array_equal(sj.logsumexp(jnp.zeros((0,)), where=jnp.zeros((0,), bool)), -INF)
    grad = jax.grad(lambda x: jnp.sum(sj.logsumexp(x, axis=-1)))
    np.testing.assert_array_equal(grad(jnp.zeros((2, 0))), jnp.zeros((2, 0)))


def test_losses_and_metrics_on_an_empty_batch():
    empty, labels = jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32)
    assert float(sj.cross_entropy(empty, labels)) == 0.0
    assert float(cal.expected_calibration_error(empty, labels)) == 0.0
    assert float(cal.maximum_calibration_error(empty, labels)) == 0.0
    assert float(cal.fit_temperature(empty, labels)) == 1.0
    assert sj.sample(jax.random.key(0), empty).shape == (0,)


def test_an_empty_class_axis_is_refused_where_a_label_is_needed():
    logits, labels = jnp.zeros((2, 0)), jnp.zeros((2,), jnp.int32)
    for fn in (sj.cross_entropy, cal.expected_calibration_error, cal.fit_temperature):
        with pytest.raises(ValueError, match=r"logits has shape \(2, 0\), with no class"):
            fn(logits, labels)
    # Nothing to draw from: V (here 0), as for a row with no finite logit.
    np.testing.assert_array_equal(sj.sample(jax.random.key(0), logits), [0, 0])
    np.testing.assert_array_equal(sj.sample(jax.random.key(0), logits, top_k=2), [0, 0])


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_attention_with_nothing_to_attend_to_or_no_query(impl):
    q = jax.random.normal(jax.random.key(9), (1, 4, 2, 8))
    empty = jnp.zeros((1, 0, 2, 8))
    out, lse = sj.dot_product_attention(q, empty, empty, return_lse=True, implementation=impl)
    np.testing.assert_array_equal(out, jnp.zeros_like(q))
    np.testing.assert_array_equal(lse, jnp.full((1, 4, 2), -INF))
    dq = jax.grad(lambda q: jnp.sum(sj.dot_product_attention(q, empty, empty, implementation=impl)))
    np.testing.assert_array_equal(dq(q), jnp.zeros_like(q))
    assert sj.dot_product_attention(empty, q, q, implementation=impl).shape == (1, 0, 2, 8)


# ---------------------------------------------------------------------------------------
# Options as NumPy / JAX scalars, and wrong types named


def test_attention_accepts_numpy_and_jax_scalars():
    q = jax.random.normal(jax.random.key(10), (1, 16, 2, 8))
    ref = sj.dot_product_attention(
        q, q, q, logit_softcap=30.0, local_window_size=3, block_q=8, block_k=8,
        implementation="chunked",
    )  # fmt: skip
    for cap, win, block in [(np.float32(30.0), np.int64(3), np.int64(8)),
                            (jnp.float32(30.0), (np.int32(3), 3), jnp.int32(8))]:  # fmt: skip
        out = sj.dot_product_attention(
            q, q, q, logit_softcap=cap, local_window_size=win, block_q=block, block_k=block,
            implementation="chunked",
        )  # fmt: skip
        np.testing.assert_allclose(out, ref, rtol=tol(jnp.float32))
    key = jax.random.key(0)
    a = sj.dot_product_attention(q, q, q, dropout_rate=np.float32(0.25), dropout_rng=key)
    b = sj.dot_product_attention(q, q, q, dropout_rate=0.25, dropout_rng=key)
    np.testing.assert_allclose(a, b, rtol=tol(jnp.float32))


def test_wrong_option_types_are_named():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(TypeError, match="axis must be an int or a tuple of ints, got 1.0"):
        sj.softmax(jnp.ones((2, 3)), axis=1.0)
    with pytest.raises(TypeError, match="axis must be an int or a tuple of ints"):
        sj.logsumexp(jnp.ones((2, 3)), axis="last")
    with pytest.raises(TypeError, match="local_window_size must be an int or a pair of ints"):
        sj.dot_product_attention(q, q, q, local_window_size=1.5)
    with pytest.raises(TypeError, match="block_q must be an int"):
        sj.dot_product_attention(q, q, q, block_q=8.0)
    with pytest.raises(TypeError, match="logit_softcap must be a number"):
        sj.dot_product_attention(q, q, q, logit_softcap="30")
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        sj.cross_entropy(jnp.ones((1, 3)), jnp.array([0]), logit_softcap=-1.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        sj.cross_entropy(jnp.ones((1, 3)), jnp.array([0]), ignore_index=1.5)


# ---------------------------------------------------------------------------------------
# jax.debug_infs stays quiet where nothing is infinite


@pytest.mark.x64
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_masked_xla_attention_makes_no_infinity(dtype):
    q = jnp.zeros((1, 5, 6, 8), dtype)
    k = jnp.zeros((1, 7, 3, 8), dtype)
    mask = np.arange(7) <= 3
    ref = sj.dot_product_attention(q, k, k, mask=mask, implementation="xla")
    with jax.debug_infs(True):
        out = sj.dot_product_attention(q, k, k, mask=mask, implementation="xla")
        causal = sj.dot_product_attention(q, q, q, is_causal=True, implementation="xla")
    np.testing.assert_array_equal(out, ref)
    assert np.all(np.isfinite(causal))


# ---------------------------------------------------------------------------------------
# Forward-mode differentiation of the losses


@pytest.mark.x64
def test_losses_support_forward_mode():
    logits = jax.random.normal(jax.random.key(11), (4, 6), jnp.float64)
    labels = jnp.array([0, 5, 2, 3])
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(12), (4, 6), jnp.float64))

    def plain(z, y):
        logp = jax.nn.log_softmax(z)
        if y.ndim == 1:
            y = jax.nn.one_hot(y, 6, dtype=z.dtype)
        y = y * 0.9 + 0.1 / 6
        return jnp.mean(-jnp.sum(y * logp, -1) + 1e-3 * jax.nn.logsumexp(z, axis=-1) ** 2)

    for y in (labels, probs):
        f = lambda z: sj.cross_entropy(z, y, label_smoothing=0.1, z_loss=1e-3)  # noqa: E731
        ref = lambda z: plain(z, y)  # noqa: E731
        fwd, rev, hess = (jax.jit(d(f))(logits) for d in (jax.jacfwd, jax.jacrev, jax.hessian))
        np.testing.assert_allclose(fwd, rev, rtol=1e-12)
        np.testing.assert_allclose(fwd, jax.jit(jax.grad(ref))(logits), rtol=1e-12)
        np.testing.assert_allclose(hess, jax.jit(jax.hessian(ref))(logits), rtol=1e-10, atol=1e-14)
    # Soft labels are differentiable too, in both modes.
    g = lambda y: sj.cross_entropy(logits, y)  # noqa: E731
    np.testing.assert_allclose(jax.jacfwd(g)(probs), jax.grad(g)(probs), rtol=1e-12)
    b = lambda z: sj.binary_cross_entropy(z, (logits > 0).astype(z.dtype))  # noqa: E731
    np.testing.assert_allclose(jax.jacfwd(b)(logits), jax.grad(b)(logits), rtol=1e-12)


def test_linear_cross_entropy_forward_mode_is_refused():
    x, w = jnp.ones((2, 4)), jnp.ones((5, 4))
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda x: sj.linear_cross_entropy(x, w, jnp.array([0, 1])), (x,), (x,))
