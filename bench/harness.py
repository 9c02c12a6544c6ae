"""Shared measurement helpers: times as medians after warm-up, memory from XLA.

Times on shared machines are noisy, so softjax and its peer are always measured in the same
process, interleaved (a, b, a, b, ...), and reported as a ratio of medians. Memory is the
compiled temp size from ``memory_analysis()``, which is exact and needs no run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

_NOTED: set[str] = set()


def note(message: str) -> None:
    """Prints ``message`` (what a run skipped, where it wrote) once per run."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"  {message}", flush=True)


def tier(args, quick, default, full):
    """The setting of the run's size tier: ``--quick``, the default, or ``--full``."""
    if getattr(args, "quick", False):
        return quick
    return full if getattr(args, "full", False) else default


def block(x):
    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def median_times(
    fns: Sequence[Callable], args: Sequence, reps: int = 7, warmup: int = 2
) -> list[float]:
    """Median wall time of each ``fn(*args)``, interleaving the functions run by run."""
    for fn in fns:
        for _ in range(warmup):
            block(fn(*args))
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            block(fn(*args))
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def temp_bytes(fn: Callable, *args) -> int:
    """Compiled temporary memory of ``jax.jit(fn)(*args)``, in bytes (exact, no run)."""
    compiled = jax.jit(fn).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def ulp_error(out, ref, dtype) -> float:
    """Max error of ``out`` against the float64 ``ref``, in ulps of ``dtype``.

    Only entries whose reference is finite and in ``dtype``'s normal range count (below it
    the ulp is fixed and relative accuracy is not promised).
    """
    import jax.numpy as jnp

    out = np.asarray(
        jnp.asarray(out).astype(jnp.float32) if jnp.asarray(out).dtype != np.float64 else out,
        np.float64,
    )
    ref = np.asarray(ref, np.float64)
    keep = np.isfinite(ref) & (np.abs(ref) >= float(jnp.finfo(dtype).tiny))
    if not keep.any():
        return 0.0
    return float(np.max(np.abs(out - ref)[keep] / ulp(np.abs(ref[keep]), dtype)))


def ulp(a: np.ndarray, dtype) -> np.ndarray:
    """The spacing of ``dtype`` at each (positive, normal) value of the float64 array ``a``."""
    import jax.numpy as jnp

    _, exponent = np.frexp(a)  # a = m * 2**exponent, m in [0.5, 1)
    return np.ldexp(1.0, exponent - 1 - int(jnp.finfo(dtype).nmant))


def compare_row(
    op: str, case: str, dtype: str, peer: str, ours, theirs, args, reps: int, errors=None
) -> dict:
    """One table row: ``ours`` beside ``theirs`` on ``args`` (times interleaved, memory exact).

    ``errors`` is an optional callable ``(out_ours, out_theirs) -> (err_ours, err_theirs)``.
    """
    ours_j, theirs_j = jax.jit(ours), jax.jit(theirs)
    t_ours, t_theirs = median_times([ours_j, theirs_j], args, reps=reps)
    row = {
        "op": op,
        "case": case,
        "dtype": dtype,
        "peer": peer,
        "time_ratio": t_ours / t_theirs,
        "softjax_ms": 1e3 * t_ours,
        "peer_ms": 1e3 * t_theirs,
        "softjax_MiB": temp_bytes(ours, *args) / 2**20,
        "peer_MiB": temp_bytes(theirs, *args) / 2**20,
    }
    if errors is not None:
        row["softjax_err"], row["peer_err"] = errors(ours_j(*args), theirs_j(*args))
    return row
