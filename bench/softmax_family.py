"""softmax, log_softmax, logsumexp beside jax.nn (and torch when installed)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import softjax as sj

from . import deviceless
from .harness import Rows, compare_row, note, ratio_columns, tier, timings, ulp_error

OPS = {
    "softmax": (sj.softmax, jax.nn.softmax),
    "log_softmax": (sj.log_softmax, jax.nn.log_softmax),
    "logsumexp": (partial(sj.logsumexp, axis=-1), partial(jax.nn.logsumexp, axis=-1)),
}

ERR_ROWS = 128  # rows checked against float64 (the reference is computed in NumPy)


def reference(op: str, x64: np.ndarray) -> np.ndarray:
    m = x64.max(-1, keepdims=True)
    e = np.exp(x64 - m)
    at_max = x64 == m
    log_norm = np.log1p(
        np.where(at_max, 0.0, e).sum(-1, keepdims=True) + (at_max.sum(-1, keepdims=True) - 1)
    )
    logp = x64 - m - log_norm
    return {"softmax": np.exp(logp), "log_softmax": logp, "logsumexp": (m + log_norm)[..., 0]}[op]


def fwd_bwd(f):
    def loss(x):
        return jnp.sum(f(x).astype(jnp.float32) * 0.5)

    return jax.grad(loss)


def run(args) -> list[dict]:
    shape = tier(args, (64, 1024), (256, 32768), (2048, 32768))
    reps = args.reps or tier(args, 3, 5, 7)
    rng = np.random.default_rng(0)
    x32 = (rng.standard_normal(shape) * 10).astype(np.float32)  # logit scale 10
    rows = Rows()
    for dtype in ("float32", "bfloat16"):
        x = jnp.asarray(x32).astype(dtype)
        x64 = np.asarray(x[:ERR_ROWS].astype(jnp.float32), np.float64)
        for name, (ours, theirs) in OPS.items():
            ref = reference(name, x64)

            def errors(a, b, ref=ref):
                return ulp_error(a[:ERR_ROWS], ref, dtype), ulp_error(b[:ERR_ROWS], ref, dtype)

            case = f"{shape[0]}x{shape[1]} fwd"
            rows.append(compare_row(name, case, dtype, "jax.nn", ours, theirs, (x,), reps, errors))
            case = f"{shape[0]}x{shape[1]} fwd+bwd"
            rows.append(
                compare_row(name, case, dtype, "jax.nn", fwd_bwd(ours), fwd_bwd(theirs), (x,), reps)
            )
    rows.extend(torch_rows(x32, reps))
    if not args.quick:  # an H200 by default, every target with --full
        rows.extend(target_rows(deviceless.TARGETS if args.full else ("h200",)))
    return rows


def target_rows(targets) -> list[dict]:
    """Each op compiled for each target (nothing run) at [8192, 131072]: temp memory and the
    HBM bytes its kernels move, beside jax.nn's (``bench.deviceless --family softmax``)."""
    rows = Rows()
    for target in targets:
        missing = deviceless.available(target)
        if missing:
            note(f"{target} rows skipped: compiling for it needs {missing} (the accel extra)")
            continue
        got = {}
        for r in deviceless.in_subprocess(target, "--family", "softmax"):
            if "error" in r:
                note(f"{target} rows failed: {r['error']}")
                break
            got[r["op"], r["dtype"], r["impl"]] = r
        for (op, dtype, impl), r in got.items():
            peer = got.get((op, dtype, "jax.nn"))
            if impl != "softjax" or peer is None:
                continue
            rows.append(
                dict(op=op, case=f"{target} compiled {'x'.join(map(str, r['shape']))} fwd",
                     dtype=dtype, peer="jax.nn", softjax_MiB=r["temp_bytes"] / 2**20,
                     peer_MiB=peer["temp_bytes"] / 2**20, softjax_HBM_GiB=_gib(r.get("hbm_bytes")),
                     peer_HBM_GiB=_gib(peer.get("hbm_bytes")))
            )  # fmt: skip
    return rows


def _gib(n):
    return None if n is None else n / 2**30


def torch_rows(x32: np.ndarray, reps: int) -> list[dict]:
    """softjax beside torch's CPU kernels (forward, float32), when torch is installed."""
    try:
        import torch
    except ImportError:
        note("torch rows skipped: torch is not installed")
        return []
    xt = torch.from_numpy(x32)
    x = jnp.asarray(x32)
    peers = {
        "softmax": lambda: torch.softmax(xt, -1),
        "log_softmax": lambda: torch.log_softmax(xt, -1),
        "logsumexp": lambda: torch.logsumexp(xt, -1),
    }
    rows = Rows()
    for name, (ours, _) in OPS.items():
        ours_j = jax.jit(ours)
        t_ours, t_torch = timings([lambda: ours_j(x), peers[name]], (), reps=reps)
        rows.append(
            {
                "op": name,
                "case": f"{x32.shape[0]}x{x32.shape[1]} fwd",
                "dtype": "float32",
                "peer": f"torch {torch.__version__}",
                **ratio_columns(t_ours, t_torch),
            }
        )
    return rows
