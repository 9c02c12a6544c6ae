"""softjax.flax: the attention_fn adapters inside Flax's own attention modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softjax.flax

linen = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")


def _row_complete_mask(b, t, s, seed=0):
    """A random boolean mask in which every query row keeps at least one key."""
    mask = np.random.default_rng(seed).random((b, 1, t, s)) < 0.6
    mask[..., 0] = True
    return jnp.asarray(mask)


@pytest.mark.parametrize("impl", ["xla", "chunked", "pallas"])
def test_linen_module_matches_flax_attention(impl):
    nn = linen
    x = jax.random.normal(jax.random.key(0), (2, 3, 24, 16), jnp.float32)  # two batch axes
    mask = _row_complete_mask(6, 24, 24).reshape(2, 3, 1, 24, 24)
    ours = nn.MultiHeadDotProductAttention(
        num_heads=4,
        attention_fn=softjax.flax.make_attention_fn(implementation=impl, block_q=8, block_k=16),
    )
    theirs = nn.MultiHeadDotProductAttention(num_heads=4)
    params = theirs.init(jax.random.key(1), x, mask=mask)

    @jax.jit
    def run(params):
        outs = ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask)
        grads = [
            jax.grad(lambda p, m=m: jnp.sum(m.apply(p, x, mask=mask) ** 2))(params)
            for m in (ours, theirs)
        ]
        return outs, grads

    (out_ours, out_theirs), (g_ours, g_theirs) = run(params)
    np.testing.assert_allclose(out_ours, out_theirs, rtol=2e-5, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_nnx_module_matches_flax_attention():
    x = jax.random.normal(jax.random.key(2), (2, 20, 16), jnp.float32)
    mask = _row_complete_mask(2, 20, 20, seed=3)
    kw = dict(num_heads=4, in_features=16, decode=False)
    ours = nnx.MultiHeadAttention(
        **kw,
        attention_fn=softjax.flax.make_attention_fn(implementation="chunked", block_q=8),
        rngs=nnx.Rngs(0),
    )
    theirs = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), rtol=2e-5, atol=2e-5)
    causal = nnx.make_causal_mask(jnp.ones((2, 20)))
    np.testing.assert_allclose(ours(x, mask=causal), theirs(x, mask=causal), rtol=2e-5, atol=2e-5)


def test_adapter_gives_zero_on_fully_masked_rows_and_refuses_sow():
    q = jax.random.normal(jax.random.key(4), (1, 5, 2, 8))
    mask = jnp.ones((1, 1, 5, 5), bool).at[..., 2, :].set(False)
    out = softjax.flax.dot_product_attention(q, q, q, mask=mask)
    np.testing.assert_array_equal(out[0, 2], 0.0)
    with pytest.raises(NotImplementedError, match="sow"):
        softjax.flax.dot_product_attention(q, q, q, module=object())


def test_adapter_dropout_follows_deterministic():
    q = jax.random.normal(jax.random.key(5), (1, 6, 2, 8))
    fn = softjax.flax.dot_product_attention
    kw = dict(dropout_rate=0.5, dropout_rng=jax.random.key(6))
    plain = fn(q, q, q)
    np.testing.assert_array_equal(fn(q, q, q, deterministic=True, **kw), plain)
    assert not np.allclose(fn(q, q, q, deterministic=False, **kw), plain)
