"""Bad input raises at trace time with a message naming argument, expectation and value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softjax as sj

X = jnp.zeros((4, 3))


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, sj.logsumexp])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8])
def test_integer_input_is_promoted_to_float32_as_in_jax_nn(fn, dtype):
    x = jnp.array([[0, 3, 7], [2, 2, 1]], dtype)
    out = fn(x)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, fn(x.astype(jnp.float32)))


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, sj.logsumexp])
def test_bool_input_is_a_type_error(fn):
    with pytest.raises(TypeError, match="got bool"):
        fn(jnp.zeros((2, 3), bool))


@pytest.mark.parametrize("fn", [sj.softmax, sj.log_softmax, sj.logsumexp])
def test_axis_out_of_range(fn):
    with pytest.raises(ValueError, match=r"axis=2 is out of range for an array of rank 2"):
        fn(X, 2)
    with pytest.raises(ValueError, match="names the same axis twice"):
        fn(X, (0, -2))


def test_bad_where():
    with pytest.raises(ValueError, match=r"where has shape \(5,\), which does not broadcast"):
        sj.softmax(X, where=jnp.ones(5, bool))
    with pytest.raises(TypeError, match="where must be a boolean array"):
        sj.softmax(X, where=jnp.ones(3))


@pytest.mark.parametrize("t", [0.0, -1.0, float("nan"), np.array([[1.0], [0.0], [1.0], [1.0]])])
def test_concrete_temperature_must_be_positive(t):
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sj.softmax(X, temperature=t)


def test_temperature_shape():
    with pytest.raises(ValueError, match="must have size 1 along the reduced axes"):
        sj.softmax(X, temperature=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        sj.log_softmax(X, temperature=jnp.ones((5, 1)))


def test_traced_temperature_is_not_checked_on_values():
    out = jax.jit(lambda t: sj.softmax(X, temperature=t))(jnp.float32(2.0))
    np.testing.assert_allclose(out, 1 / 3, rtol=1e-6)


def test_cross_entropy_label_errors():
    with pytest.raises(
        ValueError,
        match=r"labels has shape \(5,\) but logits \(4, 3\) without axis -1 has "
        r"shape \(4,\)",
    ):
        sj.cross_entropy(X, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="class probabilities must have the shape of logits"):
        sj.cross_entropy(X, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"labels \(class probabilities\) has shape"):
        sj.cross_entropy(X, jnp.zeros((4, 5)))
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        sj.cross_entropy(jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, jnp.int32))


def test_cross_entropy_option_errors():
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="reduction must be one of"):
        sj.cross_entropy(X, y, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        sj.cross_entropy(X, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\) \(one per class\)"):
        sj.cross_entropy(X, y, weight=jnp.ones(4))
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        sj.cross_entropy(X, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="logit_softcap must be > 0"):
        sj.cross_entropy(X, y, logit_softcap=0.0)
    with pytest.raises(ValueError, match="axis=3 is out of range"):
        sj.cross_entropy(X, y, axis=3)


def test_binary_cross_entropy_errors():
    with pytest.raises(ValueError, match=r"targets has shape \(4,\) but logits has shape"):
        sj.binary_cross_entropy(X, jnp.zeros(4))
    with pytest.raises(ValueError, match="pos_weight has shape"):
        sj.binary_cross_entropy(X, X, pos_weight=jnp.ones(5))
    with pytest.raises(ValueError, match="reduction must be one of"):
        sj.binary_cross_entropy(X, X, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        sj.binary_cross_entropy(X, X, label_smoothing=-0.1)
