"""dot_product_attention(implementation="pallas"): the flash attention kernels, interpreted.

Both kernel families run here in interpret mode on the same block code that compiles for
the chips (``test_accel.py`` compiles them for an H200 and TPU v5e/v6e/v5p): the TPU family
(Mosaic: a sequential grid axis, VMEM scratch) is what ``implementation="pallas"`` lowers to
on a CPU, the GPU family (Triton: loops inside each program) is pinned through
``softjax._attention.pallas.attention(..., family="gpu")``. Each is compared with the float64
reference of ``test_attention.py`` (values, lse and gradients), every option, ragged lengths.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import as_float64, assert_close, slack, tol
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention import CASES, EMPTY_WAYS, B, N, S, T, inputs, np_allowed, np_attention

import softjax
from softjax._attention import pallas
from softjax._attention.api import _segments, _window
from softjax._attention.pallas_gpu import CUSTOM_CALL

F32 = np.float32
# "tpu": the all-heads Mosaic kernels (what a TPU runs unless the bias has a head axis);
# "tpu_per_head": the per-head ones (a bias with a head axis); "gpu": the Triton kernels.
FAMILIES = ["tpu", "tpu_per_head", "gpu"]


def flash(q, k, v, bias=None, mask=None, *, family, scale=None, **kw):
    """The kernels of ``family`` (interpreted) on the API's arguments, through the same
    argument handling as ``dot_product_attention`` for everything but dispatch."""
    if family == "default":
        out, lse = softjax.dot_product_attention(
            q, k, v, bias, mask, scale=scale, return_lse=True, implementation="pallas", **kw
        )
        return out, lse
    b_, t_len, _, h = q.shape
    q_seg, kv_seg = _segments(kw.get("segment_ids"), b_, t_len, k.shape[1])
    lengths = [kw.get(n) for n in ("query_seq_lengths", "key_value_seq_lengths")]
    lengths = [None if x is None else jnp.asarray(x, jnp.int32) for x in lengths]
    bias = None if bias is None else jnp.asarray(bias).reshape((1,) * (4 - bias.ndim) + bias.shape)
    mask = None if mask is None else mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    out, lse = pallas.attention(
        q, k, v, bias, mask,
        scale=1 / np.sqrt(h) if scale is None else scale,
        softcap=kw.get("logit_softcap"),
        causal=kw.get("is_causal", False),
        window=_window(kw.get("local_window_size")),
        dyn=pallas.Dynamic(q_seg, kv_seg, *lengths),
        family=family,
    )  # fmt: skip
    return out.astype(q.dtype), lse


def _split(kw):
    kw = dict(kw)
    return kw.pop("mask", None), kw.pop("scale", None), kw


def _reference(case, q, k, v, bias):
    kw, np_kw = CASES[case]
    allowed = np_allowed(q.shape[0], q.shape[2], q.shape[1], k.shape[1], **np_kw)
    return np_attention(
        q, k, v, bias, allowed, scale=kw.get("scale"), softcap=kw.get("logit_softcap")
    )


def _reference_params():
    # Every case on the TPU kernels (what a CPU runs) and the Triton ones; the per-head TPU
    # kernels on a few by default (they share the tile maths), on all under `slow`.
    for case in CASES:
        for family in FAMILIES:
            light = family != "tpu_per_head" or case in ("plain", "causal", "segments_pair")
            marks = () if light else pytest.mark.slow
            yield pytest.param(case, family, id=f"{case}-{family}", marks=marks)


@pytest.mark.parametrize("case, family", list(_reference_params()))
def test_matches_float64_reference(case, family):
    q, k, v = inputs(dtype=F32)
    heads = N if family == "tpu_per_head" else 1  # a head axis sends "tpu" per head
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(1, heads, T, S)), F32)
    mask, scale, kw = _split(CASES[case][0])
    out, lse = flash(q, k, v, bias, mask, family=family, scale=scale, **kw)
    ref, ref_lse = _reference(case, q, k, v, bias)
    assert out.dtype == F32 and lse.dtype == F32
    big = float(np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=tol(F32), atol=slack("chained", F32) * big)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    # The lse is m + log(sum): as accurate as the largest score allows (assert_close's atol).
    assert_close(np.asarray(lse)[finite], ref_lse[finite], F32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_low_precision_rounds_once(dtype, family):
    q, k, v = inputs(dtype=dtype)
    out, lse = flash(q, k, v, is_causal=True, family=family)
    assert out.dtype == dtype and lse.dtype == F32
    ref, ref_lse = np_attention(
        *(as_float64(x) for x in (q, k, v)), allowed=np_allowed(B, N, T, S, causal=True)
    )
    # Computed in float32 (bfloat16 products of a float32 tile split in two terms) and
    # rounded once: within one rounding of the output dtype.
    big = float(np.abs(ref).max())
    np.testing.assert_allclose(as_float64(out), ref, rtol=tol(dtype), atol=tol(dtype) * big)
    np.testing.assert_allclose(lse, ref_lse, rtol=tol(F32), atol=tol(F32))


# Gradient cases: API keywords and the bias's shape (broadcast in every way a bias may be).
GRAD_CASES = {
    "plain_full_bias": ({}, (B, N, T, S)),
    "causal_gqa_head_bias": ({"is_causal": True}, (1, N, T, S)),
    "window_row_bias": ({"local_window_size": (5, 2)}, (B, 1, 1, S)),
    "lengths_column_bias": (
        {"query_seq_lengths": [20, 9], "key_value_seq_lengths": [4, 30]},
        (B, 1, T, 1),
    ),
    "segments_softcap": (
        {
            "segment_ids": jnp.asarray(np.sort(np.random.default_rng(5).integers(0, 3, (B, T)))),
            "logit_softcap": 1.5,
        },
        (1, 1, 1, 1),
    ),
    "mask_scale": (
        {"mask": jnp.asarray(np.random.default_rng(6).random((B, 1, T, S)) < 0.6), "scale": 0.7},
        (1, N, 1, S),
    ),
}


def _grads(fn, q, k, v, bias):
    def loss(q, k, v, bias):
        out, lse = fn(q, k, v, bias)
        w = jnp.cos(jnp.arange(out.size, dtype=out.dtype).reshape(out.shape))
        return jnp.sum(out * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


def _grad_params():
    for case, (_, bias_shape) in GRAD_CASES.items():
        for family in FAMILIES:
            # The per-head TPU kernels serve exactly the biases with a head axis.
            if (family == "tpu_per_head") == (bias_shape[1] == N):
                yield pytest.param(case, family, id=f"{case}-{family}")


@pytest.mark.parametrize("case, family", list(_grad_params()))
def test_gradients_match_float64(case, family):
    kw, bias_shape = GRAD_CASES[case]
    if case == "segments_softcap":  # self-attention: T == S
        q, k, v = inputs(t=T, s=T, dtype=F32)
    else:
        q, k, v = inputs(dtype=F32)
    bias = jnp.asarray(np.random.default_rng(7).normal(size=bias_shape), F32)
    mask, scale, kw = _split(kw)
    ours = _grads(
        functools.partial(flash, mask=mask, scale=scale, family=family, **kw), q, k, v, bias
    )
    with jax.enable_x64(True):  # the reference only: the kernels run as users run them
        f64 = [x.astype(np.float64) for x in (q, k, v, bias)]

        def ref_fn(q, k, v, bias):
            return softjax.dot_product_attention(
                q, k, v, bias, mask, scale=scale, return_lse=True, implementation="xla", **kw
            )

        ref = [np.asarray(g) for g in _grads(ref_fn, *f64)]
    for name, a, b in zip("qkvb", ours, ref, strict=True):
        assert a.shape == b.shape, name
        big = float(np.abs(b).max()) or 1.0
        np.testing.assert_allclose(
            a, b, rtol=tol(F32), atol=slack("matmul_grad", F32) * big, err_msg=f"d{name}"
        )


@pytest.mark.parametrize("family", ["tpu", "gpu"])
@pytest.mark.parametrize("way", list(EMPTY_WAYS))
def test_empty_rows_give_zero_and_zero_gradients(way, family):
    q, k, v = inputs(dtype=F32)
    kw = EMPTY_WAYS[way]()
    bias = kw.pop("bias", None)
    mask = kw.pop("mask", None)
    fn = functools.partial(flash, mask=mask, family=family, **kw)
    out, lse = fn(q, k, v, bias)
    assert np.all(np.asarray(out[0, 3]) == 0) and np.all(np.asarray(lse[0, 3]) == -np.inf)
    assert np.all(np.isfinite(out))
    if bias is None:
        bias = jnp.zeros((1, 1, 1, 1), F32)
    grads = _grads(fn, q, k, v, bias)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0][0, 3]) == 0)


def test_public_api_runs_the_platform_kernels():
    # On a CPU, implementation="pallas" lowers the TPU kernels, interpreted.
    q, k, v = inputs(dtype=F32)
    bias = jnp.asarray(np.random.default_rng(3).normal(size=(B, 1, T, S)), F32)
    kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([9, 33]))
    ours = flash(q, k, v, bias, family="tpu", **kw)
    api = flash(q, k, v, bias, family="default", **kw)
    for a, b in zip(api, ours, strict=True):
        np.testing.assert_array_equal(a, b)


def test_nan_inputs_stay_loud():
    q, k, v = inputs(dtype=F32)
    out = flash(q.at[0, 2, 1, 0].set(jnp.nan), k, v, family="default")[0]
    assert np.all(np.isnan(out[0, 2, 1])) and np.all(np.isfinite(out[1]))


@settings(max_examples=4, deadline=None)
@given(
    t=st.integers(1, 40),
    s=st.integers(1, 40),
    kv_heads=st.sampled_from([1, 2]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 9), st.integers(0, 9))),
    lengths=st.booleans(),
    family=st.sampled_from(FAMILIES),
    seed=st.integers(0, 2**16),
)
def test_ragged_lengths_match_reference(t, s, kv_heads, causal, window, lengths, family, seed):
    q, k, v = inputs(b=2, t=t, s=s, n=2, k=kv_heads, dtype=F32, seed=seed)
    r = np.random.default_rng(seed)
    q_len = r.integers(0, t + 1, 2) if lengths else None
    kv_len = r.integers(0, s + 1, 2) if lengths else None
    kw = dict(is_causal=causal, local_window_size=window)
    if lengths:
        kw.update(query_seq_lengths=q_len, key_value_seq_lengths=kv_len)
    out, lse = flash(q, k, v, family=family, **kw)
    allowed = np_allowed(2, 2, t, s, causal=causal, window=window, q_len=q_len, kv_len=kv_len)
    ref, ref_lse = np_attention(q, k, v, allowed=allowed)
    big = float(np.abs(ref).max()) if ref.size else 1.0
    np.testing.assert_allclose(out, ref, rtol=tol(F32), atol=slack("chained", F32) * big)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))


def test_jit_and_vmap():
    q, k, v = inputs(b=1, dtype=F32)
    f = jax.jit(lambda q, k, v: softjax.dot_product_attention(
        q, k, v, is_causal=True, implementation="pallas"))  # fmt: skip
    batched = jax.vmap(f)(q[None].repeat(2, 0), k[None].repeat(2, 0), v[None].repeat(2, 0))
    np.testing.assert_allclose(batched[1], f(q, k, v), rtol=1e-6, atol=1e-6)
    unbatched = softjax.dot_product_attention(
        q[0], k[0], v[0], is_causal=True, implementation="pallas"
    )
    np.testing.assert_allclose(unbatched, f(q, k, v)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.x64
def test_refusals_name_what_is_missing():
    q, k, v = inputs()  # float64
    with pytest.raises(NotImplementedError, match="float64"):
        softjax.dot_product_attention(q, k, v, implementation="pallas")
    q, k, v = inputs(dtype=F32)
    with pytest.raises(NotImplementedError, match="dropout"):
        softjax.dot_product_attention(
            q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0), implementation="pallas"
        )


def test_default_choice_is_unchanged():
    # implementation=None keeps the chunked/xla choice until the kernels have run natively.
    q, k, v = (jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.bfloat16),) * 3
    text = jax.jit(softjax.dot_product_attention).lower(q, k, v).as_text()
    assert "softjax_attn_fwd" not in text


def _exported(platforms, t=256):
    args = [jax.ShapeDtypeStruct((1, t, 4, 128), jnp.bfloat16)] * 3

    def f(q, k, v):
        return softjax.dot_product_attention(
            q, k, v, is_causal=True, logit_softcap=30.0, implementation="pallas"
        )

    def fwd_bwd(q, k, v):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out)

    checks = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL)]
    return jax.export.export(jax.jit(fwd_bwd), platforms=platforms, disabled_checks=checks)(*args)


KERNELS = ("softjax_attn_fwd", "softjax_attn_dq", "softjax_attn_dkv")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_lowers_each_platforms_kernels_from_this_host(platform):
    text = _exported([platform]).mlir_module()
    for name in KERNELS:
        assert name in text, name
    own, other = ("tpu_custom_call", CUSTOM_CALL)[:: 1 if platform == "tpu" else -1]
    assert own in text and other not in text
