"""dot_product_attention: float64 NumPy reference, jax.nn, torch, chunked vs xla, masks, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol
from hypothesis import given, settings
from hypothesis import strategies as st

from softjax import dot_product_attention as attention

IMPLS = ["xla", "chunked"]

# ---------------------------------------------------------------------------------------
# float64 NumPy reference


def np_allowed(
    b, n, t_len, s_len, *, causal=False, window=None, q_len=None, kv_len=None, seg=None, mask=None
):
    """Which (b, n, t, s) may attend, built elementwise from the definitions."""
    t = np.arange(t_len)[:, None]
    s = np.arange(s_len)[None, :]
    ok = np.ones((b, n, t_len, s_len), bool)
    if causal:
        ok &= s <= t
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        ok &= (s >= t - left) & (s <= t + right)
    if q_len is not None:
        ok &= (t[None] < np.asarray(q_len)[:, None, None])[:, None]
    if kv_len is not None:
        ok &= (s[None] < np.asarray(kv_len)[:, None, None])[:, None]
    if seg is not None:
        qs, ks = (seg, seg) if not isinstance(seg, tuple) else seg
        ok &= (np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :])[:, None]
    if mask is not None:
        ok &= np.broadcast_to(np.asarray(mask), ok.shape)
    return ok


def np_attention(q, k, v, bias=None, allowed=None, scale=None, softcap=None):
    """Float64 attention; rows with nothing allowed give output 0 and lse -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    out = np.einsum("bnts,bsnh->btnh", p, v)
    total = total[..., 0]
    lse = np.where(total > 0, m[..., 0] + np.log(np.where(total > 0, total, 1.0)), -np.inf)
    return out, lse.transpose(0, 2, 1)


def inputs(b=2, t=20, s=33, n=4, k=2, h=8, dtype=np.float64, seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, t, n, h))
    kk = r.normal(size=(b, s, k, h))
    v = r.normal(size=(b, s, k, h))
    return tuple(jnp.asarray(x, dtype) for x in (q, kk, v))


def assert_close(out, ref, dtype, scale=1.0):
    """Relative to the magnitude of the values averaged (attention outputs can cancel to 0)."""
    t = tol(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=t, atol=10 * t * scale)


# Each case: keyword arguments of dot_product_attention and of np_allowed.
B, T, S, N, K = 2, 20, 33, 4, 2
_r = np.random.default_rng(1)
CASES = {
    "plain": ({}, {}),
    "causal": ({"is_causal": True}, {"causal": True}),
    "window": ({"local_window_size": (3, 2)}, {"window": (3, 2)}),
    "causal_window": ({"is_causal": True, "local_window_size": 4}, {"causal": True, "window": 4}),
    "lengths": (
        {"query_seq_lengths": jnp.array([20, 7]), "key_value_seq_lengths": jnp.array([5, 33])},
        {"q_len": [20, 7], "kv_len": [5, 33]},
    ),
    "segments_pair": (
        {
            "segment_ids": (
                jnp.asarray(_r.integers(0, 3, (B, T))),
                jnp.asarray(_r.integers(0, 3, (B, S))),
            )
        },
        {"seg": None},  # filled below
    ),
    "mask": (
        {"mask": jnp.asarray(_r.random((B, 1, T, S)) < 0.7)},
        {"mask": None},
    ),
    "softcap": ({"logit_softcap": 0.5}, {}),
    "scale": ({"scale": 0.9}, {}),
}
CASES["segments_pair"][1]["seg"] = tuple(
    np.asarray(x) for x in CASES["segments_pair"][0]["segment_ids"]
)
CASES["mask"][1]["mask"] = np.asarray(CASES["mask"][0]["mask"])


def _reference(case, q, k, v, bias=None):
    kw, np_kw = CASES[case]
    allowed = np_allowed(q.shape[0], q.shape[2], q.shape[1], k.shape[1], **np_kw)
    return np_attention(
        q, k, v, bias, allowed, scale=kw.get("scale"), softcap=kw.get("logit_softcap")
    )


@pytest.mark.x64
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, impl):
    q, k, v = inputs()
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(1, N, T, S)))
    kw = CASES[case][0]
    out, lse = attention(
        q, k, v, bias, return_lse=True, implementation=impl, block_q=8, block_k=16, **kw
    )
    ref, ref_lse = _reference(case, q, k, v, bias)
    assert_close(out, ref, np.float64)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.x64
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_rounds_once(dtype, impl):
    q, k, v = inputs(dtype=dtype)
    out, lse = attention(
        q, k, v, is_causal=True, return_lse=True, implementation=impl, block_q=8, block_k=16
    )
    assert out.dtype == dtype and lse.dtype == np.float32
    ref, ref_lse = np_attention(
        q.astype(np.float64),
        k.astype(np.float64),
        v.astype(np.float64),
        allowed=np_allowed(B, N, T, S, causal=True),
    )
    # Computed in float32 and rounded once: within one rounding of the output dtype.
    assert_close(out, ref, dtype, scale=float(np.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_matches_jax_nn(impl, kv_heads):
    q, k, v = inputs(n=4, k=kv_heads, dtype=np.float32)
    bias = jnp.asarray(np.random.default_rng(3).normal(size=(B, 4, T, S)), np.float32)
    mask = jnp.asarray(np.random.default_rng(4).random((B, 1, T, S)) < 0.8).at[..., 0].set(True)
    kw = dict(mask=mask, is_causal=True, key_value_seq_lengths=jnp.array([33, 17], jnp.int32))
    ref = jax.nn.dot_product_attention(q, k, v, bias, **kw)
    out = attention(q, k, v, bias, implementation=impl, block_q=8, block_k=16, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_torch(kv_heads):
    torch = pytest.importorskip("torch")
    q, k, v = inputs(n=4, k=kv_heads, dtype=np.float32)
    mask = np.random.default_rng(5).random((B, 4, T, S)) < 0.8
    mask[..., 0] = True
    tt = [torch.tensor(np.asarray(x)).transpose(1, 2) for x in (q, k, v)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = {"enable_gqa": True} if kv_heads != 4 else {}
    for kw, tkw in [
        (
            {"mask": jnp.asarray(mask), "scale": 0.3},
            {"attn_mask": torch.tensor(mask), "scale": 0.3},
        ),
        ({"is_causal": True}, {"is_causal": True}),
    ]:
        ref = sdpa(*tt, **tkw, **gqa).transpose(1, 2).numpy()
        for impl in IMPLS:
            out = attention(q, k, v, implementation=impl, block_q=8, block_k=16, **kw)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# chunked vs xla: values and every gradient at block-unaligned sizes


def _loss(impl, kw, blocks):
    def f(q, k, v, bias):
        out, lse = attention(q, k, v, bias, return_lse=True, implementation=impl, **blocks, **kw)
        # A nonlinear function of both outputs; empty rows' lse (-inf) are left out.
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0) ** 2)

    return f


GRAD_CASES = {
    "causal_softcap_full_bias": ({"is_causal": True, "logit_softcap": 3.0}, (2, 4, 200, 333)),
    "window_head_bias": ({"local_window_size": (40, 7)}, (1, 4, 1, 333)),
    "segments_softcap_row_bias": (
        {
            "segment_ids": (
                jnp.asarray(np.repeat(np.arange(4), 50)[None].repeat(2, 0)),
                jnp.asarray(np.repeat(np.arange(4), 84)[None, :333].repeat(2, 0)),
            ),
            "logit_softcap": 3.0,
        },
        (2, 1, 200, 1),
    ),
    "lengths_dropout": (
        {
            "query_seq_lengths": jnp.array([150, 200]),
            "key_value_seq_lengths": jnp.array([333, 90]),
            "dropout_rate": 0.3,
            "dropout_rng": jax.random.key(0),
        },
        (1, 1, 200, 333),
    ),
}


@pytest.mark.x64
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.slow)
        if c in ("window_head_bias", "segments_softcap_row_bias")
        else c
        for c in GRAD_CASES
    ],
)
def test_chunked_matches_xla_values_and_gradients(case):
    kw, bias_shape = GRAD_CASES[case]
    q, k, v = inputs(t=200, s=333, h=16)
    bias = jnp.asarray(np.random.default_rng(6).normal(size=bias_shape))
    blocks = {"block_q": 64, "block_k": 128}
    out_x = attention(q, k, v, bias, implementation="xla", return_lse=True, **kw)
    out_c = attention(q, k, v, bias, implementation="chunked", return_lse=True, **blocks, **kw)
    for a, b in zip(out_c, out_x, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    gx = jax.jit(jax.grad(_loss("xla", kw, {}), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    gc = jax.jit(jax.grad(_loss("chunked", kw, blocks), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for name, a, b in zip("qkvb", gc, gx, strict=True):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=f"d{name}")


def test_chunked_default_blocks_float32():
    q, k, v = inputs(t=300, s=300, h=16, dtype=np.float32)
    ref, _ = np_attention(q, k, v, allowed=np_allowed(B, N, 300, 300, causal=True))
    out = attention(q, k, v, is_causal=True, implementation="chunked")
    assert_close(out, ref, np.float32, scale=float(np.abs(ref).max()))


# ---------------------------------------------------------------------------------------
# rows with nothing to attend to

EMPTY_WAYS = {
    # Each makes row t=3 of batch 0 (all heads) empty, in its own way.
    "mask": lambda: {"mask": jnp.ones((B, 1, T, S), bool).at[0, :, 3].set(False)},
    "query_length": lambda: {"query_seq_lengths": jnp.array([3, 20])},
    "kv_length_zero": lambda: {"key_value_seq_lengths": jnp.array([0, 33])},
    "bias_minus_inf": lambda: {"bias": jnp.zeros((B, 1, T, S)).at[0, :, 3].set(-jnp.inf)},
    "segment": lambda: {
        "segment_ids": (jnp.zeros((B, T), int).at[0, 3].set(7), jnp.zeros((B, S), int))
    },
    "window": lambda: {"local_window_size": (0, 0), "key_value_seq_lengths": jnp.array([3, 33])},
}


@pytest.mark.x64
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("way", list(EMPTY_WAYS))
def test_empty_rows_give_zero_and_zero_gradients(way, impl):
    q, k, v = inputs()
    kw = EMPTY_WAYS[way]()
    bias = kw.pop("bias", jnp.zeros((1, 1, 1, 1)))

    @jax.jit
    def run(q, k, v, bias):
        def f(q, k, v, bias):
            return attention(
                q, k, v, bias, return_lse=True, implementation=impl, block_q=8, block_k=16, **kw
            )

        def loss(q, k, v, bias):
            out, lse = f(q, k, v, bias)
            return jnp.sum(out**2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

        grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
        # The gradient through the lse of an empty row (-inf, a constant) is 0 too.
        g_lse = jax.grad(lambda q: jnp.sum(jnp.exp(f(q, k, v, bias)[1])))(q)
        return f(q, k, v, bias), grads, g_lse

    (out, lse), grads, g_lse = run(q, k, v, bias)
    assert np.all(np.asarray(out[0, 3]) == 0) and np.all(np.asarray(lse[0, 3]) == -np.inf)
    assert np.all(np.isfinite(out))
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0][0, 3]) == 0)
    assert np.all(np.isfinite(g_lse)) and np.all(np.asarray(g_lse[0, 3]) == 0)
    assert np.any(np.asarray(g_lse) != 0)  # the other rows do get a gradient


def test_jax_nn_averages_v_on_empty_rows_softjax_gives_zero():
    q, k, v = inputs(dtype=np.float32)
    mask = jnp.ones((B, 1, T, S), bool).at[0, :, 3].set(False)
    theirs = jax.nn.dot_product_attention(q, k, v, mask=mask)
    mean_v = np.repeat(np.asarray(v[0]).mean(0), 2, axis=0)
    np.testing.assert_allclose(theirs[0, 3], mean_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(attention(q, k, v, mask=mask)[0, 3], 0.0)


# ---------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_deterministic_per_rng_and_unbiased(impl):
    q, k, v = inputs(b=1, t=8, s=12, dtype=np.float32)
    kw = dict(dropout_rate=0.25, implementation=impl, block_q=8, block_k=8)
    a = attention(q, k, v, dropout_rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, attention(q, k, v, dropout_rng=jax.random.key(1), **kw))
    assert not np.allclose(a, attention(q, k, v, dropout_rng=jax.random.key(2), **kw))
    keys = jax.random.split(jax.random.key(3), 400)
    mean = jax.jit(jax.vmap(lambda r: attention(q, k, v, dropout_rng=r, **kw)))(keys).mean(0)
    plain = attention(q, k, v, implementation=impl)
    # Each output is a mean over 400 draws of a weighted sum of ~N(0, 1) values.
    np.testing.assert_allclose(mean, plain, atol=0.06)


@pytest.mark.x64
def test_dropout_masks_forward_backward_and_implementations_agree():
    q, k, v = inputs(t=24, s=20)
    kw = dict(dropout_rate=0.5, dropout_rng=jax.random.key(7), is_causal=True)
    ox = attention(q, k, v, implementation="xla", **kw)
    oc = attention(q, k, v, implementation="chunked", block_q=8, block_k=8, **kw)
    np.testing.assert_allclose(oc, ox, rtol=1e-12, atol=1e-12)
    # d out / d v is the dropped weight matrix itself: equal gradients mean equal masks.
    gx = jax.jit(jax.grad(lambda v: jnp.sum(attention(q, k, v, implementation="xla", **kw))))(v)
    gc = jax.jit(
        jax.grad(
            lambda v: jnp.sum(
                attention(q, k, v, implementation="chunked", block_q=8, block_k=8, **kw)
            )
        )
    )(v)
    np.testing.assert_allclose(gc, gx, rtol=1e-12, atol=1e-12)
    dropped = np.mean(np.asarray(ox) == np.asarray(attention(q, k, v, implementation="xla")))
    assert dropped < 0.5  # dropout really changed the output


# ---------------------------------------------------------------------------------------
# hypothesis: shapes, masks, lengths, windows, segments


def _chunked_equals_xla_equals_reference(t, s, kv_heads, causal, window, lengths, segments, seed):
    r = np.random.default_rng(seed)
    q, k, v = inputs(b=2, t=t, s=s, n=2, k=kv_heads, seed=seed)
    kw, np_kw = (
        {"is_causal": causal, "local_window_size": window},
        {"causal": causal, "window": window},
    )
    if lengths:
        ql, kl = r.integers(0, t + 1, 2), r.integers(0, s + 1, 2)
        kw.update(query_seq_lengths=jnp.asarray(ql), key_value_seq_lengths=jnp.asarray(kl))
        np_kw.update(q_len=ql, kv_len=kl)
    if segments:
        seg = (r.integers(0, 2, (2, t)), r.integers(0, 2, (2, s)))
        kw["segment_ids"] = tuple(jnp.asarray(x) for x in seg)
        np_kw["seg"] = seg
    ref, ref_lse = np_attention(q, k, v, allowed=np_allowed(2, 2, t, s, **np_kw))
    for impl in IMPLS:
        out, lse = attention(
            q, k, v, return_lse=True, implementation=impl, block_q=8, block_k=8, **kw
        )
        assert_close(out, ref, np.float64)
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.x64
@settings(max_examples=3, deadline=None)
@given(
    t=st.integers(1, 24),
    s=st.integers(1, 24),
    kv_heads=st.sampled_from([1, 2]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 6))),
    lengths=st.booleans(),
    segments=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_xla_equals_reference(**kw):
    _chunked_equals_xla_equals_reference(**kw)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(1, 24),
    s=st.integers(1, 24),
    kv_heads=st.sampled_from([1, 2]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 6), st.integers(0, 6))),
    lengths=st.booleans(),
    segments=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_xla_equals_reference_thorough(**kw):
    _chunked_equals_xla_equals_reference(**kw)


# ---------------------------------------------------------------------------------------
# transformations


@pytest.mark.x64
@pytest.mark.parametrize("impl", IMPLS)
def test_jit_and_vmap(impl):
    q, k, v = inputs(b=1)
    f = jax.jit(lambda q, k, v: attention(q, k, v, is_causal=True, implementation=impl))
    batched = jax.vmap(f)(q[None].repeat(3, 0), k[None].repeat(3, 0), v[None].repeat(3, 0))
    np.testing.assert_allclose(batched[1], f(q, k, v), rtol=1e-12)
    unbatched = attention(q[0], k[0], v[0], is_causal=True, implementation=impl)
    np.testing.assert_allclose(unbatched, f(q, k, v)[0], rtol=1e-12)


def test_unbatched_inputs_with_nts_bias_and_mask_match_jax_nn():
    q, k, v = (x[0] for x in inputs(dtype=np.float32))
    bias = jnp.asarray(np.random.default_rng(9).normal(size=(N, T, S)), np.float32)
    mask = jnp.asarray(np.random.default_rng(10).random((1, T, S)) < 0.7).at[..., 0].set(True)
    # The rank handling is shared by both implementations (it happens before dispatch).
    out = attention(q, k, v, bias, mask, implementation="xla")
    ref = jax.nn.dot_product_attention(q, k, v, bias, mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.x64
def test_grad_of_grad_and_jvp_through_xla():
    q, k, v = inputs(b=1, t=5, s=6)
    f = lambda q: jnp.sum(attention(q, k, v, is_causal=True, implementation="xla") ** 2)
    direction = jnp.asarray(np.random.default_rng(8).normal(size=q.shape))
    _, hvp = jax.jit(lambda q, d: jax.jvp(jax.grad(f), (q,), (d,)))(q, direction)
    eps = 1e-6
    grad = jax.jit(jax.grad(f))
    fd = (grad(q + eps * direction) - grad(q - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(hvp, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.x64
def test_chunked_jvp_raises():
    q, k, v = inputs(b=1, t=5, s=6)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda q: attention(q, k, v, implementation="chunked"), (q,), (q,))


# ---------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"query": jnp.ones((2, 3))}, ValueError, "query must have rank 4"),
        (
            {
                "key": jnp.ones((2, 33, 3, 8), np.float32),
                "value": jnp.ones((2, 33, 3, 8), np.float32),
            },
            ValueError,
            "not a multiple",
        ),
        ({"value": jnp.ones((2, 33, 2, 4), np.float32)}, ValueError, "same shape"),
        ({"mask": jnp.ones((2, 4, 20, 5), bool)}, ValueError, "mask has shape"),
        ({"mask": jnp.ones((2, 4, 20, 33))}, TypeError, "mask must be a boolean"),
        ({"bias": jnp.ones((3, 4, 20, 33))}, ValueError, "bias has shape"),
        ({"logit_softcap": 0.0}, ValueError, "logit_softcap must be"),
        ({"dropout_rate": 0.1}, ValueError, "dropout_rng"),
        ({"dropout_rate": 1.0, "dropout_rng": jax.random.key(0)}, ValueError, "dropout_rate"),
        (
            {"implementation": "pallas", "dropout_rate": 0.1, "dropout_rng": jax.random.key(0)},
            NotImplementedError,
            "dropout is not implemented by the attention kernels",
        ),
        ({"implementation": "fast"}, ValueError, "implementation must be"),
        ({"query_seq_lengths": jnp.ones((3,), int)}, ValueError, "query_seq_lengths"),
        ({"segment_ids": jnp.ones((2, 20), int)}, ValueError, "key/value segment_ids"),
        ({"local_window_size": -1}, ValueError, "local_window_size"),
        ({"key": jnp.ones((2, 33, 2, 8), np.float16)}, TypeError, "same dtype"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    kwargs = dict(kwargs)
    q, k, v = inputs(dtype=np.float32)
    args = dict(query=q, key=k, value=v)
    args.update({a: kwargs.pop(a) for a in list(kwargs) if a in args})
    with pytest.raises(error, match=match):
        attention(args["query"], args["key"], args["value"], **kwargs)


# ---------------------------------------------------------------------------------------
# memory (compile only, no run)


def _fwd_bwd_temp_mib(t_len, impl):
    spec = jax.ShapeDtypeStruct((1, t_len, 8, 64), jnp.float32)

    def f(q, k, v):
        return jax.grad(
            lambda q, k, v: jnp.sum(attention(q, k, v, is_causal=True, implementation=impl)),
            argnums=(0, 1, 2),
        )(q, k, v)

    compiled = jax.jit(f).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_chunked_memory_is_small_and_linear_in_t():
    m4 = _fwd_bwd_temp_mib(4096, "chunked")
    m8 = _fwd_bwd_temp_mib(8192, "chunked")
    # jax.nn needs 1552 MiB of temporaries here: at most 5% of it, and linear growth.
    assert m4 <= 0.05 * 1552, m4
    assert m8 <= 2.2 * m4, (m4, m8)


def test_xla_memory_is_quadratic():
    # The reference does materialise the scores: the chunked bound above is not trivial.
    assert _fwd_bwd_temp_mib(1024, "xla") >= 8 * 1024 * 1024 * 4 / 2**20
