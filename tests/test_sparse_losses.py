"""sparsemax_loss and entmax15_loss: float64 Fenchel-Young references, optax parity, zero
exactly at the target, gradients p - q, no NaN at -inf logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import loss_atol, slack, tol
from jax.test_util import check_grads
from test_sparse import ref_entmax15, ref_sparsemax

import softjax

F32, BF16 = jnp.float32, jnp.bfloat16


def _omega_sparsemax(p):
    return 0.5 * (np.sum(p * p, axis=-1) - 1)


def _omega_entmax15(p):
    return (4 / 3) * (np.sum(np.maximum(p, 0) ** 1.5, axis=-1) - 1)


# (softjax function, float64 map, float64 Ω): the loss is Ω*(z) + Ω(q) - <z, q>.
KINDS = {
    "sparsemax": (softjax.sparsemax_loss, ref_sparsemax, _omega_sparsemax),
    "entmax15": (softjax.entmax15_loss, ref_entmax15, _omega_entmax15),
}
KIND = pytest.mark.parametrize("kind", list(KINDS))


def ref_loss(kind, z, q):
    """float64 Fenchel-Young loss rows: ``<z, p> - Ω(p) + Ω(q) - <z, q>``, straight from the
    definition (no rewriting), and the gradient ``p - q``."""
    _, fmap, omega = KINDS[kind]
    z, q = np.asarray(z, np.float64), np.asarray(q, np.float64)
    p = np.apply_along_axis(fmap, -1, z)
    loss = np.sum(z * p, -1) - omega(p) + omega(q) - np.sum(z * q, -1)
    return loss, p - q


def _data(seed=0, shape=(6, 11), scale=3.0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * scale).astype(np.float32)
    y = rng.integers(0, shape[-1], shape[:-1])
    return z, y


@KIND
def test_integer_labels_match_float64_and_gradient_is_p_minus_q(kind):
    fn = KINDS[kind][0]
    z, y = _data()
    want, want_grad = ref_loss(kind, z, np.eye(z.shape[-1])[y])
    got = fn(z, y, reduction="none")
    assert got.dtype == F32
    np.testing.assert_allclose(
        got, want, rtol=slack("row_sum", F32), atol=loss_atol("two_paths", F32, z)
    )
    np.testing.assert_allclose(fn(z, y), want.mean(), rtol=slack("row_sum", F32))
    np.testing.assert_allclose(fn(z, y, reduction="sum"), want.sum(), rtol=slack("row_sum", F32))
    grad = jax.grad(lambda z: fn(z, y, reduction="sum"))(z)
    np.testing.assert_allclose(grad, want_grad, atol=slack("row_sum", F32))


@KIND
def test_probability_targets_match_float64_in_both_gradients(kind):
    fn = KINDS[kind][0]
    z, _ = _data(1)
    rng = np.random.default_rng(2)
    q = rng.dirichlet(np.ones(z.shape[-1]) * 0.5, z.shape[0]).astype(np.float32)
    want, want_grad = ref_loss(kind, z, q)
    got = fn(z, q, reduction="none")
    np.testing.assert_allclose(
        got, want, rtol=slack("row_sum", F32), atol=loss_atol("two_paths", F32, z)
    )
    gz, gq = jax.grad(lambda z, q: fn(z, q, reduction="sum"), argnums=(0, 1))(z, q)
    np.testing.assert_allclose(gz, want_grad, atol=slack("row_sum", F32))
    # ∂L/∂q = ∇Ω(q) - z up to a constant per row (q lives on the simplex): compare the
    # directional derivatives along tangents that sum to zero.
    grad_omega = q if kind == "sparsemax" else 2 * np.sqrt(q)
    want_gq = grad_omega - z
    v = rng.standard_normal(q.shape)
    v -= v.mean(-1, keepdims=True)
    np.testing.assert_allclose(
        np.sum(np.asarray(gq) * v, -1), np.sum(want_gq * v, -1), rtol=1e-5, atol=1e-5
    )


@pytest.mark.x64
@KIND
def test_float64_gradients_check(kind):
    fn = KINDS[kind][0]
    z, y = _data(3, (3, 7))
    z = jnp.asarray(z, jnp.float64)
    check_grads(lambda z: fn(z, y, reduction="sum"), (z,), order=1, modes=["rev", "fwd"])
    want, _ = ref_loss(kind, z, np.eye(7)[y])
    np.testing.assert_allclose(fn(z, y, reduction="none"), want, rtol=tol(jnp.float64) * 100)


def test_sparsemax_loss_matches_optax():
    from optax.losses import multiclass_sparsemax_loss

    z, y = _data(4, (32, 50))
    got = softjax.sparsemax_loss(z, y, reduction="none")
    peer = multiclass_sparsemax_loss(z, y)
    np.testing.assert_allclose(
        got, peer, rtol=slack("two_paths", F32), atol=loss_atol("two_paths", F32, z)
    )
    g = jax.grad(lambda z: softjax.sparsemax_loss(z, y, reduction="sum"))(z)
    g_peer = jax.grad(lambda z: multiclass_sparsemax_loss(z, y).sum())(z)
    np.testing.assert_allclose(g, g_peer, atol=slack("row_sum", F32))
    assert optax is not None


@KIND
def test_zero_exactly_at_the_target_and_small_losses_keep_their_accuracy(kind):
    fn, fmap, _ = KINDS[kind]
    # A confident right prediction: p is the one-hot label, the loss exactly 0, gradient 0.
    z = jnp.array([[10.0, 0.0, -3.0, 1.0]])
    assert fn(z, jnp.array([0])) == 0.0
    np.testing.assert_array_equal(jax.grad(lambda z: fn(z, jnp.array([0])))(z), 0.0)
    # Nearly confident: the loss is small, and its error is what the logits' own rounding
    # makes of it (a change δz moves it by (p - q)·δz), far below an error relative to |z|.
    near = np.array([[2.0, 1.002, -1.0]] if kind == "sparsemax" else [[2.0, 0.1, -1.0]], np.float32)
    want, grad = ref_loss(kind, near, np.eye(near.shape[-1])[[0]])
    assert 0 < want[0] < 1e-2, want
    conditioning = np.sum(np.abs(grad) * (1 + np.abs(near)))
    atol = slack("chained", F32) * conditioning
    assert atol < want[0] / 10  # a bound that says something about a loss this small
    np.testing.assert_allclose(fn(near, jnp.array([0]), reduction="none"), want, rtol=0, atol=atol)
    # The target itself as probabilities: 0.
    q = np.apply_along_axis(fmap, -1, np.asarray(z, np.float64)).astype(np.float32)
    np.testing.assert_allclose(fn(z, q), 0.0, atol=tol(F32))


@KIND
def test_infinite_logits_masks_bad_labels_and_dtypes(kind):
    fn = KINDS[kind][0]
    z = jnp.array([[0.0, -jnp.inf, 1.0], [2.0, 0.5, -jnp.inf]])
    y = jnp.array([0, 1])
    got = fn(z, y, reduction="none")
    want, want_grad = ref_loss(kind, np.where(np.isfinite(z), z, -1e30), np.eye(3)[np.asarray(y)])
    np.testing.assert_allclose(got, want, rtol=slack("row_sum", F32))
    grad = jax.grad(lambda z: fn(z, y, reduction="sum"))(z)
    np.testing.assert_allclose(grad, want_grad, atol=slack("row_sum", F32))
    # The target at -inf: the loss is +inf, as the maths says (not NaN).
    assert fn(z, jnp.array([1, 0]), reduction="none")[0] == jnp.inf
    # Excluded rows: 0, and a NaN there stays out; a counted out-of-range label is NaN.
    bad = z.at[1, 0].set(jnp.nan)
    masked = fn(bad, y, where=jnp.array([True, False]), reduction="none")
    np.testing.assert_allclose(masked, [got[0], 0.0], rtol=slack("row_sum", F32))
    assert np.isnan(fn(bad, y, reduction="none")[1])
    assert np.isnan(fn(z, jnp.array([0, 3]), reduction="none")[1])
    assert fn(jnp.ones((2, 3), BF16), y).dtype == F32
    # A class axis other than the last.
    zt, yt = _data(5, (4, 6))
    np.testing.assert_allclose(
        fn(zt.T, yt, axis=0, reduction="none"), fn(zt, yt, reduction="none"), rtol=0
    )


def test_validation_names_the_argument():
    z, y = _data()
    with pytest.raises(ValueError, match="labels has shape"):
        softjax.sparsemax_loss(z, y[:3])
    with pytest.raises(ValueError, match="class probabilities must have the shape"):
        softjax.entmax15_loss(z, np.ones((6, 5), np.float32))
    with pytest.raises(ValueError, match="reduction"):
        softjax.entmax15_loss(z, y, reduction="batchmean")
    with pytest.raises(TypeError, match="logits"):
        softjax.sparsemax_loss(np.ones((2, 3), np.int32), np.zeros(2, np.int32))
