"""The contract every public function keeps: jit, vmap, grad, dtype kept, no NaN on zeros,
and no recompilation when called again with new values of the same shapes.

Each entry builds a call from an array ``x`` of shape [4, 8] (the batch axis first) and
states the dtype the result must have for input dtype ``dt`` and whether it is
differentiable in ``x``. The suite runs as users run (x64 off); the float64 cases and the
finite-difference gradients opt in to x64.
"""

import inspect
from typing import NamedTuple

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol

import softjax as sj
from softjax import calibration, conformal, metrics, sampling

LABELS = np.array([0, 3, 7, 1])
W_OUT = np.random.default_rng(9).standard_normal((5, 8))  # [V, D] output layer
KEY = np.asarray(jax.random.key_data(jax.random.key(0)))
# A target distribution with exact zeros (a sparse map's target), constant in x.
_TARGET_ROW = np.array([0.5, 0.0, 0.25, 0.0, 0.125, 0.125, 0.0, 0.0], np.float32)


class Case(NamedTuple):
    fn: object  # x [4, 8] -> a result (or a tuple of results)
    kind: str  # "same": x's dtype; "loss": float32 (float64 for float64); "float32"; "int"
    differentiable: bool = True


def _attention(x):
    # x [4, 8] as one sequence of T=4 positions, N=2 heads of H=4; keys reversed.
    q = x.reshape(1, 4, 2, 4)
    out = sj.dot_product_attention(q, q[..., ::-1], q, is_causal=True, logit_softcap=5.0)
    return out.reshape(x.shape)


def _labels(x):
    return LABELS[: x.shape[0]]


def _teacher(x):
    """A teacher's hidden states of ``x``'s shape, not a function of ``x`` (the teacher of
    ``linear_kl_divergence`` is a constant)."""
    return jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape)


CASES = {
    "softmax": Case(lambda x: sj.softmax(x, temperature=0.9), "same"),
    "log_softmax": Case(
        lambda x: jnp.where(mask := jnp.arange(8) < 6, sj.log_softmax(x, where=mask), 0),
        "same",
    ),
    "logsumexp": Case(lambda x: sj.logsumexp(x, axis=-1), "same"),
    "cross_entropy": Case(
        lambda x: sj.cross_entropy(x, _labels(x), label_smoothing=0.1, z_loss=1e-3), "loss"
    ),
    "cross_entropy_probs": Case(
        lambda x: sj.cross_entropy(
            x, jax.nn.softmax(2 * x.astype(jnp.promote_types(x.dtype, jnp.float32)))
        ),
        "loss",
    ),
    "linear_cross_entropy": Case(
        lambda x: sj.linear_cross_entropy(
            x, jnp.asarray(W_OUT, x.dtype), _labels(x) % 5, label_smoothing=0.1
        ),
        "loss",
    ),
    "linear_kl_divergence": Case(
        lambda x: sj.linear_kl_divergence(
            x,
            jnp.asarray(W_OUT, x.dtype),
            _teacher(x),
            jnp.asarray(W_OUT, x.dtype),
            temperature=1.5,
            beta=0.3,
            reduction="none",
        ),  # fmt: skip
        "loss",
    ),
    "sampled_softmax_cross_entropy": Case(
        lambda x: sj.sampled_softmax_cross_entropy(
            x,
            jnp.asarray(W_OUT, x.dtype),
            _labels(x) % 5,
            jax.random.key(1),
            num_samples=4,
            proposal="uniform",
            reduction="none",
        ),  # fmt: skip
        "loss",
    ),
    "linear_log_probs": Case(
        lambda x: jnp.stack(
            sj.linear_log_probs(
                x,
                jnp.asarray(W_OUT, x.dtype),
                _labels(x) % 5,
                temperature=0.8,
                return_entropy=True,
            )
        ),  # fmt: skip
        "loss",
    ),
    "sparsemax": Case(lambda x: sj.sparsemax(x), "same"),
    "entmax15": Case(lambda x: sj.entmax15(x), "same"),
    # The soft sample: the hard one's straight-through gradient is not its value's derivative.
    "gumbel_softmax": Case(
        lambda x: sj.gumbel_softmax(jax.random.wrap_key_data(KEY), x, tau=0.7), "same"
    ),
    "sparsemax_loss": Case(lambda x: sj.sparsemax_loss(x, _labels(x), reduction="none"), "loss"),
    "entmax15_loss": Case(
        lambda x: sj.entmax15_loss(x, jnp.broadcast_to(_TARGET_ROW, x.shape)), "loss"
    ),
    "nll_loss": Case(lambda x: sj.nll_loss(sj.log_softmax(x), _labels(x), ignore_index=3), "loss"),
    "kl_divergence": Case(
        lambda x: sj.kl_divergence(
            sj.log_softmax(x),
            jnp.broadcast_to(jax.nn.softmax(jnp.cos(jnp.arange(8.0))), x.shape),
            reduction="batchmean",
        ),
        "loss",
    ),
    "log_sigmoid": Case(lambda x: sj.log_sigmoid(x), "same"),
    "sigmoid_focal_loss": Case(
        lambda x: sj.sigmoid_focal_loss(x, (x > 0.5).astype(x.dtype), alpha=0.25), "loss"
    ),
    "poly_loss": Case(lambda x: sj.poly_loss(x, _labels(x), epsilon=1.5), "loss"),
    "binary_cross_entropy": Case(
        lambda x: sj.binary_cross_entropy(x, (x > 0).astype(x.dtype)), "loss"
    ),
    "dot_product_attention": Case(_attention, "same"),
    # Documented float32 (what sample draws from), for inspection rather than training.
    "filter_logits": Case(
        lambda x: jnp.maximum(sampling.filter_logits(x, top_k=5, min_p=0.01), -1e4),
        "float32",
        differentiable=False,
    ),
    "sample": Case(
        lambda x: sj.sample(jax.random.wrap_key_data(KEY), x, temperature=0.7, top_p=0.9),
        "int",
        differentiable=False,
    ),
    # Binned statistics: piecewise constant in the logits' ranking, so not differentiated.
    "bin_statistics": Case(
        lambda x: calibration.bin_statistics(x, _labels(x), n_bins=4), "loss", False
    ),
    "expected_calibration_error": Case(
        lambda x: calibration.expected_calibration_error(x, _labels(x), n_bins=4), "loss", False
    ),
    "maximum_calibration_error": Case(
        lambda x: calibration.maximum_calibration_error(x, _labels(x), n_bins=4), "loss", False
    ),
    "fit_temperature": Case(
        lambda x: calibration.fit_temperature(x, _labels(x), steps=5), "loss", False
    ),
    # x as one sequence of T=4 positions over V=8 tokens.
    "token_log_probs": Case(lambda x: metrics.token_log_probs(x, _labels(x)), "loss"),
    "sequence_log_probs": Case(
        lambda x: metrics.sequence_log_probs(x, _labels(x), length_penalty=0.7), "loss"
    ),
    "perplexity": Case(lambda x: metrics.perplexity(x, _labels(x), ignore_index=3), "loss"),
    # Conformal prediction: the scores are piecewise smooth in the logits (sums of
    # probabilities in ranked order); the threshold is an order statistic of them and the
    # sets are boolean (compared as int32 here), so those are not differentiated.
    "scores": Case(
        lambda x: conformal.scores(x, _labels(x), method="raps", k_reg=2, lam=0.1), "loss"
    ),
    "calibrate": Case(
        lambda x: conformal.calibrate(x, _labels(x), alpha=0.2, method="aps"), "loss", False
    ),
    "prediction_sets": Case(
        lambda x: conformal.prediction_sets(x, 0.6, method="raps", k_reg=1, lam=0.05).astype(
            jnp.int32
        ),
        "int",
        False,
    ),
    "coverage": Case(
        lambda x: conformal.coverage(conformal.prediction_sets(x, 0.7), _labels(x)),
        "float32",
        False,
    ),
    "mean_set_size": Case(
        lambda x: conformal.mean_set_size(conformal.prediction_sets(x, 0.7, method="aps")),
        "float32",
        False,
    ),
    # A count of ranks: piecewise constant, float32 whatever the logits.
    "top_k_accuracy": Case(lambda x: metrics.top_k_accuracy(x, _labels(x), k=2), "float32", False),
}

# Public functions whose contract is checked in their own test module.
EXTRA_COVERED = {
    "filter_logits_reference": "the sort-based oracle of filter_logits (test_sampling.py)",
    "reliability_diagram": "draws a matplotlib figure (test_calibration.py)",
}

X64 = pytest.mark.x64


def expected_dtype(kind, dt):
    if kind == "same":
        return jnp.dtype(dt)
    if kind in ("int", "float32"):
        return jnp.dtype(jnp.int32 if kind == "int" else jnp.float32)
    return jnp.dtype(jnp.float64 if dt == jnp.float64 else jnp.float32)


def as_f64(tree):
    return [np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in jax.tree.leaves(tree)]


def data(seed, shape=(4, 8), dt=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dt)


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param]


@pytest.mark.parametrize(
    "dt", [jnp.float32, jnp.bfloat16, pytest.param(jnp.float64, marks=X64)], ids=str
)
def test_jit_matches_eager_and_keeps_dtype(case, dt):
    x = data(0, dt=dt)
    eager, jitted = case.fn(x), jax.jit(case.fn)(x)
    for leaf in jax.tree.leaves(eager):
        assert leaf.dtype == expected_dtype(case.kind, dt)
    for got, want in zip(as_f64(jitted), as_f64(eager), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_vmap_matches_loop(case):
    xs = data(1, (3, 4, 8))
    batched = jax.vmap(case.fn)(xs)
    looped = jax.tree.map(lambda *r: jnp.stack(r), *[case.fn(x) for x in xs])
    rtol = 0 if case.kind == "int" else tol(jnp.float32)
    for got, want in zip(as_f64(batched), as_f64(looped), strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


@X64
@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.differentiable))
def test_grad_is_finite_and_matches_finite_differences(name):
    case = CASES[name]
    x = data(2, dt=jnp.float64)
    v = jnp.asarray(np.random.default_rng(3).standard_normal(jnp.shape(case.fn(x))))
    scalar = lambda x: jnp.sum(case.fn(x) * v)
    g = jax.grad(scalar)(x)
    assert np.all(np.isfinite(g))
    d = data(4, dt=jnp.float64)
    eps = 1e-6
    fd = (scalar(x + eps * d) - scalar(x - eps * d)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=1e-6, atol=1e-8)


def test_zeros_give_no_nan(case):
    x = jnp.zeros((4, 8), jnp.float32)
    for leaf in as_f64(case.fn(x)):
        assert np.all(np.isfinite(leaf))
    if case.differentiable:
        g = jax.grad(lambda x: jnp.sum(case.fn(x)))(x)
        assert np.all(np.isfinite(g))


class Compilations:
    """Counts executables built while it is entered (jax.monitoring events): XLA backend
    compilations and loads from the test run's compilation cache (conftest.py), which stand
    in for a compilation a user without that cache would pay."""

    count = 0

    @classmethod
    def listen(cls, event, duration, **kwargs):
        del duration, kwargs
        if event.endswith(("backend_compile_duration", "cache_retrieval_time_sec")):
            cls.count += 1

    def __enter__(self):
        self.start = Compilations.count
        return self

    def __exit__(self, *exc):
        self.compiled = Compilations.count - self.start


jax.monitoring.register_event_duration_secs_listener(Compilations.listen)


def test_second_call_compiles_nothing(case):
    # As in a notebook or an eager script: the same shapes with new values reuse what the
    # first call compiled (a loop or closure rebuilt per call would compile again).
    x1, x2 = data(5), data(6)
    calls = [case.fn]
    if case.differentiable:
        calls.append(jax.grad(lambda x: jnp.sum(case.fn(x))))
    for call in calls:
        jax.block_until_ready(call(x1))
        with Compilations() as c:
            jax.block_until_ready(call(x2))
        assert c.compiled == 0, call


def test_the_compilation_counter_sees_a_compilation():
    with Compilations() as c:
        jax.jit(lambda x: x * 3 + 1)(data(7, (3, 5)))
    assert c.compiled >= 1


def test_every_public_function_is_covered():
    def functions(module, names):
        return {n for n in names if inspect.isfunction(getattr(module, n))}

    public = functions(sj, sj.__all__)
    for module in (sampling, calibration, conformal, metrics):
        public |= functions(module, module.__all__)
    covered = set(CASES) | {name.removesuffix("_probs") for name in CASES} | set(EXTRA_COVERED)
    assert public <= covered, public - covered
