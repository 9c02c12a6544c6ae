"""Sampling: ``softjax.sample`` beside a plain sort-based sampler and ``jax.random.categorical``.

At B = 64 rows and a V = 262144 vocabulary (float32), each filter setting is timed against
two peers in the same process: the textbook sort-based implementation of the same semantics
(``filter_logits_reference``: sort, cumulative sum, cut) and ``jax.random.categorical`` on the
raw logits, the floor (drawing one token with no filtering at all). Ratios below 1 mean
softjax is faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from softjax import sample
from softjax.sampling import sample_reference

from .harness import median_times, temp_bytes


def _logits(b: int, v: int) -> jax.Array:
    # Heavy-tailed, LLM-like: a Zipf-shaped profile with noise, shuffled per row.
    rng = np.random.default_rng(0)
    ranks = np.arange(1, v + 1)
    base = -1.1 * np.log(ranks) + rng.normal(size=(b, v)) * 0.5
    return jnp.asarray(rng.permuted(base, axis=-1), jnp.float32)


def run(args) -> list[dict]:
    b, v = (8, 32768) if args.quick else (64, 262144)
    reps = args.reps or (3 if args.quick else 5)
    x = _logits(b, v)
    key = jax.random.key(0)
    case = f"B={b} V={v}"
    settings = [
        ("top_p=0.9", dict(top_p=0.9)),
        ("top_k=50 (static)", dict(top_k=50)),
        ("top_k=50,top_p=0.9", dict(top_k=50, top_p=0.9)),
        ("min_p=0.05", dict(min_p=0.05)),
    ]
    floor = jax.jit(lambda k, x: jax.random.categorical(k, x, axis=-1))
    rows = []
    for name, kw in settings:
        ours = jax.jit(lambda k, x, kw=kw: sample(k, x, **kw))
        sort_based = jax.jit(lambda k, x, kw=kw: sample_reference(k, x, **kw))
        t_ours, t_sort, t_floor = median_times([ours, sort_based, floor], (key, x), reps=reps,
                                               warmup=1)  # fmt: skip
        mem_ours = temp_bytes(ours, key, x)
        for peer, t_peer, fn_peer in (
            ("sort-based", t_sort, sort_based),
            ("random.categorical", t_floor, floor),
        ):
            rows.append(
                dict(
                    op=f"sample({name})",
                    case=case,
                    dtype="float32",
                    peer=peer,
                    time_ratio=t_ours / t_peer,
                    softjax_ms=t_ours * 1e3,
                    peer_ms=t_peer * 1e3,
                    softjax_MiB=mem_ours / 2**20,
                    peer_MiB=temp_bytes(fn_peer, key, x) / 2**20,
                )
            )
        same = bool(jnp.all(ours(key, x) == sort_based(key, x)))
        rows[-1]["case"] = case + ("" if same else " MISMATCH")
    return rows
