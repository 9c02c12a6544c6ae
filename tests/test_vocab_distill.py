"""linear_kl_divergence: forward / reverse KL and the generalised JSD of two x @ w.T softmaxes,
against float64 NumPy, streamed and materialised, sharded, and their memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import assert_close, loss_atol, slack
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import softjax
from softjax._vocab import chunked

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16
N, DS, DT, V = 13, 16, 24, 150

KINDS = {
    "forward": {},
    "reverse": {"direction": "reverse"},
    "jsd": {"beta": 0.5},
    "jsd-0.2": {"beta": 0.2},
}


def _inputs(dtype=F32, seed=0):
    """Student and teacher with different hidden sizes; the teacher sharper."""
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(N, DS)), F64).astype(dtype)
    ws = jnp.asarray(rng.normal(size=(V, DS)) / 2, F64).astype(dtype)
    xt = jnp.asarray(rng.normal(size=(N, DT)), F64).astype(dtype)
    wt = jnp.asarray(rng.normal(size=(V, DT)) / 1.5, F64).astype(dtype)
    return xs, ws, xt, wt


def np_divergence(xs, ws, xt, wt, direction="forward", beta=None, temperature=1.0):
    """float64 NumPy divergence per row, and the logits it came from."""
    f64 = lambda a: np.asarray(jnp.asarray(a, F32), np.float64)  # noqa: E731
    zs = f64(xs) @ f64(ws).T / temperature
    zt = f64(xt) @ f64(wt).T / temperature

    def log_softmax(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    ls, lt = log_softmax(zs), log_softmax(zt)
    ps, pt = np.exp(ls), np.exp(lt)
    if beta is not None:
        lm = np.log(beta * pt + (1 - beta) * ps)
        out = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    elif direction == "forward":
        out = (pt * (lt - ls)).sum(-1)
    else:
        out = (ps * (ls - lt)).sum(-1)
    return out, np.concatenate([zs, zt], -1)


@pytest.mark.x64
@pytest.mark.parametrize("impl", ["chunked", "xla"])
@pytest.mark.parametrize("temperature", [1.7, pytest.param(1.0, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_values_match_float64(small_blocks, impl, temperature, kind):
    xs, ws, xt, wt = _inputs()
    kw = KINDS[kind]
    ref, z = np_divergence(xs, ws, xt, wt, temperature=temperature, **kw)
    where = jnp.arange(N) % 4 != 3
    got = softjax.linear_kl_divergence(
        xs, ws, xt, wt, temperature=temperature, where=where, reduction="none",
        implementation=impl, **kw,
    )  # fmt: skip
    assert got.dtype == F32 and got.shape == (N,)
    atol = loss_atol("two_paths", F32, z)
    ref = np.where(where, ref, 0.0)
    np.testing.assert_allclose(got, ref, rtol=slack("two_paths", F32), atol=atol)
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(where)], 0.0)
    assert np.all(ref[np.asarray(where)] > 0.01)  # a test of something, not of zeros
    for reduction, want in (("sum", ref.sum()), ("mean", ref.sum() / np.sum(where))):
        got = softjax.linear_kl_divergence(
            xs, ws, xt, wt, temperature=temperature, where=where, reduction=reduction,
            implementation=impl, **kw,
        )  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=slack("two_paths", F32), atol=N * atol)


def _objective(impl, kind, reduction, temperature=1.3, where=None):
    """The divergence as a scalar function of the student (per-row cotangents for "none")."""
    g = jnp.linspace(0.5, 1.5, N)

    def f(xs, ws, xt, wt):
        out = softjax.linear_kl_divergence(
            xs, ws, xt, wt, temperature=temperature, where=where, reduction=reduction,
            implementation=impl, **KINDS[kind],
        )  # fmt: skip
        return jnp.sum(out * g.astype(out.dtype)) if reduction == "none" else out

    return f


@pytest.mark.x64
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd-0.2"])
@pytest.mark.parametrize(
    "dtype,reduction", [(F32, "none"), (F32, "mean"), (F32, "sum"), (BF16, "mean")]
)
def test_student_gradients_match_float64(small_blocks, kind, dtype, reduction):
    # f32 "none" and bf16 take the streaming backward, f32 "mean"/"sum" the single pass.
    xs, ws, xt, wt = _inputs(dtype)
    where = jnp.arange(N) % 5 != 2
    got = jax.jit(jax.grad(_objective("chunked", kind, reduction, where=where), (0, 1)))(
        xs, ws, xt, wt
    )
    # The float64 reference sees exactly the (rounded) inputs: materialised, autodiff.
    up = [a.astype(F64) for a in (xs, ws, xt, wt)]
    want = jax.grad(_objective("xla", kind, reduction, where=where), (0, 1))(*up)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    rtol = slack("matmul_grad", F32) if dtype == F32 else slack("two_paths", BF16)
    for a, b in zip(got, want, strict=True):
        assert_close(a.astype(F64), b, rtol=rtol)
    assert np.all(np.asarray(got[0])[~np.asarray(where)] == 0)


@pytest.mark.x64
@pytest.mark.parametrize("reduction", ["none", pytest.param("mean", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_check_grads_in_float64(small_blocks, kind, reduction):
    xs, ws, xt, wt = _inputs(F64, seed=3)
    f = _objective("chunked", kind, reduction)
    check_grads(lambda a, b: f(a, b, xt, wt), (xs, ws), order=1, modes=["rev"])


@pytest.mark.x64
def test_teacher_is_a_constant_and_t_squared_is_an_option(small_blocks):
    xs, ws, xt, wt = _inputs()
    f = _objective("chunked", "forward", "mean", temperature=2.0)
    for impl in ("chunked", "xla"):
        f = _objective(impl, "forward", "mean", temperature=2.0)
        dxt, dwt = jax.grad(f, (2, 3))(xs, ws, xt, wt)
        np.testing.assert_array_equal(dxt, 0.0)
        np.testing.assert_array_equal(dwt, 0.0)
    plain = softjax.linear_kl_divergence(xs, ws, xt, wt, temperature=2.0)
    hinton = softjax.linear_kl_divergence(
        xs, ws, xt, wt, temperature=2.0, multiply_by_temperature_squared=True
    )
    np.testing.assert_allclose(hinton, 4.0 * plain, rtol=slack("two_paths", F32))
    # The student against itself: exactly zero, with a zero gradient.
    same = jax.value_and_grad(lambda a: softjax.linear_kl_divergence(a, ws, a, ws))(xs)
    assert same[0] == 0.0
    np.testing.assert_array_equal(same[1], 0.0)


@pytest.mark.x64
def test_ignore_index_and_empty_batches(small_blocks):
    xs, ws, xt, wt = _inputs()
    labels = jnp.arange(N) % 7
    out = softjax.linear_kl_divergence(
        xs, ws, xt, wt, labels=labels, ignore_index=3, reduction="none"
    )
    keep = np.asarray(labels) != 3
    ref, _ = np_divergence(xs, ws, xt, wt)
    np.testing.assert_allclose(out, np.where(keep, ref, 0.0), rtol=slack("two_paths", F32))
    nothing = jnp.zeros((N,), bool)

    def mean(a):
        return softjax.linear_kl_divergence(a, ws, xt, wt, where=nothing)

    value, grad = jax.value_and_grad(mean)(xs)
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.x64
def test_refusals_name_the_argument():
    xs, ws, xt, wt = _inputs()
    kl = softjax.linear_kl_divergence
    with pytest.raises(ValueError, match="direction"):
        kl(xs, ws, xt, wt, direction="backward")
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="beta"):
            kl(xs, ws, xt, wt, beta=beta)
    with pytest.raises(ValueError, match="beta"):
        kl(xs, ws, xt, wt, beta=0.5, direction="reverse")
    with pytest.raises(ValueError, match="w_teacher"):
        kl(xs, ws, xt, wt[:-1])
    with pytest.raises(ValueError, match="w_teacher"):
        kl(xs, ws, xt, wt[:, :-1])
    with pytest.raises(ValueError, match="x_teacher"):
        kl(xs, ws, xt[:-1], wt)
    with pytest.raises(ValueError, match="ignore_index needs labels"):
        kl(xs, ws, xt, wt, ignore_index=0)
    with pytest.raises(ValueError, match="temperature"):
        kl(xs, ws, xt, wt, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        kl(xs, ws, xt, wt, reduction="batchmean")
    with pytest.raises(NotImplementedError, match="chunked"):
        kl(xs, ws, xt, wt, implementation="pallas")


@pytest.mark.x64
@pytest.mark.parametrize(
    "kind,reduction",
    [
        ("forward", "mean"),
        ("jsd-0.2", "none"),
        pytest.param("reverse", "mean", marks=pytest.mark.slow),
        pytest.param("forward", "none", marks=pytest.mark.slow),
        pytest.param("reverse", "none", marks=pytest.mark.slow),
        pytest.param("jsd-0.2", "mean", marks=pytest.mark.slow),
    ],
)
def test_vocab_parallel_matches_unsharded(monkeypatch, kind, reduction):
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 48)  # 125 classes a device: 3 blocks, ragged
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.normal(size=(16, 8)), F32)
    ws = jnp.asarray(rng.normal(size=(1000, 8)), F32)
    xt = jnp.asarray(rng.normal(size=(16, 12)), F32)
    wt = jnp.asarray(rng.normal(size=(1000, 12)), F32)
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    g = jnp.linspace(0.5, 1.5, 16)

    def total(xs, ws, xt, wt, axis=None):
        out = softjax.linear_kl_divergence(
            xs, ws, xt, wt, temperature=1.5, reduction=reduction, vocab_axis_name=axis,
            **KINDS[kind],
        )  # fmt: skip
        return jnp.sum(out * g) if reduction == "none" else out

    spec = (P(), P("model"), P(), P("model"))
    sharded = jax.shard_map(
        lambda *a: total(*a, axis="model"), mesh=mesh, in_specs=spec, out_specs=P()
    )
    out, grads = jax.jit(jax.value_and_grad(sharded, (0, 1)))(xs, ws, xt, wt)
    ref, rgrads = jax.jit(jax.value_and_grad(total, (0, 1)))(xs, ws, xt, wt)
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    for a, b in zip(grads, rgrads, strict=True):
        assert_close(a, b, rtol=slack("two_paths", F32))


def _temp_mib(fn, n, d, v):
    args = [jax.ShapeDtypeStruct(s, BF16) for s in ((n, d), (v, d), (n, d), (v, d))]
    compiled = jax.jit(jax.grad(fn, (0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_memory_is_flat_in_vocabulary():
    n, d = 8192, 2048

    def fused(xs, ws, xt, wt):
        return softjax.linear_kl_divergence(xs, ws, xt, wt, temperature=2.0)

    def naive(xs, ws, xt, wt):
        ls = jax.nn.log_softmax((xs @ ws.T).astype(F32) / 2.0)
        lt = jax.nn.log_softmax((xt @ wt.T).astype(F32) / 2.0)
        return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1))

    at_64k, at_128k = _temp_mib(fused, n, d, 65536), _temp_mib(fused, n, d, 131072)
    materialised = _temp_mib(naive, n, d, 131072)
    print(f"temp MiB: V=64k {at_64k:.1f}, V=128k {at_128k:.1f}, materialised {materialised:.1f}")
    assert at_128k <= 0.02 * materialised, (at_128k, materialised)
    assert at_128k <= 1.10 * at_64k, (at_64k, at_128k)
