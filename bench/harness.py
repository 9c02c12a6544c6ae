"""Shared measurement helpers: times as medians after warm-up, memory from XLA.

Times on shared machines are noisy, so softjax and its peer are always measured in the same
process, interleaved (a, b, a, b, ...), and reported as ratios of medians: of wall time and
of process CPU time. Memory is the compiled temp size from ``memory_analysis()``, which is
exact and needs no run.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

_NOTED: set[str] = set()

# Called with each finished row (see Rows); the bench's main loop sets it to print the row.
_REPORTER: list[Callable[[dict], None]] = []


class Rows(list):
    """A family's table rows: each row is reported to the running bench as it is added, so
    the table prints row by row while the family is still measuring."""

    def append(self, row: dict) -> None:
        super().append(row)
        if _REPORTER and not row.get("_reported"):
            row["_reported"] = True
            _REPORTER[0](row)

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)

    def __iadd__(self, rows):
        self.extend(rows)
        return self


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


class Timing(NamedTuple):
    """Median cost of one call: wall seconds and process CPU seconds (every thread)."""

    wall: float
    cpu: float


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timings(fns: Sequence[Callable], args: Sequence, reps: int = 7, warmup: int = 2) -> list:
    """The :class:`Timing` of each ``fn(*args)``, interleaving the functions run by run.

    The CPU time (``resource.getrusage``) counts every thread of the process, so a ratio of
    CPU times says how much work was done where a wall ratio also says how well it spread
    over the cores; on a shared machine it is also the less noisy of the two.
    """
    for fn in fns:
        for _ in range(warmup):
            block(fn(*args))
    walls, cpus = [[] for _ in fns], [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            c0, t0 = _cpu_seconds(), time.perf_counter()
            block(fn(*args))
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(_cpu_seconds() - c0)
    medians = zip(np.median(walls, axis=1), np.median(cpus, axis=1), strict=True)
    return [Timing(float(w), float(c)) for w, c in medians]


def median_times(
    fns: Sequence[Callable], args: Sequence, reps: int = 7, warmup: int = 2
) -> list[float]:
    """Median wall time of each ``fn(*args)``, interleaving the functions run by run."""
    return [t.wall for t in timings(fns, args, reps=reps, warmup=warmup)]


def ratio_columns(ours: Timing | None, peer: Timing | None) -> dict:
    """The timing columns of a row: wall and CPU ratios (softjax / peer) and both walls;
    only softjax's time without a peer's, nothing without either."""
    if ours is None:
        return {}
    if peer is None:
        return {"softjax_ms": 1e3 * ours.wall}
    return {
        "time_ratio": ours.wall / peer.wall,
        "cpu_ratio": ours.cpu / peer.cpu if peer.cpu > 0 else None,
        "softjax_ms": 1e3 * ours.wall,
        "peer_ms": 1e3 * peer.wall,
    }


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
    # Differences of the kept entries only: an infinite reference would make inf - inf.
    return float(np.max(np.abs(out[keep] - ref[keep]) / ulp(np.abs(ref[keep]), dtype)))


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
    t_ours, t_theirs = timings([ours_j, theirs_j], args, reps=reps)
    row = {
        "op": op,
        "case": case,
        "dtype": dtype,
        "peer": peer,
        **ratio_columns(t_ours, t_theirs),
        "softjax_MiB": temp_bytes(ours, *args) / 2**20,
        "peer_MiB": temp_bytes(theirs, *args) / 2**20,
    }
    if errors is not None:
        row["softjax_err"], row["peer_err"] = errors(ours_j(*args), theirs_j(*args))
    return row
