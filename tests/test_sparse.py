"""Tests of sparsemax and entmax15 against float64 NumPy references found by bisection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import softjax
from softjax import entmax15, sparsemax

# ---------------------------------------------------------------------------------------
# float64 references: tau by bisection on sum(f(x - tau)) = 1 (independent of sorting)


def _bisect_tau(x, mass):
    lo, hi = x.max() - 10.0 - 2 * np.abs(x).max(), x.max()
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) > 1 else (lo, mid)
    return (lo + hi) / 2


def ref_sparsemax(x):
    x = np.asarray(x, np.float64)
    valid = np.isfinite(x)
    if not valid.any():
        return np.zeros_like(x)
    xv = x[valid]
    tau = _bisect_tau(xv, lambda t: np.maximum(xv - t, 0).sum())
    return np.where(valid, np.maximum(x - tau, 0), 0.0)


def ref_entmax15(x):
    x = np.asarray(x, np.float64)
    valid = np.isfinite(x)
    if not valid.any():
        return np.zeros_like(x)
    xv = x[valid] / 2
    tau = _bisect_tau(xv, lambda t: (np.maximum(xv - t, 0) ** 2).sum())
    return np.where(valid, np.maximum(x / 2 - tau, 0) ** 2, 0.0)


REFS = {sparsemax: ref_sparsemax, entmax15: ref_entmax15}
FNS = pytest.mark.parametrize("fn", [sparsemax, entmax15], ids=["sparsemax", "entmax15"])


def rows_ref(fn, x):
    x = np.asarray(x, np.float64)
    return np.apply_along_axis(REFS[fn], -1, x)


# ---------------------------------------------------------------------------------------


def test_sparsemax_known_values_and_jacobian():
    x = jnp.array([1.0, 0.8, -1.0])
    np.testing.assert_allclose(sparsemax(x), [0.6, 0.4, 0.0], rtol=tol(jnp.float32), atol=1e-7)
    jac = jax.jacobian(sparsemax)(x)
    np.testing.assert_allclose(jac[0], [0.5, -0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(jac, [[0.5, -0.5, 0], [-0.5, 0.5, 0], [0, 0, 0]], atol=1e-7)


@pytest.mark.x64
def test_entmax15_known_values_and_jacobian():
    # Support {0, 1}: (0.5 - tau)^2 + (0.4 - tau)^2 = 1.
    tau = 0.45 - np.sqrt((1 - 2 * (0.205 - 0.45**2)) / 2)
    want = [(0.5 - tau) ** 2, (0.4 - tau) ** 2, 0.0]
    x = jnp.array([1.0, 0.8, -1.0], jnp.float64)
    np.testing.assert_allclose(entmax15(x), want, rtol=tol(jnp.float64))
    g = np.sqrt(want)
    jac_want = np.diag(g) - np.outer(g, g) / g.sum()
    np.testing.assert_allclose(jax.jacobian(entmax15)(x), jac_want, rtol=1e-12, atol=1e-15)


@pytest.mark.x64
@FNS
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
def test_matches_float64_reference(fn, dtype):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 50)) * 2, dtype)
    got = fn(x)
    assert got.dtype == dtype
    want = rows_ref(fn, np.asarray(x.astype(jnp.float32) if dtype != jnp.float64 else x))
    atol = {jnp.float64: 1e-13, jnp.float32: 1e-6, jnp.bfloat16: 4e-3}[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol(dtype), atol=atol)


@pytest.mark.x64
@FNS
def test_large_and_shifted_inputs(fn):
    x = np.random.default_rng(1).normal(size=(4, 30))
    for shift in (0.0, 1e4, -3e4):
        got = fn(jnp.asarray(x + shift, jnp.float64))
        np.testing.assert_allclose(got, rows_ref(fn, x), rtol=1e-9, atol=1e-12)


@pytest.mark.x64
@FNS
def test_check_grads(fn):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 9)), jnp.float64)
    w = jnp.asarray(np.random.default_rng(3).random((3, 9)) > 0.3)
    check_grads(lambda x: fn(x, where=w), (x,), order=1, modes=("fwd", "rev"))
    if fn is entmax15:  # sparsemax is piecewise linear: its second derivative is 0
        check_grads(fn, (x,), order=2, modes=("rev",))


@pytest.mark.x64
@FNS
def test_where_equals_filtering(fn):
    x = np.random.default_rng(4).normal(size=(5, 12))
    w = np.random.default_rng(5).random((5, 12)) > 0.4
    w[:, 0] = True
    got = np.asarray(fn(jnp.asarray(x), where=jnp.asarray(w)))
    for i in range(5):
        np.testing.assert_allclose(got[i][w[i]], REFS[fn](x[i][w[i]]), rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(got[i][~w[i]], 0.0)


@pytest.mark.x64
@FNS
def test_axis_and_tuple_axes(fn):
    x = jnp.asarray(np.random.default_rng(6).normal(size=(3, 7, 4)))
    np.testing.assert_allclose(
        fn(x, axis=1), jnp.moveaxis(fn(jnp.moveaxis(x, 1, -1)), -1, 1), rtol=1e-12
    )
    both = fn(x, axis=(0, 2))
    flat = fn(jnp.moveaxis(x, 1, 0).reshape(7, 12)).reshape(7, 3, 4)
    np.testing.assert_allclose(both, jnp.moveaxis(flat, 0, 1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(both.sum(axis=(0, 2)), np.ones(7), rtol=1e-12)


@FNS
def test_empty_rows_zero_with_zero_grads_and_nan_stays_in_its_row(fn):
    x = jnp.array([[1.0, -jnp.inf, 0.5], [-jnp.inf, -jnp.inf, -jnp.inf], [jnp.nan, 1.0, 0.0]])
    out = np.asarray(fn(x))
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.isnan(out[2]).all() and np.isfinite(out[:2]).all()
    masked = jnp.ones((2, 3)), jnp.array([[True, True, False], [False, False, False]])
    g = jax.grad(lambda x: jnp.sum(fn(x, where=masked[1]) * jnp.arange(3.0)))(masked[0])
    np.testing.assert_array_equal(g[1], 0.0)
    assert np.isfinite(np.asarray(g)).all()


@FNS
def test_jit_vmap(fn):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(4, 10)))
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(x), fn(x), rtol=1e-14)


def test_exported_and_validated():
    assert softjax.sparsemax is sparsemax and softjax.entmax15 is entmax15
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        sparsemax(jnp.arange(3))
    with pytest.raises(ValueError, match="where has shape"):
        entmax15(jnp.zeros((2, 3)), where=jnp.ones(4, bool))
    with pytest.raises(ValueError, match="out of range"):
        entmax15(jnp.zeros((2, 3)), axis=3)


@pytest.mark.x64
@settings(max_examples=15, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=1, max_size=12),
    st.floats(-100, 100),
    st.sampled_from([sparsemax, entmax15]),
)
def test_hypothesis_simplex_and_shift_invariance(xs, shift, fn):
    x = jnp.asarray(xs, jnp.float64)
    p = np.asarray(fn(x))
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(fn(x + shift), p, atol=1e-9)
    np.testing.assert_allclose(p, REFS[fn](np.asarray(xs)), atol=1e-9)
