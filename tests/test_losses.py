"""cross_entropy and binary_cross_entropy: PyTorch semantics, float64 references, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tol
from jax.test_util import check_grads

import softjax as sj

# ---------------------------------------------------------------------------------------
# float64 references of torch.nn.CrossEntropyLoss / BCEWithLogitsLoss, written in NumPy


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def ref_cross_entropy(
    x,
    y,
    weight=None,
    ignore_index=None,
    smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    reduction="mean",
    where=None,
):
    """Integer labels ``y`` [N] or probabilities [N, C]; classes on the last axis."""
    x = np.asarray(x, np.float64)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    c = x.shape[-1]
    logp = np_log_softmax(x)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    valid = np.ones(x.shape[:-1], bool) if where is None else np.asarray(where)
    if np.issubdtype(np.asarray(y).dtype, np.integer):
        y = np.asarray(y)
        if ignore_index is not None:
            valid = valid & (y != ignore_index)
        yc = np.where(valid, y, 0)
        wy = w[yc]
        nll = -np.take_along_axis(logp, yc[..., None], -1)[..., 0] * wy
        smooth = -(logp * w).sum(-1)
        per = (1 - smoothing) * nll + smoothing / c * smooth + z_loss * wy * lse**2
        per = np.where(valid, per, 0.0)
        den = np.sum(np.where(valid, wy, 0.0))
    else:
        q = np.asarray(y, np.float64) * (1 - smoothing) + smoothing / c
        per = -(q * w * logp).sum(-1) + z_loss * lse**2
        per = np.where(valid, per, 0.0)
        den = valid.sum()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / den if den else 0.0


def ref_bce(x, t, weight=None, pos_weight=None, smoothing=0.0, reduction="mean"):
    x = np.asarray(x, np.float64)
    t = np.asarray(t, np.float64) * (1 - smoothing) + smoothing / 2
    log_sig = -np.logaddexp(0, -x)
    log_sig_neg = -np.logaddexp(0, x)
    pw = 1.0 if pos_weight is None else pos_weight
    loss = -(pw * t * log_sig + (1 - t) * log_sig_neg)
    if weight is not None:
        loss = loss * weight
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


RNG = np.random.default_rng(0)
X = RNG.standard_normal((9, 6)) * 2
Y = np.array([0, 1, -100, 3, -100, 5, 2, 2, 4])
W = RNG.random(6) + 0.2
P = RNG.dirichlet(np.ones(6), size=9)

OPTION_SETS = [
    {},
    {"weight": W},
    {"smoothing": 0.2},
    {"weight": W, "smoothing": 0.3},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"weight": W, "smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0},
]


def call_ce(x, y, opts, **kw):
    return sj.cross_entropy(
        x,
        y,
        weight=opts.get("weight"),
        label_smoothing=opts.get("smoothing", 0.0),
        z_loss=opts.get("z_loss", 0.0),
        logit_softcap=opts.get("softcap"),
        **kw,
    )


# ---------------------------------------------------------------------------------------
# Worked example


def test_explainer_example_value_and_gradient():
    logits = jnp.array([2.0, 1.0, 0.5])
    np.testing.assert_allclose(sj.softmax(logits), [0.629, 0.231, 0.140], atol=5e-4)
    loss, grad = jax.value_and_grad(lambda z: sj.cross_entropy(z, jnp.array(0)))(logits)
    np.testing.assert_allclose(loss, 0.464, atol=5e-4)
    np.testing.assert_allclose(grad, [-0.371, 0.231, 0.140], atol=5e-4)


# ---------------------------------------------------------------------------------------
# Values and gradients against the float64 reference


@pytest.mark.x64
@pytest.mark.parametrize("opts", OPTION_SETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_integer_labels_match_reference(opts, reduction):
    kw = dict(ignore_index=-100, reduction=reduction)
    got = call_ce(X, Y, opts, **kw)
    want = ref_cross_entropy(X, Y, ignore_index=-100, reduction=reduction, **opts)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    cot = RNG.standard_normal(np.shape(want))
    grad = jax.grad(lambda x: jnp.sum(call_ce(x, Y, opts, **kw) * cot))(X)
    num = jax.grad(
        lambda x: jnp.sum(
            _ce_by_autodiff(x, Y, ignore_index=-100, reduction=reduction, **opts) * cot
        )
    )(X)
    np.testing.assert_allclose(grad, num, rtol=1e-10, atol=1e-13)


def _ce_by_autodiff(
    x, y, weight=None, ignore_index=None, smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean"
):
    """The reference again, in jnp, differentiated by plain autodiff."""
    if softcap is not None:
        x = softcap * jnp.tanh(x / softcap)
    c = x.shape[-1]
    logp = jax.nn.log_softmax(x)
    lse = jax.nn.logsumexp(x, axis=-1)
    w = jnp.ones(c) if weight is None else jnp.asarray(weight)
    valid = y != ignore_index
    yc = jnp.where(valid, y, 0)
    wy = w[yc]
    per = (1 - smoothing) * -jnp.take_along_axis(logp, yc[:, None], -1)[:, 0] * wy
    per = per - smoothing / c * (logp * w).sum(-1) + z_loss * wy * lse**2
    per = jnp.where(valid, per, 0.0)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.sum() / jnp.sum(jnp.where(valid, wy, 0))


@pytest.mark.x64
@pytest.mark.parametrize("opts", OPTION_SETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_probabilities_match_reference(opts, reduction):
    where = np.array([True] * 7 + [False, True])
    got = call_ce(X, P, opts, reduction=reduction, where=where)
    want = ref_cross_entropy(X, P, reduction=reduction, where=where, **opts)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.x64
@pytest.mark.parametrize("opts", OPTION_SETS[:4] + OPTION_SETS[-1:])
def test_check_grads_order_2(opts):
    y = np.array([0, 1, 5, 3, 0, 5, 2, 2, 4])
    check_grads(jax.jit(lambda x: call_ce(x, y, opts)), (X,), order=2, modes=("rev",))
    check_grads(jax.jit(lambda x, p: call_ce(x, p, opts)), (X, P), order=2, modes=("rev",))


@pytest.mark.x64
def test_hessian_through_forward_over_reverse():
    y = np.array([0, 1, 2])
    h = jax.jit(jax.hessian(lambda x: sj.cross_entropy(x, y)))(X[:3])
    h_ref = jax.jit(jax.hessian(lambda x: _ce_by_autodiff(x, y)))(X[:3])
    np.testing.assert_allclose(h, h_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision_logits_give_float32_losses(dtype):
    x = jnp.asarray(X).astype(dtype)
    loss = sj.cross_entropy(x, Y, ignore_index=-100)
    assert loss.dtype == jnp.float32
    want = ref_cross_entropy(np.asarray(x.astype(jnp.float32)), Y, ignore_index=-100)
    np.testing.assert_allclose(loss, want, rtol=tol("float32"))
    grad = jax.grad(lambda x: sj.cross_entropy(x, Y, ignore_index=-100))(x)
    assert grad.dtype == x.dtype
    assert sj.binary_cross_entropy(x, jnp.asarray(P).astype(dtype)).dtype == jnp.float32


@pytest.mark.x64
def test_float64_logits_give_float64_losses():
    assert sj.cross_entropy(X, Y, ignore_index=-100).dtype == jnp.float64


@pytest.mark.x64
def test_class_axis_other_than_last():
    x = RNG.standard_normal((4, 6, 3))  # PyTorch layout [N, C, d]
    y = RNG.integers(0, 6, (4, 3))
    got = sj.cross_entropy(x, y, axis=1, reduction="none")
    want = ref_cross_entropy(np.moveaxis(x, 1, -1), y, reduction="none")
    np.testing.assert_allclose(got, want, rtol=1e-12)
    p = RNG.dirichlet(np.ones(6), size=(4, 3))
    got = sj.cross_entropy(x, np.moveaxis(p, -1, 1), axis=1)
    np.testing.assert_allclose(got, ref_cross_entropy(np.moveaxis(x, 1, -1), p), rtol=1e-12)


def test_large_logits_keep_precision():
    x = np.array([[1000.0, 0.0, -1000.0], [50.0, 49.0, 48.0]], np.float32)
    got = sj.cross_entropy(x, np.array([0, 2]), reduction="none")
    want = ref_cross_entropy(x.astype(np.float64), np.array([0, 2]), reduction="none")
    np.testing.assert_allclose(got, want, rtol=4e-7)
    assert got[0] == 0.0  # exp(-1000) is below float32 and float64 alike


# ---------------------------------------------------------------------------------------
# Ignored, masked, out of range


def test_mean_over_zero_valid_examples_is_zero_with_zero_gradient():
    y = np.full(9, -100)
    for opts in OPTION_SETS:
        loss, grad = jax.value_and_grad(lambda x: call_ce(x, y, opts, ignore_index=-100))(X)
        assert loss == 0.0
        np.testing.assert_array_equal(grad, 0.0)
    where = np.zeros(9, bool)
    loss, grad = jax.value_and_grad(lambda x: sj.cross_entropy(x, P, where=where))(X)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_ignored_rows_get_zero_gradient_even_with_nan_logits():
    x = X.copy()
    x[2] = np.nan  # row 2 is ignored
    loss, grad = jax.value_and_grad(lambda x: sj.cross_entropy(x, Y, ignore_index=-100))(x)
    assert np.isfinite(loss)
    np.testing.assert_array_equal(grad[2], 0.0)
    assert np.all(np.isfinite(grad))


def test_where_equals_filtering():
    where = np.array([True, False, True, True, False, True, True, False, True])
    y = np.array([0, 1, 5, 3, 0, 5, 2, 2, 4])
    got = sj.cross_entropy(X, y, where=where, weight=W, label_smoothing=0.1)
    want = sj.cross_entropy(X[where], y[where], weight=W, label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-13)


def test_out_of_range_label_gives_nan_for_that_example_only():
    y = np.array([0, 7, 2])
    per = np.asarray(sj.cross_entropy(X[:3], y, reduction="none"))
    assert np.isnan(per[1]) and np.all(np.isfinite(per[[0, 2]]))
    assert np.isnan(sj.cross_entropy(X[:3], y))
    grad = np.asarray(jax.grad(lambda x: sj.cross_entropy(x, y, reduction="sum"))(X[:3]))
    assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(grad[[0, 2]]))
    per = sj.cross_entropy(X[:3], np.array([0, -1, 2]), reduction="none")
    assert np.isnan(per[1])


def test_nan_logits_are_loud():
    x = X.copy()
    x[0, 0] = np.nan
    assert np.isnan(sj.cross_entropy(x, Y, ignore_index=-100))
    assert np.isnan(sj.cross_entropy(x, P))


def _sub_jaxprs(eqn):
    """The jaxprs an equation calls (jit, custom_jvp/vjp, cond, scan, while), unwrapped."""
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            jaxpr = getattr(item, "jaxpr", item)
            if hasattr(jaxpr, "eqns"):
                yield jaxpr


def label_only_floats(jaxpr, tags, shape):
    """Float arrays of ``shape`` computed from the labels alone (tag "y", not "x").

    ``tags`` maps the jaxpr's input variables to the inputs they carry ("x", "y"). A one-hot
    matrix, however it is built (``jax.nn.one_hot``, ``eq`` then ``convert_element_type``,
    a scatter into zeros), is exactly such an array: a ``[N, V]`` float that depends on the
    labels but not on the logits. Data dependence is followed into called jaxprs
    (positionally where the arity matches, else every input carries every tag).
    """
    tags = dict(tags)
    found = []

    def of(v):
        return set() if hasattr(v, "val") else tags.get(v, set())  # a Literal has no tags

    for eqn in jaxpr.eqns:
        carried = set().union(*(of(v) for v in eqn.invars))
        for sub in _sub_jaxprs(eqn):
            if len(sub.invars) == len(eqn.invars):
                inner = {a: of(b) for a, b in zip(sub.invars, eqn.invars, strict=True)}
            else:
                inner = dict.fromkeys(sub.invars, carried)
            found += label_only_floats(sub, inner, shape)
        for v in eqn.outvars:
            tags[v] = carried
            aval = v.aval
            floating = jnp.issubdtype(aval.dtype, jnp.floating)
            if aval.shape == shape and floating and carried == {"y"}:
                found.append(str(eqn.primitive))
    return found


def _one_hots(fn, x, y):
    """The primitives of ``fn(x, y)``'s jaxpr that build an x-shaped float from ``y`` alone."""
    jaxpr = jax.make_jaxpr(fn)(x, y).jaxpr
    tags = {v: {name} for v, name in zip(jaxpr.invars, ("x", "y"), strict=True)}
    return label_only_floats(jaxpr, tags, x.shape)


def test_integer_path_builds_no_one_hot():
    """The forward picks the label's logit by index, never through a one-hot product.

    The gradient, ``softmax - onehot``, does compare the labels with the class index: that
    comparison is elementwise and fuses into the pass that writes the gradient, so only the
    forward is held to "no one-hot", and the backward to "no [N, V] residual".
    """
    x = jnp.zeros((64, 4096), jnp.float32)
    y = jnp.zeros((64,), jnp.int32)
    for options in ({}, {"label_smoothing": 0.1, "ignore_index": 0, "weight": jnp.ones(4096)}):
        loss = functools.partial(sj.cross_entropy, **options)
        assert _one_hots(loss, x, y) == [], options
    # The detector finds a one-hot where there is one (so the assertion above can fail).
    with_one_hot = lambda x, y: -jnp.mean(jnp.sum(jax.nn.one_hot(y, 4096) * x, -1))  # noqa: E731
    assert _one_hots(with_one_hot, x, y)
    # The gradient needs no [N, V] residual besides the logits themselves.
    _, vjp = jax.vjp(lambda x: sj.cross_entropy(x, y), x)
    big = [r for r in jax.tree_util.tree_leaves(vjp) if getattr(r, "size", 0) >= x.size]
    assert len(big) == 1


# ---------------------------------------------------------------------------------------
# PyTorch, when installed


@pytest.mark.x64  # float64 against torch's float64, to 1e-12
def test_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    f = torch.nn.functional.cross_entropy
    for opts in OPTION_SETS:
        if "z_loss" in opts or "softcap" in opts:
            continue
        w = None if "weight" not in opts else torch.tensor(opts["weight"])
        for reduction in ("mean", "sum", "none"):
            xt = torch.tensor(X, requires_grad=True)
            out = f(
                xt,
                torch.tensor(Y),
                weight=w,
                ignore_index=-100,
                label_smoothing=opts.get("smoothing", 0.0),
                reduction=reduction,
            )
            out.sum().backward()
            got, grad = jax.value_and_grad(
                lambda x: call_ce(x, Y, opts, ignore_index=-100, reduction=reduction).sum()
            )(X)
            np.testing.assert_allclose(got, out.detach().sum().numpy(), rtol=1e-12)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-10, atol=1e-15)
            pt = torch.tensor(P)
            out = f(
                torch.tensor(X),
                pt,
                weight=w,
                label_smoothing=opts.get("smoothing", 0.0),
                reduction=reduction,
            )
            np.testing.assert_allclose(
                call_ce(X, P, opts, reduction=reduction), out.numpy(), rtol=1e-12
            )


@pytest.mark.x64  # float64 against torch's float64, to 1e-12
def test_matches_torch_bce_with_logits():
    torch = pytest.importorskip("torch")
    t = RNG.random(X.shape)
    pw = RNG.random(6) + 0.5
    for kw in ({}, {"weight": W}, {"pos_weight": pw}, {"weight": W, "pos_weight": pw}):
        for reduction in ("mean", "sum", "none"):
            out = torch.nn.functional.binary_cross_entropy_with_logits(
                torch.tensor(X),
                torch.tensor(t),
                reduction=reduction,
                **{k: torch.tensor(v) for k, v in kw.items()},
            )
            got = sj.binary_cross_entropy(X, t, reduction=reduction, **kw)
            np.testing.assert_allclose(got, out.numpy(), rtol=1e-12)


# ---------------------------------------------------------------------------------------
# Binary cross-entropy


@pytest.mark.x64
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_matches_reference(reduction):
    t = RNG.random(X.shape)
    pw = RNG.random(6) + 0.5
    for kw in ({}, {"weight": W}, {"pos_weight": pw}, {"smoothing": 0.2}):
        got = sj.binary_cross_entropy(
            X,
            t,
            reduction=reduction,
            weight=kw.get("weight"),
            pos_weight=kw.get("pos_weight"),
            label_smoothing=kw.get("smoothing", 0.0),
        )
        np.testing.assert_allclose(got, ref_bce(X, t, reduction=reduction, **kw), rtol=1e-12)


def test_bce_is_stable_for_large_logits():
    # The small losses keep their relative accuracy (no log(1 - sigmoid) cancellation).
    x = np.array([30.0, -30.0, 1e4, -1e4], np.float32)
    t = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    got = sj.binary_cross_entropy(x, t, reduction="none")
    np.testing.assert_allclose(got, [np.exp(-30.0), np.exp(-30.0), 1e4, 1e4], rtol=1e-6)
    grad = jax.grad(lambda x: sj.binary_cross_entropy(x, t, reduction="sum"))(x)
    np.testing.assert_allclose(grad, [-np.exp(-30.0), np.exp(-30.0), 1.0, -1.0], rtol=1e-6)


@pytest.mark.x64
def test_bce_where_and_all_masked():
    t = RNG.random(X.shape)
    where = RNG.random(X.shape) < 0.5
    got = sj.binary_cross_entropy(X, t, where=where)
    np.testing.assert_allclose(got, ref_bce(X[where], t[where]), rtol=1e-12)
    x = X.copy()
    x[~where] = np.nan
    loss, grad = jax.value_and_grad(lambda x: sj.binary_cross_entropy(x, t, where=where))(x)
    np.testing.assert_allclose(loss, ref_bce(X[where], t[where]), rtol=1e-12)
    np.testing.assert_array_equal(grad[~where], 0.0)
    none = np.zeros(X.shape, bool)
    loss, grad = jax.value_and_grad(lambda x: sj.binary_cross_entropy(x, t, where=none))(X)
    assert loss == 0.0
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.x64
def test_bce_check_grads():
    # float64, as every finite-difference check of order 2 here, and targets of its own: in
    # float32, with targets drawn from the module's shared generator (so depending on which
    # tests ran before it in the process), the second-order check failed for some draws.
    t = np.random.default_rng(449).random(X.shape)
    check_grads(jax.jit(lambda x: sj.binary_cross_entropy(x, t, pos_weight=W)), (X,), order=2)


@pytest.mark.x64
def test_bce_gradients_in_logits_targets_and_pos_weight_match_autodiff_of_the_formula():
    # The closed-form derivative rule against plain autodiff of the textbook formula, at
    # logits from a far tail to the other, smoothed targets, per-element weights.
    x = jnp.array([-40.0, -30.0, -2.0, 0.0, 0.5, 3.0, 40.0])
    t = jnp.array([0.0, 1.0, 0.3, 0.5, 1.0, 0.9, 0.2])
    pw = jnp.array([1.5, 0.5, 2.0, 1.0, 3.0, 0.7, 1.2])
    w = jnp.linspace(0.5, 1.5, 7)

    def ours(x, t, pw):
        return sj.binary_cross_entropy(x, t, pos_weight=pw, weight=w, label_smoothing=0.1)

    def formula(x, t, pw):
        t = t * 0.9 + 0.05
        return jnp.mean(-w * (pw * t * jax.nn.log_sigmoid(x) + (1 - t) * jax.nn.log_sigmoid(-x)))

    got, want = jax.grad(ours, (0, 1, 2))(x, t, pw), jax.grad(formula, (0, 1, 2))(x, t, pw)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-14, atol=0)
    check_grads(ours, (x, t, pw), order=2, modes=["fwd", "rev"], eps=1e-4)
