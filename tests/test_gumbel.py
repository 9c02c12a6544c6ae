"""gumbel_softmax: the documented noise through a float64 softmax, draws distributed as
softmax(z), exact one-hot hard values with the soft gradient, PyTorch's forward distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import slack, tol

import softjax

F32, BF16 = jnp.float32, jnp.bfloat16
KEY = jax.random.key(7)
N_DRAWS = 20000


def ref_soft(key, z, tau, axis=-1):
    """float64 ``softmax((z + g) / τ)`` with the documented noise ``g``."""
    g = np.asarray(jax.random.gumbel(key, z.shape, F32), np.float64)
    s = (np.asarray(z, np.float64) + g) / tau
    s = s - s.max(axis, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis, keepdims=True)


def _band(p, n, sigmas=5.0):
    """A ``sigmas``-standard-error band of a frequency of probability ``p`` in ``n`` draws."""
    return sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("tau", [1.0, 0.3, 2.5])
def test_soft_sample_matches_float64_softmax_of_the_documented_noise(tau):
    z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 9)) * 3, F32)
    got = softjax.gumbel_softmax(KEY, z, tau=tau)
    assert got.dtype == F32 and got.shape == z.shape
    np.testing.assert_allclose(got, ref_soft(KEY, z, tau), rtol=slack("chained", F32), atol=1e-30)
    # Another class axis: the same sample transposed.
    zt = softjax.gumbel_softmax(KEY, z.T, tau=tau, axis=0)
    np.testing.assert_allclose(
        zt, ref_soft(KEY, z.T, tau, axis=0), rtol=slack("chained", F32), atol=1e-30
    )


def test_hard_draws_are_one_hot_and_distributed_as_softmax():
    p = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    keys = jax.random.split(KEY, N_DRAWS)
    draw = jax.jit(jax.vmap(lambda k: softjax.gumbel_softmax(k, jnp.log(p), tau=0.7, hard=True)))
    y = np.asarray(draw(keys))
    np.testing.assert_array_equal(np.sort(y, axis=-1)[:, -1], 1.0)  # exactly one-hot
    np.testing.assert_array_equal(y.sum(-1), 1.0)
    freq = y.mean(0)
    assert np.all(np.abs(freq - p) <= _band(p, N_DRAWS)), (freq, p)
    # The draw is the argmax of the soft sample with the same key, whatever tau.
    soft = np.asarray(jax.vmap(lambda k: softjax.gumbel_softmax(k, jnp.log(p), tau=3.0))(keys))
    np.testing.assert_array_equal(y.argmax(-1), soft.argmax(-1))


def test_hard_gradient_is_the_soft_samples():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6)), F32)
    tau = jnp.asarray(0.8, F32)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((3, 6)), F32)

    def loss(z, tau, hard):
        return jnp.sum(cot * softjax.gumbel_softmax(KEY, z, tau=tau, hard=hard))

    g_hard = jax.grad(loss, argnums=(0, 1))(z, tau, True)
    g_soft = jax.grad(loss, argnums=(0, 1))(z, tau, False)
    for a, b in zip(g_hard, g_soft, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(g_soft[0]) != 0) and g_soft[1] != 0


def test_masks_infinite_logits_empty_rows_and_nan():
    z = jnp.array([[1.0, -jnp.inf, 0.5, 2.0], [-jnp.inf] * 4, [jnp.nan, 0.0, 1.0, 2.0]])
    where = jnp.array([True, True, True, False])
    for hard in (False, True):
        y = softjax.gumbel_softmax(KEY, z, hard=hard, where=where)
        assert y[0, 1] == 0 and y[0, 3] == 0  # -inf and masked: never drawn
        np.testing.assert_allclose(y[0].sum(), 1.0, rtol=tol(F32))
        np.testing.assert_array_equal(y[1], 0.0)  # nothing to draw: zeros, not NaN
        assert np.all(np.isnan(y[2]))  # a NaN logit is loud
        g = jax.grad(lambda z: jnp.sum(softjax.gumbel_softmax(KEY, z, hard=hard)[:2] * 1.5))(z)
        assert np.all(np.isfinite(g[:2])), g
    # +inf logits: the row's limit, the draw among them by their noise, never NaN.
    inf = jnp.array([jnp.inf, 0.0, jnp.inf, 1.0])
    keys = jax.random.split(KEY, 2000)
    y = jax.vmap(lambda k: softjax.gumbel_softmax(k, inf, hard=True))(keys)
    assert np.all(np.isfinite(y)) and np.all(np.asarray(y)[:, [1, 3]] == 0)
    assert 0.4 < float(y[:, 0].mean()) < 0.6


def test_dtypes_tau_per_row_and_validation():
    z = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5)), BF16)
    y = softjax.gumbel_softmax(KEY, z, tau=jnp.array([[0.5], [2.0]]))
    assert y.dtype == BF16
    want = np.concatenate(
        [ref_soft(KEY, z[:1].astype(F32), 0.5), ref_soft(KEY, z.astype(F32), 2.0)[1:]]
    )
    # The per-row noise of a [2, 5] draw is not that of a [1, 5] one: compare row 1 only.
    np.testing.assert_allclose(np.asarray(y[1], np.float64), want[1], rtol=tol(BF16))
    assert softjax.gumbel_softmax(KEY, z, hard=True).dtype == BF16
    with pytest.raises(ValueError, match="tau must be > 0"):
        softjax.gumbel_softmax(KEY, z, tau=0.0)
    with pytest.raises(ValueError, match="tau has shape"):
        softjax.gumbel_softmax(KEY, z, tau=jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="logits"):
        softjax.gumbel_softmax(KEY, jnp.ones((2, 3), jnp.int32))


def test_forward_distribution_matches_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    z = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    for hard in (False, True):
        theirs = torch.nn.functional.gumbel_softmax(
            torch.tensor(np.tile(z, (N_DRAWS, 1)), dtype=torch.float32), tau=0.5, hard=hard
        ).numpy()
        keys = jax.random.split(KEY, N_DRAWS)
        ours = np.asarray(
            jax.vmap(lambda k: softjax.gumbel_softmax(k, jnp.asarray(z, F32), tau=0.5, hard=hard))(
                keys
            )
        )
        # Two samples of one distribution: their per-class means and second moments agree
        # within five standard errors of the difference.
        for moment in (1, 2):
            a, b = ours**moment, theirs**moment
            se = np.sqrt(a.var(0) / N_DRAWS + b.var(0) / N_DRAWS)
            assert np.all(np.abs(a.mean(0) - b.mean(0)) <= 5 * se), (
                hard,
                moment,
                a.mean(0),
                b.mean(0),
            )
