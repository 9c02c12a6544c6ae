"""The implementation registry, and the options that now mean the same in every op."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import slack, tol

import softjax as sj
from softjax import _dispatch
from softjax._attention import api as attention_api
from softjax._vocab import api as vocab_api

F32, F64 = jnp.float32, jnp.float64


def _registry():
    reg = _dispatch.Registry("op", lambda call: ("pallas", "chunked"))
    reg.register("chunked", lambda: "chunked")
    reg.register(
        "pallas",
        lambda: "pallas",
        lambda call: "no float64 kernel" if call.dtypes["x"] == np.float64 else None,
    )
    return reg


def _call(dtype):
    return _dispatch.Call(shapes={"x": (2, 3)}, dtypes={"x": np.dtype(dtype)})


def test_none_takes_the_first_preference_that_serves_the_call():
    reg = _registry()
    assert reg.select(None, _call(np.float32)).fn() == "pallas"
    assert reg.select(None, _call(np.float64)).fn() == "chunked"


def test_a_named_implementation_that_cannot_serve_says_what_is_missing():
    reg = _registry()
    with pytest.raises(NotImplementedError, match=r"op\(implementation='pallas'\).*float64"):
        reg.select("pallas", _call(np.float64))
    with pytest.raises(NotImplementedError, match="no 'xla' implementation yet"):
        reg.select("xla", _call(np.float32))
    with pytest.raises(ValueError, match=r"one of \('chunked', 'pallas'\) or None, got 'fast'"):
        reg.select("fast", _call(np.float32))
    with pytest.raises(NotImplementedError, match="jax.nn.dot_product_attention"):
        reg.select("cudnn", _call(np.float32))
    with pytest.raises(ValueError, match="not an implementation name"):
        reg.register("fast", lambda: None)


def test_no_implementation_serving_the_call_raises_with_every_reason():
    reg = _dispatch.Registry("op", lambda call: ("chunked",))
    reg.register("chunked", lambda: None, lambda call: "never")
    with pytest.raises(NotImplementedError, match="'chunked': never"):
        reg.select(None, _call(np.float32))


def test_every_op_uses_one_vocabulary_of_names():
    assert vocab_api.REGISTRY.names == ("xla", "chunked", "pallas")
    assert attention_api.REGISTRY.names == ("xla", "chunked", "pallas")
    for reg in (vocab_api.REGISTRY, attention_api.REGISTRY):
        assert set(reg.names) <= set(_dispatch.NAMES)


def test_attention_defaults_follow_the_documented_order():
    short = _dispatch.Call(shapes={"query": (1, 64, 2, 8), "key": (1, 64, 2, 8)}, dtypes={})
    long = _dispatch.Call(shapes={"query": (1, 4096, 2, 8), "key": (1, 4096, 2, 8)}, dtypes={})
    assert attention_api.REGISTRY.select(None, short).name == "xla"  # CPU, T * S < 512**2
    assert attention_api.REGISTRY.select(None, long).name == "chunked"
    # "pallas" is chosen only when named, until the kernels have run on a chip.
    for call in (short, long):
        assert "pallas" not in attention_api._preference(call)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_xla_materialises_exactly_cross_entropy(reduction):
    x = jax.random.normal(jax.random.key(0), (6, 8), F32)
    w = jax.random.normal(jax.random.key(1), (40, 8), F32)
    y = jnp.array([0, 3, -100, 39, 7, 7])
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, logit_softcap=4.0)
    got = sj.linear_cross_entropy(x, w, y, implementation="xla", reduction=reduction, **kw)
    want = sj.cross_entropy(jnp.dot(x, w.T, precision="highest"), y, reduction=reduction, **kw)
    np.testing.assert_allclose(got, want, rtol=tol(F32))
    streamed = sj.linear_cross_entropy(x, w, y, implementation="chunked", reduction=reduction, **kw)
    np.testing.assert_allclose(got, streamed, rtol=slack("two_paths", F32))


@pytest.mark.x64
def test_linear_cross_entropy_pallas_refuses_float64_naming_it():
    x, w = jnp.ones((4, 8), F64), jnp.ones((10, 8), F64)
    with pytest.raises(NotImplementedError, match="no float64 form.*'chunked'"):
        sj.linear_cross_entropy(x, w, jnp.zeros(4, int), implementation="pallas")


# ---------------------------------------------------------------------------------------
# Options with one meaning across ops


def test_cross_entropy_takes_a_tuple_of_class_axes_as_optax():
    # [B, H, W, C1, C2]-like logits with the classes over two axes: flat row-major labels.
    logits = jax.random.normal(jax.random.key(2), (2, 3, 4, 5), F32)
    labels = jnp.array([[0, 7, 19], [11, 4, 2]])  # [2, 3], flat indices into the 4 x 5 classes
    moved = jnp.moveaxis(logits, 1, -1)  # [2, 4, 5, 3]: the classes on axes (1, 2)
    got = sj.cross_entropy(moved, labels, axis=(1, 2), reduction="none")
    want = optax.softmax_cross_entropy_with_integer_labels(moved, labels, axis=(1, 2))
    np.testing.assert_allclose(got, want, rtol=tol(F32))
    flat = jnp.moveaxis(moved, -1, 1).reshape(2, 3, 20)
    np.testing.assert_allclose(got, sj.cross_entropy(flat, labels, reduction="none"), rtol=0)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(3), moved.shape), axis=(1, 2))
    soft = sj.cross_entropy(moved, probs, axis=(1, 2), reduction="none")
    soft_flat = jnp.moveaxis(probs, -1, 1).reshape(2, 3, 20)
    np.testing.assert_allclose(
        soft, sj.cross_entropy(flat, soft_flat, reduction="none"), rtol=tol(F32)
    )
    np.testing.assert_allclose(
        soft, optax.softmax_cross_entropy(moved, probs, axis=(1, 2)), rtol=slack("two_paths", F32)
    )


def test_attention_softcap_may_be_traced_as_in_the_losses():
    q = jax.random.normal(jax.random.key(4), (1, 16, 2, 8), F32) * 4
    for impl in ("xla", "chunked"):
        static = sj.dot_product_attention(q, q, q, logit_softcap=2.0, implementation=impl)
        traced = jax.jit(
            lambda c, impl=impl: sj.dot_product_attention(
                q, q, q, logit_softcap=c, implementation=impl
            )
        )(jnp.float32(2.0))
        np.testing.assert_allclose(traced, static, rtol=tol(F32), atol=tol(F32))
        uncapped = sj.dot_product_attention(q, q, q, implementation=impl)
        assert np.max(np.abs(np.asarray(static) - np.asarray(uncapped))) > 1e-2


@pytest.mark.x64
def test_fit_temperature_keeps_float64():
    x = jnp.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]], F64)
    t = sj.calibration.fit_temperature(x, jnp.array([0, 1, 1]))
    assert t.dtype == F64
    t32 = sj.calibration.fit_temperature(x.astype(F32), jnp.array([0, 1, 1]))
    assert t32.dtype == F32
    np.testing.assert_allclose(t, t32, rtol=1e-5)
