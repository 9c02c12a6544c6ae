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
3. **Attention.** ``dot_product_attention(implementation="pallas")`` against ``"chunked"``
   (output, lse and the gradients of q, k, v and the bias) for every option at ragged
   lengths, bf16 and float32; then fwd+bwd time at B=1, N=32/K=8, H=128, bf16, T=8192 and
   32768, causal and sliding window, beside ``"chunked"`` and the chip's own kernel
   (``jax.nn.dot_product_attention(implementation="cudnn")`` on a GPU, the jax TPU flash
   kernel on a TPU, causal only), interleaved medians.

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


# name -> keyword arguments of dot_product_attention for the attention agreement.
ATTENTION_OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "window": {"local_window_size": (100, 0)},
    "lengths": {"lengths": True},
    "segments": {"segments": True},
    "softcap": {"logit_softcap": 20.0, "is_causal": True},
    "bias": {"bias": True},
    "mask": {"mask": True},
}
# Ragged attention sizes (T = S): no length a multiple of any block.
ATTENTION_RAGGED = [1000, 2053]


def attention_inputs(t_len, n, k, h, dtype, name, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (2, t_len, n, h), jnp.float32).astype(dtype)
    kk, v = (jax.random.normal(c, (2, t_len, k, h), jnp.float32).astype(dtype) for c in keys[1:3])
    kw = dict(ATTENTION_OPTIONS[name])
    bias = None
    if kw.pop("bias", False):
        bias = jax.random.normal(keys[3], (1, n, t_len, t_len), jnp.float32)
    if kw.pop("mask", False):
        kw["mask"] = jax.random.bernoulli(keys[4], 0.8, (2, 1, t_len, t_len))
    if kw.pop("lengths", False):
        kw["query_seq_lengths"] = jnp.array([t_len, t_len // 3], jnp.int32)
        kw["key_value_seq_lengths"] = jnp.array([t_len // 2, t_len], jnp.int32)
    if kw.pop("segments", False):
        kw["segment_ids"] = jnp.sort(jax.random.randint(keys[5], (2, t_len), 0, 4), axis=-1)
    return (q, kk, v, bias), kw


def attention_grad_fn(impl, kw):
    import softjax

    def loss(q, k, v, bias):
        out, lse = softjax.dot_product_attention(
            q, k, v, bias, return_lse=True, implementation=impl, **kw
        )
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse), (out, lse)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))


def attention_agreement(t_len, dtype, name) -> dict:
    args, kw = attention_inputs(t_len, 8, 2, 128, dtype, name)
    got = attention_grad_fn("pallas", kw)(*args)
    want = attention_grad_fn("chunked", kw)(*args)
    # Leaves: the loss, the output, the lse, then the gradients.
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    lse, lse_want = (np.asarray(x) for x in pairs[2])
    same_empty = bool(np.array_equal(np.isfinite(lse), np.isfinite(lse_want)))
    finite_lse = np.isfinite(lse_want)
    errs = [rel_err(g, r) for g, r in pairs[:2] + pairs[3:]]
    err_lse = rel_err(lse[finite_lse], lse_want[finite_lse])
    finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g, _ in pairs[3:])
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    ok = finite and same_empty and max(errs + [err_lse]) <= tol
    case = f"T={t_len} {jnp.dtype(dtype).name} {name}"
    return dict(check="attention_agreement", case=case, err_out=errs[1], err_lse=err_lse,
                err_grads=max(errs[2:]), ok=ok)  # fmt: skip


def attention_timing(t_len, mask, reps) -> dict:
    import softjax

    dev = jax.devices()[0]
    (q, k, v, _), _ = attention_inputs(t_len, 32, 8, 128, jnp.bfloat16, "plain")
    q, k, v = q[:1], k[:1], v[:1]
    kw = {"is_causal": True} if mask == "causal" else {"local_window_size": (1024, 0)}

    def ours(impl):
        return lambda q, k, v: softjax.dot_product_attention(q, k, v, implementation=impl, **kw)

    fns = {"pallas": ours("pallas"), "chunked": ours("chunked")}
    if dev.platform == "gpu":
        fns["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, implementation="cudnn", **kw
        )
    elif dev.platform == "tpu" and mask == "causal":
        fns["tpu_flash"] = deviceless.attention_fn("tpu_flash", mask)
    fwd_bwd = {}
    for name, fn in fns.items():
        if name == "tpu_flash":  # already (q, k, v, dO) -> (O, dQ, dK, dV)
            fwd_bwd[name] = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, q))
        else:
            fwd_bwd[name] = jax.jit(
                lambda q, k, v, fn=fn: jax.grad(
                    lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), (0, 1, 2)
                )(q, k, v)
            )
    row = dict(check="attention_time", case=f"T={t_len} N=32/8 H=128 bf16 {mask}", ok=True)
    names = list(fwd_bwd)
    try:
        times = median_times([fwd_bwd[n] for n in names], (q, k, v), reps=reps, warmup=1)
        row.update({f"{n}_ms": t * 1e3 for n, t in zip(names, times, strict=True)})
    except Exception as e:  # a peer may refuse a case (cudnn versions, memory)
        row["time_error"] = str(e).splitlines()[0][:200]
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
    for t_len in ATTENTION_RAGGED if not args.smoke else [37]:
        for dtype in (jnp.bfloat16, jnp.float32):
            for name in ATTENTION_OPTIONS if not args.smoke else ["causal", "segments"]:
                record(attention_agreement, t_len, dtype, name)
    for t_len in (8192, 32768) if not args.smoke else []:
        for mask in ("causal", "window"):
            record(attention_timing, t_len, mask, args.reps)
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
    peers = ("pallas_ms", "chunked_ms", "naive_ms", "cudnn_ms", "tpu_flash_ms")
    print(f"\n{'case':<48} {'ok':<5} {'err':<9} " + " ".join(f"{p:>12}" for p in peers))
    for r in rows:
        err = max([r[k] for k in r if k.startswith("err_")], default=float("nan"))
        ms = [f"{r[k]:.2f}" if k in r else "-" for k in peers]
        print(f"{r['case']:<48} {r['ok']!s:<5} {err:<9.2e} " + " ".join(f"{m:>12}" for m in ms))
    failed = [r["case"] for r in rows if not r["ok"]]
    print(f"\nwrote {path}; {len(rows) - len(failed)}/{len(rows)} checks pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
