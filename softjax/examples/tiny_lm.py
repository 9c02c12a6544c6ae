"""``python -m softjax.examples.tiny_lm``: a tiny byte-level transformer LM trained on softjax.

A decoder-only transformer (Flax linen) on the help topics that ship with Python
(``pydoc_data.topics``, ~0.47 MB of English): attention is :func:`softjax.dot_product_attention`
(causal, packed sequences separated by ``segment_ids``), the output layer is tied to the input
embedding and trained with :func:`softjax.linear_cross_entropy` (label smoothing and z-loss),
optimised with optax. At the end it reports held-out bits per byte against the unigram and
bigram baselines, the held-out scores of :func:`softjax.linear_log_probs` (log-probabilities
and prediction entropies, per byte and per row), a sample drawn with :func:`softjax.sample`
(temperature and top-p), the expected calibration error before and after
:func:`softjax.calibration.fit_temperature`, and writes a loss curve.

Flags:
  ``--plain``    compare the step against ``jax.nn.dot_product_attention`` + ``x @ w.T`` + an
                 optax loss: step time and compiled temp memory at the default size and at a
                 long-context / large-vocabulary size (no training).
  ``--distill``  then train a smaller student (``--student-d-model``, ``--student-layers``)
                 on the model's next-byte distributions with
                 :func:`softjax.linear_kl_divergence` (``--distill-temperature``), beside the
                 same student trained on the labels.
  ``--devices P`` train on ``P`` virtual CPU devices over a 2-D ``(data, model)`` mesh: batch
                 sharded over ``data``, the tied embedding sharded over the vocabulary on
                 ``model`` and the loss vocab-parallel (``vocab_axis_name="model"``).

Why linen: ``init``/``apply`` give a plain parameter pytree and a pure function, which go into
``jax.shard_map`` (a pytree of ``PartitionSpec`` as ``in_specs``), ``jax.grad`` and optax as they
are; NNX modules would have to be split into graph and state around every such boundary.

Why ``shard_map`` around the loss, with ``jax.grad`` outside it: the vocabulary-parallel
pieces (the embedding lookup and :func:`softjax.linear_cross_entropy` with
``vocab_axis_name``) are written per device with explicit ``psum``/``pmax``, and differentiating
the ``shard_map`` (``check_vma=True``) inserts the gradient reductions itself (the replicated
trunk's gradients summed over ``data``, the embedding's kept sharded), so the optax update runs
unchanged on sharded arrays under ``jit``. Only the embedding is split over ``model``; the trunk
is replicated there (computed redundantly), which is enough to show the vocab-parallel loss
and is where the memory goes at large vocabularies.

Shape legend: B batch, T sequence length, N heads, H head dim, D hidden, V vocabulary (256).
"""

from __future__ import annotations

import os
import sys


def _devices_flag(argv: list[str]) -> int | None:
    """The value of ``--devices`` in ``argv``, read before jax is imported (it fixes the
    number of virtual CPU devices at backend start-up)."""
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
    return None


if __name__ == "__main__":
    _n = _devices_flag(sys.argv[1:])
    if _n and _n > 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={_n}".strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import softjax  # noqa: E402
from softjax import calibration  # noqa: E402

VOCAB = 256  # bytes
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
    """Model, data and optimiser settings (defaults: 2 M training bytes, ~5 passes)."""

    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    seq_len: int = 128
    batch: int = 16
    steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    label_smoothing: float = 0.05
    z_loss: float = 1e-4
    vocab: int = VOCAB
    seed: int = 0
    attention: str = "softjax"  # or "plain": jax.nn.dot_product_attention with a mask


# ---------------------------------------------------------------------------------------
# Data: bytes of the pydoc topics, packed into rows with segment ids


def corpus(held_fraction: float = 0.1) -> tuple[list[bytes], list[bytes]]:
    """The help topics as UTF-8 documents, split into (train, held-out) by whole topics.

    Walking the topics in name order, a topic is held out whenever that keeps the held-out
    bytes within ``held_fraction`` of the bytes seen so far: about that fraction of the bytes,
    spread over the alphabet, and no document split across the two parts.
    """
    from pydoc_data.topics import topics

    train, held = [], []
    seen = n_held = 0
    for name in sorted(topics):
        doc = topics[name].encode("utf-8")
        seen += len(doc)
        if n_held + len(doc) <= held_fraction * seen:
            held.append(doc)
            n_held += len(doc)
        else:
            train.append(doc)
    return train, held


def stream(docs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Documents concatenated: byte values ``[L]`` int32 and document ids ``[L]`` int32."""
    data = np.frombuffer(b"".join(docs), np.uint8).astype(np.int32)
    ids = np.repeat(np.arange(len(docs), dtype=np.int32), [len(d) for d in docs])
    return data, ids


def pack(data: np.ndarray, ids: np.ndarray, starts: np.ndarray, seq_len: int) -> dict:
    """Rows of ``seq_len + 1`` bytes from ``starts`` into a packed batch.

    Returns a dict of ``[B, T]`` arrays: ``tokens`` (inputs), ``labels`` (the next byte),
    ``segment_ids`` (the document of each input; attention stays within it), ``positions``
    (offset from the start of the document inside the row: each packed sequence starts at 0)
    and ``valid`` (False where the next byte belongs to another document).
    """
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    tok, seg = data[idx], ids[idx]
    seg_in = seg[:, :-1]
    # Position restarts wherever the segment changes inside the row.
    new = np.concatenate([np.ones_like(seg_in[:, :1], bool), seg_in[:, 1:] != seg_in[:, :-1]], 1)
    col = np.broadcast_to(np.arange(seq_len), seg_in.shape)
    start_col = np.maximum.accumulate(np.where(new, col, 0), axis=1)
    return {
        "tokens": tok[:, :-1].astype(np.int32),
        "labels": tok[:, 1:].astype(np.int32),
        "segment_ids": seg_in.astype(np.int32),
        "positions": (col - start_col).astype(np.int32),
        "valid": seg[:, 1:] == seg_in,
    }


def train_batches(data, ids, cfg: Config):
    """Endless random packed batches (seeded: the same sequence for every run)."""
    rng = np.random.default_rng(cfg.seed)
    while True:
        starts = rng.integers(0, len(data) - cfg.seq_len - 1, size=cfg.batch)
        yield pack(data, ids, starts, cfg.seq_len)


def eval_batches(data, ids, seq_len: int, batch: int, max_rows: int | None = None):
    """Non-overlapping rows covering the held-out stream (each byte predicted once)."""
    starts = np.arange(0, len(data) - seq_len - 1, seq_len)
    if max_rows is not None:
        starts = starts[:max_rows]
    for i in range(0, len(starts) - batch + 1, batch):
        yield pack(data, ids, starts[i : i + batch], seq_len)


def unigram_bits(train: np.ndarray, held: np.ndarray) -> float:
    """Bits per byte of the held-out bytes under the train byte frequencies (add-one)."""
    counts = np.bincount(train, minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[held].mean())


def bigram_bits(train_docs: list[bytes], held_docs: list[bytes], alpha: float = 0.1) -> float:
    """Bits per byte of each held-out byte after the first of its document under the train
    byte-pair frequencies (add-``alpha``): a second, stronger baseline."""
    counts = np.full((VOCAB, VOCAB), alpha)
    for d in train_docs:
        a = np.frombuffer(d, np.uint8)
        np.add.at(counts, (a[:-1], a[1:]), 1.0)
    logp = np.log2(counts / counts.sum(1, keepdims=True))
    total = n = 0
    for d in held_docs:
        a = np.frombuffer(d, np.uint8)
        total -= logp[a[:-1], a[1:]].sum()
        n += len(a) - 1
    return float(total / n)


# ---------------------------------------------------------------------------------------
# Model: the transformer trunk in linen; the tied embedding lives beside it


def plain_attention(q, k, v, segment_ids):
    """``jax.nn.dot_product_attention``, packing expressed as a ``[B, 1, T, T]`` mask."""
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)


def softjax_attention(q, k, v, segment_ids):
    """:func:`softjax.dot_product_attention`, causal within each packed segment."""
    return softjax.dot_product_attention(q, k, v, is_causal=True, segment_ids=segment_ids)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    n_heads: int
    attention: str

    @nn.compact
    def __call__(self, x, segment_ids):  # x [B, T, D]
        d = x.shape[-1]
        h = nn.LayerNorm(dtype=F32)(x)
        qkv = nn.DenseGeneral((3, self.n_heads, d // self.n_heads), use_bias=False)(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H]
        attend = softjax_attention if self.attention == "softjax" else plain_attention
        o = attend(q, k, v, segment_ids)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), use_bias=False)(o)
        h = nn.LayerNorm(dtype=F32)(x)
        h = nn.Dense(4 * d)(h)
        return x + nn.Dense(d)(jax.nn.gelu(h))


class Trunk(nn.Module):
    """Embedded bytes ``[B, T, D]`` -> final hidden states ``[B, T, D]``."""

    n_layers: int
    n_heads: int
    seq_len: int
    attention: str = "softjax"

    @nn.compact
    def __call__(self, x, segment_ids, positions):
        pos = self.param(
            "pos_embed", nn.initializers.normal(0.02), (self.seq_len, x.shape[-1]), F32
        )
        x = x + pos[positions]
        for _ in range(self.n_layers):
            x = Block(self.n_heads, self.attention)(x, segment_ids)
        return nn.LayerNorm(dtype=F32)(x)


def make_trunk(cfg: Config) -> Trunk:
    return Trunk(cfg.n_layers, cfg.n_heads, cfg.seq_len, cfg.attention)


def init_params(cfg: Config) -> dict:
    """``{"embed": [V, D], "trunk": linen params}``, float32."""
    # One compiled program: op by op, the first initialisation dispatches (and compiles)
    # every small op on its own, which takes seconds.
    return _init_params(cfg)


@partial(jax.jit, static_argnums=0)
def _init_params(cfg: Config) -> dict:
    k_emb, k_trunk = jax.random.split(jax.random.key(cfg.seed))
    embed = jax.random.normal(k_emb, (cfg.vocab, cfg.d_model), F32) * cfg.d_model**-0.5
    x = jnp.zeros((1, cfg.seq_len, cfg.d_model), F32)
    seg = jnp.zeros((1, cfg.seq_len), jnp.int32)
    trunk = make_trunk(cfg).init(k_trunk, x, seg, seg)["params"]
    return {"embed": embed, "trunk": trunk}


def lookup(embed, tokens, vocab_axis: str | None = None):
    """Embedding rows ``[B, T, D]``; with ``vocab_axis``, ``embed`` is this device's ``[V/P, D]``
    shard: each device contributes the rows it holds and a ``psum`` assembles them."""
    if vocab_axis is None:
        return jnp.take(embed, tokens, axis=0)
    v_local = embed.shape[0]
    local = tokens - jax.lax.axis_index(vocab_axis) * v_local
    here = (local >= 0) & (local < v_local)
    rows = jnp.where(here[..., None], embed[jnp.clip(local, 0, v_local - 1)], 0.0)
    return jax.lax.psum(rows, vocab_axis)


def hidden(cfg: Config, params, batch, vocab_axis=None):
    """Final hidden states ``[B, T, D]`` of a packed batch."""
    x = lookup(params["embed"], batch["tokens"], vocab_axis)
    return make_trunk(cfg).apply(
        {"params": params["trunk"]}, x, batch["segment_ids"], batch["positions"]
    )


def loss_sum(cfg: Config, params, batch, vocab_axis=None):
    """Summed training loss (smoothing + z-loss) and the number of counted tokens."""
    h = hidden(cfg, params, batch, vocab_axis)
    # Per-token losses (0 where not valid), summed here: "none" takes the same streaming path
    # on one device and on the mesh, so the sharded run reproduces the single-device losses.
    rows = softjax.linear_cross_entropy(
        h,
        params["embed"],
        batch["labels"],
        where=batch["valid"],
        label_smoothing=cfg.label_smoothing,
        z_loss=cfg.z_loss,
        reduction="none",
        vocab_axis_name=vocab_axis,
    )
    return jnp.sum(rows), jnp.sum(batch["valid"].astype(F32))


def loss_fn(cfg: Config, params, batch):
    """Mean training loss over the valid tokens of the batch (single device)."""
    total, count = loss_sum(cfg, params, batch)
    return total / count


def plain_loss_fn(cfg: Config, params, batch):
    """The same loss from ``x @ w.T`` and optax: materialises the ``[B, T, V]`` logits."""
    logits = hidden(cfg, params, batch) @ params["embed"].T
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    lse = jax.nn.logsumexp(logits, axis=-1)
    a = cfg.label_smoothing
    # Smoothing toward uniform: a/V sum_c (lse - z_c) = a (lse - mean_c z_c).
    per_token = (1 - a) * ce + a * (lse - jnp.mean(logits, -1)) + cfg.z_loss * lse**2
    valid = batch["valid"].astype(F32)
    return jnp.sum(per_token * valid) / jnp.sum(valid)


def make_optimizer(cfg: Config):
    warmup = min(cfg.warmup, cfg.steps // 2)
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), cfg.lr * 0.1
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay),
    )


def make_step(cfg: Config, loss, optimizer):
    """``step(params, opt_state, batch) -> (params, opt_state, loss)`` (pure, jittable)."""

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


# ---------------------------------------------------------------------------------------
# Sharded training: (data, model) mesh, vocab-parallel tied embedding and loss


def make_mesh(devices: int) -> Mesh:
    """A ``(data, model)`` mesh over the first ``devices`` devices, ``model`` the larger
    power-of-two factor up to 4 (it divides the byte vocabulary)."""
    model = 4 if devices % 4 == 0 else (2 if devices % 2 == 0 else 1)
    return Mesh(
        np.array(jax.devices()[:devices]).reshape(devices // model, model), ("data", "model")
    )


def param_specs(params) -> dict:
    """Embedding sharded over the vocabulary on ``model``; the trunk replicated."""
    return {"embed": P("model"), "trunk": jax.tree.map(lambda _: P(), params["trunk"])}


def sharded_loss_fn(cfg: Config, mesh: Mesh):
    """Mean loss with the batch split over ``data`` and the vocabulary over ``model``.

    Inside ``shard_map`` each device holds ``B/Pd`` rows and ``V/Pm`` embedding rows: the
    lookup and :func:`softjax.linear_cross_entropy` combine the vocabulary shards with
    ``psum``/``pmax``, and the summed loss and token count are ``psum``-ed over ``data``.
    Differentiating through ``shard_map`` (``check_vma=True``) sums the gradients of the
    replicated trunk over ``data`` and keeps the embedding gradient sharded.
    """

    def local(params, batch):
        total, count = loss_sum(cfg, params, batch, vocab_axis="model")
        return jax.lax.psum(total, "data") / jax.lax.psum(count, "data")

    def loss(params, batch):
        specs = (param_specs(params), jax.tree.map(lambda _: P("data"), batch))
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(params, batch)

    return loss


def shard(tree, specs, mesh: Mesh):
    return jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, specs)


# ---------------------------------------------------------------------------------------
# Training loop, evaluation, sampling, calibration


def train(cfg: Config, devices: int = 1, log=sys.stderr, params=None, loss=None):
    """Trains for ``cfg.steps``; returns ``(params, losses [steps], tokens/s)``.

    Progress is one ``\\r``-rewritten line on ``log`` (None for silence). ``loss(params,
    batch)`` replaces the training loss on one device (distillation).
    """
    train_docs, _ = corpus()
    data, ids = stream(train_docs)
    params = init_params(cfg) if params is None else params
    optimizer = make_optimizer(cfg)
    if devices > 1:
        mesh = make_mesh(devices)
        loss = sharded_loss_fn(cfg, mesh)
        params = shard(params, param_specs(params), mesh)
        batch_sharding = NamedSharding(mesh, P("data"))
    else:
        if loss is None:
            loss = partial(loss_fn if cfg.attention == "softjax" else plain_loss_fn, cfg)
        batch_sharding = None
    opt_state = optimizer.init(params)
    step = jax.jit(make_step(cfg, loss, optimizer), donate_argnums=(0, 1))
    batches = train_batches(data, ids, cfg)
    losses = []
    tokens = 0
    t0 = time.perf_counter()
    t_start = None  # after the first (compiling) step
    for i in range(cfg.steps):
        batch = next(batches)
        if batch_sharding is not None:
            batch = jax.device_put(batch, batch_sharding)
        params, opt_state, value = step(params, opt_state, batch)
        losses.append(float(value))
        if i == 0:
            t_start = time.perf_counter()
        else:
            tokens += cfg.batch * cfg.seq_len
        rate = tokens / max(time.perf_counter() - t_start, 1e-9)
        if log is not None and (i % 10 == 0 or i == cfg.steps - 1):
            print(
                f"\rstep {i + 1:5d}/{cfg.steps}  loss {losses[-1]:.4f}  {rate:8.0f} tok/s",
                end="",
                file=log,
                flush=True,
            )
    if log is not None:
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=log)
    return params, np.array(losses), tokens / max(time.perf_counter() - t_start, 1e-9)


@partial(jax.jit, static_argnums=0)
def _eval_rows(cfg: Config, params, batch):
    """Per-token loss in nats ``[B, T]`` (no smoothing, no z-loss) and the logits' hidden."""
    h = hidden(cfg, params, batch)
    return softjax.linear_cross_entropy(
        h, params["embed"], batch["labels"], where=batch["valid"], reduction="none"
    )


def heldout_bits(cfg: Config, params, max_rows: int = 512) -> float:
    """Held-out bits per byte (each held-out byte that has a predecessor in its document)."""
    _, held = corpus()
    data, ids = stream(held)
    total, count = 0.0, 0
    for batch in eval_batches(data, ids, cfg.seq_len, cfg.batch, max_rows):
        nats = np.asarray(_eval_rows(cfg, params, batch))
        total += float(nats[batch["valid"]].sum())
        count += int(batch["valid"].sum())
    return total / count / math.log(2)


@partial(jax.jit, static_argnums=0)
def _scores(cfg: Config, params, batch):
    """``log p`` of each next byte and the entropy of each prediction ``[B, T]`` (0 where not
    valid), by :func:`softjax.linear_log_probs`: the scores of reranking and perplexity."""
    h = hidden(cfg, params, batch)
    return softjax.linear_log_probs(
        h, params["embed"], batch["labels"], where=batch["valid"], return_entropy=True
    )


def heldout_scores(cfg: Config, params, max_rows: int = 512) -> dict:
    """Scoring of the held-out rows: bits per byte from the summed ``log p`` (the held-out
    loss again, by another function), the mean entropy of the predictions in bits, and the
    rows' mean ``log p`` per byte (a sequence score) at its best and worst."""
    _, held = corpus()
    data, ids = stream(held)
    total, entropy, count, per_row = 0.0, 0.0, 0, []
    for batch in eval_batches(data, ids, cfg.seq_len, cfg.batch, max_rows):
        log_p, ent = (np.asarray(a, np.float64) for a in _scores(cfg, params, batch))
        valid = batch["valid"]
        total += float(log_p[valid].sum())
        entropy += float(ent[valid].sum())
        count += int(valid.sum())
        has = valid.sum(-1) > 0
        per_row += list(log_p.sum(-1)[has] / valid.sum(-1)[has])
    return {
        "bits": -total / count / math.log(2),
        "entropy_bits": entropy / count / math.log(2),
        "best_row_bits": -max(per_row) / math.log(2),
        "worst_row_bits": -min(per_row) / math.log(2),
    }


def distill_loss_fn(student: Config, teacher: Config, teacher_params, temperature: float):
    """``loss(params, batch)``: the forward KL from the teacher's next-byte distribution to
    the student's at ``temperature``, times ``T²`` (Hinton et al.), by
    :func:`softjax.linear_kl_divergence` (the two hidden sizes differ; the teacher is a
    constant)."""
    teacher_params = jax.tree.map(jnp.asarray, teacher_params)  # host arrays too

    def loss(params, batch):
        h_t = hidden(teacher, teacher_params, batch)
        h_s = hidden(student, params, batch)
        return softjax.linear_kl_divergence(
            h_s, params["embed"], h_t, teacher_params["embed"], temperature=temperature,
            where=batch["valid"], multiply_by_temperature_squared=True,
        )  # fmt: skip

    return loss


def distill(student: Config, teacher: Config, teacher_params, temperature=2.0, log=sys.stderr):
    """A student trained from the teacher's distributions alone, and the same student trained
    on the labels, for the same steps: ``(params, bits, bits_from_labels, losses)``, the
    distilled student's parameters, the two students' held-out bits per byte and the
    distillation losses."""
    loss = distill_loss_fn(student, teacher, teacher_params, temperature)
    distilled, kl, _ = train(student, log=log, loss=loss)
    plain, _, _ = train(student, log=log)
    return distilled, heldout_bits(student, distilled), heldout_bits(student, plain), kl


def baseline_bits() -> tuple[float, float]:
    """Held-out bits per byte of the unigram and the bigram models of the train part."""
    train_docs, held = corpus()
    return unigram_bits(stream(train_docs)[0], stream(held)[0]), bigram_bits(train_docs, held)


@partial(jax.jit, static_argnums=0)
def _logits(cfg: Config, params, batch):
    return hidden(cfg, params, batch) @ params["embed"].T  # [B, T, V]: small here


def heldout_logits(cfg: Config, params, rows: int = 64):
    """Logits ``[M, V]`` and labels ``[M]`` of the valid positions of ``rows`` held-out rows."""
    _, held = corpus()
    data, ids = stream(held)
    zs, ys = [], []
    for batch in eval_batches(data, ids, cfg.seq_len, cfg.batch, rows):
        z = np.asarray(_logits(cfg, params, batch))
        zs.append(z[batch["valid"]])
        ys.append(batch["labels"][batch["valid"]])
    return np.concatenate(zs), np.concatenate(ys)


def calibration_split(logits, labels):
    """``((logits, labels) to fit on, (logits, labels) to score)``: alternate positions, so
    both halves come from the same held-out documents and a shift of topic between the two
    halves does not pass for miscalibration."""
    return (logits[0::2], labels[0::2]), (logits[1::2], labels[1::2])


def calibration_report(logits, labels, n_bins: int = 15) -> dict:
    """Temperature fitted on one half of the positions; on the other, before and after, the
    ECE of the top-1 confidence and the NLL in bits per byte (what the fit minimises)."""
    (z_fit, y_fit), (z, y) = calibration_split(jnp.asarray(logits), jnp.asarray(labels))
    t = calibration.fit_temperature(z_fit, y_fit)
    bits = lambda z: float(softjax.cross_entropy(z, y)) / math.log(2)  # noqa: E731
    return {
        "temperature": float(t),
        "ece_before": float(calibration.expected_calibration_error(z, y, n_bins=n_bins)),
        "ece_after": float(calibration.expected_calibration_error(z / t, y, n_bins=n_bins)),
        "bits_before": bits(z),
        "bits_after": bits(z / t),
    }


def generate(
    cfg: Config, params, prompt: str, n: int = 300, temperature=0.8, top_p=0.95, seed=0
) -> str:
    """Continues ``prompt`` byte by byte with :func:`softjax.sample` (no KV cache: the model
    runs on the last ``T`` bytes, one fixed shape, compiled once)."""

    @jax.jit
    def next_byte(params, key, window, pos):  # window [1, T]; predict after index pos
        batch = {
            "tokens": window,
            "segment_ids": jnp.zeros_like(window),
            "positions": jnp.arange(cfg.seq_len, dtype=jnp.int32)[None],
        }
        h = hidden(cfg, params, batch)[0, pos]
        return softjax.sample(key, h @ params["embed"].T, temperature=temperature, top_p=top_p)

    out = list(prompt.encode("utf-8"))
    key = jax.random.key(seed)
    for _ in range(n):
        ctx = out[-cfg.seq_len :]
        window = np.zeros((1, cfg.seq_len), np.int32)
        window[0, : len(ctx)] = ctx
        key, sub = jax.random.split(key)
        out.append(int(next_byte(params, sub, window, len(ctx) - 1)))
    return bytes(out).decode("utf-8", errors="replace")


def plot_losses(losses, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, label="train loss (nats, smoothed targets + z-loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# --plain: the same training step from jax.nn + x @ w.T + optax, side by side


def random_batch(cfg: Config, seed: int = 0) -> dict:
    """A packed batch of random tokens in ``[0, cfg.vocab)`` (two segments a row), for timing."""
    rng = np.random.default_rng(seed)
    n = cfg.batch * (cfg.seq_len + 1)
    data = rng.integers(0, cfg.vocab, size=n).astype(np.int32)
    ids = np.repeat(np.arange(2 * cfg.batch, dtype=np.int32), -(-n // (2 * cfg.batch)))[:n]
    starts = np.arange(cfg.batch) * (cfg.seq_len + 1)
    return pack(data, ids, starts, cfg.seq_len)


def compare_steps(cfg: Config, reps: int = 5) -> dict:
    """Step time (median, interleaved) and compiled temp memory: softjax vs plain."""
    from bench.harness import median_times, temp_bytes

    plain_cfg = dataclasses.replace(cfg, attention="plain")
    params = init_params(cfg)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    batch = random_batch(cfg)
    ours = make_step(cfg, partial(loss_fn, cfg), optimizer)
    theirs = make_step(plain_cfg, partial(plain_loss_fn, plain_cfg), optimizer)
    args = (params, opt_state, batch)
    t_ours, t_theirs = median_times([jax.jit(ours), jax.jit(theirs)], args, reps=reps, warmup=1)
    return {
        "softjax_ms": 1e3 * t_ours,
        "plain_ms": 1e3 * t_theirs,
        "time_ratio": t_ours / t_theirs,
        "softjax_MiB": temp_bytes(ours, *args) / 2**20,
        "plain_MiB": temp_bytes(theirs, *args) / 2**20,
    }


def run_comparison(cfg: Config, large: Config, reps: int = 5) -> None:
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}")
    print("one training step (forward, backward, adamw): softjax vs jax.nn + x @ w.T + optax")
    head = f"{'size':>34} {'softjax ms':>11} {'plain ms':>9} {'ratio':>6} {'softjax MiB':>12}"
    print(head + f" {'plain MiB':>10} {'mem ratio':>9}")
    for name, c, r in (("default", cfg, reps), ("long context, large vocab", large, 3)):
        row = compare_steps(c, reps=r)
        size = f"{name} (B={c.batch} T={c.seq_len} V={c.vocab})"
        print(
            f"{size:>34} {row['softjax_ms']:11.1f} {row['plain_ms']:9.1f} "
            f"{row['time_ratio']:6.2f} {row['softjax_MiB']:12.1f} {row['plain_MiB']:10.1f} "
            f"{row['softjax_MiB'] / row['plain_MiB']:9.3f}",
            flush=True,
        )


# ---------------------------------------------------------------------------------------
# Entry point


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m softjax.examples.tiny_lm", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--batch", type=int, default=Config.batch)
    ap.add_argument("--seq-len", type=int, default=Config.seq_len)
    ap.add_argument("--d-model", type=int, default=Config.d_model)
    ap.add_argument("--layers", type=int, default=Config.n_layers)
    ap.add_argument("--heads", type=int, default=Config.n_heads)
    ap.add_argument("--lr", type=float, default=Config.lr)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="softjax vs plain step comparison")
    ap.add_argument("--large-seq-len", type=int, default=2048, help="--plain large size: T")
    ap.add_argument("--large-vocab", type=int, default=32768, help="--plain large size: V")
    ap.add_argument("--large-batch", type=int, default=2, help="--plain large size: B")
    ap.add_argument("--out", default="bench_out", help="folder for the loss curve PNG")
    ap.add_argument(
        "--distill", action="store_true", help="then distill a smaller student from the model"
    )
    ap.add_argument("--student-d-model", type=int, default=64, help="--distill: student's D")
    ap.add_argument("--student-layers", type=int, default=2, help="--distill: its layers")
    ap.add_argument("--distill-temperature", type=float, default=2.0, help="--distill: T")
    args = ap.parse_args(argv)
    cfg = Config(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq_len,
        batch=args.batch,
        steps=args.steps,
        lr=args.lr,
    )
    if args.plain:
        large = dataclasses.replace(
            cfg, seq_len=args.large_seq_len, vocab=args.large_vocab, batch=args.large_batch
        )
        run_comparison(cfg, large)
        return
    if args.devices > 1 and jax.device_count() < args.devices:
        raise SystemExit(f"--devices {args.devices} but jax sees {jax.device_count()} devices")
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; {cfg}")
    params, losses, rate = train(cfg, devices=args.devices)
    params = jax.device_get(params)
    bits, (uni, bi) = heldout_bits(cfg, params), baseline_bits()
    print(
        f"held-out: {bits:.3f} bits/byte (baselines: unigram {uni:.3f}, bigram {bi:.3f}); "
        f"{rate:.0f} tok/s"
    )
    sc = heldout_scores(cfg, params)
    print(
        f"scoring (linear_log_probs): {sc['bits']:.3f} bits/byte, prediction entropy "
        f"{sc['entropy_bits']:.3f} bits; rows from {sc['best_row_bits']:.3f} to "
        f"{sc['worst_row_bits']:.3f} bits/byte"
    )
    cal = calibration_report(*heldout_logits(cfg, params, rows=128))
    print(
        f"calibration (next byte, held-out): ECE {cal['ece_before']:.4f} -> "
        f"{cal['ece_after']:.4f} after T = {cal['temperature']:.3f}"
    )
    print("sample (temperature 0.8, top_p 0.95):")
    print(generate(cfg, params, "The with statement "))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tiny_lm_loss.png")
    plot_losses(losses, path, f"{cfg.n_layers} layers, d={cfg.d_model}, {args.devices} device(s)")
    print(f"loss curve: {path}")
    if args.distill:
        student = dataclasses.replace(
            cfg, d_model=args.student_d_model, n_layers=args.student_layers
        )
        t = args.distill_temperature
        print(f"distilling a student (D={student.d_model}, {student.n_layers} layers) at T={t}")
        _, distilled, from_labels, _ = distill(student, cfg, params, t)
        print(
            f"student held-out: distilled {distilled:.3f} bits/byte, trained on the labels "
            f"{from_labels:.3f} (teacher {bits:.3f})"
        )


if __name__ == "__main__":
    main()
