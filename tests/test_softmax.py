"""softmax, log_softmax, logsumexp against float64 NumPy references and their guarantees."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import slack, tol, ulp_error
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softjax as sj

# ---------------------------------------------------------------------------------------
# float64 references (NumPy only)


def ref_log_softmax(x, axis=-1, where=None, temperature=1.0):
    """log_softmax in float64 with log1p of the non-maximal terms (accurate near 0)."""
    x = np.asarray(x, np.float64) / np.float64(temperature)
    if where is not None:
        x = np.where(where, x, -np.inf)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - m)
        at_max = x == m
        rest = np.sum(np.where(at_max, 0.0, e), axis=axis, keepdims=True)
        count = np.sum(at_max, axis=axis, keepdims=True)
        log_norm = np.log1p(rest + (count - 1))
        return x - m - np.where(count == 0, 0.0, log_norm)


def ref_softmax(x, axis=-1, where=None, temperature=1.0):
    with np.errstate(invalid="ignore"):
        return np.exp(ref_log_softmax(x, axis, where, temperature))


def ref_logsumexp(x, axis=-1, where=None):
    """max + log1p(sum of the non-maximal terms + ties), in float64."""
    x = np.asarray(x, np.float64)
    if where is not None:
        x = np.where(where, x, -np.inf)
    m = np.max(x, axis=axis, keepdims=True)
    safe_m = np.where(np.isneginf(m), 0.0, m)
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(x - safe_m)
        at_max = x == m
        rest = np.sum(np.where(at_max, 0.0, e), axis=axis, keepdims=True)
        count = np.sum(at_max & np.isfinite(x), axis=axis, keepdims=True)
        lse = np.where(count == 0, -np.inf, safe_m + np.log1p(rest + (count - 1)))
    return np.squeeze(lse, axis)


def logits(shape, scale=1.0, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# ---------------------------------------------------------------------------------------
# Worked numbers


def test_max_shift_stability_example():
    out = sj.softmax(jnp.array([1000.0, 999.0, 998.0], jnp.float32))
    np.testing.assert_allclose(out, [0.6652, 0.2447, 0.0900], atol=5e-5)
    assert out.dtype == jnp.float32


def test_explainer_numbers():
    np.testing.assert_allclose(
        sj.softmax(jnp.array([4.5, -1.2, 0.8])), [0.973, 0.003, 0.024], atol=5e-4
    )
    for margin, p in [(1, 0.731), (2, 0.881), (5, 0.9933), (10, 0.99995)]:
        got = sj.softmax(jnp.array([float(margin), 0.0]))[0]
        np.testing.assert_allclose(got, p, atol=0.5 * 10.0 ** -(len(str(p)) - 2))


@pytest.mark.parametrize(
    "t, expected",
    [
        (0.3, [0.9931, 0.0067, 0.0002]),
        (1.0, [0.7662, 0.1710, 0.0629]),
        # 0.26856 rounds to 0.2686; tables that print 0.2685 truncate.
        (2.0, [0.5685, 0.2686, 0.1629]),
    ],
)
def test_temperature_table(t, expected):
    got = sj.softmax(jnp.array([3.0, 1.5, 0.5]), temperature=t)
    np.testing.assert_allclose(got, expected, atol=5e-5)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_where_is_positional_as_in_jax_nn(name):
    # jax.nn.softmax(x, axis, where): the same call gives the same result here.
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    where = jnp.array([[True, False, True], [True, True, False]])
    ours = getattr(sj, name)(x, -1, where)
    np.testing.assert_array_equal(ours, getattr(sj, name)(x, axis=-1, where=where))
    theirs = getattr(jax.nn, name)(x, -1, where)
    np.testing.assert_allclose(jnp.where(where, ours, 0), jnp.where(where, theirs, 0), rtol=1e-6)


def test_no_overflow_for_any_finite_input():
    big = np.finfo(np.float32).max
    x = jnp.array([big, -big, 0.0, big / 2], jnp.float32)
    for f in (sj.softmax, sj.log_softmax):
        assert np.all(np.isfinite(np.asarray(f(x)) if f is sj.softmax else f(x)[:1]))
    np.testing.assert_allclose(sj.softmax(x), [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(sj.logsumexp(x, axis=-1), big, rtol=1e-7)


@pytest.mark.x64
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("top", [-1e37, -1e38, -3e38, 0.0, 3e38])
def test_minus_inf_entries_drop_out_at_any_shift(top, dtype):
    # A -inf entry contributes exactly nothing, however far the row's maximum is from 0
    # (a floor of shift - 1e30 rounds back to the shift itself below about -8e36).
    x = jnp.asarray([top, -np.inf], dtype)
    np.testing.assert_array_equal(sj.log_softmax(x), [0.0, -np.inf])
    np.testing.assert_array_equal(sj.logsumexp(x), x[0])
    assert float(sj.cross_entropy(x[None], jnp.array([0]))) == 0.0


# ---------------------------------------------------------------------------------------
# Accuracy against float64


@pytest.mark.parametrize("scale", [1.0, 10.0, 30.0, 100.0])
def test_float32_softmax_within_6_ulp(scale):
    x = logits((16, 32768), scale, seed=int(scale))
    err = ulp_error(jax.jit(sj.softmax)(x), ref_softmax(x), np.float32)
    assert err <= 6.0, err


@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0, 30.0])
def test_float32_tempered_softmax_within_6_ulp(scale):
    x = logits((16, 32768), scale, seed=7)
    t = np.float32(0.7)
    got = jax.jit(lambda x: sj.softmax(x, temperature=0.7))(x)
    err = ulp_error(got, ref_softmax(x, temperature=t), np.float32)
    assert err <= 6.0, err


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_float32_log_softmax_within_4_ulp(scale):
    x = logits((16, 4096), scale, seed=3)
    for t in (1.0, 0.7):
        got = jax.jit(lambda x, t=t: sj.log_softmax(x, temperature=t))(x)
        err = ulp_error(got, ref_log_softmax(x, temperature=np.float32(t)), np.float32)
        assert err <= 4.0, (t, err)


def test_dominant_class_log_probability_keeps_relative_accuracy():
    x = jnp.array([0.0, -30.0, -40.0], jnp.float32)
    got = sj.log_softmax(x)
    want = ref_log_softmax(np.asarray(x, np.float64))
    assert got[0] < 0  # jax.nn returns exactly 0.0 here
    np.testing.assert_allclose(got, want, rtol=4 * 2.0**-23)


@pytest.mark.parametrize("top", [1e9, -1e9, 7e8])
def test_dominant_class_log_probability_at_huge_logits(top):
    # Beyond ~2**29 the shift's lift (shift - 32) is not a float: all of it lands in the
    # shift's rounding error, which must scale the sum as exp(-c_lo), not as 1 - c_lo.
    x = jnp.asarray([top, top, top], jnp.float32)
    gap = np.float64(np.spacing(np.float32(abs(top))))
    x = x - jnp.asarray([0.0, gap, 2 * gap], jnp.float32)
    want = -np.log1p(np.exp(-gap) + np.exp(-2 * gap))
    got = sj.log_softmax(x)
    np.testing.assert_allclose(float(got[0]), want, rtol=4 * 2.0**-23)
    loss = sj.cross_entropy(x[None], jnp.array([0]))
    np.testing.assert_allclose(float(loss), -want, rtol=4 * 2.0**-23)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_low_precision_rounded_once_within_1_ulp(dtype, scale):
    x = jnp.asarray(logits((8, 4096), scale, seed=1)).astype(dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    for f, ref in ((sj.softmax, ref_softmax), (sj.log_softmax, ref_log_softmax)):
        out = jax.jit(f)(x)
        assert out.dtype == dtype
        assert ulp_error(out, ref(x64), dtype) <= 1.0
    lse = sj.logsumexp(x, axis=-1)
    assert lse.dtype == dtype
    assert ulp_error(lse, ref_logsumexp(x64), dtype) <= 1.0


@pytest.mark.x64
def test_flat_float16_row_does_not_overflow():
    x = jnp.zeros((65536,), jnp.float16)
    np.testing.assert_allclose(
        sj.logsumexp(x, axis=-1).astype(np.float64), np.log(65536.0), rtol=1e-3
    )
    np.testing.assert_allclose(sj.softmax(x).astype(np.float64), 1 / 65536, rtol=1e-3)


def test_temperature_under_jit_with_huge_finite_logits():
    x = jnp.array([1e10, 0.0, -1e10], jnp.float32)
    out = jax.jit(lambda x: sj.softmax(x, temperature=0.7))(x)
    np.testing.assert_array_equal(out, [1.0, 0.0, 0.0])
    logp = jax.jit(lambda x: sj.log_softmax(x, temperature=0.7))(x)
    assert np.all(np.asarray(logp) <= 0)
    np.testing.assert_allclose(logp, [0.0, -1e10 / 0.7, -2e10 / 0.7], rtol=1e-6)


@given(
    x=hnp.arrays(np.float32, (3, 17), elements=st.floats(-1e4, 1e4, width=32)),
    t=st.floats(0.05, 20.0),
)
@settings(max_examples=40, deadline=None)
def test_log_probabilities_never_positive(x, t):
    out = np.asarray(sj.log_softmax(x, temperature=t))
    assert np.all(out <= 0), out.max()


# ---------------------------------------------------------------------------------------
# Masking and empty rows


def _empty_row_cases():
    x = jnp.array([[1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf], [0.5, -1.0, 2.0]])
    where = jnp.array([[True, True, True], [True, True, True], [False, False, False]])
    return x, where


def test_masked_entries_are_exactly_zero_and_minus_inf():
    x = jnp.array([3.0, 1.0, 100.0, 2.0])
    where = jnp.array([True, True, False, True])
    p = sj.softmax(x, where=where)
    assert p[2] == 0.0
    np.testing.assert_allclose(p, ref_softmax(np.asarray(x), where=np.asarray(where)), rtol=1e-6)
    assert sj.log_softmax(x, where=where)[2] == -jnp.inf
    np.testing.assert_allclose(sj.logsumexp(x, where=where, axis=-1), ref_logsumexp(x, where=where))


@pytest.mark.x64
@pytest.mark.parametrize("transform", ["plain", "jit", "vmap"])
def test_empty_rows_give_zeros_and_minus_inf_never_nan(transform):
    x, where = _empty_row_cases()
    wrap = {"plain": lambda f: f, "jit": jax.jit, "vmap": jax.vmap}[transform]
    p = wrap(lambda x, w: sj.softmax(x, where=w))(x, where)
    logp = wrap(lambda x, w: sj.log_softmax(x, where=w))(x, where)
    lse = wrap(lambda x, w: sj.logsumexp(x, where=w, axis=-1))(x, where)
    np.testing.assert_array_equal(p[1:], 0.0)
    np.testing.assert_array_equal(logp[1:], -np.inf)
    np.testing.assert_array_equal(lse[1:], -np.inf)
    np.testing.assert_allclose(p[0], ref_softmax(np.asarray(x[0])), rtol=1e-12)


@pytest.mark.parametrize("diff", ["grad", "jacfwd", "jacrev"])
def test_empty_rows_have_zero_gradients(diff):
    x, where = _empty_row_cases()
    t = jnp.full((3, 1), 0.8)
    fns = {
        "softmax": lambda x, t: sj.softmax(x, where=where, temperature=t),
        "log_softmax": lambda x, t: jnp.where(
            jnp.isinf(out := sj.log_softmax(x, where=where, temperature=t)), 0.0, out
        ),
        "logsumexp": lambda x, t: jnp.where(
            jnp.isinf(out := sj.logsumexp(x, where=where, axis=-1)), 0.0, out
        ),
    }
    for name, f in fns.items():
        if diff == "grad":
            gx, gt = jax.grad(
                lambda x, t, f=f: jnp.sum(
                    f(x, t) * jnp.arange(1.0, 1 + f(x, t).size).reshape(f(x, t).shape)
                ),
                argnums=(0, 1),
            )(x, t)
        else:
            jac = getattr(jax, diff)(f, argnums=(0, 1))(x, t)
            gx, gt = jac
        gx, gt = np.asarray(gx), np.asarray(gt)
        assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gt)), name
        # grad: the inputs of rows 1 and 2 move nothing. A Jacobian's leading axes are the
        # output's: rows 1 and 2 of the output depend on nothing, and (after the output
        # axes) no output depends on the inputs of rows 1 and 2.
        np.testing.assert_array_equal(gx[1:], 0.0, err_msg=name)
        np.testing.assert_array_equal(gt[1:], 0.0, err_msg=name)
        if diff != "grad":
            inputs_of_empty_rows = (slice(None),) * f(x, t).ndim + (slice(1, None),)
            np.testing.assert_array_equal(gx[inputs_of_empty_rows], 0.0, err_msg=name)
            np.testing.assert_array_equal(gt[inputs_of_empty_rows], 0.0, err_msg=name)


def test_jax_nn_gives_nan_on_an_all_minus_inf_row_and_we_do_not():
    x = jnp.full((4,), -jnp.inf)
    assert np.all(np.isnan(jax.nn.softmax(x)))
    np.testing.assert_array_equal(sj.softmax(x), 0.0)


def test_nan_stays_in_its_row():
    x = jnp.array([[1.0, jnp.nan, 0.0], [1.0, 2.0, 3.0]])
    for f in (sj.softmax, sj.log_softmax):
        out = np.asarray(f(x))
        assert np.all(np.isnan(out[0])), f
        assert np.all(np.isfinite(out[1])), f
    lse = np.asarray(sj.logsumexp(x, axis=-1))
    assert np.isnan(lse[0]) and np.isfinite(lse[1])


@pytest.mark.x64
@given(
    x=hnp.arrays(np.float64, (4, 9), elements=st.floats(-50, 50)),
    where=hnp.arrays(np.bool_, (4, 9)),
)
@settings(max_examples=30, deadline=None)
def test_where_equals_filtering(x, where):
    p = np.asarray(sj.softmax(x, where=where))
    lse = np.asarray(sj.logsumexp(x, where=where, axis=-1))
    for i in range(4):
        kept = x[i][where[i]]
        if kept.size == 0:
            np.testing.assert_array_equal(p[i], 0.0)
            assert lse[i] == -np.inf
            continue
        np.testing.assert_allclose(p[i][where[i]], ref_softmax(kept), rtol=1e-12, atol=1e-300)
        np.testing.assert_array_equal(p[i][~where[i]], 0.0)
        # The same floor as the softmax above: XLA flushes subnormal results (even x + 0.0
        # of a subnormal x is 0), so a row whose logsumexp is subnormal gives 0.
        np.testing.assert_allclose(lse[i], ref_logsumexp(kept), rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------------------------------
# Invariants


@pytest.mark.x64
@given(
    x=hnp.arrays(np.float64, (3, 11), elements=st.floats(-100, 100)),
    c=st.floats(-1e3, 1e3),
)
@settings(max_examples=30, deadline=None)
def test_shift_invariance_and_sums_to_one(x, c):
    p = np.asarray(sj.softmax(x))
    np.testing.assert_allclose(np.asarray(sj.softmax(x + c)), p, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(
        sj.logsumexp(x + c, axis=-1), np.asarray(sj.logsumexp(x, axis=-1)) + c, rtol=1e-12
    )


@pytest.mark.x64
@given(x=hnp.arrays(np.float64, (2, 7), elements=st.floats(-20, 20)))
@settings(max_examples=20, deadline=None)
def test_temperature_one_equals_plain(x):
    np.testing.assert_array_equal(sj.softmax(x, temperature=jnp.ones((2, 1))), sj.softmax(x))
    np.testing.assert_allclose(
        sj.log_softmax(x, temperature=jnp.ones((2, 1))), sj.log_softmax(x), rtol=1e-15
    )


@pytest.mark.x64
@pytest.mark.parametrize("axis", [0, 1, -1, (0, 2), (1, 2), None])
def test_axes_against_reference(axis):
    x = logits((3, 4, 5), 3.0, dtype=np.float64)
    np_axis = axis if axis is not None else (0, 1, 2)
    np.testing.assert_allclose(sj.softmax(x, axis), ref_softmax(x, np_axis), rtol=1e-12)
    np.testing.assert_allclose(sj.log_softmax(x, axis), ref_log_softmax(x, np_axis), rtol=1e-12)
    np.testing.assert_allclose(sj.logsumexp(x, axis), ref_logsumexp(x, np_axis), rtol=1e-12)
    kept = sj.logsumexp(x, axis, keepdims=True)
    assert kept.shape == np.sum(x, axis=np_axis, keepdims=True).shape


@pytest.mark.x64
def test_per_row_temperature():
    x = logits((3, 6), 2.0, dtype=np.float64)
    t = np.array([[0.5], [1.0], [3.0]])
    want = np.stack([ref_softmax(x[i], temperature=t[i, 0]) for i in range(3)])
    np.testing.assert_allclose(sj.softmax(x, temperature=t), want, rtol=1e-12)
    want = np.stack([ref_log_softmax(x[i], temperature=t[i, 0]) for i in range(3)])
    np.testing.assert_allclose(sj.log_softmax(x, temperature=t), want, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Gradients


@pytest.mark.x64
@pytest.mark.parametrize("fn", ["softmax", pytest.param("log_softmax", marks=pytest.mark.slow)])
def test_check_grads_order_2_with_temperature(fn):
    f = getattr(sj, fn)
    x = jnp.asarray(logits((3, 5), 2.0, dtype=np.float64))
    t = jnp.array([[0.7], [1.3], [2.0]])
    # jit: check_grads calls its function dozens of times; op-by-op dispatch would dominate.
    check_grads(jax.jit(lambda x, t: f(x, temperature=t)), (x, t), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(f), (x,), order=2, modes=("fwd", "rev"))
    where = jnp.array([True, False, True, True, False])
    check_grads(jax.jit(lambda x, t: f(x, where=where, temperature=t)), (x, t), order=2)


def test_check_grads_logsumexp_order_2():
    x = jnp.asarray(logits((3, 5), 2.0, dtype=np.float64))
    check_grads(jax.jit(sj.logsumexp), (x,), order=2, modes=("fwd", "rev"))
    check_grads(jax.jit(lambda x: sj.logsumexp(x, axis=(0, 1))), (x,), order=2)


@pytest.mark.x64
def test_gradients_match_jax_nn_on_regular_rows():
    x = jnp.asarray(logits((4, 6), 3.0, dtype=np.float64))
    v = jnp.asarray(logits((4, 6), 1.0, seed=5, dtype=np.float64))
    for ours, theirs in (
        (sj.softmax, jax.nn.softmax),
        (sj.log_softmax, jax.nn.log_softmax),
    ):
        g1 = jax.grad(lambda x: jnp.sum(ours(x) * v))(x)
        g2 = jax.grad(lambda x: jnp.sum(theirs(x) * v))(x)
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-15)
    g1 = jax.grad(lambda x: jnp.sum(sj.logsumexp(x, axis=-1)))(x)
    np.testing.assert_allclose(g1, jax.nn.softmax(x), rtol=1e-12)


def test_softmax_saves_only_its_output():
    x = jnp.ones((8, 128), jnp.float32)
    _, vjp = jax.vjp(sj.softmax, x)
    residuals = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if hasattr(leaf, "shape")]
    big = [r for r in residuals if r.size >= x.size]
    assert len(big) == 1, [r.shape for r in residuals]


@pytest.mark.x64
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_of_log_softmax_matches_reference(dtype):
    x = logits((5, 7), 2.0, dtype=np.dtype(dtype))
    y = np.random.default_rng(1).integers(0, 7, 5)
    g = jax.grad(lambda x: -jnp.sum(sj.log_softmax(x)[jnp.arange(5), y]))(jnp.asarray(x))
    want = ref_softmax(x.astype(np.float64))
    want[np.arange(5), y] -= 1
    np.testing.assert_allclose(g, want, rtol=slack("cancelling_grad", dtype), atol=tol(dtype))


# ---------------------------------------------------------------------------------------
# logsumexp as jax.nn.logsumexp: all axes by default, weights b, return_sign, where

F32 = jnp.float32


@pytest.mark.x64
def test_logsumexp_takes_jax_nn_calls():
    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(3, 5)) * 4)
    b = jnp.asarray(rng.uniform(0.1, 2.0, size=(5,)))
    where = jnp.asarray(rng.random((3, 5)) < 0.8).at[:, 0].set(True)
    for args in [(a,), (a, 1), (a, 0, b), (a, 1, b, True), (a, None, b, False, False, where)]:
        np.testing.assert_allclose(sj.logsumexp(*args), jax.nn.logsumexp(*args), rtol=1e-12)
    assert sj.logsumexp(a).shape == ()  # all axes, as jax.nn


def test_logsumexp_signed_weights_against_float64():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(64, 33)) * 3
    b = rng.normal(size=(64, 33))
    out, sign = sj.logsumexp(jnp.asarray(a, F32), 1, jnp.asarray(b, F32), return_sign=True)
    a32, b32 = np.asarray(a, np.float32).astype(np.float64), np.asarray(b, np.float32)
    total = (b32.astype(np.float64) * np.exp(a32)).sum(1)
    np.testing.assert_array_equal(sign, np.sign(total))
    np.testing.assert_allclose(out, np.log(np.abs(total)), rtol=tol(F32), atol=tol(F32))
    # Without return_sign a negative sum has no real logarithm: NaN, as in jax.nn.
    plain = np.asarray(sj.logsumexp(jnp.asarray(a, F32), 1, jnp.asarray(b, F32)))
    np.testing.assert_array_equal(np.isnan(plain), total < 0)


def test_logsumexp_zero_weights_are_excluded_from_the_shift():
    # 0 * e^1000 + 1 * e^0: shifted by 1000 the e^0 underflows (jax.nn gives -inf in float32).
    a, b = jnp.array([1000.0, 0.0], F32), jnp.array([0.0, 1.0], F32)
    assert float(sj.logsumexp(a, b=b)) == 0.0


@pytest.mark.x64
def test_logsumexp_weights_gradients_match_jax_nn():
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.normal(size=(4, 6)))
    b = jnp.asarray(rng.uniform(0.2, 2.0, size=(4, 6)))

    def grads(fn):
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(fn(a, 1, b))), (0, 1))(a, b)

    for ours, theirs in zip(grads(sj.logsumexp), grads(jax.nn.logsumexp), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_logsumexp_sign_of_empty_rows_is_zero_with_zero_gradient():
    a = jnp.array([[1.0, 2.0], [-jnp.inf, -jnp.inf]])
    out, sign = sj.logsumexp(a, axis=1, return_sign=True)
    np.testing.assert_array_equal(sign, [1.0, 0.0])
    assert out[1] == -jnp.inf
    b = jnp.array([[1.0, -1.0], [2.0, 0.0]])
    out, sign = sj.logsumexp(jnp.zeros((2, 2)), axis=1, b=b, return_sign=True)
    np.testing.assert_array_equal(sign, [0.0, 1.0])  # 1 - 1 cancels exactly
    assert out[0] == -jnp.inf
    g = jax.grad(lambda a: jnp.sum(sj.logsumexp(a, 1, jnp.ones(2))))(jnp.full((2, 2), -jnp.inf))
    np.testing.assert_array_equal(g, jnp.zeros((2, 2)))
