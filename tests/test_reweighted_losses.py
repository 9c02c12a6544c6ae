"""sigmoid_focal_loss and poly_loss: float64 references, optax parity, the easy examples they
down-weight kept exact, no NaN at saturation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import slack, tol

import softjax

F32, BF16 = jnp.float32, jnp.bfloat16


def np_focal(x, t, alpha, gamma):
    """float64 elementwise focal loss (the formula of Lin et al.)."""
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    np.seterr(over="ignore")
    bce = t * np.logaddexp(0, -x) + (1 - t) * np.logaddexp(0, x)
    one_minus_pt = t / (1 + np.exp(x)) + (1 - t) / (1 + np.exp(-x))
    loss = one_minus_pt**gamma * bce
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


@pytest.mark.parametrize("alpha,gamma", [(None, 2.0), (0.25, 2.0), (0.6, 0.5), (None, 0.0)])
def test_focal_matches_float64_and_optax(alpha, gamma):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5, 7)) * 4).astype(np.float32)
    t = (rng.random((5, 7)) < 0.3).astype(np.float32)
    t[0, :3] = [0.2, 0.7, 1.0]  # soft targets too
    got = softjax.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none")
    want = np_focal(x, t, alpha, gamma)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=slack("chained", F32), atol=1e-30)
    peer = optax.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(got, peer, rtol=slack("composite_loss", F32), atol=1e-6)
    mean = softjax.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(mean, want.mean(), rtol=slack("chained", F32))


def test_focal_keeps_easy_examples_exact_and_saturation_nan_free():
    # Confident right predictions: 1 - p_t would round to 0 from p_t = 1 in float32; the
    # exact value is about e^(-3|x|) at gamma = 2 (normal floats here).
    x = jnp.array([20.0, 25.0, -20.0, 120.0])
    t = jnp.array([1.0, 1.0, 0.0, 0.0])
    got = softjax.sigmoid_focal_loss(x, t, reduction="none")
    want = np_focal(np.asarray(x), np.asarray(t), None, 2.0)
    np.testing.assert_allclose(got, want, rtol=slack("chained", F32))
    assert got[0] > 0
    far = jnp.array([200.0, -200.0, -200.0, 200.0])  # everything underflows or saturates
    for gamma in (0.5, 2.0):
        g = jax.grad(lambda x: softjax.sigmoid_focal_loss(x, t, gamma=gamma, reduction="sum"))(far)
        assert np.all(np.isfinite(g)), (gamma, g)
    masked = jnp.array([True, False, True, True])
    out = softjax.sigmoid_focal_loss(x.at[1].set(jnp.nan), t, where=masked, reduction="none")
    assert out[1] == 0.0 and np.all(np.isfinite(out))
    assert softjax.sigmoid_focal_loss(jnp.ones(3, BF16), jnp.ones(3, BF16)).dtype == F32
    with pytest.raises(ValueError, match="gamma"):
        softjax.sigmoid_focal_loss(x, t, gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        softjax.sigmoid_focal_loss(x, t, alpha=1.5)


def test_poly_loss_matches_optax_and_float64():
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((6, 9)) * 3).astype(np.float32)
    y = rng.integers(0, 9, 6)
    onehot = np.eye(9, dtype=np.float32)[y]
    for eps in (2.0, -1.0, 0.5):
        got = softjax.poly_loss(z, y, epsilon=eps, reduction="none")
        z64 = z.astype(np.float64)
        lp = z64 - z64.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        want = -lp[np.arange(6), y] + eps * (1 - np.exp(lp[np.arange(6), y]))
        np.testing.assert_allclose(got, want, rtol=slack("chained", F32))
        soft = softjax.poly_loss(z, onehot, epsilon=eps, reduction="none")
        np.testing.assert_allclose(soft, want, rtol=slack("chained", F32))
        peer = optax.losses.poly_loss_cross_entropy(z, onehot, epsilon=eps)
        np.testing.assert_allclose(got, peer, rtol=slack("composite_loss", F32))


def test_poly_loss_confident_class_masks_and_gradients():
    z = jnp.array([[30.0, 0.0, 0.0]])
    got = softjax.poly_loss(z, jnp.array([0]), reduction="none")
    # CE = log(1 + 2 e^-30) ~ 2 e^-30; 1 - p = the same: exact, not 0 from 1 - 1.
    np.testing.assert_allclose(got, 3 * 2 * np.exp(-30.0), rtol=tol(F32) * 4)
    where = jnp.array([True, False])
    zz = jnp.array([[1.0, 2.0, 0.5], [jnp.nan, 0.0, 0.0]])
    out = softjax.poly_loss(zz, jnp.array([1, 0]), where=where, reduction="none")
    assert out[1] == 0.0 and np.isfinite(out[0])
    g = jax.grad(lambda z: softjax.poly_loss(z, jnp.array([1, 0]), where=where))(zz)
    np.testing.assert_array_equal(g[1], 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        softjax.poly_loss(z, jnp.array([0]), epsilon=float("inf"))
