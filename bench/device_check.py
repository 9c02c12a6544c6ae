"""The native check of softjax's Pallas kernels, for a machine with a GPU or a TPU.

Everything else about the kernels is proved on a CPU (interpret mode runs the kernel code,
deviceless compilation proves it compiles for the chip); this runs them on the chip:

1. **Agreement.** ``linear_cross_entropy(implementation="pallas")`` against ``"chunked"`` (the
   streaming path, which is itself tested against float64 on every option) and against the
   float64 loss on the host: the loss and both gradients, every option (ignore_index, where,
   class weights, label smoothing, z-loss, soft-capping, each reduction), bf16 and float32,
   ragged sizes (N, V, D not multiples of any block).
2. **Heads.** The accelerator table's heads that fit in memory: pallas against chunked
   (values, gradients) and the time of ``value_and_grad`` for pallas, chunked and the naive
   ``x @ w.T`` + optax, interleaved medians.

Writes ``<out>/device_check.json`` and prints a short table; exits non-zero when any check
fails. One command, a few minutes::

    python -m bench.device_check --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from . import deviceless
from .harness import block, median_times

# name -> keyword arguments of linear_cross_entropy ("w" is replaced by class weights).
OPTIONS = {
    "plain": {},
    "ignore_index": {"ignore_index": -100},
    "where": {"where": "mask"},
    "weight": {"weight": "w"},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"logit_softcap": 30.0},
    "all": {
        "ignore_index": -100,
        "where": "mask",
        "weight": "w",
        "label_smoothing": 0.1,
        "z_loss": 1e-3,
        "logit_softcap": 30.0,
    },
}
REDUCTIONS = ("mean", "sum", "none")
# Ragged agreement sizes (N, D, V): no axis a multiple of a block.
RAGGED = [(1000, 200, 5003), (4099, 1536, 32011)]


def make(n, d, v, dtype, seed=0):
    kx, kw, ky, km = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (v, d), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v).at[::17].set(-100)
    mask = jax.random.bernoulli(km, 0.9, (n,))
    return x, w, y, mask


def options(name, v, mask):
    kw = dict(OPTIONS[name])
    if kw.get("weight") == "w":
        kw["weight"] = jax.random.uniform(jax.random.key(7), (v,), jnp.float32, 0.2, 2.0)
    if kw.get("where") == "mask":
        kw["where"] = mask
    if "ignore_index" not in kw:  # labels must then be valid classes
        kw["_clip"] = True
    return kw


def grad_fn(impl, reduction, kw):
    import softjax

    def loss(x, w, y):
        out = softjax.linear_cross_entropy(x, w, y, reduction=reduction, implementation=impl, **kw)
        if reduction == "none":  # an arbitrary cotangent: every row's gradient is checked
            out = (out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32))).sum()
        return out

    return jax.jit(jax.value_and_grad(loss, (0, 1)))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def agreement(n, d, v, dtype, name, reduction) -> dict:
    x, w, y, mask = make(n, d, v, dtype)
    kw = options(name, v, mask)
    if kw.pop("_clip", False):
        y = jnp.where(y < 0, 0, y)
    got = grad_fn("pallas", reduction, kw)(x, w, y)
    want = grad_fn("chunked", reduction, kw)(x, w, y)
    errs = [rel_err(g, r) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in jax.tree.leaves(got))
    # float32: the two paths differ only in summation order; bf16: by the rounding of the
    # logits-gradient block to bf16 before its matmul (the chunked path rounds the same way).
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    return dict(
        check="agreement",
        case=f"N={n} D={d} V={v} {jnp.dtype(dtype).name} {name} {reduction}",
        err_loss=errs[0],
        err_dx=errs[1],
        err_dw=errs[2],
        ok=finite and max(errs) <= tol,
    )


def head_row(name, head, reps) -> dict:
    import optax

    import softjax

    d, v, dtype, n = head
    x, w, y, _ = make(n, d, v, jnp.dtype(dtype))
    y = jnp.where(y < 0, 0, y)

    def naive(x, w, y):
        logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def fused(impl):
        return lambda x, w, y: softjax.linear_cross_entropy(x, w, y, implementation=impl)

    fns = {
        name: jax.jit(jax.value_and_grad(fn, (0, 1)))
        for name, fn in (
            ("pallas", fused("pallas")),
            ("chunked", fused("chunked")),
            ("naive", naive),
        )
    }
    got, want = block(fns["pallas"](x, w, y)), block(fns["chunked"](x, w, y))
    errs = [rel_err(g, r) for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    row = dict(check="head", case=name, head=list(head), err_loss=errs[0], err_dx=errs[1],
               err_dw=errs[2], ok=max(errs) <= (1e-4 if dtype == "float32" else 2e-2))  # fmt: skip
    try:
        times = median_times(list(fns.values()), (x, w, y), reps=reps, warmup=1)
        row.update({f"{k}_ms": t * 1e3 for k, t in zip(fns, times, strict=True)})
    except Exception as e:  # naive may not fit: its logits are N*V*4 bytes
        row["time_error"] = str(e).splitlines()[0][:200]
        times = median_times(list(fns.values())[:2], (x, w, y), reps=reps, warmup=1)
        row.update({f"{k}_ms": t * 1e3 for k, t in zip(fns, times, strict=False)})
    return row


def run_all(args) -> list[dict]:
    rows = []

    def record(fn, *a):
        t0 = time.perf_counter()
        try:
            row = fn(*a)
        except Exception:
            error = traceback.format_exc()[-2000:]
            row = dict(check=fn.__name__, case=str(a), ok=False, error=error)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for n, d, v in RAGGED if not args.smoke else [(37, 40, 300)]:
        for dtype in (jnp.bfloat16, jnp.float32):
            for name in OPTIONS if not args.smoke else ["all"]:
                for reduction in REDUCTIONS if name == "all" else ("mean",):
                    record(agreement, n, d, v, dtype, name, reduction)
    for name in args.heads if not args.smoke else []:
        record(head_row, name, deviceless.HEADS[name], args.reps)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--heads", nargs="*", default=list(deviceless.HEADS))
    parser.add_argument(
        "--smoke", action="store_true", help="one tiny case per reduction, any backend (tests)"
    )
    args = parser.parse_args(argv)
    dev = jax.devices()[0]
    print(f"# device check on {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
    if dev.platform == "cpu" and not args.smoke:
        print("no accelerator: the kernels would run interpreted; nothing to check natively")
        return 2
    rows = run_all(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "device_check.json")
    with open(path, "w") as f:
        json.dump({"device": dev.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
    print(f"\n{'case':<48} {'ok':<5} {'err':<9} {'pallas_ms':>9} {'xla_ms':>8} {'naive_ms':>8}")
    for r in rows:
        err = max(r.get(k, float("nan")) for k in ("err_loss", "err_dx", "err_dw"))
        ms = [f"{r[k]:.2f}" if k in r else "-" for k in ("pallas_ms", "xla_ms", "naive_ms")]
        print(f"{r['case']:<48} {r['ok']!s:<5} {err:<9.2e} {ms[0]:>9} {ms[1]:>8} {ms[2]:>8}")
    failed = [r["case"] for r in rows if not r["ok"]]
    print(f"\nwrote {path}; {len(rows) - len(failed)}/{len(rows)} checks pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
