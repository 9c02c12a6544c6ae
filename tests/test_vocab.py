"""linear_cross_entropy: parity with the materialising oracle and a float64 NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import assert_close, slack, tol
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import softjax
from softjax._vocab import chunked, pallas_gpu
from softjax._vocab.reference import linear_cross_entropy_reference

F32, BF16, F64 = jnp.float32, jnp.bfloat16, jnp.float64


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 512 classes and ~10 tokens: small problems span several ragged ones."""
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 512)
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    monkeypatch.setattr(chunked, "BLOCK_N", 10)
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 10_000)  # single pass: 10 tokens at V=1000


def make(n, d, v, dtype=F32, seed=0, scale=1.0):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = (jax.random.normal(kx, (n, d), F64) * scale).astype(dtype)
    w = (jax.random.normal(kw, (v, d), F64) / np.sqrt(d) * 3).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v)
    return x, w, y


def np_loss(x, w, y, *, valid=None, weight=None, smoothing=0.0, z_loss=0.0, cap=None):
    """float64 NumPy per-row losses of PyTorch's CrossEntropyLoss on x @ w.T (+ z-loss, cap)."""
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    if cap is not None:
        z = cap * np.tanh(z / cap)
    v = z.shape[-1]
    cw = np.ones(v) if weight is None else np.asarray(weight, np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
    nlp = lse[:, None] - z
    y = np.asarray(y)
    wy = cw[y]
    loss = (1 - smoothing) * wy * nlp[np.arange(len(y)), y]
    loss += smoothing / v * (nlp * cw).sum(-1) + z_loss * wy * lse**2
    valid = np.ones(len(y), bool) if valid is None else np.asarray(valid)
    return np.where(valid, loss, 0.0), np.where(valid, wy, 0.0)


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "weight": {"weight": "w"},
    "weight_smoothing": {"weight": "w", "label_smoothing": 0.3},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"logit_softcap": 3.0},
    "all": {"weight": "w", "label_smoothing": 0.2, "z_loss": 1e-3, "logit_softcap": 4.0},
}


def _options(name, v, seed=1):
    kw = dict(OPTIONS[name])
    if kw.get("weight") == "w":
        kw["weight"] = jax.random.uniform(jax.random.key(seed), (v,), F64, 0.2, 2.0)
    return kw


def _np_kwargs(kw):
    return dict(
        weight=kw.get("weight"),
        smoothing=kw.get("label_smoothing", 0.0),
        z_loss=kw.get("z_loss", 0.0),
        cap=kw.get("logit_softcap"),
    )


# Every option under an arbitrary cotangent ("none"); the other reductions with all options
# at once by default, one by one in the slow run.
CASES = [(name, "none") for name in OPTIONS] + [("all", "mean"), ("all", "sum")]
CASES += [pytest.param(name, "mean", marks=pytest.mark.slow) for name in OPTIONS if name != "all"]


@pytest.mark.x64
@pytest.mark.parametrize("name,reduction", CASES)
def test_value_and_grads_match_oracle(small_blocks, name, reduction):
    n, d, v = 24, 16, 1000  # 2 blocks of 512, the second one ragged
    x, w, y = make(n, d, v)
    y = y.at[3].set(-100).at[7].set(v - 1).at[8].set(0)
    valid = jnp.arange(n) % 5 != 4
    kw = _options(name, v)
    kw32 = {k: (a.astype(F32) if k == "weight" else a) for k, a in kw.items()}
    g_out = jax.random.normal(jax.random.key(9), (n,), F64)

    def run(fn, x, w, **extra):
        def f(x, w):
            out = fn(x, w, y, where=valid, ignore_index=-100, reduction=reduction, **extra)
            return jnp.sum(out * g_out.astype(out.dtype)) if reduction == "none" else out

        return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    out, (dx, dw) = run(softjax.linear_cross_entropy, x, w, **kw32)
    ref, (rdx, rdw) = run(linear_cross_entropy_reference, x.astype(F64), w.astype(F64), **kw)
    assert out.dtype == F32 and dx.dtype == F32 and dw.dtype == F32
    rows, wy = np_loss(x, w, y, valid=valid & (y != -100), **_np_kwargs(kw))
    expect = {"mean": rows.sum() / wy.sum(), "sum": rows.sum(), "none": rows @ g_out}[reduction]
    np.testing.assert_allclose(float(ref), expect, rtol=1e-12)
    np.testing.assert_allclose(float(out), expect, rtol=slack("two_paths", F32))
    # The f32 matmul of D terms perturbs each logit by ~D/2 ulps; gradients inherit that.
    assert_close(dx, rdx, rtol=slack("matmul_grad", F32))
    assert_close(dw, rdw, rtol=slack("matmul_grad", F32))


@pytest.mark.x64
@pytest.mark.parametrize(
    "v,block",
    [(5000, 512), pytest.param(50257, 4096, marks=pytest.mark.slow), (7, 4096), (513, 512)],
)
def test_ragged_vocabularies(monkeypatch, v, block):
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", block)
    n, d = 6, 8
    x, w, y = make(n, d, v, seed=v)
    y = y.at[0].set(v - 1).at[1].set(0).at[2].set(v - block // 3 if v > block else 1)
    g = jax.random.normal(jax.random.key(v), (n,), F64)

    def run(fn, x, w):
        # "none" with an arbitrary cotangent: the streaming (blocked) path.
        out = lambda x, w: fn(x, w, y, label_smoothing=0.1, reduction="none")  # noqa: E731
        f = lambda x, w: jnp.sum(out(x, w) * g.astype(out(x, w).dtype))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    out, (dx, dw) = run(softjax.linear_cross_entropy, x, w)
    ref, (rdx, rdw) = run(linear_cross_entropy_reference, x.astype(F64), w.astype(F64))
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32), atol=slack("two_paths", F32))
    assert_close(dx, rdx, rtol=slack("matmul_grad", F32))
    assert_close(dw, rdw, rtol=slack("matmul_grad", F32))


@pytest.mark.x64
def test_float64_is_exact(small_blocks):
    x, w, y = make(16, 8, 700, F64)
    kw = _options("all", 700)
    out, grads = jax.jit(
        jax.value_and_grad(lambda x, w: softjax.linear_cross_entropy(x, w, y, **kw), (0, 1))
    )(x, w)
    ref, rgrads = jax.jit(
        jax.value_and_grad(lambda x, w: linear_cross_entropy_reference(x, w, y, **kw), (0, 1))
    )(x, w)
    assert out.dtype == F64
    np.testing.assert_allclose(out, ref, rtol=tol(F64))
    for a, b in zip(grads, rgrads, strict=True):
        assert_close(a, b, rtol=slack("matmul_grad", F64))


@pytest.mark.x64
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bfloat16_operands(small_blocks, reduction):
    x, w, y = make(32, 64, 1500, BF16)
    g = jax.random.normal(jax.random.key(3), (32,), F32)

    def run(fn, x, w):
        def f(x, w):
            out = fn(x, w, y, label_smoothing=0.1, reduction=reduction)
            return jnp.sum(out * g.astype(out.dtype)) if reduction == "none" else out

        return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    out, (dx, dw) = run(softjax.linear_cross_entropy, x, w)
    # The oracle sees the same bf16 values, exactly, in float64.
    ref, (rdx, rdw) = run(linear_cross_entropy_reference, x.astype(F64), w.astype(F64))
    assert out.dtype == F32 and dx.dtype == BF16 and dw.dtype == BF16
    # bf16 x bf16 products are exact in float32: the loss is float32-accurate.
    np.testing.assert_allclose(out, ref, rtol=slack("matmul_loss", F32))
    # Gradients: the bf16 rounding of the result, plus dz rounded to bf16 in the matmuls.
    assert_close(dx, rdx, rtol=slack("bf16_grad", BF16))
    assert_close(dw, rdw, rtol=slack("bf16_grad", BF16))


@pytest.mark.x64
def test_batch_dims_and_where_broadcast():
    x, w, y = make(12, 8, 300)
    x3, y3 = x.reshape(3, 4, 8), y.reshape(3, 4)
    where = jnp.array([True, False, True, True])  # broadcast over the batch
    out = softjax.linear_cross_entropy(x3, w, y3, where=where, reduction="none")
    assert out.shape == (3, 4)
    rows, _ = np_loss(x, w, y, valid=np.tile(np.asarray(where), 3))
    np.testing.assert_allclose(out.reshape(-1), rows, rtol=slack("two_paths", F32))


@pytest.mark.x64
def test_out_of_range_label_is_nan_in_its_row_only():
    x, w, y = make(5, 8, 50)
    y = y.at[2].set(50)
    out = jax.jit(functools.partial(softjax.linear_cross_entropy, reduction="none"))(x, w, y)
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(np.asarray(out), 2)))
    assert np.isnan(softjax.linear_cross_entropy(x, w, y))


@pytest.mark.x64
def test_all_ignored_gives_zero_loss_and_gradients():
    x, w, _ = make(5, 8, 50)
    y = jnp.full((5,), -100)
    f = lambda x, w: softjax.linear_cross_entropy(x, w, y, ignore_index=-100, z_loss=1e-3)  # noqa: E731
    out, (dx, dw) = jax.value_and_grad(f, (0, 1))(x, w)
    np.testing.assert_array_equal(out, 0.0)
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dw, 0.0)


def test_confident_row_keeps_its_tiny_loss(small_blocks):
    # One class dominates by ~25 nats: the loss is ~1e-11, far below one ulp of lse.
    d, v = 4, 600
    w = jnp.zeros((v, d), F32).at[555, 0].set(1.0)
    x = jnp.array([[25.0, 0, 0, 0]], F32)
    out = softjax.linear_cross_entropy(x, w, jnp.array([555]))
    expect = np.log1p((v - 1) * np.exp(-25.0))
    np.testing.assert_allclose(out, expect, rtol=tol(F32))


@pytest.mark.x64
@pytest.mark.parametrize("rows", [8, 37])
def test_target_dots_gathered_in_token_chunks_equal_one_gather(rows):
    # 37 tokens in chunks of 8: four chunks and a fifth clamped onto the fourth's rows.
    x, w, y = make(37, 40, 300, dtype=F64)
    y = y.at[0].set(-100).at[5].set(299)
    one = chunked.target_dots(x, w, y)
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(one, z[np.arange(37), np.clip(np.asarray(y), 0, 299)], rtol=1e-12)
    blocked = jax.jit(functools.partial(chunked.target_dots_chunked, rows=rows))(x, w, y)
    np.testing.assert_array_equal(blocked, one)


@pytest.mark.x64
def test_jit_and_vmap():
    x, w, y = make(12, 8, 300)
    f = jax.jit(lambda x, y: softjax.linear_cross_entropy(x, w, y, reduction="sum"))
    batched = jax.vmap(f)(x.reshape(3, 4, 8), y.reshape(3, 4))
    np.testing.assert_allclose(
        batched, [f(x[i : i + 4], y[i : i + 4]) for i in (0, 4, 8)], rtol=tol(F32)
    )


@pytest.mark.x64
def test_errors():
    x, w, y = make(4, 8, 10)
    lce = softjax.linear_cross_entropy
    with pytest.raises(ValueError, match=r"w has shape \(10, 7\) but x \(4, 8\)"):
        lce(x, w[:, :7], y)
    with pytest.raises(ValueError, match=r"w must have shape \(V, D\)"):
        lce(x, w[None], y)
    with pytest.raises(ValueError, match=r"labels has shape \(3,\)"):
        lce(x, w, y[:3])
    # It takes no class probabilities, so the message must not suggest them.
    with pytest.raises(TypeError, match="linear_cross_entropy takes integer class labels"):
        lce(x, w, y.astype(F32))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        lce(jnp.ones((4, 8), jnp.int32), w, y)
    with pytest.raises(ValueError, match=r"weight must have shape \(10,\)"):
        lce(x, w, y, weight=jnp.ones(9))
    with pytest.raises(ValueError, match="reduction must be one of"):
        lce(x, w, y, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        lce(x, w, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="implementation must be one of"):
        lce(x, w, y, implementation="fast")
    with pytest.raises(NotImplementedError, match="use implementation='pallas'"):
        lce(x, w, y, implementation="triton")
    with pytest.raises(ValueError, match=r"where has shape \(3,\)"):
        lce(x, w, y, where=jnp.ones(3, bool))


# ---------------------------------------------------------------------------------------
# Memory: compiled temp size of value_and_grad (exact, compiles without running)


def _temp_mib(fn, n, d, v, dtype=BF16):
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((v, d), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    compiled = jax.jit(jax.value_and_grad(fn, (0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _naive(x, w, y):
    import optax

    logits = (x @ w.T).astype(F32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def test_memory_is_flat_in_vocabulary_and_far_below_naive():
    n, d = 8192, 2048
    fused = lambda x, w, y: softjax.linear_cross_entropy(x, w, y, implementation="chunked")  # noqa: E731
    at_64k = _temp_mib(fused, n, d, 65536)
    at_128k = _temp_mib(fused, n, d, 131072)
    naive = _temp_mib(_naive, n, d, 131072)
    assert naive >= 9216  # the 4 GiB float32 logits, their gradient and the bf16 copies
    assert at_128k <= 0.02 * naive, (at_128k, naive)
    assert at_128k <= 1.10 * at_64k, (at_64k, at_128k)


# ---------------------------------------------------------------------------------------
# Vocab-parallel: w sharded along V over a mesh axis inside shard_map


def _sharded_case(v=1000, n=16, d=8):
    x, w, y = make(n, d, v, seed=5)
    y = y.at[1].set(-100).at[2].set(v - 1).at[3].set(0)
    weight = jax.random.uniform(jax.random.key(6), (v,), F32, 0.5, 2.0)
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
    return x, w, y, weight, kw


@pytest.mark.x64
@pytest.mark.parametrize("impl", ["chunked", "xla"])
@pytest.mark.parametrize("with_weight", [False, True])
def test_vocab_parallel_matches_unsharded(monkeypatch, with_weight, impl):
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 48)  # 125 classes a device: 3 blocks, ragged
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    x, w, y, weight, kw = _sharded_case()
    weight = weight if with_weight else None
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))

    def local(x, w, y, weight):
        return softjax.linear_cross_entropy(
            x, w, y, weight=weight, vocab_axis_name="model", implementation=impl, **kw
        )

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P("model"), P(), P("model")), out_specs=P()
    )
    out, grads = jax.jit(jax.value_and_grad(sharded, (0, 1)))(x, w, y, weight)
    ref, rgrads = jax.jit(
        jax.value_and_grad(
            lambda x, w: softjax.linear_cross_entropy(x, w, y, weight=weight, **kw), (0, 1)
        )
    )(x, w)
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    for a, b in zip(grads, rgrads, strict=True):
        assert_close(a, b, rtol=slack("two_paths", F32))


@pytest.mark.x64
@pytest.mark.parametrize("check_vma,spec", [(False, P("model")), (True, P())])
def test_vocab_parallel_refuses_untyped_or_replicated_w(check_vma, spec):
    x, w, y, _, _ = _sharded_case()
    mesh = Mesh(np.array(jax.devices()[:8]), ("model",))
    local = lambda x, w: softjax.linear_cross_entropy(x, w, y, vocab_axis_name="model")  # noqa: E731
    f = jax.shard_map(local, mesh=mesh, in_specs=(P(), spec), out_specs=P(), check_vma=check_vma)
    with pytest.raises(ValueError, match="check_vma=True"):
        f(x, w)


@pytest.mark.x64
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_vocab_parallel_with_data_axis(monkeypatch, reduction):
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 100)  # 250 classes a device
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    x, w, y, _, kw = _sharded_case()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    g = jax.random.normal(jax.random.key(4), (x.shape[0],), F32)

    def local(x, w, y):
        out = softjax.linear_cross_entropy(
            x, w, y, reduction=reduction, vocab_axis_name="model", **kw
        )
        return jax.lax.psum(out, "data") if reduction == "sum" else out

    out_spec = P() if reduction == "sum" else P("data")
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"), P("model"), P("data")), out_specs=out_spec
    )

    def scalar(fn):
        return lambda x, w: jnp.sum(fn(x, w) * (g if reduction == "none" else 1.0))

    out, grads = jax.jit(jax.value_and_grad(scalar(lambda x, w: sharded(x, w, y)), (0, 1)))(x, w)
    plain = lambda x, w: softjax.linear_cross_entropy(x, w, y, reduction=reduction, **kw)  # noqa: E731
    ref, rgrads = jax.jit(jax.value_and_grad(scalar(plain), (0, 1)))(x, w)
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    for a, b in zip(grads, rgrads, strict=True):
        assert_close(a, b, rtol=slack("two_paths", F32))
    rows = jax.jit(sharded)(x, w, y)
    expect = plain(x, w)
    np.testing.assert_allclose(rows, expect, rtol=slack("two_paths", F32))


# ---------------------------------------------------------------------------------------
# Pallas kernels: interpret mode on CPU against the chunked path, lowering for real targets
# (compiled for real chips in tests/test_accel.py)

PALLAS_CASES = [pytest.param("plain", marks=pytest.mark.slow), "all"]


@pytest.mark.x64
@pytest.mark.parametrize("name", PALLAS_CASES)
def test_pallas_interpret_matches_xla(name):
    # Ragged in tokens (blocks of 8), classes (128) and the hidden size (D steps of 16).
    n, d, v = 37, 40, 300
    x, w, y = make(n, d, v, seed=11)
    y = y.at[0].set(-100).at[1].set(v - 1)
    kw = {k: (a.astype(F32) if k == "weight" else a) for k, a in _options(name, v).items()}
    g = jax.random.normal(jax.random.key(2), (n,), F32)

    def run(impl):
        def f(x, w):
            out = softjax.linear_cross_entropy(
                x, w, y, ignore_index=-100, reduction="none", implementation=impl, **kw
            )
            return jnp.sum(out * g)

        return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    out, (dx, dw) = run("pallas")
    ref, (rdx, rdw) = run("chunked")
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    assert_close(dx, rdx, rtol=slack("two_paths", F32))
    assert_close(dw, rdw, rtol=slack("two_paths", F32))


@pytest.mark.x64
def test_pallas_interpret_bfloat16():
    x, w, y = make(24, 32, 260, BF16, seed=12)

    def run(impl):
        f = lambda x, w: softjax.linear_cross_entropy(x, w, y, implementation=impl)  # noqa: E731
        return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    out, (dx, dw) = run("pallas")
    ref, (rdx, rdw) = run("chunked")
    assert dx.dtype == BF16 and dw.dtype == BF16
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    assert_close(dx, rdx, rtol=tol(BF16))
    assert_close(dw, rdw, rtol=tol(BF16))


def _backend_inputs(n, d, v, cap=3.0, seed=13):
    """Inputs of the backend contract (``forward_stats``/``backward``) with every option on."""
    from softjax import _losses

    x, w, y = make(n, d, v, seed=seed)
    y = y.at[2].set(v - 1)
    cw = jax.random.uniform(jax.random.key(seed + 1), (v,), F32, 0.2, 2.0)
    ok = jnp.arange(n) % 5 != 3
    st = chunked.forward_stats(x, w, cw, cap, block_v=128, smoothing=True)
    k = jax.random.split(jax.random.key(seed + 2), 3)
    coefs = _losses.GradCoefs(*(jax.random.normal(kk, (n,), F32) for kk in k))
    shift, log_norm = st.m, jnp.log1p(st.rest + st.rest_c)
    return (x, w, y, ok, coefs, shift, log_norm, cw, cap)


# Blocks that leave every axis ragged at these sizes, and backward chunks that split both.
FAMILY_BLOCKS = {"tpu": (8, 128, 16), "gpu": (16, 64, 16)}


@pytest.mark.x64
@pytest.mark.parametrize("family_name", ["tpu", "gpu"])
def test_each_kernel_family_serves_the_backend_contract(family_name):
    """Both families, interpreted, against ``chunked.forward_stats``/``chunked.backward``."""
    from softjax._vocab import pallas, pallas_gpu, pallas_tpu
    from softjax._vocab.blocks import BlockSizes

    family = {"tpu": pallas_tpu, "gpu": pallas_gpu}[family_name]
    blocks = BlockSizes(*FAMILY_BLOCKS[family_name], chunk_n=16, chunk_v=128)
    n, d, v = 37, 40, 300
    args = _backend_inputs(n, d, v)
    x, w, y, ok, coefs, shift, log_norm, cw, cap = args
    got = pallas.forward_stats(x, w, cw, cap, smoothing=True, family=family, blocks=blocks)
    want = chunked.forward_stats(x, w, cw, cap, block_v=64, smoothing=True)
    lse = lambda st: st.m + jnp.log1p(st.rest + st.rest_c)  # noqa: E731
    np.testing.assert_allclose(lse(got), lse(want), rtol=slack("bf16_grad", F32))
    np.testing.assert_allclose(got.d, want.d, rtol=slack("two_paths", F32))
    dx, dw = pallas.backward(*args, dx_dtype=F32, family=family, blocks=blocks)
    rdx, rdw = chunked.backward(*args, block_v=64, block_n=10)
    assert_close(dx, rdx, rtol=slack("two_paths", F32))
    assert_close(dw, rdw, rtol=slack("two_paths", F32))
    # Excluded rows get no gradient at all.
    np.testing.assert_array_equal(np.asarray(dx)[~np.asarray(ok)], 0.0)


@pytest.mark.x64
@pytest.mark.parametrize("family_name", ["tpu", "gpu"])
def test_each_kernel_family_takes_a_temperature_and_keeps_the_moments(family_name):
    """The contract with a ``LogitMap`` (soft-cap and temperature), the moments of the
    forward statistics and a ``spread`` coefficient (``linear_log_probs``), interpreted."""
    from softjax._vocab import pallas, pallas_gpu, pallas_tpu
    from softjax._vocab.blocks import BlockSizes

    family = {"tpu": pallas_tpu, "gpu": pallas_gpu}[family_name]
    blocks = BlockSizes(*FAMILY_BLOCKS[family_name], chunk_n=16, chunk_v=128)
    n, d, v = 37, 40, 300
    x, w, y, ok, coefs, _, _, _, _ = _backend_inputs(n, d, v)
    lmap = chunked.LogitMap(jnp.asarray(3.0, F32), jnp.asarray(1 / 0.7, F32))
    got, got_mo = pallas.forward_stats(
        x, w, None, lmap, smoothing=False, moments=True, family=family, blocks=blocks
    )
    want, want_mo = chunked.forward_stats(
        x, w, None, lmap, block_v=64, smoothing=False, moments=True
    )
    lse = lambda st: st.m + jnp.log1p(st.rest + st.rest_c)  # noqa: E731
    np.testing.assert_allclose(lse(got), lse(want), rtol=slack("bf16_grad", F32))
    for a, b in zip(got_mo, want_mo, strict=True):
        np.testing.assert_allclose(a, b, rtol=slack("two_paths", F32))
    assert np.all(np.asarray(want_mo.s1) > 0)  # the moments are not all zero
    coefs = coefs._replace(spread=jax.random.normal(jax.random.key(4), (n,), F32))
    args = (x, w, y, ok, coefs, want.m, jnp.log1p(want.rest + want.rest_c), None, lmap)
    dx, dw = pallas.backward(*args, dx_dtype=F32, family=family, blocks=blocks)
    rdx, rdw = chunked.backward(*args, block_v=64, block_n=10)
    assert_close(dx, rdx, rtol=slack("two_paths", F32))
    assert_close(dw, rdw, rtol=slack("two_paths", F32))
    no_spread = chunked.backward(*args[:4], coefs._replace(spread=None), *args[5:], block_v=64)
    assert not np.allclose(no_spread[0], rdx)  # the spread term is there and matters


def _exported(platforms, n=512, d=320, v=5000):
    args = (
        jax.ShapeDtypeStruct((n, d), BF16),
        jax.ShapeDtypeStruct((v, d), BF16),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def f(x, w, y):
        return softjax.linear_cross_entropy(
            x, w, y, implementation="pallas", label_smoothing=0.1, logit_softcap=30.0
        )

    # Triton kernels are custom calls without a serialisation-compatibility guarantee.
    checks = [jax.export.DisabledSafetyCheck.custom_call(pallas_gpu.CUSTOM_CALL)]
    return jax.export.export(
        jax.jit(jax.value_and_grad(f, (0, 1))), platforms=platforms, disabled_checks=checks
    )(*args)


KERNELS = ("softjax_lce_fwd", "softjax_lce_grad")


def test_pallas_lowers_for_tpu_from_this_host():
    text = _exported(["tpu"]).mlir_module()
    for name in KERNELS:
        assert name in text, name
    assert "tpu_custom_call" in text
    assert pallas_gpu.CUSTOM_CALL not in text


def test_pallas_lowers_for_cuda_from_this_host():
    text = _exported(["cuda"]).mlir_module()
    for name in KERNELS:
        assert f'name = "{name}"' in text, name
    assert pallas_gpu.CUSTOM_CALL in text
    assert "tpu_custom_call" not in text


@pytest.mark.x64
def test_one_export_holds_the_kernel_of_every_platform():
    # Ragged in N, D and V against every target's blocks, and small: the cpu lowering runs
    # the kernels interpreted (512 x 320 x 5000 took 67 s of interpretation).
    n, d, v = 136, 200, 1100
    exported = _exported(["cpu", "cuda", "tpu"], n, d, v)
    text = exported.mlir_module()
    assert exported.platforms == ("cpu", "cuda", "tpu")
    assert "tpu_custom_call" in text and pallas_gpu.CUSTOM_CALL in text
    # The cpu lowering (interpreted kernels) runs here and agrees with the xla path.
    x, w, y = make(n, d, v, BF16, seed=3)
    y = y.astype(jnp.int32)
    out, (dx, dw) = exported.call(x, w, y)
    f = lambda x, w: softjax.linear_cross_entropy(  # noqa: E731
        x, w, y, label_smoothing=0.1, logit_softcap=30.0
    )
    ref, (rdx, rdw) = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
    np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32))
    assert_close(dx, rdx, rtol=tol(BF16))
    assert_close(dw, rdw, rtol=tol(BF16))


@pytest.mark.x64
def test_pallas_refusals_name_what_is_missing():
    from softjax._vocab.blocks import BlockSizes

    x, w, y = make(8, 16, 40, F64)
    with pytest.raises(NotImplementedError, match="float64"):
        softjax.linear_cross_entropy(x, w, y, implementation="pallas")
    # Labels travel to the gradient kernels as float32: exact below 2**24 classes.
    huge = jax.ShapeDtypeStruct((2**24, 8), F32)
    with pytest.raises(NotImplementedError, match="fewer than 2\\*\\*24 classes"):
        jax.eval_shape(
            functools.partial(softjax.linear_cross_entropy, implementation="pallas"),
            jax.ShapeDtypeStruct((4, 8), F32),
            huge,
            jax.ShapeDtypeStruct((4,), jnp.int32),
        )
    with pytest.raises(ValueError, match="block_v must be a positive multiple of 8"):
        BlockSizes(16, 12, 128)
    with pytest.raises(ValueError, match="chunk_n must be a positive multiple of 8"):
        BlockSizes(16, 128, 128, chunk_n=0)


@pytest.mark.x64
@pytest.mark.parametrize("impl", ["chunked", "pallas"])
@pytest.mark.parametrize("n,d,v", [(13, 16, 150), (3, 4, 10), (24, 16, 1000)])
def test_soft_capped_rows_keep_their_maximal_entry(impl, n, d, v):
    # XLA:CPU fused the soft-capped logits into each reduction of the online logsumexp and
    # contracted `cap * tanh(.) - max` into a fused multiply-add in some of them: the tie
    # test `z - max == 0` then disagreed between the count and the sum, and every row lost
    # its maximal entry (-log p off by 0.08 at 13 x 150). Per-row losses against float64.
    x, w, y = make(n, d, v, seed=n)
    for cap in (5.0, 30.0):
        out = softjax.linear_cross_entropy(
            x, w, y, logit_softcap=cap, reduction="none", implementation=impl
        )
        ref, _ = np_loss(x, w, y, cap=cap)
        np.testing.assert_allclose(out, ref, rtol=slack("two_paths", F32), atol=1e-6)
