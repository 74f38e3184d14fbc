"""The hand-written backward passes and the hashed dropout masks against plain JAX.

`grouped_attention` and `lora_product` define their own VJPs to keep less for the backward
pass, so their gradients must equal autodiff of the textbook formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbjax.models.attention import attention_mask, dot_product_attention
from cbjax.models.dropout import keep_mask
from cbjax.models.layers import lora_product


def textbook_attention(q, k, v, mask):
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k) * head_dim**-0.5
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(batch, seq, heads, head_dim)


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_attention_gradients_match_autodiff(sliding_window):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (3, 7, 6, 8))
    k = jax.random.normal(keys[1], (3, 7, 2, 8))
    v = jax.random.normal(keys[2], (3, 7, 2, 8))
    weights = jax.random.normal(keys[3], q.shape)
    # Right padding, left padding (two query rows with no valid key) and no padding.
    valid = jnp.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    mask = attention_mask(jnp.arange(7), jnp.arange(7), valid, sliding_window)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask) * weights)

    np.testing.assert_allclose(dot_product_attention(q, k, v, mask), textbook_attention(q, k, v, mask), atol=1e-6)
    ours = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(textbook_attention), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", ours, expected):
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("with_mask", [False, True])
def test_lora_product_gradients_match_autodiff(with_mask):
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (10, 6))
    lora_a = jax.random.normal(keys[1], (6, 3))
    lora_b = jax.random.normal(keys[2], (3, 5))
    weights = jax.random.normal(keys[3], (10, 5))
    keep = jax.random.bernoulli(keys[4], 0.7, x.shape) if with_mask else None
    scale, keep_prob = 2.5, 0.7

    def textbook(x, a, b):
        dropped = x if keep is None else jnp.where(keep, x / keep_prob, 0.0)
        return jnp.sum(scale * (dropped @ a @ b) * weights)

    def ours(x, a, b):
        return jnp.sum(lora_product(x, a, b, keep, scale, keep_prob) * weights)

    np.testing.assert_allclose(ours(x, lora_a, lora_b), textbook(x, lora_a, lora_b), rtol=1e-6)
    got = jax.grad(ours, argnums=(0, 1, 2))(x, lora_a, lora_b)
    want = jax.grad(textbook, argnums=(0, 1, 2))(x, lora_a, lora_b)
    for name, g, w in zip(("x", "lora_a", "lora_b"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


def test_keep_mask_rate_independence_and_determinism():
    shape, keep = (1024, 576), 0.95
    first = np.asarray(keep_mask(jax.random.key(0), shape, keep))
    again = np.asarray(keep_mask(jax.random.key(0), shape, keep))
    other = np.asarray(keep_mask(jax.random.key(1), shape, keep))
    n = first.size
    sigma = np.sqrt(keep * (1 - keep) / n)

    assert first.shape == shape
    assert first.dtype == bool
    assert np.array_equal(first, again)
    assert abs(first.mean() - keep) < 5 * sigma
    # Independent masks agree where both keep or both drop.
    agreement = keep**2 + (1 - keep) ** 2
    assert abs((first == other).mean() - agreement) < 5 * np.sqrt(agreement * (1 - agreement) / n)
    # Neighbours along either axis are uncorrelated.
    values = first.astype(np.float64)
    assert abs(np.corrcoef(values[:, :-1].ravel(), values[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(values[:-1].ravel(), values[1:].ravel())[0, 1]) < 0.01


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_keep_mask_rate_on_small_and_3d_shapes(keep):
    masks = np.stack([np.asarray(keep_mask(jax.random.key(seed), (4, 8, 16), keep)) for seed in range(200)])
    sigma = np.sqrt(keep * (1 - keep) / masks.size)
    assert abs(masks.mean() - keep) < 5 * sigma
