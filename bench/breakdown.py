"""``python -m bench.breakdown``: where the time of an exact logsumexp goes on this machine.

softjax's ``logsumexp`` (and the forward of ``log_softmax`` and ``cross_entropy``, which share
its row statistics) is built from pieces, each needed for exactness; this times ``jax.nn`` and
then the pieces added one at a time, in one process, interleaved, as wall and process-CPU
ratios to ``jax.nn`` at [2048, 32768] float32:

- ``max + sum``: the row max and ``log(sum(exp(x - m)))``, what ``jax.nn`` computes;
- ``+ not-max mask``: the sum over the non-maximal entries only (``rest``, for
  ``log1p(rest)``), the mask as arithmetic (a select here costs far more on XLA:CPU);
- ``+ compensated shift``: ``x - m`` as TwoSum's ``hi + lo`` and ``exp(hi) * (1 + lo)``, which
  keeps ``rest`` relatively exact when one class dominates;
- ``+ tie count``: the number of entries at the maximum, a second reduction of ``x``;
- ``two sums of one expression`` and ``variadic reduce``: ``rest`` and the count in one
  pass, two ways, neither fused by XLA:CPU;
- ``not-max mask + tie count``, arithmetic and as ``sum(x == max)``: what a compare in a
  reduction's input costs on XLA:CPU against the same count in arithmetic;
- ``sum carrying TwoSum errors``: ``sum(exp(x - m))`` compensated by one variadic reduction
  of (sum, error) pairs (``softjax._numerics.streaming_sum``, what TPU and GPU run);
- ``softjax``: the shipped ``softjax.logsumexp``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import softjax
from softjax import _numerics as nx

from .harness import timings

# (x - m) * -BIG is <= -2 for any non-zero difference: min(1, .) is the not-max indicator.
BIG = 2.0 / float(jnp.finfo(jnp.float32).tiny)


def _max(x):
    return lax.reduce_max(x, (1,))[:, None]


def max_sum(x):
    m = _max(x)
    return m + jnp.log(jnp.sum(jnp.exp(x - m), 1, keepdims=True))


def _masked_rest(x, m):
    return jnp.sum(jnp.exp(x - m) * jnp.minimum(1.0, (x - m) * -BIG), 1, keepdims=True)


def not_max_mask(x):
    m = _max(x)
    return m + jnp.log1p(_masked_rest(x, m))


def _compensated_rest(x, m):
    s, err = nx._two_sum_unguarded(x, -m)
    e = jnp.exp(s)
    return jnp.sum((e + e * err) * jnp.minimum(1.0, (x - m) * -BIG), 1, keepdims=True)


def compensated_shift(x):
    m = _max(x)
    return m + jnp.log1p(_compensated_rest(x, m))


def tie_count(x):
    m = _max(x)
    count = 0.5 * jnp.sum(2.0 - jnp.minimum(2.0, (m - jnp.minimum(x, m)) * BIG), 1, keepdims=True)
    return m + jnp.log1p(_compensated_rest(x, m) + (count - 1))


def two_sums(x):
    m = _max(x)
    not_max = jnp.minimum(1.0, (x - m) * -BIG)
    rest = jnp.sum(jnp.exp(x - m) * not_max, 1, keepdims=True)
    others = jnp.sum(not_max, 1, keepdims=True)
    return m + jnp.log1p(rest + (x.shape[1] - others - 1))


def variadic(x):
    m = _max(x)
    not_max = jnp.minimum(1.0, (x - m) * -BIG)
    zero = np.float32(0)
    rest, others = lax.reduce(
        (jnp.exp(x - m) * not_max, not_max),
        (zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        (1,),
    )
    return m + jnp.log1p(rest[:, None] + (x.shape[1] - others[:, None] - 1))


def count_arithmetic(x):
    m = _max(x)
    top = lax.optimization_barrier(m)  # the count's own broadcast of m, as softjax's
    count = 0.5 * jnp.sum(
        2.0 - jnp.minimum(2.0, (top - jnp.minimum(x, top)) * BIG), 1, keepdims=True
    )
    return m + jnp.log1p(_masked_rest(x, m) + (count - 1))


def count_compare(x):
    m = _max(x)
    top = lax.optimization_barrier(m)
    count = jnp.sum((x == top).astype(x.dtype), 1, keepdims=True)
    return m + jnp.log1p(_masked_rest(x, m) + (count - 1))


def carried_sum(x):
    m = _max(x)
    return m + jnp.log(nx.streaming_sum(jnp.exp(x - m), (1,)))


VARIANTS = {
    "jax.nn": lambda x: jax.nn.logsumexp(x, axis=-1, keepdims=True),
    "max + sum": max_sum,
    "+ not-max mask": not_max_mask,
    "+ compensated shift": compensated_shift,
    "+ tie count": tie_count,
    "two sums of one expression": two_sums,
    "variadic reduce": variadic,
    "not-max mask + tie count": count_arithmetic,
    "same, count by compare": count_compare,
    "sum carrying TwoSum errors": carried_sum,
    "softjax": lambda x: softjax.logsumexp(x, axis=-1, keepdims=True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--classes", type=int, default=32768)
    p.add_argument("--scale", type=float, default=2.0, help="logits ~ N(0, scale**2)")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.rows, args.classes)).astype(np.float32) * args.scale)
    fns = [jax.jit(f) for f in VARIANTS.values()]
    times = timings(fns, (x,), reps=args.reps, warmup=1)
    base = times[0]
    print(f"logsumexp [{args.rows}, {args.classes}] float32, scale {args.scale}")
    print(f"{'variant':28s} {'ms':>8s} {'time_ratio':>11s} {'cpu_ratio':>10s}")
    for name, t in zip(VARIANTS, times, strict=True):
        print(f"{name:28s} {t.wall * 1e3:8.1f} {t.wall / base.wall:11.2f} {t.cpu / base.cpu:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
