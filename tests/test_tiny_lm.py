"""The tiny-LM training script: packing, the loss against its plain twin, a short run, and
sharded training (8 virtual devices, a 2 x 4 data x model mesh) against one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softjax.examples import tiny_lm as tl

# A model small enough that compiling and 20 steps take a few seconds.
TINY = tl.Config(d_model=32, n_layers=1, n_heads=2, seq_len=32, batch=8, steps=20, lr=1e-2)


@pytest.fixture(scope="module")
def single_run():
    return tl.train(TINY, devices=1, log=None)


@pytest.fixture(scope="module")
def sharded_run():
    return tl.train(TINY, devices=8, log=None)


def test_pack_segments_positions_and_valid():
    # Two documents: [10, 11, 12] and [20, 21, 22, 23]; one row of T=5 from offset 1.
    data = np.array([10, 11, 12, 20, 21, 22, 23], np.int32)
    ids = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
    b = tl.pack(data, ids, np.array([1]), 5)
    np.testing.assert_array_equal(b["tokens"], [[11, 12, 20, 21, 22]])
    np.testing.assert_array_equal(b["labels"], [[12, 20, 21, 22, 23]])
    np.testing.assert_array_equal(b["segment_ids"], [[0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 0, 1, 2]])
    # 12 -> 20 crosses a document boundary: not a prediction to train on.
    np.testing.assert_array_equal(b["valid"], [[True, False, True, True, True]])


def test_unigram_bits_of_a_uniform_stream():
    data = np.arange(256 * 4, dtype=np.int32) % 256
    np.testing.assert_allclose(tl.unigram_bits(data, data), 8.0, rtol=1e-12)


def test_softjax_loss_equals_plain_loss():
    # Same parameters, same batch: the fused path equals jax.nn attention + x @ w.T + optax.
    params = tl.init_params(TINY)
    batch = tl.random_batch(TINY)
    plain = dataclasses.replace(TINY, attention="plain")
    ours, grads = jax.jit(jax.value_and_grad(lambda p: tl.loss_fn(TINY, p, batch)))(params)
    ref, rgrads = jax.jit(jax.value_and_grad(lambda p: tl.plain_loss_fn(plain, p, batch)))(params)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(rgrads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_training_decreases_the_loss(single_run):
    params, losses, rate = single_run
    assert losses.shape == (TINY.steps,)
    assert np.all(np.isfinite(losses)) and rate > 0
    # From ~ln(256) = 5.5 nats at the start, a tiny model learns the byte frequencies fast.
    assert losses[-3:].mean() < losses[0] - 1.0, losses
    for leaf in jax.tree.leaves(params):
        assert np.all(np.isfinite(leaf))


def test_eval_sample_and_calibration_are_finite(single_run):
    params = jax.device_get(single_run[0])
    bits = tl.heldout_bits(TINY, params, max_rows=16)
    assert np.isfinite(bits) and 0 < bits < 8.5
    logits, labels = tl.heldout_logits(TINY, params, rows=16)
    assert logits.shape == (labels.shape[0], tl.VOCAB)
    cal = tl.calibration_report(logits, labels)
    assert all(np.isfinite(v) for v in cal.values()), cal
    assert cal["temperature"] > 0
    text = tl.generate(TINY, params, "def ", n=8)
    assert text.startswith("def ") and len(text.encode("utf-8", "replace")) >= 8


def test_sharded_steps_equal_single_device_steps(single_run, sharded_run):
    assert jax.device_count() >= 8
    params, losses, _ = single_run
    sparams, slosses, _ = sharded_run
    # Equal up to the order of the sums (measured: 1.5e-7 relative on the losses, 2.4e-7 on
    # the parameters after 20 adamw steps).
    np.testing.assert_allclose(slosses, losses, rtol=1e-6)
    # The embedding stayed sharded over the vocabulary: 256 / 4 rows a device.
    assert sparams["embed"].addressable_shards[0].data.shape == (64, TINY.d_model)
    for a, b in zip(jax.tree.leaves(jax.device_get(sparams)), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_scores_give_the_heldout_loss_again(single_run):
    params = single_run[0]
    scores = tl.heldout_scores(TINY, params, max_rows=32)
    np.testing.assert_allclose(scores["bits"], tl.heldout_bits(TINY, params, 32), rtol=1e-5)
    assert 0 < scores["entropy_bits"] < 8  # at most log2(256) for a byte
    assert scores["best_row_bits"] <= scores["bits"] <= scores["worst_row_bits"]


@pytest.mark.slow  # trains a student (14 s); the divergences are tested in test_vocab_distill.py
def test_distillation_trains_the_student_toward_the_teacher(single_run):
    teacher = single_run[0]
    student = dataclasses.replace(TINY, d_model=16, steps=15)
    loss = tl.distill_loss_fn(student, TINY, teacher, temperature=2.0)
    params, kl, _ = tl.train(student, log=None, loss=loss)
    assert np.all(np.isfinite(kl)) and kl[-3:].mean() < 0.5 * kl[:3].mean(), kl
    # The loss is T² KL(teacher || student) over the valid positions: check one batch.
    batch = tl.random_batch(student)
    h_s, h_t = tl.hidden(student, params, batch), tl.hidden(TINY, teacher, batch)
    lt = jax.nn.log_softmax(h_t @ teacher["embed"].T / 2.0)
    ls = jax.nn.log_softmax(h_s @ params["embed"].T / 2.0)
    rows = jnp.sum(jnp.exp(lt) * (lt - ls), -1)
    valid = batch["valid"]
    want = 4.0 * jnp.sum(jnp.where(valid, rows, 0.0)) / jnp.sum(valid)
    np.testing.assert_allclose(loss(params, batch), want, rtol=1e-5)
