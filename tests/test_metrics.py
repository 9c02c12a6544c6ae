"""metrics: per-token and sequence log-probabilities, perplexity and top-k accuracy against
float64 references, scikit-learn and PyTorch; masks, padding, ties and bad labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import slack, tol

from softjax import metrics

F32, BF16 = jnp.float32, jnp.bfloat16


def np_log_probs(z, y):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    lp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    return np.take_along_axis(lp, np.asarray(y)[..., None], -1)[..., 0]


def _batch(seed=0, shape=(3, 7, 50), scale=3.0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal(shape) * scale).astype(np.float32)
    y = rng.integers(0, shape[-1], shape[:-1])
    return z, y


def test_token_and_sequence_log_probs_match_float64_with_padding():
    z, y = _batch()
    mask = np.arange(7) < np.array([[7], [4], [0]])  # lengths 7, 4, 0
    want_tok = np.where(mask, np_log_probs(z, y), 0.0)
    tok = metrics.token_log_probs(z, y, where=mask)
    assert tok.dtype == F32 and tok.shape == (3, 7)
    np.testing.assert_allclose(tok, want_tok, rtol=slack("chained", F32), atol=tol(F32))
    seq = metrics.sequence_log_probs(z, y, where=mask)
    np.testing.assert_allclose(seq, want_tok.sum(-1), rtol=slack("chained", F32))
    # Beam scores: the sum over L^α; no counted token scores 0.
    lengths = mask.sum(-1)
    for alpha in (1.0, 0.6):
        got = metrics.sequence_log_probs(z, y, where=mask, length_penalty=alpha)
        want = np.where(lengths > 0, want_tok.sum(-1) / np.maximum(lengths, 1) ** alpha, 0.0)
        np.testing.assert_allclose(got, want, rtol=slack("chained", F32))
    # ignore_index is padding too.
    padded = np.where(mask, y, -100)
    np.testing.assert_array_equal(metrics.token_log_probs(z, padded, ignore_index=-100), tok)
    # Differentiable: d/dz of a sequence's log-probability is onehot - softmax at each
    # counted position.
    g = jax.grad(lambda z: metrics.sequence_log_probs(z, y, where=mask)[1])(z)
    p = np.exp(
        np_log_probs(z[..., None, :].repeat(50, -2), np.broadcast_to(np.arange(50), (3, 7, 50)))
    )
    want_g = (np.eye(50)[y] - p) * (mask[..., None] & (np.arange(3) == 1)[:, None, None])
    np.testing.assert_allclose(g, want_g, atol=slack("cancelling_grad", F32))


def test_log_probs_bf16_and_bad_tokens():
    z, y = _batch(1, (2, 5, 9))
    got = metrics.token_log_probs(jnp.asarray(z, BF16), y)
    assert got.dtype == F32
    want = np_log_probs(np.asarray(jnp.asarray(z, BF16).astype(F32)), y)
    np.testing.assert_allclose(got, want, rtol=slack("chained", F32), atol=tol(F32))
    bad = y.copy()
    bad[0, 2] = 9
    out = metrics.sequence_log_probs(z, bad)
    assert np.isnan(out[0]) and np.isfinite(out[1])
    # A masked bad token is not counted, so not loud.
    assert np.isfinite(metrics.sequence_log_probs(z, bad, where=bad != 9)[0])


def test_perplexity_matches_float64_and_torch():
    z, y = _batch(2)
    mask = np.random.default_rng(3).random(y.shape) < 0.8
    want = np.exp(-np_log_probs(z, y)[mask].mean())
    got = metrics.perplexity(z, y, where=mask)
    np.testing.assert_allclose(got, want, rtol=slack("chained", F32))
    assert metrics.perplexity(z, y, where=np.zeros_like(mask)) == 1.0  # nothing counted
    np.testing.assert_allclose(
        metrics.perplexity(np.zeros((2, 3, 8), np.float32), y[:2, :3] % 8), 8.0, rtol=tol(F32)
    )
    torch = pytest.importorskip("torch")
    t = torch.nn.functional.cross_entropy(
        torch.tensor(z.reshape(-1, 50)),
        torch.tensor(np.where(mask, y, -100).reshape(-1)),
        ignore_index=-100,
    )
    np.testing.assert_allclose(got, float(torch.exp(t)), rtol=slack("two_paths", F32))


def np_top_k(z, y, k):
    """float64 reference: the label's rank counts classes above it, ties to the lower index."""
    z = np.asarray(z, np.float64)
    zy = np.take_along_axis(z, y[..., None], -1)
    before = np.arange(z.shape[-1]) < y[..., None]
    rank = ((z > zy) | ((z == zy) & before)).sum(-1)
    return rank < k


@pytest.mark.parametrize("k", [1, 3, 9])
def test_top_k_accuracy_matches_sklearn_and_the_reference(k):
    from sklearn.metrics import top_k_accuracy_score

    z, y = _batch(4, (400, 10), 1.0)
    got = metrics.top_k_accuracy(z, y, k=k)
    want = np_top_k(z, y, k).mean()
    np.testing.assert_allclose(got, want, rtol=tol(F32))
    np.testing.assert_allclose(
        got, top_k_accuracy_score(y, z, k=k, labels=np.arange(10)), rtol=tol(F32)
    )
    if k == 1:
        np.testing.assert_allclose(got, np.mean(z.argmax(-1) == y), rtol=tol(F32))


def test_top_k_accuracy_ties_masks_and_loud_data():
    z = np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 5.0, -np.inf]], np.float32)
    y = np.array([1, 2, 2])
    # Row 0: class 0 ties with the label and comes first: rank 1. Row 1: rank 2. Row 2: a
    # -inf label: rank 2.
    np.testing.assert_allclose(metrics.top_k_accuracy(z, y, k=1), 0.0)
    np.testing.assert_allclose(metrics.top_k_accuracy(z, y, k=2), 1 / 3, rtol=tol(F32))
    np.testing.assert_allclose(metrics.top_k_accuracy(z, y, k=3), 1.0)
    np.testing.assert_allclose(
        metrics.top_k_accuracy(z, y, k=2, where=np.array([True, False, False])), 1.0
    )
    np.testing.assert_allclose(metrics.top_k_accuracy(z, y, k=2, ignore_index=2), 1.0)
    assert metrics.top_k_accuracy(z, y, where=np.zeros(3, bool)) == 0.0
    assert np.isnan(metrics.top_k_accuracy(z, np.array([1, 3, 2])))
    nan = z.copy()
    nan[0, 0] = np.nan
    assert np.isnan(metrics.top_k_accuracy(nan, y))
    # jit and vmap over a batch of [N, V] problems.
    zz, yy = _batch(5, (4, 20, 6), 1.0)
    batched = jax.jit(jax.vmap(lambda a, b: metrics.top_k_accuracy(a, b, k=2)))(zz, yy)
    np.testing.assert_allclose(batched, np_top_k(zz, yy, 2).mean(-1), rtol=tol(F32))


def test_validation_names_the_argument():
    z, y = _batch()
    with pytest.raises(ValueError, match="labels has shape"):
        metrics.perplexity(z, y[:, :3])
    with pytest.raises(ValueError, match="k must be a positive int"):
        metrics.top_k_accuracy(z, y, k=0)
    with pytest.raises(TypeError, match="logits"):
        metrics.token_log_probs(np.ones((2, 3), np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="sequence axis"):
        metrics.sequence_log_probs(z[0, 0], 3)
