"""cross_entropy and binary_cross_entropy beside optax (and torch when installed); nll_loss,
kl_divergence, log_sigmoid and sparsemax_loss beside their jax/optax peers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.losses import multiclass_sparsemax_loss

import softjax as sj

from .harness import Rows, compare_row, ratio_columns, tier, timings


def _rel_err_ulps(value, ref: float) -> float:
    return float(abs(float(value) - ref) / (abs(ref) * 2.0**-23))


def ce_reference(x64: np.ndarray, labels: np.ndarray) -> float:
    m = x64.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x64 - m).sum(-1, keepdims=True)))[:, 0]
    return float(np.mean(lse - x64[np.arange(len(labels)), labels]))


def bce_reference(x64: np.ndarray, t64: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, -x64) * t64 + np.logaddexp(0, x64) * (1 - t64)))


def ce_smoothed_reference(x64: np.ndarray, labels: np.ndarray, a: float) -> float:
    """PyTorch's label smoothing: ``(1 - a) * (-log p_y) + a / C * sum_c (-log p_c)``."""
    m = x64.max(-1, keepdims=True)
    logp = x64 - (m + np.log(np.exp(x64 - m).sum(-1, keepdims=True)))
    nll = -logp[np.arange(len(labels)), labels]
    return float(np.mean((1 - a) * nll - a * logp.mean(-1)))


def sparsemax_loss_reference(x64: np.ndarray, labels: np.ndarray) -> float:
    """Mean float64 sparsemax loss ``<z, p> - ½ ‖p‖² + ½ - z_y`` with sort-based ``p``."""
    srt = -np.sort(-x64, axis=-1)
    k = np.arange(1, x64.shape[-1] + 1)
    cs = np.cumsum(srt, axis=-1)
    size = np.sum(1 + k * srt > cs, axis=-1, keepdims=True)
    tau = (np.take_along_axis(cs, size - 1, axis=-1) - 1) / size
    p = np.maximum(x64 - tau, 0)
    z_y = x64[np.arange(len(labels)), labels]
    return float(np.mean(np.sum(x64 * p, -1) - 0.5 * np.sum(p * p, -1) + 0.5 - z_y))


def _fwd_and_bwd_rows(op, size, dtype, peer, ours, theirs, x, reps, ref) -> list[dict]:
    """The forward row (with errors against ``ref``) and the forward+backward row of a pair."""

    def errors(a, b):
        return _rel_err_ulps(a, ref), _rel_err_ulps(b, ref)

    return [
        compare_row(op, f"{size} fwd", dtype, peer, ours, theirs, (x,), reps, errors),
        compare_row(
            op, f"{size} fwd+bwd", dtype, peer, jax.grad(ours), jax.grad(theirs), (x,), reps
        ),
    ]


SMOOTHING = 0.1
SPARSE_ROWS = 32


def run(args) -> list[dict]:
    shape = tier(args, (64, 1024), (256, 32768), (2048, 32768))
    reps = args.reps or tier(args, 3, 5, 7)
    rng = np.random.default_rng(0)
    x32 = (rng.standard_normal(shape) * 3).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, shape[1], shape[0]), jnp.int32)
    smoothed = optax.smooth_labels(jax.nn.one_hot(labels, shape[1]), SMOOTHING)
    t32 = (rng.random(shape) < 0.1).astype(np.float32)
    size = f"{shape[0]}x{shape[1]}"
    rows = Rows()
    for dtype in ("float32", "bfloat16"):
        x = jnp.asarray(x32).astype(dtype)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        t = jnp.asarray(t32).astype(dtype)
        # x read as log-probabilities (nll_loss, kl_divergence do not normalise), targets p.
        p = jax.nn.softmax(jnp.asarray(x32) / 2)
        p64 = np.asarray(p, np.float64)
        pairs = [
            (
                "cross_entropy",
                size,
                "optax int-label CE",
                lambda x: sj.cross_entropy(x, labels),
                lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels).mean(),
                ce_reference(x64, np.asarray(labels)),
            ),
            (
                "cross_entropy",
                f"{size} smoothing={SMOOTHING}",
                "optax smooth_labels CE",
                lambda x: sj.cross_entropy(x, labels, label_smoothing=SMOOTHING),
                lambda x: optax.softmax_cross_entropy(x, smoothed).mean(),
                ce_smoothed_reference(x64, np.asarray(labels), SMOOTHING),
            ),
            (
                "binary_cross_entropy",
                size,
                "optax sigmoid BCE",
                lambda x, t=t: sj.binary_cross_entropy(x, t),
                lambda x, t=t: optax.sigmoid_binary_cross_entropy(x, t).mean(),
                bce_reference(x64, t32.astype(np.float64)),
            ),
        ]
        pairs += [
            (
                "nll_loss",
                size,
                "jnp gather mean",
                lambda x: sj.nll_loss(x, labels),
                lambda x: -jnp.mean(jnp.take_along_axis(x, labels[:, None], -1)),
                float(-x64[np.arange(shape[0]), np.asarray(labels)].mean()),
            ),
            (
                "kl_divergence",
                f"{size} batchmean",
                "optax kl_divergence",
                lambda x: sj.kl_divergence(x, p, reduction="batchmean"),
                lambda x: optax.kl_divergence(x, p).mean(),
                float((p64 * (np.log(p64) - x64)).sum() / shape[0]),
            ),
            (
                "log_sigmoid",
                f"{size} sum",
                "jax.nn",
                lambda x: jnp.sum(sj.log_sigmoid(x).astype(jnp.float32)),
                lambda x: jnp.sum(jax.nn.log_sigmoid(x).astype(jnp.float32)),
                float(-np.logaddexp(0, -x64).sum()),
            ),
        ]
        for op, case, peer, ours, theirs, ref in pairs:
            rows.extend(_fwd_and_bwd_rows(op, case, dtype, peer, ours, theirs, x, reps, ref))
        # Both sparse losses sort every row (O(V log V), about 6 ms a row of 32768 here): the
        # first SPARSE_ROWS rows keep the default run's time.
        xs, ys = x[:SPARSE_ROWS], labels[:SPARSE_ROWS]
        rows.extend(
            _fwd_and_bwd_rows(
                "sparsemax_loss",
                f"{xs.shape[0]}x{shape[1]}",
                dtype,
                "optax multiclass_sparsemax_loss",
                lambda x: sj.sparsemax_loss(x, ys),
                # optax's custom JVP fails on bfloat16 scores: it is given float32 ones.
                lambda x: multiclass_sparsemax_loss(x.astype(jnp.float32), ys).mean(),
                xs,
                reps,
                sparsemax_loss_reference(x64[:SPARSE_ROWS], np.asarray(ys)),
            )
        )
    rows.extend(torch_rows(x32, np.asarray(labels), reps))
    return rows


def torch_rows(x32, labels, reps) -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    xt = torch.from_numpy(x32).requires_grad_(True)
    yt = torch.from_numpy(labels.astype(np.int64))

    def torch_step():
        xt.grad = None
        torch.nn.functional.cross_entropy(xt, yt).backward()
        return xt.grad

    labels_j = jnp.asarray(labels)
    grad = jax.jit(jax.grad(lambda x: sj.cross_entropy(x, labels_j)))
    x = jnp.asarray(x32)
    t_ours, t_torch = timings([lambda: grad(x), torch_step], (), reps=reps)
    return [
        {
            "op": "cross_entropy",
            "case": f"{x32.shape[0]}x{x32.shape[1]} fwd+bwd",
            "dtype": "float32",
            "peer": f"torch {torch.__version__}",
            **ratio_columns(t_ours, t_torch),
        }
    ]
