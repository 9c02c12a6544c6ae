"""Attention: softjax's chunked online softmax beside jax.nn and torch's CPU flash kernel.

Rows (B=1, N=8, H=64, float32, causal, the issue's case T=4096):
- forward and forward+backward time: softjax "chunked" vs jax.nn.dot_product_attention and
  vs torch.nn.functional.scaled_dot_product_attention (when torch is installed), all three
  measured interleaved in one process;
- compiled temp memory of forward+backward (exact, compile only) against T, up to T=32768
  (compile only; the run at T=32768 only with --large);
- the xla/chunked crossover at short T that sets ``implementation=None``'s choice on CPU;
- the flash attention kernels (``implementation="pallas"``) compiled for an H200 (and, with
  ``--full``, TPU v5e/v6e/v5p) at B=1, T=8192, N=32/K=8, H=128, bf16, fwd+bwd: temp memory
  and HBM bytes beside softjax chunked, jax.nn (xla; cudnn on the H200) and the jax TPU
  flash kernel (``bench.deviceless --family attention``; nothing runs).
A PNG of time and memory against T goes to ``args.out``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

import softjax

from . import deviceless
from .harness import Rows, note, ratio_columns, temp_bytes, tier, timings

N, H = 8, 64


def _inputs(t_len, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (1, t_len, N, H), jnp.float32) for k in keys)


def _softjax(impl):
    return lambda q, k, v: softjax.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl
    )


def _jax_nn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def _fwd_bwd(f):
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))


def _torch_fns(q, k, v):
    """Forward and forward+backward closures for torch's SDPA, or (None, None)."""
    try:
        import torch
    except ImportError:
        note("torch SDPA rows skipped: torch is not installed")
        return None, None
    tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous() for x in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd(*_):
        with torch.no_grad():
            return sdpa(tq, tk, tv, is_causal=True)

    leaves = [x.clone().requires_grad_() for x in (tq, tk, tv)]

    def fwd_bwd(*_):
        for x in leaves:
            x.grad = None
        sdpa(*leaves, is_causal=True).sum().backward()
        return None

    return fwd, fwd_bwd


def _error(f, q, k, v, rows=256):
    """Max abs error of ``f`` against float64 on the first ``rows`` queries (causal)."""
    out = np.asarray(f(q, k, v))[:, :rows]
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("btnh,bsnh->bnts", q64[:, :rows], k64) / np.sqrt(H)
    s = np.where(np.arange(k.shape[1])[None, :] <= np.arange(rows)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), v64)
    return float(np.max(np.abs(out - ref)))


def _ms(t):
    return None if t is None else 1e3 * t


def _mib(n):
    return None if n is None else n / 2**20


def _headline(t_len, reps):
    """Time, memory and error at ``t_len`` for softjax vs jax.nn and vs torch."""
    q, k, v = _inputs(t_len)
    spec = jax.ShapeDtypeStruct(q.shape, q.dtype)
    sj, nn = _softjax("chunked"), _jax_nn
    torch_fwd, torch_fwd_bwd = _torch_fns(q, k, v)
    rows = Rows()
    for what, wrap, torch_fn in (
        ("fwd", lambda f: f, torch_fwd),
        ("fwd+bwd", _fwd_bwd, torch_fwd_bwd),
    ):
        fns = [jax.jit(wrap(sj)), jax.jit(wrap(nn))] + ([torch_fn] if torch_fn else [])
        times = timings(fns, (q, k, v), reps=reps, warmup=1)
        mem_sj, mem_nn = (
            temp_bytes(wrap(sj), spec, spec, spec),
            temp_bytes(wrap(nn), spec, spec, spec),
        )
        err_sj = _error(jax.jit(sj), q, k, v) if what == "fwd" else None
        err_nn = _error(jax.jit(nn), q, k, v) if what == "fwd" else None
        case = f"T={t_len} causal {what}"
        rows.append(
            dict(op="attention chunked", case=case, dtype="float32", peer="jax.nn",
                 **ratio_columns(times[0], times[1]), softjax_MiB=_mib(mem_sj),
                 peer_MiB=_mib(mem_nn), softjax_err=err_sj, peer_err=err_nn)
        )  # fmt: skip
        if torch_fn:
            rows.append(
                dict(op="attention chunked", case=case, dtype="float32", peer="torch sdpa (cpu)",
                     **ratio_columns(times[0], times[2]), softjax_MiB=_mib(mem_sj))
            )  # fmt: skip
    return rows


def _scaling(lengths, timed, large, reps):
    """fwd+bwd temp memory (compile only) for every T, and time for T in ``timed``."""
    rows, curve = Rows(), []
    for t_len in lengths:
        spec = jax.ShapeDtypeStruct((1, t_len, N, H), jnp.float32)
        mem_sj = temp_bytes(_fwd_bwd(_softjax("chunked")), spec, spec, spec)
        mem_nn = temp_bytes(_fwd_bwd(_jax_nn), spec, spec, spec)
        t_sj = t_nn = t_torch = timed_sj = timed_nn = None
        if t_len in timed or (large and t_len == max(lengths)):
            q, k, v = _inputs(t_len)
            fns = [jax.jit(_fwd_bwd(_softjax("chunked")))]
            if t_len in timed:
                fns.append(jax.jit(_fwd_bwd(_jax_nn)))
                torch_fn = _torch_fns(q, k, v)[1]
                if torch_fn:
                    fns.append(torch_fn)
            times = timings(fns, (q, k, v), reps=reps if t_len in timed else 1, warmup=1)
            timed_sj = times[0]
            timed_nn = times[1] if len(times) > 1 else None
            t_sj, t_nn = timed_sj.wall, None if timed_nn is None else timed_nn.wall
            t_torch = times[2].wall if len(times) > 2 else None
        curve.append((t_len, t_sj, t_nn, t_torch, mem_sj, mem_nn))
        rows.append(
            dict(op="attention chunked", case=f"T={t_len} causal fwd+bwd", dtype="float32",
                 peer="jax.nn (memory)", **ratio_columns(timed_sj, timed_nn),
                 softjax_MiB=_mib(mem_sj), peer_MiB=_mib(mem_nn))
        )  # fmt: skip
    return rows, curve


def _block_rows(t_len, reps):
    """fwd+bwd with the default query blocks against the 256-query blocks they replaced."""
    q, k, v = _inputs(t_len)

    def fixed(q, k, v):
        return softjax.dot_product_attention(q, k, v, is_causal=True, implementation="chunked",
                                             block_q=256)  # fmt: skip

    fns = [jax.jit(_fwd_bwd(_softjax("chunked"))), jax.jit(_fwd_bwd(fixed))]
    ours, peer = timings(fns, (q, k, v), reps=reps, warmup=1)
    rows = Rows()
    rows.append(
        dict(op="attention chunked", case=f"T={t_len} causal fwd+bwd", dtype="float32",
             peer="softjax block_q=256", **ratio_columns(ours, peer))
    )  # fmt: skip
    return rows


def _crossover(lengths, reps):
    """fwd+bwd time of the materialising path against the chunked one at short T."""
    rows = Rows()
    for t_len in lengths:
        q, k, v = _inputs(t_len)
        fns = [jax.jit(_fwd_bwd(_softjax("chunked"))), jax.jit(_fwd_bwd(_softjax("xla")))]
        t_c, t_x = timings(fns, (q, k, v), reps=reps, warmup=1)
        rows.append(
            dict(op="attention chunked", case=f"T={t_len} causal fwd+bwd", dtype="float32",
                 peer="softjax xla", **ratio_columns(t_c, t_x))
        )  # fmt: skip
    return rows


def _plot(curve, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.array([c[0] for c in curve])
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for col, label in ((1, "softjax chunked"), (2, "jax.nn"), (3, "torch sdpa (cpu)")):
        pts = [(c[0], c[col]) for c in curve if c[col] is not None]
        if pts:
            ax_t.loglog(*zip(*pts, strict=True), "o-", label=label)
    ax_t.set(xlabel="T (= S)", ylabel="fwd+bwd time [s]", title="causal, B=1, N=8, H=64, f32")
    ax_m.loglog(t, [c[4] / 2**20 for c in curve], "o-", label="softjax chunked")
    ax_m.loglog(t, [c[5] / 2**20 for c in curve], "o-", label="jax.nn")
    ax_m.axhline(24 * 1024, color="gray", ls=":", label="24 GiB machine")
    ax_m.set(xlabel="T (= S)", ylabel="fwd+bwd temp memory [MiB]", title="compiled temp memory")
    for ax in (ax_t, ax_m):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# The peers compiled beside softjax's kernels per target, and the cases per tier.
KERNEL_PEERS = {"h200": ["cudnn"], "v5e": ["tpu_flash"], "v6e": ["tpu_flash"], "v5p": ["tpu_flash"]}
PEER_LABELS = {
    "chunked": "softjax chunked",
    "xla": "jax.nn xla",
    "cudnn": "jax.nn cudnn",
    "tpu_flash": "jax tpu flash_attention",
}
KERNEL_CASES = {
    "default": [(8192, 128, "causal")],
    "full": [(8192, 128, "causal"), (8192, 128, "window")],
}


def target_rows(targets, cases) -> list[dict]:
    """fwd+bwd of the attention kernels compiled for each target (nothing run): temp memory
    and HBM bytes of softjax pallas beside softjax chunked, jax.nn and the target's peer.

    HBM bytes count each kernel's operands and results once: what a kernel re-reads inside
    (K/V blocks, once per query block) is not seen, for softjax's kernels and the peers'
    alike, so those compare with each other and not with the XLA loops of chunked/xla."""
    rows = Rows()
    for target in targets:
        missing = deviceless.available(target)
        if missing:
            note(f"{target} attention rows skipped: compiling needs {missing} (the accel extra)")
            continue
        impls = ["pallas", "chunked", "xla", *KERNEL_PEERS[target]]
        flags = ["--family", "attention", *(f for i in impls for f in ("--impl", i))]
        flags += [f for c in cases for f in ("--case", ",".join(map(str, c)))]
        got = {}
        for r in deviceless.in_subprocess(target, *flags):
            if "impl" not in r:  # the process failed
                note(f"{target} attention rows failed: {r.get('error')}")
                break
            got[r["t"], r["h"], r["mask"], r["impl"]] = r
        for (t_len, h, mask, impl), ours in got.items():
            if impl != "pallas":
                continue
            for peer_name in impls[1:]:
                peer = got.get((t_len, h, mask, peer_name), {})
                label = PEER_LABELS[peer_name]
                if "error" in peer:
                    note(f"{target} {label} T={t_len} {mask}: {peer['error'][0][:120]}")
                rows.append(
                    dict(op="attention pallas", dtype="bfloat16", peer=label,
                         case=f"{target} compiled T={t_len} N=32/8 H={h} {mask} fwd+bwd",
                         softjax_MiB=_mib(ours.get("temp_bytes")),
                         peer_MiB=_mib(peer.get("temp_bytes")),
                         softjax_HBM_GiB=_gib(ours.get("hbm_bytes")),
                         peer_HBM_GiB=_gib(peer.get("hbm_bytes")))
                )  # fmt: skip
    return rows


def _gib(n):
    return None if n is None else n / 2**30


def run(args) -> list[dict]:
    reps = args.reps or tier(args, 2, 3, 3)
    rows = _headline(tier(args, 512, 2048, 4096), reps)
    rows += _block_rows(tier(args, 512, 2048, 4096), reps)
    full = [512, 1024, 2048, 4096, 8192, 16384, 32768]
    lengths = tier(args, [256, 512, 1024], full[:5], full)
    timed = tier(args, [256, 512], [512, 1024], [512, 1024, 2048])
    scaling_rows, curve = _scaling(lengths, timed, args.large, reps)
    rows += scaling_rows
    rows += _crossover(tier(args, [128, 256], [256, 512, 1024], [256, 512, 1024, 2048]), reps)
    if not args.quick:  # an H200 by default, every target with --full
        targets = deviceless.TARGETS if args.full else ("h200",)
        rows += target_rows(targets, KERNEL_CASES["full" if args.full else "default"])
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "attention.png")
    try:
        _plot(curve, path)
        note(f"wrote {path}")
    except ImportError:
        note("attention plot skipped: matplotlib is not installed (pip install matplotlib)")
    return rows
