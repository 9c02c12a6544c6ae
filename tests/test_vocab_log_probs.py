"""linear_log_probs: per-token log-probabilities and entropies of x @ w.T, against float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import assert_close, slack
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import softjax
from softjax._vocab import chunked

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16
N, D, V = 13, 16, 150


def _inputs(dtype=F32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), F64).astype(dtype)
    w = jnp.asarray(rng.normal(size=(V, D)) / 2, F64).astype(dtype)
    y = jnp.asarray(rng.integers(0, V, N)).at[0].set(V - 1).at[1].set(0)
    where = jnp.arange(N) % 4 != 3
    return x, w, y, where


def np_scores(x, w, y, where, temperature=1.0, cap=None):
    """float64 NumPy ``log p(y)`` and entropy per row (0 where excluded)."""
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    if cap is not None:
        z = cap * np.tanh(z / cap)
    z = z / temperature
    m = z.max(-1, keepdims=True)
    lp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    out = lp[np.arange(len(y)), np.asarray(y)]
    ent = -(np.exp(lp) * lp).sum(-1)
    where = np.asarray(where)
    return np.where(where, out, 0.0), np.where(where, ent, 0.0)


OPTIONS = {
    "plain": {},
    "softcap": {"logit_softcap": 4.0},
    "temperature": {"temperature": 0.7},
    "both": {"temperature": 1.6, "logit_softcap": 4.0},
}


@pytest.mark.x64
@pytest.mark.parametrize("impl", ["chunked", "xla", "pallas"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_values_match_float64(small_blocks, impl, name):
    x, w, y, where = _inputs()
    kw = OPTIONS[name]
    ref_lp, ref_h = np_scores(x, w, y, where, kw.get("temperature", 1.0), kw.get("logit_softcap"))
    log_p = softjax.linear_log_probs(x, w, y, where=where, implementation=impl, **kw)
    assert log_p.dtype == F32 and log_p.shape == (N,)
    np.testing.assert_allclose(log_p, ref_lp, rtol=slack("two_paths", F32), atol=1e-6)
    log_p, ent = softjax.linear_log_probs(
        x, w, y, where=where, return_entropy=True, implementation=impl, **kw
    )
    np.testing.assert_allclose(log_p, ref_lp, rtol=slack("two_paths", F32), atol=1e-6)
    np.testing.assert_allclose(ent, ref_h, rtol=slack("two_paths", F32), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(log_p)[~np.asarray(where)], 0.0)


def _loss(impl, temperature_kind="traced", cap=4.0):
    """A scalar mixing log p and H with per-row cotangents, as a function of (x, w, T)."""
    g = jnp.linspace(0.5, 1.5, N)
    h = jnp.linspace(-1.0, 2.0, N)

    def f(x, w, t):
        t = t if temperature_kind == "traced" else float(t)
        log_p, ent = softjax.linear_log_probs(
            x, w, _inputs()[2], temperature=t, logit_softcap=cap, where=_inputs()[3],
            return_entropy=True, implementation=impl,
        )  # fmt: skip
        return jnp.sum(log_p * g.astype(log_p.dtype)) + jnp.sum(ent * h.astype(ent.dtype))

    return f


@pytest.mark.x64
@pytest.mark.parametrize(
    "impl,dtype,cap",
    [
        ("chunked", F32, None),
        ("chunked", F32, 4.0),
        ("chunked", BF16, None),
        ("chunked", BF16, 4.0),
        # The Pallas kernels (interpreted): the temperature, the moments and the spread
        # coefficient inside them.
        ("pallas", F32, 4.0),
        ("pallas", BF16, None),
    ],
)
def test_gradients_in_x_w_and_temperature_match_float64(small_blocks, impl, dtype, cap):
    x, w, _, _ = _inputs(dtype)
    t = jnp.asarray(0.8, F32)
    got = jax.jit(jax.grad(_loss(impl, cap=cap), (0, 1, 2)))(x, w, t)
    # The float64 reference sees exactly the (rounded) inputs: materialised, autodiff.
    want = jax.grad(_loss("xla", cap=cap), (0, 1, 2))(x.astype(F64), w.astype(F64), t.astype(F64))
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == F32
    rtol = slack("matmul_grad", F32) if dtype == F32 else slack("two_paths", BF16)
    for a, b in zip(got, want, strict=True):
        assert_close(a.astype(F64), b, rtol=rtol)


@pytest.mark.x64
def test_masked_positions_give_zero_with_zero_gradient_and_bad_labels_are_loud(small_blocks):
    x, w, y, where = _inputs()
    y_bad = y.at[3].set(V + 5).at[2].set(V + 5)  # row 3 is masked, row 2 is not

    def f(x):
        log_p, ent = softjax.linear_log_probs(x, w, y, where=where, return_entropy=True)
        return jnp.sum(log_p) + jnp.sum(ent)

    dx = jax.grad(f)(x)
    np.testing.assert_array_equal(np.asarray(dx)[~np.asarray(where)], 0.0)
    log_p = softjax.linear_log_probs(x, w, y_bad, where=where)
    assert np.isnan(log_p[2]) and log_p[3] == 0.0


@pytest.mark.x64
def test_refusals_name_the_argument():
    x, w, y, _ = _inputs()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            softjax.linear_log_probs(x, w, y, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        softjax.linear_log_probs(x, w, y, temperature=jnp.ones((2,)))
    with pytest.raises(TypeError, match="return_entropy"):
        softjax.linear_log_probs(x, w, y, return_entropy=1)
    with pytest.raises(ValueError, match="labels"):
        softjax.linear_log_probs(x, w, y[:3])


@pytest.mark.x64
@pytest.mark.parametrize("kw", [{}, {"temperature": 0.7, "return_entropy": True}])
def test_vocab_parallel_matches_unsharded(monkeypatch, kw):
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 48)  # 125 classes a device: 3 blocks, ragged
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(16, 8)), F32)
    w = jnp.asarray(rng.normal(size=(1000, 8)), F32)
    y = jnp.asarray(rng.integers(0, 1000, 16)).at[2].set(999).at[3].set(0)
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))

    def scores(x, w, axis=None):
        out = softjax.linear_log_probs(x, w, y, logit_softcap=5.0, vocab_axis_name=axis, **kw)
        return out if isinstance(out, tuple) else (out,)

    def total(x, w, axis=None):
        return sum(jnp.sum(o * (i + 1.0)) for i, o in enumerate(scores(x, w, axis)))

    sharded = jax.shard_map(
        lambda x, w: total(x, w, "model"), mesh=mesh, in_specs=(P(), P("model")), out_specs=P()
    )
    out, grads = jax.jit(jax.value_and_grad(sharded, (0, 1)))(x, w)
    ref, rgrads = jax.jit(jax.value_and_grad(total, (0, 1)))(x, w)
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    for a, b in zip(grads, rgrads, strict=True):
        assert_close(a, b, rtol=slack("two_paths", F32))


def _temp_mib(fn, n, d, v):
    args = (
        jax.ShapeDtypeStruct((n, d), BF16),
        jax.ShapeDtypeStruct((v, d), BF16),
        jax.ShapeDtypeStruct((), F32),
    )
    compiled = jax.jit(jax.grad(fn, (0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_memory_is_flat_in_vocabulary():
    n, d = 8192, 2048
    y = jnp.zeros((n,), jnp.int32)

    def fused(x, w, t):
        log_p, ent = softjax.linear_log_probs(x, w, y, temperature=t, return_entropy=True)
        return jnp.sum(log_p) + jnp.sum(ent)

    def naive(x, w, t):
        lp = jax.nn.log_softmax((x @ w.T).astype(F32) / t)
        return jnp.sum(lp[:, 0]) - jnp.sum(jnp.exp(lp) * lp)

    at_64k, at_128k = _temp_mib(fused, n, d, 65536), _temp_mib(fused, n, d, 131072)
    materialised = _temp_mib(naive, n, d, 131072)
    print(f"temp MiB: V=64k {at_64k:.1f}, V=128k {at_128k:.1f}, materialised {materialised:.1f}")
    assert at_128k <= 0.02 * materialised, (at_128k, materialised)
    assert at_128k <= 1.10 * at_64k, (at_64k, at_128k)
