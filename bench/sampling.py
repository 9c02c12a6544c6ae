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
from softjax.sampling import filter_logits, filter_logits_reference, sample_reference

from .harness import Rows, ratio_columns, temp_bytes, tier, timings


def _logits(b: int, v: int) -> jax.Array:
    # Heavy-tailed, LLM-like: a Zipf-shaped profile with noise, shuffled per row.
    rng = np.random.default_rng(0)
    ranks = np.arange(1, v + 1)
    base = -1.1 * np.log(ranks) + rng.normal(size=(b, v)) * 0.5
    return jnp.asarray(rng.permuted(base, axis=-1), jnp.float32)


def run(args) -> list[dict]:
    b, v = tier(args, (8, 32768), (16, 131072), (64, 262144))
    # The sort-based peer takes seconds a call at full size: few runs keep it ~1 min.
    reps = args.reps or tier(args, 3, 3, 2)
    x = _logits(b, v)
    key = jax.random.key(0)
    settings = [
        ("top_p=0.9", dict(top_p=0.9)),
        ("top_k=50 (static)", dict(top_k=50)),
        ("top_k=50,top_p=0.9", dict(top_k=50, top_p=0.9)),
    ]
    if args.large:
        settings.append(("min_p=0.05", dict(min_p=0.05)))
        # Typical-p bisects on the keys of -|log p + H| (the peer sorts them).
        settings.append(("typical_p=0.9", dict(typical_p=0.9)))
    floor = jax.jit(lambda k, x: jax.random.categorical(k, x, axis=-1))
    floor_bytes = temp_bytes(floor, key, x)
    rows = Rows()
    for name, kw in settings:
        ours = jax.jit(lambda k, x, kw=kw: sample(k, x, **kw))
        sort_based = jax.jit(lambda k, x, kw=kw: sample_reference(k, x, **kw))
        times = timings([ours, sort_based, floor], (key, x), reps=reps, warmup=1)
        t_ours, t_sort, t_floor = times
        # The kept sets must agree exactly (checked on a few rows; the tests do the rest).
        head = x[:4]
        same = bool(jnp.all(filter_logits(head, **kw) == filter_logits_reference(head, **kw)))
        mem_ours = temp_bytes(ours, key, x)
        for peer, t_peer, peer_bytes in (
            ("sort-based", t_sort, temp_bytes(sort_based, key, x)),
            ("random.categorical", t_floor, floor_bytes),
        ):
            rows.append(
                dict(
                    op=f"sample({name})",
                    case=f"B={b} V={v}" + ("" if same else " KEPT-SET MISMATCH"),
                    dtype="float32",
                    peer=peer,
                    **ratio_columns(t_ours, t_peer),
                    softjax_MiB=mem_ours / 2**20,
                    peer_MiB=peer_bytes / 2**20,
                )
            )
    return rows
