"""Vocabulary-scale cross-entropy: ``linear_cross_entropy`` beside ``x @ w.T`` + optax.

``linear_log_probs`` (log-probabilities and entropies with a temperature) and
``linear_kl_divergence`` (distillation) are timed and compiled beside their materialising
paths too (:func:`log_probs_rows`, :func:`distill_rows`), ``sampled_softmax_cross_entropy``
beside the exact ``linear_cross_entropy`` with its error (:func:`sampled_rows`).

* Memory: compiled temp size of ``value_and_grad`` with respect to ``(x, w)`` (exact, no
  run) at N=8192 tokens, D=2048, V=131072, bfloat16, and at V=65536 for the growth in V;
  a PNG of temp memory against V (8k..256k) for both.
* Compiled for target (needs the ``accel`` extra): temp memory of ``value_and_grad`` compiled
  for an H200 and TPU v5e/v6e/v5p from this machine (``bench.deviceless``; nothing runs) for
  softjax pallas, softjax chunked, the naive path and (TPU) tokamax's Mosaic kernel, side by side,
  with the HBM bytes the executable's kernels move (``bench.hlo_bytes``).
* Time: forward + backward at N=2048, D=512, V=32768 float32, interleaved medians, beside
  the naive path and, when installed, ``torch.nn.functional.linear_cross_entropy`` with
  its chunked options.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import softjax

from . import deviceless
from .harness import Rows, note, ratio_columns, temp_bytes, tier, timings, ulp_error


def fused(x, w, y):
    return softjax.linear_cross_entropy(x, w, y)


def naive(x, w, y):
    logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _specs(n, d, v, dtype):
    return (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((v, d), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )


def _grad_temp(fn, n, d, v, dtype) -> int:
    return temp_bytes(jax.value_and_grad(fn, (0, 1)), *_specs(n, d, v, dtype))


def memory_rows(n, d, vs, dtype) -> list[dict]:
    rows = Rows()
    for k, v in enumerate(vs):
        ours, peer = _grad_temp(fused, n, d, v, dtype), _grad_temp(naive, n, d, v, dtype)
        # Flat in V: the second size against the first.
        growth = f" (x{ours / rows[0]['softjax_MiB'] / 2**20:.3f} vs V/2)" if k == 1 else ""
        rows.append(
            dict(
                op="linear_cross_entropy",
                case=f"mem N={n} D={d} V={v}{growth}",
                dtype=jnp.dtype(dtype).name,
                peer="x@w.T + optax",
                softjax_MiB=ours / 2**20,
                peer_MiB=peer / 2**20,
                mem_ratio=ours / peer,
            )
        )
    return rows


def memory_plot(n, d, vs, dtype, path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ours = [_grad_temp(fused, n, d, v, dtype) / 2**20 for v in vs]
    peer = [_grad_temp(naive, n, d, v, dtype) / 2**20 for v in vs]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(vs, peer, "o-", label="x @ w.T + optax (naive)")
    ax.plot(vs, ours, "s-", label="softjax.linear_cross_entropy")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("temp memory of value_and_grad (MiB)")
    ax.set_title(f"N={n} tokens, D={d}, {jnp.dtype(dtype).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _torch_fn(x, w, y):
    """fwd+bwd of torch's linear_cross_entropy with its chunked options, or None."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return None
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    tw = torch.tensor(np.asarray(w), requires_grad=True)
    ty = torch.tensor(np.asarray(y), dtype=torch.long)
    options = torch.nn.LinearCrossEntropyOptions()

    def run():
        tx.grad = tw.grad = None
        loss = F.linear_cross_entropy(tx, tw, ty, options=options)
        loss.backward()
        return float(loss.detach())

    return run


def time_rows(n, d, v, reps) -> list[dict]:
    kx, kw, ky = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32)
    w = jax.random.normal(kw, (v, d), jnp.float32) / np.sqrt(d)
    y = jax.random.randint(ky, (n,), 0, v)
    ours = jax.jit(jax.value_and_grad(fused, (0, 1)))
    peer = jax.jit(jax.value_and_grad(naive, (0, 1)))
    fns = [lambda: ours(x, w, y), lambda: peer(x, w, y)]
    torch_run = _torch_fn(x, w, y)
    if torch_run is not None:
        fns.append(torch_run)
    else:
        note("torch rows skipped: no torch with linear_cross_entropy installed")
    times = timings(fns, (), reps=reps, warmup=1)
    # Error of the loss against float64 (NumPy), in float32 ulps.
    z = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    m = z.max(-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(-1))
    ref = np.mean(lse - z[np.arange(n), np.asarray(y)])
    err = lambda out: ulp_error(np.asarray(out), np.asarray(ref), jnp.float32)  # noqa: E731
    case = f"fwd+bwd N={n} D={d} V={v}"
    rows = Rows()
    rows.append(
        dict(
            op="linear_cross_entropy",
            case=case,
            dtype="float32",
            peer="x@w.T + optax",
            **ratio_columns(times[0], times[1]),
            softjax_err=err(ours(x, w, y)[0]),
            peer_err=err(peer(x, w, y)[0]),
        )
    )
    if torch_run is not None:
        rows.append(
            dict(
                op="linear_cross_entropy",
                case=case,
                dtype="float32",
                peer="torch chunked",
                **ratio_columns(times[0], times[2]),
                peer_err=err(torch_run()),
            )
        )
    return rows


def reduction_rows(n, d, v, reps) -> list[dict]:
    """fwd+bwd against the materialising path for the other reductions and bfloat16.

    ``"none"`` is differentiated through a weighted sum of the per-token losses (a cotangent
    that differs per token, as a masked or reweighted training loss has); ``"mean"`` in
    float32 is :func:`time_rows`'s.
    """
    kx, kw, ky = jax.random.split(jax.random.key(1), 3)
    x32 = jax.random.normal(kx, (n, d), jnp.float32)
    w32 = jax.random.normal(kw, (v, d), jnp.float32) / np.sqrt(d)
    y = jax.random.randint(ky, (n,), 0, v)
    g = jnp.linspace(0.5, 1.5, n)
    reduce = {"mean": jnp.mean, "sum": jnp.sum, "none": lambda losses: jnp.sum(losses * g)}

    def naive_rows(x, w):
        logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    rows = Rows()
    for dtype in (jnp.float32, jnp.bfloat16):
        x, w = x32.astype(dtype), w32.astype(dtype)
        for reduction, red in reduce.items():
            if reduction == "mean" and dtype == jnp.float32:
                continue

            def ours(x, w, reduction=reduction, red=red):
                out = softjax.linear_cross_entropy(x, w, y, reduction=reduction)
                return red(out) if reduction == "none" else out

            def peer(x, w, red=red):
                return red(naive_rows(x, w))

            fns = [jax.jit(jax.value_and_grad(f, (0, 1))) for f in (ours, peer)]
            times = timings(fns, (x, w), reps=reps, warmup=1)
            rows.append(
                dict(
                    op="linear_cross_entropy",
                    case=f"fwd+bwd N={n} D={d} V={v} {reduction}",
                    dtype=jnp.dtype(dtype).name,
                    peer="x@w.T + optax",
                    **ratio_columns(times[0], times[1]),
                )
            )
    return rows


def log_probs_rows(n, d, v, reps, mem=(8192, 2048, 131072)) -> list[dict]:
    """``linear_log_probs`` (with the entropy and a traced temperature) beside the
    materialising path (``jax.nn.log_softmax`` of the float32 logits, gathered, and its
    entropy): fwd+bwd time in float32 and bfloat16, and compiled temp memory at ``mem``."""
    kx, kw, ky = jax.random.split(jax.random.key(2), 3)
    x32 = jax.random.normal(kx, (n, d), jnp.float32)
    w32 = jax.random.normal(kw, (v, d), jnp.float32) / np.sqrt(d)

    def ours(x, w, y, t):
        log_p, ent = softjax.linear_log_probs(x, w, y, temperature=t, return_entropy=True)
        return jnp.sum(jnp.linspace(0.5, 1.5, x.shape[0]) * log_p) + jnp.sum(ent)

    def peer(x, w, y, t):
        logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32) / t
        lp = jax.nn.log_softmax(logits)
        log_p = jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.linspace(0.5, 1.5, x.shape[0]) * log_p) - jnp.sum(jnp.exp(lp) * lp)

    y = jax.random.randint(ky, (n,), 0, v)
    t = jnp.float32(0.9)
    rows = Rows()
    for dtype in (jnp.float32, jnp.bfloat16):
        x, w = x32.astype(dtype), w32.astype(dtype)
        fns = [jax.jit(jax.grad(f, (0, 1, 3))) for f in (ours, peer)]
        times = timings(fns, (x, w, y, t), reps=reps, warmup=1)
        rows.append(
            dict(
                op="linear_log_probs",
                case=f"fwd+bwd N={n} D={d} V={v} T, entropy",
                dtype=jnp.dtype(dtype).name,
                peer="x@w.T + log_softmax",
                **ratio_columns(times[0], times[1]),
            )
        )
    mn, md, mv = mem
    specs = (*_specs(mn, md, mv, jnp.bfloat16)[:2], jax.ShapeDtypeStruct((mn,), jnp.int32), t)
    temps = [temp_bytes(jax.grad(f, (0, 1, 3)), *specs) for f in (ours, peer)]
    rows.append(
        dict(
            op="linear_log_probs",
            case=f"mem N={mn} D={md} V={mv} T, entropy",
            dtype="bfloat16",
            peer="x@w.T + log_softmax",
            softjax_MiB=temps[0] / 2**20,
            peer_MiB=temps[1] / 2**20,
        )
    )
    return rows


def _compile_target(target, heads, impls) -> list[dict]:
    """``bench.deviceless`` rows for ``target`` (its own process: one TPU generation each)."""
    flags = [f for h in heads for f in ("--head", h)] + [f for i in impls for f in ("--impl", i)]
    return deviceless.in_subprocess(target, *flags)


def target_rows(heads, targets=deviceless.TARGETS) -> list[dict]:
    """Side by side, per target and head: temp MiB and HBM GiB of each implementation."""
    impls = ("pallas", "chunked", "naive", "tokamax")
    rows = Rows()
    for target in targets:
        missing = deviceless.available(target)
        if missing:
            print(f"  {target}: skipped, needs {missing} (pip install -e '.[accel]')", flush=True)
            continue
        print(f"  compiling for {target}: {', '.join(heads)} ...", flush=True)
        names = [i for i in impls if i != "tokamax" or target != "h200"]
        by_head = {}
        for r in _compile_target(target, heads, names):
            by_head.setdefault(tuple(r.get("head", ())), {})[r.get("impl")] = r
        for head, cells in by_head.items():
            row = dict(target=target, head=list(head))
            for impl, cell in cells.items():
                if "error" in cell:
                    row[f"{impl}_MiB"] = "error"
                    continue
                row[f"{impl}_MiB"] = cell["temp_bytes"] / 2**20
                row[f"{impl}_kernel"] = cell["kernel"]
                if cell.get("hbm_bytes") is not None:
                    row[f"{impl}_HBM_GiB"] = cell["hbm_bytes"] / 2**30
            # The shared columns: softjax pallas against the naive path.
            row.update(
                op="linear_cross_entropy",
                case=f"{target} compiled D={head[0]} V={head[1]}",
                dtype=head[2] if head else None,
                peer="x@w.T + optax",
                softjax_MiB=row.get("pallas_MiB"),
                peer_MiB=row.get("naive_MiB"),
                softjax_HBM_GiB=row.get("pallas_HBM_GiB"),
                peer_HBM_GiB=row.get("naive_HBM_GiB"),
            )
            rows.append(row)
    return rows


def format_target_rows(rows) -> str:
    cols = ["pallas_MiB", "xla_MiB", "naive_MiB", "tokamax_MiB", "pallas_HBM_GiB", "naive_HBM_GiB"]
    cell = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["target head (D,V,dtype,N)".ljust(40) + " ".join(c.rjust(15) for c in cols)]
    for r in rows:
        head = ",".join(map(str, r.get("head", [])))
        lines.append(
            f"{r['target']} {head}".ljust(40) + " ".join(cell(r.get(c)).rjust(15) for c in cols)
        )
    return "\n".join(lines)


def _naive_divergence(xs, ws, xt, wt, t, beta):
    """The materialising path: both float32 logits (float64 for float64 inputs),
    ``jax.nn.log_softmax``, the divergence."""
    acc = jnp.promote_types(xs.dtype, jnp.float32)
    ls = jax.nn.log_softmax(jnp.einsum("nd,vd->nv", xs, ws, preferred_element_type=acc) / t)
    lt = jax.nn.log_softmax(jnp.einsum("nd,vd->nv", xt, wt, preferred_element_type=acc) / t)
    lt = jax.lax.stop_gradient(lt)
    if beta is None:
        return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - ls), -1))
    lm = jnp.logaddexp(np.log(beta) + lt, np.log1p(-beta) + ls)
    kl_t = jnp.sum(jnp.exp(lt) * (lt - lm), -1)
    kl_s = jnp.sum(jnp.exp(ls) * (ls - lm), -1)
    return jnp.mean(beta * kl_t + (1 - beta) * kl_s)


def distill_rows(n, d, v, reps, mem=(8192, 2048, 131072)) -> list[dict]:
    """``linear_kl_divergence`` (forward KL and the JSD, T = 2, "mean") beside the
    materialising path: fwd+bwd time (student gradients) in float32 and bfloat16, both
    float32 values' relative errors against the float64 materialised divergence, compiled
    temp memory at ``mem``."""
    ks = jax.random.split(jax.random.key(3), 4)
    xs32 = jax.random.normal(ks[0], (n, d), jnp.float32)
    ws32 = jax.random.normal(ks[1], (v, d), jnp.float32) / np.sqrt(d)
    xt32 = jax.random.normal(ks[2], (n, d), jnp.float32)
    wt32 = 1.5 * jax.random.normal(ks[3], (v, d), jnp.float32) / np.sqrt(d)
    rows = Rows()
    for beta, name in ((None, "forward KL"), (0.5, "JSD")):

        def ours(xs, ws, xt, wt, beta=beta):
            return softjax.linear_kl_divergence(xs, ws, xt, wt, temperature=2.0, beta=beta)

        def peer(xs, ws, xt, wt, beta=beta):
            return _naive_divergence(xs, ws, xt, wt, 2.0, beta)

        for dtype in (jnp.float32, jnp.bfloat16):
            args = tuple(a.astype(dtype) for a in (xs32, ws32, xt32, wt32))
            fns = [jax.jit(jax.grad(f, (0, 1))) for f in (ours, peer)]
            times = timings(fns, args, reps=reps, warmup=1)
            extra = {}
            if dtype == jnp.float32:
                # Relative errors of the float32 divergence against the float64 materialised one.
                with jax.enable_x64(True):
                    ref = float(peer(*(jnp.asarray(a, jnp.float64) for a in args)))
                rel = lambda f: abs(float(jax.jit(f)(*args)) - ref) / ref  # noqa: E731
                extra = dict(softjax_err=rel(ours), peer_err=rel(peer))
            rows.append(
                dict(
                    op="linear_kl_divergence",
                    case=f"fwd+bwd N={n} D={d} V={v} {name}, T=2",
                    dtype=jnp.dtype(dtype).name,
                    peer="x@w.T + log_softmax",
                    **ratio_columns(times[0], times[1]),
                    **extra,
                )
            )
    mn, md, mv = mem
    specs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((mn, md), (mv, md)) * 2]
    temps = [temp_bytes(jax.grad(f, (0, 1)), *specs) for f in (ours, peer)]
    rows.append(
        dict(
            op="linear_kl_divergence",
            case=f"mem N={mn} D={md} V={mv} JSD, T=2",
            dtype="bfloat16",
            peer="x@w.T + log_softmax",
            softjax_MiB=temps[0] / 2**20,
            peer_MiB=temps[1] / 2**20,
        )
    )
    return rows


def sampled_rows(n, d, v, reps, samples=(512, 2048)) -> list[dict]:
    """``sampled_softmax_cross_entropy`` beside the exact ``linear_cross_entropy`` (float32,
    "mean"): fwd+bwd time, and the relative error of one draw's loss (``softjax_err``) and
    ``dx`` (``grad_err``) against the exact ones: the estimator's bias and variance
    together, which shrink as S grows."""
    kx, kw, ky = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32)
    w = jax.random.normal(kw, (v, d), jnp.float32) / np.sqrt(d)
    y = jax.random.randint(ky, (n,), 0, v)
    key = jax.random.key(5)
    exact_fn = jax.jit(jax.value_and_grad(softjax.linear_cross_entropy))
    exact, exact_dx = exact_fn(x, w, y)
    rows = Rows()
    for proposal in ("uniform", "log_uniform"):
        for s in samples:

            def ours(x, w, y, key=key, s=s, proposal=proposal):
                return softjax.sampled_softmax_cross_entropy(
                    x, w, y, key, num_samples=s, proposal=proposal
                )

            fns = [jax.jit(jax.grad(f, (0, 1))) for f in (ours, softjax.linear_cross_entropy)]
            times = timings(fns, (x, w, y), reps=reps, warmup=1)
            loss, dx = jax.jit(jax.value_and_grad(ours))(x, w, y)
            rows.append(
                dict(
                    op="sampled_softmax_cross_entropy",
                    case=f"fwd+bwd N={n} D={d} V={v} S={s} {proposal}, err: 1 draw",
                    dtype="float32",
                    peer="linear_cross_entropy",
                    **ratio_columns(times[0], times[1]),
                    softjax_err=abs(float(loss - exact)) / float(exact),
                    grad_err=float(jnp.linalg.norm(dx - exact_dx) / jnp.linalg.norm(exact_dx)),
                )
            )
    return rows


def run(args) -> list[dict]:
    # Memory is compiled, not run: the realistic head at every tier but --quick.
    n, d, vs = tier(args, (512, 128, (4096, 8192)), *[(8192, 2048, (65536, 131072))] * 2)
    plot_vs = tier(args, (4096, 8192), (2**13, 2**15, 2**17), tuple(2**k for k in range(13, 19)))
    tn, td, tv = tier(args, (128, 64, 2048), (1024, 256, 16384), (2048, 512, 32768))
    reps = args.reps or tier(args, 2, 3, 3)
    rows = memory_rows(n, d, vs, jnp.bfloat16)
    rows += time_rows(tn, td, tv, reps)
    if not args.quick:
        rows += reduction_rows(tn, td, tv, reps)
        rows += log_probs_rows(tn, td, tv, reps, mem=(n, d, vs[-1]))
        rows += distill_rows(tn, td, tv, reps, mem=(n, d, vs[-1]))
        rows += sampled_rows(tn, td, tv, reps)
    if not args.quick:
        # One head and target per chip family by default; every target with --full, every
        # head of the accelerator table with --large.
        heads = list(deviceless.HEADS) if args.large else ["llama3-8b"]
        targets = deviceless.TARGETS if args.full else ("h200", "v5e")
        compiled = target_rows(heads, targets)
        if compiled:
            print("compiled for target (temp memory of value_and_grad, nothing run):")
            print(format_target_rows(compiled), flush=True)
            rows += compiled
    os.makedirs(args.out, exist_ok=True)
    path = memory_plot(n, d, plot_vs, jnp.bfloat16, os.path.join(args.out, "vocab_memory.png"))
    if path:
        note(f"wrote {path}")
    else:
        note("vocab plot skipped: matplotlib is not installed (pip install matplotlib)")
    return rows
