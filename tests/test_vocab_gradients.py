"""linear_cross_entropy gradients against float64 autodiff of the materialised loss.

The full grid: every option (alone where it changes the code path, and all together) x
every reduction x every dtype x every implementation (the xla single pass, the xla two-pass
streaming path, the Pallas kernels interpreted on CPU). The reference is written here from
the definition (``log_softmax`` of ``x @ w.T`` in float64, PyTorch's weighted mean), and
differentiated by JAX's own autodiff: nothing of softjax is in it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import assert_close, slack

import softjax
from softjax._vocab import api, chunked

F32, BF16, F64 = jnp.float32, jnp.bfloat16, jnp.float64
N, D, V = 13, 16, 150
IGNORE = -100

OPTION_SETS = {
    "plain": {},
    "softcap": {"logit_softcap": 3.0},
    "smoothing": {"label_smoothing": 0.2},
    "z_loss": {"z_loss": 1e-2},
    "weight": {"weight": True},
    "masks": {"ignore_index": IGNORE, "where": True},
    "all": {
        "weight": True,
        "label_smoothing": 0.2,
        "z_loss": 1e-2,
        "logit_softcap": 3.0,
        "ignore_index": IGNORE,
        "where": True,
    },
}


def reference_loss(x, w, y, *, weight=None, where=None, ignore_index=None, label_smoothing=0.0,
                   z_loss=0.0, logit_softcap=None, reduction="mean"):  # fmt: skip
    """PyTorch's CrossEntropyLoss on ``x @ w.T`` (+ z-loss, soft-cap), plain float64 jnp."""
    z = x.astype(F64) @ w.astype(F64).T
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    cw = jnp.ones(V, F64) if weight is None else weight.astype(F64)
    valid = jnp.ones(y.shape, bool) if where is None else where
    if ignore_index is not None:
        valid = valid & (y != ignore_index)
    safe_y = jnp.where(valid, y, 0)
    logp = jax.nn.log_softmax(z, axis=-1)
    lse = jax.nn.logsumexp(z, axis=-1)
    wy = cw[safe_y]
    nll = -jnp.take_along_axis(logp, safe_y[:, None], axis=-1)[:, 0]
    rows = (1 - label_smoothing) * wy * nll - label_smoothing / V * jnp.sum(cw * logp, -1)
    rows = jnp.where(valid, rows + z_loss * wy * lse**2, 0.0)
    if reduction == "none":
        return rows
    total = jnp.sum(rows)
    return total if reduction == "sum" else total / jnp.sum(jnp.where(valid, wy, 0.0))


def _inputs(dtype):
    kx, kw, ky, kc, km = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(kx, (N, D), F64).astype(dtype)
    w = (jax.random.normal(kw, (V, D), F64) / np.sqrt(D) * 3).astype(dtype)
    y = jax.random.randint(ky, (N,), 0, V).at[2].set(IGNORE).at[5].set(V - 1).at[6].set(0)
    weight = jax.random.uniform(kc, (V,), F64, 0.2, 2.0)
    where = jax.random.uniform(km, (N,)) > 0.2
    return x, w, y, weight, where


def _kwargs(name, weight, where, dtype):
    kw = dict(OPTION_SETS[name])
    if kw.get("weight"):
        kw["weight"] = weight.astype(dtype if dtype == F64 else F32)
    if kw.get("where"):
        kw["where"] = where
    if "ignore_index" not in kw:
        kw["ignore_index"] = IGNORE  # label 2 holds IGNORE: it must never count as a class
    return kw


def _value_and_grads(fn, x, w, y, g, reduction, kw, jit=True):
    def f(x, w):
        out = fn(x, w, y, reduction=reduction, **kw)
        return jnp.sum(out * g.astype(out.dtype)) if reduction == "none" else out

    vg = jax.value_and_grad(f, (0, 1))
    # The reference runs op by op: its small ops compile once for the whole grid.
    return (jax.jit(vg) if jit else vg)(x, w)


@pytest.fixture
def small_blocks(monkeypatch):
    """Several ragged blocks at the test's sizes, on every path."""
    monkeypatch.setattr(chunked, "MAX_BLOCK_V", 64)  # 150 classes: 3 blocks, the last ragged
    monkeypatch.setattr(chunked, "MIN_BLOCK_V", 8)
    monkeypatch.setattr(chunked, "BLOCK_N", 5)  # 13 tokens: 3 token blocks
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 4 * V)  # single pass: chunks of 4 tokens


# (implementation, path): "natural" and "two-pass" name the chunked paths; the single pass serves
# float32/float64 weights with a scalar reduction, so "two-pass" forces the other one there.
PATHS = [("chunked", "natural"), ("chunked", "two-pass"), ("pallas", "natural"), ("xla", "natural")]
# The Pallas kernels (interpreted, ~10 s a case) run two cases by default, the rest under
# `slow`; test_vocab.py compares them with the chunked path at every option.
PALLAS_DEFAULT = {(F32, "mean"), (BF16, "none")}


def _marks(impl, dtype, reduction):
    slow = impl == "pallas" and (dtype, reduction) not in PALLAS_DEFAULT
    return [pytest.mark.slow] if slow else []


GRID = [
    pytest.param(
        impl,
        path,
        dtype,
        reduction,
        id=f"{impl}-{path}-{dtype.__name__}-{reduction}",
        marks=_marks(impl, dtype, reduction),
    )
    for impl, path in PATHS
    for dtype in (F32, BF16, F64)
    for reduction in ("mean", "sum", "none")
    if not (impl == "pallas" and dtype == F64)  # the kernels refuse float64 (tested apart)
    if not (path == "two-pass" and (dtype == BF16 or reduction == "none"))  # natural already
]


@pytest.mark.x64
@pytest.mark.parametrize("impl,path,dtype,reduction", GRID)
def test_gradients_match_float64_autodiff(small_blocks, monkeypatch, impl, path, dtype, reduction):
    if path == "two-pass":
        monkeypatch.setattr(api, "_single_pass_applies", lambda *a: False)
    x, w, y, weight, where = _inputs(dtype)
    g = jax.random.normal(jax.random.key(3), (N,), F64)
    # The float64 reference sees exactly the (rounded) inputs softjax sees.
    x64, w64 = x.astype(F64), w.astype(F64)
    rtol = slack("bf16_grad" if dtype == BF16 else "matmul_grad", dtype)
    for name in OPTION_SETS:
        kw = _kwargs(name, weight, where, dtype)
        lce = lambda *a, **k: softjax.linear_cross_entropy(*a, implementation=impl, **k)  # noqa: E731
        out, (dx, dw) = _value_and_grads(lce, x, w, y, g, reduction, kw)
        ref_kw = {k: (v.astype(F64) if k == "weight" else v) for k, v in kw.items()}
        ref, (rdx, rdw) = _value_and_grads(
            reference_loss, x64, w64, y, g, reduction, ref_kw, jit=False
        )
        assert dx.dtype == dtype and dw.dtype == dtype, name
        # bf16 x bf16 products are exact in float32: the loss is float32-accurate there too.
        loss_rtol = slack("matmul_grad", F64) if dtype == F64 else slack("matmul_loss", F32)
        np.testing.assert_allclose(float(out), float(ref), rtol=loss_rtol, err_msg=name)
        try:
            assert_close(dx, rdx, rtol=rtol)
            assert_close(dw, rdw, rtol=rtol)
        except AssertionError as e:
            raise AssertionError(f"option set {name!r}: {e}") from None
