"""The contract every public function keeps: jit, vmap, grad, dtype kept, no NaN on zeros.

Each entry builds a call from an array ``x`` of shape [4, 8] (the batch axis first) and
states the dtype the result must have for input dtype ``dt``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softjax as sj

LABELS = np.array([0, 3, 7, 1])
W_OUT = jnp.asarray(np.random.default_rng(9).standard_normal((5, 8)))  # [V, D] output layer

CASES = {
    "softmax": (lambda x: sj.softmax(x, temperature=0.9), "same"),
    "log_softmax": (
        lambda x: jnp.where(mask := jnp.arange(8) < 6, sj.log_softmax(x, where=mask), 0),
        "same",
    ),
    "logsumexp": (lambda x: sj.logsumexp(x, axis=-1), "same"),
    "cross_entropy": (
        lambda x: sj.cross_entropy(x, LABELS[: x.shape[0]], label_smoothing=0.1, z_loss=1e-3),
        "loss",
    ),
    "cross_entropy_probs": (
        lambda x: sj.cross_entropy(
            x, jax.nn.softmax(2 * x.astype(jnp.promote_types(x.dtype, jnp.float32)))
        ),
        "loss",
    ),
    "linear_cross_entropy": (
        lambda x: sj.linear_cross_entropy(
            x, W_OUT.astype(x.dtype), LABELS[: x.shape[0]] % 5, label_smoothing=0.1
        ),
        "loss",
    ),
    "sparsemax": (lambda x: sj.sparsemax(x), "same"),
    "entmax15": (lambda x: sj.entmax15(x), "same"),
    "binary_cross_entropy": (
        lambda x: sj.binary_cross_entropy(x, (x > 0).astype(x.dtype)),
        "loss",
    ),
}


def expected_dtype(kind, dt):
    if kind == "same":
        return jnp.dtype(dt)
    return jnp.dtype(jnp.float64 if dt == jnp.float64 else jnp.float32)


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


@pytest.mark.parametrize("dt", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_jit_matches_eager_and_keeps_dtype(case, dt):
    fn, kind = case
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), dt)
    eager, jitted = fn(x), jax.jit(fn)(x)
    assert eager.dtype == expected_dtype(kind, dt)
    np.testing.assert_allclose(
        np.asarray(jitted, np.float64), np.asarray(eager, np.float64), rtol=1e-6, atol=1e-7
    )


def test_vmap_matches_loop(case):
    fn, _ = case
    xs = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 8)))
    batched = jax.vmap(fn)(xs)
    looped = jnp.stack([fn(x) for x in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-12)


def test_grad_is_finite_and_matches_finite_differences(case):
    fn, _ = case
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)))
    v = jnp.asarray(np.random.default_rng(3).standard_normal(jnp.shape(fn(x))))
    scalar = lambda x: jnp.sum(fn(x) * v)
    g = jax.grad(scalar)(x)
    assert np.all(np.isfinite(g))
    d = jnp.asarray(np.random.default_rng(4).standard_normal(x.shape))
    eps = 1e-6
    fd = (scalar(x + eps * d) - scalar(x - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6, atol=1e-8)


def test_zeros_give_no_nan(case):
    fn, _ = case
    x = jnp.zeros((4, 8), jnp.float32)
    out, g = jax.value_and_grad(lambda x: jnp.sum(fn(x)))(x)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(g))


def test_every_public_function_is_covered():
    import inspect

    public = {n for n in sj.__all__ if inspect.isfunction(getattr(sj, n))}
    covered = {name.split("_probs")[0] for name in CASES}
    assert public <= covered | EXTRA_COVERED, public - covered - EXTRA_COVERED


# Public functions whose contract is checked in their own test module (other signatures).
EXTRA_COVERED = {
    "dot_product_attention",  # [B, T, N, H] layout: tests/test_attention.py
    "sample",  # integer output, not differentiable: tests/test_sampling.py
}
