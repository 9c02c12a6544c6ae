"""Compile softjax for chips this machine does not have, and read what the compiler kept.

``jax.experimental.topologies`` gives devices of a TPU slice (``libtpu``) or of an H200
(the CUDA plugin with a ``GpuTargetConfigProto`` of the chip, ``tests/targets/h200.txtpb``)
without the chip: ``jit(...).lower(...).compile()`` then runs the real compiler (Mosaic;
XLA:GPU with Triton and ptxas), so VMEM, shared-memory and register limits are enforced, and
``memory_analysis()`` is exact. Install what it needs with ``pip install -e ".[accel]"``.

One target per process (libtpu serves one TPU generation per process). As a command it
compiles ``value_and_grad`` of a loss at one head size and prints one JSON line::

    JAX_PLATFORMS=cpu python -m bench.deviceless --target v5e --head 4096,131072,bf16,8192
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import tempfile
import time

from .hlo_bytes import hbm_bytes

TPU_TOPOLOGIES = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1"}
TARGETS = ("h200", *TPU_TOPOLOGIES)
H200_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "tests" / "targets" / "h200.txtpb"

# Custom-call targets of compiled Pallas kernels: Mosaic TPU, Triton
# (softjax._vocab.pallas_gpu.CUSTOM_CALL: spelled out, since this module must not import jax
# before the target's flags are set; tests/test_bench_tools.py checks the two agree), Mosaic GPU.
KERNEL_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu")

# LLM output heads (D, V, dtype, N): the sizes the accelerator tests compile.
HEADS = {
    "llama3.2-1b": (2048, 131072, "bfloat16", 8192),
    "llama3-8b": (4096, 131072, "bfloat16", 8192),
    "gemma2-2b": (2304, 256000, "bfloat16", 8192),
    "qwen2.5-1.5b": (1536, 151936, "bfloat16", 8192),
    "llama3-70b": (8192, 131072, "bfloat16", 4096),
    "llama3.2-1b-f32": (2048, 131072, "float32", 8192),
    "llama2-32k": (4096, 32000, "bfloat16", 8192),
    "gpt2-50k": (768, 50257, "bfloat16", 8192),
}


def available(target: str) -> str | None:
    """None if ``target`` can be compiled for here, else what is missing."""
    import importlib.util

    if target == "h200":
        missing = [m for m in ("jax_plugins.xla_cuda12",) if importlib.util.find_spec(m) is None]
        return f"the CUDA plugin ({missing[0]})" if missing else None
    return None if importlib.util.find_spec("libtpu") else "libtpu"


def device(target: str):
    """A device of ``target`` (no such chip needed)."""
    from jax.experimental import topologies

    if target == "h200":
        topo = topologies.get_topology_desc(
            topology_name="h200",
            platform="cuda",
            topology="1x1x1",
            target_config=H200_CONFIG.read_text(),
        )
    else:
        topo = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[target], platform="tpu")
    return topo.devices[0]


# XLA writes each compiled module's optimised HLO here when DUMP_ENV names a folder (set by
# `main` before jax starts): on this jaxlib `compiled.as_text()` aborts the process for some
# TPU v6e/v5p executables, and a dump is what the compiler itself prints.
DUMP_ENV = "SOFTJAX_HLO_DUMP"


def optimized_hlo(target: str, compiled) -> str | None:
    """The optimised HLO text of the last compiled module, or None where it is not readable."""
    folder = os.environ.get(DUMP_ENV)
    if folder and os.path.isdir(folder):
        dumps = sorted(
            pathlib.Path(folder).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_mtime
        )
        return dumps[-1].read_text() if dumps else None
    if target in ("v6e", "v5p"):
        return None
    return compiled.as_text()


def compile_for(target: str, fn, *shapes, as_default_device: bool = False) -> dict:
    """Compiles ``fn`` for ``target`` at ``shapes`` (``(shape, dtype)`` pairs).

    Returns the compiled executable's temp memory, the kernel custom calls it holds, the HBM
    bytes its kernels move and the compile time. ``as_default_device`` makes the target's
    device jax's default while tracing, for code that picks its kernel from the default
    device (tokamax); softjax's own code needs no such help.
    """
    import contextlib

    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh([device(target)], ("x",))
    spec = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(s, d, sharding=spec) for s, d in shapes]
    t0 = time.perf_counter()
    default = jax.default_device(mesh.devices.flat[0]) if as_default_device else None
    with default or contextlib.nullcontext():
        lowered = jax.jit(fn).lower(*args)
        compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    text = optimized_hlo(target, compiled)
    hbm = None if text is None else hbm_bytes(text)
    text = text or lowered.as_text()  # the kernels' custom calls are in the module too
    mem = compiled.memory_analysis()
    calls = re.findall(r'custom_call_target="([^"]+)"', text)  # compiled HLO
    calls = sorted(set(calls + re.findall(r"stablehlo.custom_call @([\w$.]+)", text)))
    return {
        "target": target,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "custom_calls": calls,
        "kernel": any(k in c for c in calls for k in KERNEL_CALLS),
        "kernels": sorted(set(re.findall(r"softjax_(?:lce|attn)_[a-z]+", text))),
        "hlo": "lowered" if hbm is None else "compiled",  # where calls and kernels were read
        "hbm_bytes": hbm,  # None where the executable's HLO cannot be printed
        "compile_s": round(seconds, 2),
    }


def loss_fn(impl: str):
    """``value_and_grad`` in ``x`` and ``w`` of the mean loss by ``impl``."""
    import jax
    import optax

    import softjax

    if impl == "naive":

        def loss(x, w, y):
            logits = (x @ w.T).astype("float32")
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    elif impl == "tokamax":
        import tokamax

        def loss(x, w, y):
            return tokamax.linear_softmax_cross_entropy_loss(
                x, y, w.T, reduction="mean", implementation="mosaic_tpu"
            )

    elif impl == "log_probs":
        # linear_log_probs on the Pallas kernels with a temperature and the entropy: the
        # moments in the forward kernel, the spread coefficient in the gradient kernel.
        def loss(x, w, y):
            log_p, ent = softjax.linear_log_probs(
                x, w, y, temperature=0.8, return_entropy=True, implementation="pallas"
            )
            return log_p.sum() + ent.sum()

    else:

        def loss(x, w, y):
            return softjax.linear_cross_entropy(x, w, y, implementation=impl)

    return jax.value_and_grad(loss, (0, 1))


def compile_head(target: str, head: tuple, impl: str = "pallas") -> dict:
    """:func:`compile_for` of ``loss_fn(impl)`` at one head ``(D, V, dtype, N)``."""
    import jax.numpy as jnp

    dim, v, dtype, n = head
    shapes = [((n, dim), dtype), ((v, dim), dtype), ((n,), jnp.int32)]
    out = compile_for(target, loss_fn(impl), *shapes, as_default_device=impl == "tokamax")
    out.update(impl=impl, head=list(head), logits_f32_bytes=n * v * 4)
    return out


# The softmax family is compiled beside jax.nn at one LLM-sized block of rows.
FAMILY_SHAPE = (8192, 131072)


def family_fns() -> dict:
    """``{op: (softjax function, jax.nn function)}``, rows along the last axis."""
    import jax

    import softjax

    def lse(x):
        return softjax.logsumexp(x, axis=-1)

    def nn_lse(x):
        return jax.nn.logsumexp(x, axis=-1)

    return {
        "softmax": (softjax.softmax, jax.nn.softmax),
        "log_softmax": (softjax.log_softmax, jax.nn.log_softmax),
        "logsumexp": (lse, nn_lse),
    }


def compile_family(target: str, shape=FAMILY_SHAPE, dtypes=("bfloat16", "float32")) -> list:
    """:func:`compile_for` of each softmax-family op, softjax and jax.nn, forward only."""
    import jax.numpy as jnp

    rows = []
    for op, fns in family_fns().items():
        for dtype in dtypes:
            for impl, fn in zip(("softjax", "jax.nn"), fns, strict=True):
                out = compile_for(target, fn, (shape, jnp.dtype(dtype)))
                out.update(op=op, impl=impl, dtype=dtype, shape=list(shape))
                rows.append(out)
    return rows


# Attention at long context (B=1, N=32 query heads, K=8 key/value heads, bfloat16): the sizes
# the accelerator tests compile, as (T, H, mask) with T = S.
ATTENTION_CASES = [
    (t, h, mask) for t in (8192, 32768) for h in (128, 64) for mask in ("causal", "window")
]
ATTENTION_HEADS = (32, 8)
WINDOW = (1024, 0)  # a sliding window of 1024 keys before each query (Mistral, Gemma 2)


# The other options, each compiled through its own kernel variant (scalar-prefetched segment
# ranges, a bias without and with a head axis, a boolean mask folded into the bias).
OPTION_CASES = ("segments", "row_bias", "head_bias", "bool_mask")


def attention_options(name: str, t_len: int, n_heads: int) -> dict:
    """Keyword arguments of ``dot_product_attention`` for an option case, built from iotas
    (packed documents of 1000 tokens, the last 100 keys padding)."""
    import jax.numpy as jnp

    pos = jnp.arange(t_len, dtype=jnp.int32)[None]
    seg = pos // 1000
    if name == "segments":
        lengths = jnp.array([t_len - 100], jnp.int32)
        return dict(segment_ids=seg, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                    logit_softcap=30.0, is_causal=True)  # fmt: skip
    if name == "row_bias":  # ALiBi-like key bias [1, 1, 1, S], differentiated
        return dict(bias=-0.01 * pos[:, None, None, :].astype(jnp.float32), is_causal=True)
    if name == "head_bias":  # a bias per head [1, N, T, S]
        slopes = jnp.arange(1, n_heads + 1, dtype=jnp.float32)[None, :, None, None]
        rel = (pos[:, :, None] - pos[:, None, :]).astype(jnp.bfloat16)[:, None]
        return dict(bias=-(2.0**-slopes) * rel, is_causal=True)
    return dict(mask=(seg[:, :, None] == seg[:, None, :])[:, None])


def attention_fn(impl: str, mask: str):
    """``(q, k, v, dO) -> (O, dQ, dK, dV)`` of attention by ``impl``: the forward and
    backward pass of a training step, with the output's cotangent given (an argument, not a
    temporary of the executable)."""
    import jax

    import softjax

    if mask in OPTION_CASES:
        if impl not in ("pallas", "chunked"):
            raise NotImplementedError(f"{impl} is compiled for causal and window only")

        def attend(q, k, v):
            kw = attention_options(mask, q.shape[1], q.shape[2])
            return softjax.dot_product_attention(q, k, v, implementation=impl, **kw)

        def fwd_bwd(q, k, v, d_out):
            out, vjp = jax.vjp(attend, q, k, v)
            return (out, *vjp(d_out))

        return fwd_bwd

    kw = {"is_causal": True} if mask == "causal" else {"local_window_size": WINDOW}

    if impl in ("pallas", "chunked"):

        def attend(q, k, v):
            return softjax.dot_product_attention(q, k, v, implementation=impl, **kw)

    elif impl in ("xla", "cudnn"):  # jax.nn's own implementations

        def attend(q, k, v):
            kw_nn = dict(kw)
            if mask == "window":
                kw_nn["local_window_size"] = WINDOW
            return jax.nn.dot_product_attention(q, k, v, implementation=impl, **kw_nn)

    elif impl == "tpu_flash":  # jax.experimental.pallas.ops.tpu: causal, no GQA, [B, N, T, H]
        from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

        if mask != "causal":
            raise NotImplementedError("the jax TPU flash attention kernel has no window")

        def attend(q, k, v):
            g = q.shape[2] // k.shape[2]
            q_, k_, v_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
            k_, v_ = (x.repeat(g, axis=1) for x in (k_, v_))
            scale = q.shape[-1] ** -0.5
            out = tpu_flash.flash_attention(q_, k_, v_, causal=True, sm_scale=scale)
            return out.transpose(0, 2, 1, 3)

    else:
        raise ValueError(f"unknown attention implementation {impl!r}")

    def fwd_bwd(q, k, v, d_out):
        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(d_out))

    return fwd_bwd


def compile_attention(target: str, t_len: int, h: int, mask: str, impl: str) -> dict:
    """:func:`compile_for` of :func:`attention_fn` at one case (``mask`` causal, window or
    one of :data:`OPTION_CASES`), with the size of the float32 scores ``[N, T, S]`` that a
    materialising implementation would keep."""
    import jax.numpy as jnp

    n, k = ATTENTION_HEADS
    q = ((1, t_len, n, h), jnp.bfloat16)
    kv = ((1, t_len, k, h), jnp.bfloat16)
    out = compile_for(target, attention_fn(impl, mask), q, kv, kv, q)
    out.update(
        op="attention", impl=impl, t=t_len, h=h, mask=mask, scores_f32_bytes=n * t_len**2 * 4
    )
    return out


def in_subprocess(target: str, *flags: str, timeout: int = 3600) -> list[dict]:
    """This module's JSON rows for ``target`` with ``flags``, from a process of its own (libtpu
    serves one TPU generation per process); one row with an ``error`` if that process failed."""
    import subprocess

    cmd = [sys.executable, "-m", "bench.deviceless", "--target", target, *flags]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
    if proc.returncode != 0:
        return [dict(target=target, error=proc.stderr.strip().splitlines()[-1:])]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, required=True)
    parser.add_argument("--head", action="append", default=[], help="D,V,dtype,N or a name")
    parser.add_argument(
        "--impl",
        action="append",
        default=[],
        help="pallas, chunked, naive, tokamax, log_probs (linear_log_probs on the kernels)",
    )
    parser.add_argument(
        "--family", choices=["softmax", "attention"], default=None,
        help="compile softmax, log_softmax, logsumexp and their jax.nn peers, or attention "
        "fwd+bwd (--impl pallas, chunked, xla, cudnn, tpu_flash; --case T,H,mask), "
        "instead of a loss",
    )  # fmt: skip
    parser.add_argument("--case", action="append", default=[], help="attention: T,H,mask")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # tokamax parses absl flags from sys.argv, which are ours
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Without it a second process compiling for a TPU (another target, another test worker)
    # fails on libtpu's lockfile; nothing here holds a chip, so nothing is shared.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with tempfile.TemporaryDirectory() as dump:
        if "jax" not in sys.modules:  # XLA reads its flags once, when it starts
            os.environ[DUMP_ENV] = dump
            flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_"
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        return _run(args)


def _run(args) -> int:
    if args.family == "attention":
        cases = [(int(t), int(h), m) for t, h, m in (c.split(",") for c in args.case)]
        for t_len, h, mask in cases or ATTENTION_CASES:
            for impl in args.impl or ["pallas"]:
                try:
                    out = compile_attention(args.target, t_len, h, mask, impl)
                except Exception as e:  # report and go on, as for the heads
                    msg = str(e).strip().splitlines()
                    out = dict(target=args.target, op="attention", impl=impl, t=t_len, h=h,
                               mask=mask, error=msg[:3])  # fmt: skip
                print(json.dumps(out), flush=True)
        return 0
    if args.family:
        for out in compile_family(args.target):
            print(json.dumps(out), flush=True)
        return 0
    heads = []
    for h in args.head or list(HEADS):
        if h in HEADS:
            heads.append(HEADS[h])
        else:
            d, v, dt, n = h.split(",")
            heads.append(
                (int(d), int(v), {"bf16": "bfloat16", "f32": "float32"}.get(dt, dt), int(n))
            )
    for head in heads:
        for impl in args.impl or ["pallas"]:
            try:
                out = compile_head(args.target, head, impl)
            except Exception as e:  # report and go on: the caller decides what a failure means
                msg = str(e).strip().splitlines()
                out = {"target": args.target, "impl": impl, "head": list(head), "error": msg[:3]}
            print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
