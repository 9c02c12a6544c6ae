"""sampled_softmax_cross_entropy: the estimator against float64 NumPy, its proposals, its
convergence to the full cross-entropy as the sample grows, masks, sharding and memory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import slack
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import softjax
from softjax._vocab import sampled

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16
N, D, V = 12, 8, 40
PROPOSALS = {
    "uniform": "uniform",
    "log_uniform": "log_uniform",
    "array": jnp.asarray(np.linspace(0.0, -3.0, V), F32),
}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), F32)
    w = jnp.asarray(rng.normal(size=(V, D)), F32)
    y = jnp.asarray(rng.integers(0, V, N))
    return x, w, y


def np_log_q(name, num_classes):
    """float64 ``log Q(c)`` of every class."""
    c = np.arange(num_classes, dtype=np.float64)
    if name == "uniform":
        return np.full(num_classes, -np.log(num_classes))
    if name == "log_uniform":
        return np.log(np.log((c + 2) / (c + 1)) / np.log(num_classes + 1))
    a = np.asarray(PROPOSALS[name], np.float64)
    return a - np.log(np.exp(a).sum())


def np_sampled_loss(x, w, y, classes, log_q, remove_hits, cap=None):
    """float64 NumPy losses per row of the estimator, from the drawn classes."""
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    if cap is not None:
        z = cap * np.tanh(z / cap)
    rows = np.arange(len(y))
    s = len(classes)
    target = z[rows, np.asarray(y)]
    samp = z[:, classes] - (np.log(s) + log_q[classes])[None, :]
    if remove_hits:
        samp = np.where(classes[None, :] == np.asarray(y)[:, None], -np.inf, samp)
    all_ = np.concatenate([target[:, None], samp], -1)
    m = all_.max(-1)
    return m + np.log(np.exp(all_ - m[:, None]).sum(-1)) - target


@pytest.mark.x64
@pytest.mark.parametrize("remove_hits", [True, False])
@pytest.mark.parametrize("name", list(PROPOSALS))
def test_the_estimator_matches_float64(name, remove_hits):
    x, w, y = _inputs()
    key = jax.random.key(7)
    classes, _ = sampled.draw(key, 64, V, PROPOSALS[name])
    classes = np.asarray(classes)
    assert np.any(classes[None, :] == np.asarray(y)[:, None])  # hits happen at these sizes
    ref = np_sampled_loss(x, w, y, classes, np_log_q(name, V), remove_hits, cap=6.0)
    got = softjax.sampled_softmax_cross_entropy(
        x, w, y, key, num_samples=64, proposal=PROPOSALS[name],
        remove_accidental_hits=remove_hits, logit_softcap=6.0, reduction="none",
    )  # fmt: skip
    assert got.dtype == F32 and got.shape == (N,)
    np.testing.assert_allclose(got, ref, rtol=slack("matmul_loss", F32))
    if not remove_hits:
        return
    # Its hand-written gradient (dw summed per distinct class) against finite differences.
    g = jnp.linspace(0.5, 1.5, N, dtype=F64)

    def f(x, w):
        out = softjax.sampled_softmax_cross_entropy(
            x, w, y, key, num_samples=64, proposal=PROPOSALS[name],
            remove_accidental_hits=remove_hits, logit_softcap=6.0, reduction="none",
        )  # fmt: skip
        return jnp.sum(out * g)

    check_grads(f, (x.astype(F64), w.astype(F64)), order=1, modes=["rev"])


def test_log_uniform_draws_follow_the_proposal():
    v, s = 1000, 200_000
    classes, log_sq = sampled.draw(jax.random.key(0), s, v, "log_uniform")
    counts = np.bincount(np.asarray(classes), minlength=v)
    q = np.exp(np_log_q("log_uniform", v))
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(log_sq), np.log(s * q[np.asarray(classes)]), rtol=1e-5)
    # The most frequent classes: each count within 5 binomial standard deviations.
    for c in (0, 1, 2, 10, 100):
        sd = math.sqrt(s * q[c] * (1 - q[c]))
        assert abs(counts[c] - s * q[c]) < 5 * sd, (c, counts[c], s * q[c])
    assert counts.min() >= 0 and np.asarray(classes).max() < v


@pytest.mark.parametrize("name", [pytest.param("uniform", marks=pytest.mark.slow), "log_uniform"])
def test_expected_loss_and_gradient_approach_the_exact_ones(name):
    x, w, y = _inputs(1)
    exact = softjax.linear_cross_entropy(x, w, y)
    exact_grads = jax.grad(softjax.linear_cross_entropy, (0, 1))(x, w, y)
    keys = jax.random.split(jax.random.key(3), 128)
    errors = []
    for s in (4, 32, 1024):

        def loss(x, w, key, s=s):
            return softjax.sampled_softmax_cross_entropy(x, w, y, key, num_samples=s, proposal=name)

        values = jax.jit(jax.vmap(loss, (None, None, 0)))(x, w, keys)
        grads = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), (None, None, 0)))(x, w, keys)
        rel = [
            float(jnp.linalg.norm(g.mean(0) - e) / jnp.linalg.norm(e))
            for g, e in zip(grads, exact_grads, strict=True)
        ]
        # The log of an unbiased estimate of the normaliser: below the exact loss on average.
        assert float(values.mean()) < float(exact)
        errors.append((float(exact - values.mean()), *rel))
    errors = np.array(errors)
    assert np.all(np.diff(errors, axis=0) < 0), errors  # every error shrinks as S grows
    assert np.all(errors[-1] < [0.02, 0.02, 0.02]), errors


@pytest.mark.x64
def test_masks_ignore_index_and_bad_labels():
    x, w, y = _inputs()
    key = jax.random.key(1)
    where = jnp.arange(N) % 3 != 0
    kw = dict(num_samples=16, proposal="uniform")
    rows = softjax.sampled_softmax_cross_entropy(x, w, y, key, reduction="none", **kw)
    masked = softjax.sampled_softmax_cross_entropy(
        x, w, y, key, where=where, reduction="none", **kw
    )
    np.testing.assert_array_equal(masked, jnp.where(where, rows, 0.0))
    mean = softjax.sampled_softmax_cross_entropy(x, w, y, key, where=where, **kw)
    np.testing.assert_allclose(mean, rows[where].mean(), rtol=slack("two_paths", F32))
    y_ign = y.at[0].set(-100)
    ign = softjax.sampled_softmax_cross_entropy(
        x, w, y_ign, key, ignore_index=-100, reduction="none", **kw
    )
    assert ign[0] == 0.0
    dx = jax.grad(lambda x: softjax.sampled_softmax_cross_entropy(x, w, y, key, where=where, **kw))(
        x
    )
    np.testing.assert_array_equal(np.asarray(dx)[~np.asarray(where)], 0.0)
    bad = softjax.sampled_softmax_cross_entropy(x, w, y.at[1].set(V), key, reduction="none", **kw)
    assert np.isnan(bad[1]) and np.all(np.isfinite(np.delete(np.asarray(bad), 1)))


def test_refusals_name_the_argument():
    x, w, y = _inputs()
    key = jax.random.key(0)
    loss = softjax.sampled_softmax_cross_entropy
    with pytest.raises(ValueError, match="num_samples"):
        loss(x, w, y, key, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        loss(x, w, y, key, num_samples=2.5)
    with pytest.raises(ValueError, match="proposal"):
        loss(x, w, y, key, num_samples=4, proposal="zipf")
    with pytest.raises(ValueError, match="proposal"):
        loss(x, w, y, key, num_samples=4, proposal=jnp.zeros(V + 1))
    with pytest.raises(TypeError, match="remove_accidental_hits"):
        loss(x, w, y, key, num_samples=4, remove_accidental_hits=1)
    with pytest.raises(ValueError, match="labels"):
        loss(x, w, y[:3], key, num_samples=4)


@pytest.mark.parametrize("name", ["log_uniform", "array"])
def test_vocab_parallel_matches_unsharded(name):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(16, 8)), F32)
    w = jnp.asarray(rng.normal(size=(1000, 8)), F32)
    y = jnp.asarray(rng.integers(0, 1000, 16))
    proposal = jnp.asarray(-np.log1p(np.arange(1000.0)), F32) if name == "array" else name
    key = jax.random.key(4)
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))

    def loss(x, w, axis=None):
        return softjax.sampled_softmax_cross_entropy(
            x, w, y, key, num_samples=300, proposal=proposal, vocab_axis_name=axis
        )

    sharded = jax.shard_map(
        lambda x, w: loss(x, w, "model"), mesh=mesh, in_specs=(P(), P("model")), out_specs=P()
    )
    out, grads = jax.jit(jax.value_and_grad(sharded, (0, 1)))(x, w)
    ref, rgrads = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    for a, b in zip(grads, rgrads, strict=True):
        np.testing.assert_allclose(a, b, rtol=slack("two_paths", F32), atol=1e-7)


def _temp_mib(fn, n, d, v):
    specs = (
        jax.ShapeDtypeStruct((n, d), BF16),
        jax.ShapeDtypeStruct((v, d), BF16),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.grad(fn, (0, 1))).lower(*specs).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_memory_is_flat_in_vocabulary():
    # What it holds is O((N + S) D): the gathered rows and their float32 gradients, summed per
    # class; nothing of size V (dw is the output) and nothing of size N x V.
    n, d, s = 8192, 2048, 1024

    def fused(x, w, y):
        return softjax.sampled_softmax_cross_entropy(x, w, y, jax.random.key(0), num_samples=s)

    def naive(x, w, y):
        logits = (x @ w.T).astype(F32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1))

    at_64k, at_128k = _temp_mib(fused, n, d, 65536), _temp_mib(fused, n, d, 131072)
    materialised = _temp_mib(naive, n, d, 131072)
    print(f"temp MiB: V=64k {at_64k:.1f}, V=128k {at_128k:.1f}, materialised {materialised:.1f}")
    rows_f32 = (n + s) * d * 4 / 2**20
    assert at_128k <= 5 * rows_f32, (at_128k, rows_f32)
    assert at_128k <= 0.04 * materialised, (at_128k, materialised)
    assert at_128k <= 1.01 * at_64k, (at_64k, at_128k)
