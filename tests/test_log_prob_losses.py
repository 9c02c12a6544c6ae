"""nll_loss, kl_divergence and log_sigmoid: float64 references, PyTorch's semantics (and
PyTorch itself where installed), the zeros and NaNs of softjax's rules."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import assert_close, slack, tol

import softjax

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16


def _log_probs(shape=(6, 5), seed=0, axis=-1):
    z = np.random.default_rng(seed).normal(size=shape) * 2
    z = z - z.max(axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis, keepdims=True))


def np_nll(lp, y, weight=None, valid=None, reduction="mean"):
    """float64 reference of ``torch.nn.functional.nll_loss`` (class axis last)."""
    lp, y = np.asarray(lp, np.float64), np.asarray(y)
    w = np.ones(lp.shape[-1]) if weight is None else np.asarray(weight, np.float64)
    valid = np.ones(y.shape, bool) if valid is None else np.asarray(valid)
    picked = np.take_along_axis(lp, np.clip(y, 0, lp.shape[-1] - 1)[..., None], -1)[..., 0]
    wy = w[np.clip(y, 0, lp.shape[-1] - 1)]
    losses = np.where(valid, -picked * wy, 0.0)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / np.where(valid, wy, 0.0).sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_matches_float64(reduction):
    lp = _log_probs()
    y = np.array([0, 4, 2, 2, 1, 3])
    weight = np.array([0.5, 1.0, 2.0, 1.5, 0.25])
    where = np.array([True, True, False, True, True, True])
    got = softjax.nll_loss(
        jnp.asarray(lp, F32), y, weight=jnp.asarray(weight, F32), where=where,
        ignore_index=1, reduction=reduction,
    )  # fmt: skip
    valid = where & (y != 1)
    want = np_nll(lp.astype(np.float32), y, weight, valid, reduction)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=slack("chained", F32), atol=1e-7)


def test_nll_loss_of_log_softmax_is_cross_entropy_and_takes_torch_layout():
    z = jnp.asarray(np.random.default_rng(1).normal(size=(3, 7, 4)), F32)  # [N, C, d]
    y = jnp.asarray(np.random.default_rng(2).integers(0, 7, (3, 4)))
    ce = softjax.cross_entropy(z, y, axis=1)
    nll = softjax.nll_loss(softjax.log_softmax(z, axis=1), y, axis=1)
    np.testing.assert_allclose(nll, ce, rtol=slack("two_paths", F32))
    g_ce = jax.grad(lambda z: softjax.cross_entropy(z, y, axis=1))(z)
    g_nll = jax.grad(lambda z: softjax.nll_loss(softjax.log_softmax(z, axis=1), y, axis=1))(z)
    assert_close(g_nll, g_ce, rtol=slack("cancelling_grad", F32))


def test_nll_loss_rules_nothing_counted_bad_labels_bf16():
    lp = jnp.asarray(_log_probs(), F32)
    y = jnp.array([0, 4, 2, 2, 1, 3])
    value, grad = jax.value_and_grad(lambda lp: softjax.nll_loss(lp, y, where=jnp.zeros(6, bool)))(
        lp
    )
    assert value == 0.0  # PyTorch: NaN (0 / 0)
    np.testing.assert_array_equal(grad, 0.0)
    bad = softjax.nll_loss(lp, y.at[2].set(5), reduction="none")
    assert np.isnan(bad[2]) and np.all(np.isfinite(np.delete(np.asarray(bad), 2)))
    # An excluded bad label is not a bug to report.
    assert np.isfinite(softjax.nll_loss(lp, y.at[2].set(-100), ignore_index=-100))
    out = softjax.nll_loss(lp.astype(BF16), y)
    assert out.dtype == F32
    want = np_nll(np.asarray(lp.astype(BF16).astype(F32)), y)
    np.testing.assert_allclose(out, want, rtol=tol(F32))
    dlp = jax.grad(lambda lp: softjax.nll_loss(lp, y, reduction="sum"))(lp)
    np.testing.assert_array_equal(dlp, -jax.nn.one_hot(y, 5))
    with pytest.raises(ValueError, match="labels"):
        softjax.nll_loss(lp, y[:3])
    with pytest.raises(ValueError, match="weight"):
        softjax.nll_loss(lp, y, weight=jnp.ones(4))


def np_kl(x, t, log_target, reduction):
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    if log_target:
        with np.errstate(invalid="ignore"):
            terms = np.where(np.exp(t) > 0, np.exp(t) * (t - x), 0.0)
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(t > 0, t * (np.log(np.where(t > 0, t, 1)) - x), 0.0)
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "batchmean":
        return terms.sum() / x.shape[0]
    return terms.mean()


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_kl_divergence_matches_float64(log_target, reduction):
    x = _log_probs((4, 6), seed=3).astype(np.float32)
    p = np.exp(_log_probs((4, 6), seed=4))
    p[0, 2] = 0.0  # a zero target: costs nothing
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    with np.errstate(divide="ignore"):
        t = np.log(p) if log_target else p
    got = softjax.kl_divergence(x, t, log_target=log_target, reduction=reduction)
    want = np_kl(x, t, log_target, reduction)
    assert got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=slack("chained", F32), atol=1e-7)


def test_kl_divergence_zeros_nans_masks_and_gradients():
    x = jnp.array([[-jnp.inf, jnp.log(0.5), jnp.log(0.5)]])
    t = jnp.array([[0.0, 0.5, 0.5]])
    # A zero target beside a -inf prediction: 0 (PyTorch: NaN, from 0 * -inf).
    np.testing.assert_array_equal(softjax.kl_divergence(x, t, reduction="none"), 0.0)
    grads = jax.grad(lambda x, t: softjax.kl_divergence(x, t, reduction="sum"), (0, 1))(x, t)
    np.testing.assert_array_equal(grads[0], [[0.0, -0.5, -0.5]])
    assert np.all(np.isfinite(grads[1][:, 1:]))
    # NaN predictions stay loud even where the target is 0; so do negative targets.
    loud = softjax.kl_divergence(x.at[0, 0].set(jnp.nan), t, reduction="none")
    assert np.isnan(loud[0, 0])
    assert np.isnan(softjax.kl_divergence(x, t.at[0, 1].set(-0.1), reduction="sum"))
    where = jnp.array([[True, True, False]])
    got = softjax.kl_divergence(jnp.zeros((1, 3)), t, where=where, reduction="mean")
    np.testing.assert_allclose(got, 0.5 * np.log(0.5) / 2, rtol=tol(F32))
    with pytest.raises(ValueError, match="reduction"):
        softjax.kl_divergence(x, t, reduction="batch")
    with pytest.raises(ValueError, match="targets"):
        softjax.kl_divergence(x, t[:, :2])


def test_log_sigmoid_is_exact_in_both_tails():
    # Up to 80: e^-80 is a normal float32 (beyond it the result is subnormal, flushed on CPU).
    x = np.array([-1000.0, -40.0, -1.0, 0.0, 1e-8, 1.0, 20.0, 40.0, 80.0])
    want = -np.logaddexp(0.0, -x)  # float64
    got = softjax.log_sigmoid(jnp.asarray(x, F32))
    np.testing.assert_allclose(got, want, rtol=tol(F32))
    grad = jax.vmap(jax.grad(softjax.log_sigmoid))(jnp.asarray(x, F32))
    np.testing.assert_allclose(grad, 1 / (1 + np.exp(x)), rtol=tol(F32))
    assert softjax.log_sigmoid(jnp.ones(3, BF16)).dtype == BF16
    assert softjax.log_sigmoid(jnp.array(jnp.inf)) == 0.0
    assert softjax.log_sigmoid(jnp.array(-jnp.inf)) == -jnp.inf


def test_parity_with_torch():
    torch = pytest.importorskip("torch")
    lp = _log_probs((5, 7), seed=6).astype(np.float32)
    y = np.array([0, 6, 3, -100, 2])
    w = np.linspace(0.5, 2, 7).astype(np.float32)
    ours = softjax.nll_loss(lp, y, weight=w, ignore_index=-100)
    ref = torch.nn.functional.nll_loss(
        torch.tensor(lp), torch.tensor(y), weight=torch.tensor(w), ignore_index=-100
    )
    np.testing.assert_allclose(ours, ref.numpy(), rtol=slack("chained", F32))
    t = np.exp(_log_probs((5, 7), seed=7)).astype(np.float32)
    for reduction in ("mean", "batchmean", "sum", "none"):
        ours = softjax.kl_divergence(lp, t, reduction=reduction)
        with warnings.catch_warnings():  # PyTorch warns that "mean" is not the KL of rows
            warnings.simplefilter("ignore", UserWarning)
            ref = torch.nn.functional.kl_div(torch.tensor(lp), torch.tensor(t), reduction=reduction)
        np.testing.assert_allclose(ours, ref.numpy(), rtol=slack("chained", F32), atol=1e-7)
    x = np.linspace(-30, 30, 13).astype(np.float32)
    ref = torch.nn.functional.logsigmoid(torch.tensor(x)).numpy()
    np.testing.assert_allclose(softjax.log_sigmoid(x), ref, rtol=tol(F32))
